"""Import DMC-VB (or any RLDS-in-TFRecord) episodes into the HDF5 format of VRNN/hdf5_io.py, without
TensorFlow.

    python VRNN/import_dmc_vb.py shard-00000-of-00010.tfrecord ... --out data/dmc_vb/train.h5 --env walker-walk

Layouts read (one TFRecord record = one RLDS episode of L steps; every step feature holds L entries):

* ``tf.train.Example`` with flattened step features (how TFDS serialises RLDS episodes):
  ``steps/observation/pixels`` bytes_list of L encoded frames; ``steps/action`` float_list of L*A
  values (step-major: the A values of step 0, then step 1, ...), so A = len / L;
  ``steps/reward`` float_list of L; ``steps/is_first``, ``steps/is_last``, ``steps/is_terminal``
  int64_list of L (0/1; a float_list is accepted too).
* ``tf.train.SequenceExample`` with the same names in ``feature_lists``: one Feature per step, the
  frame a 1-entry bytes_list, the action an A-entry float_list, the scalars 1-entry lists.

Frames may be PNG (as TFDS ``Image`` features are), zlib-compressed raw uint8 [S,S,3], or raw bytes.
The pixel key may also be spelled ``steps/observations/pixels`` or ``steps/observation/image``.
Records are framed and checked as TFRecord specifies (length, masked CRC-32C of length and of data);
a bad checksum or a truncated record is an error naming the shard, the record and its byte offset.

RLDS rows already follow this project's convention (row t: x_t, a_t, r_t after a_t), so rows are copied
one to one. Seeds are unknown for imported data and stored as -1.
"""

from __future__ import annotations

import argparse
import io
import logging
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from VRNN.hdf5_io import EpisodeWriter

__all__ = ["decode_frame", "import_shards", "main", "parse_episode", "read_tfrecord"]

logger = logging.getLogger(__name__)

PIXEL_KEYS = ("steps/observation/pixels", "steps/observations/pixels", "steps/observation/image")
SCALAR_KEYS = ("steps/reward", "steps/is_first", "steps/is_last", "steps/is_terminal")
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    import crc32c  # TFRecord's checksum is CRC-32C (Castagnoli), rotated and offset ("masked")

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path: str | Path) -> Iterator[bytes]:
    """Yield the records of a TFRecord file, verifying both checksums of every record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFRecord shard not found: {path}")
    with open(path, "rb") as f:
        index = 0
        while True:
            offset = f.tell()
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"{path}: record {index} at byte {offset} is truncated (header of {len(header)} bytes)")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise ValueError(f"{path}: record {index} at byte {offset} is corrupt (length checksum mismatch)")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise ValueError(f"{path}: record {index} at byte {offset} is truncated "
                                 f"({len(data)} of {length} data bytes)")
            if _masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: record {index} at byte {offset} is corrupt (data checksum mismatch)")
            yield data
            index += 1


def decode_frame(blob: bytes) -> np.ndarray:
    """PNG, zlib-compressed raw or raw RGB bytes -> uint8 [S,S,3]."""
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        frame = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)
        return frame
    raw = blob
    if blob[:1] == b"\x78":  # zlib header (0x78 0x01 / 0x5e / 0x9c / 0xda)
        try:
            raw = zlib.decompress(blob)
        except zlib.error as err:
            raise ValueError(f"frame looks zlib-compressed but does not decompress: {err}") from err
    side = round((len(raw) / 3) ** 0.5)
    if side * side * 3 != len(raw):
        raise ValueError(f"frame of {len(raw)} raw bytes is not a square RGB image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(side, side, 3).copy()


def _values(feature) -> list:
    kind = feature.WhichOneof("kind")
    if kind is None:
        return []
    return list(getattr(feature, kind).value)


def _step_features(record: bytes) -> dict[str, list[list]]:
    """Parse one record into ``key -> per-entry values``: for an Example one list of all values; for a
    SequenceExample one list per step."""
    from tfrecord import example_pb2

    seq = example_pb2.SequenceExample()
    try:
        seq.ParseFromString(record)
        is_sequence = len(seq.feature_lists.feature_list) > 0
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError; fall through to Example
        is_sequence = False
    if is_sequence:
        return {key: [_values(f) for f in fl.feature] for key, fl in seq.feature_lists.feature_list.items()}
    example = example_pb2.Example()
    try:
        example.ParseFromString(record)
    except Exception as err:
        raise ValueError(f"record is neither a tf.train.Example nor a SequenceExample: {err}") from err
    return {key: [_values(f)] for key, f in example.features.feature.items()}


def parse_episode(record: bytes, where: str = "record") -> dict[str, np.ndarray]:
    """One serialised RLDS episode -> rows: obs uint8 [L,S,S,3], action float32 [L,A], reward float32 [L],
    is_first / is_last / is_terminal bool [L]."""
    feats = _step_features(record)
    pixel_key = next((k for k in PIXEL_KEYS if k in feats), None)
    missing = [k for k in ("steps/action",) + SCALAR_KEYS if k not in feats]
    if pixel_key is None or missing:
        raise ValueError(f"{where}: missing step features {missing + ([] if pixel_key else [PIXEL_KEYS[0]])}; "
                         f"found {sorted(feats)}")

    def flat(key: str) -> list:
        return [v for entry in feats[key] for v in entry]

    frames_bytes = flat(pixel_key)
    steps = len(frames_bytes)
    if steps == 0:
        raise ValueError(f"{where}: episode has no steps")
    counts = {pixel_key: steps}
    for key in SCALAR_KEYS:
        counts[key] = len(flat(key))
    actions = np.asarray(flat("steps/action"), dtype=np.float32)
    if len(feats["steps/action"]) > 1 and len(feats["steps/action"]) != steps:
        counts["steps/action (per-step entries)"] = len(feats["steps/action"])
    if any(c != steps for c in counts.values()) or actions.size % steps != 0 or actions.size == 0:
        raise ValueError(f"{where}: inconsistent step counts {counts} with {actions.size} action values "
                         f"(expected every step feature to hold {steps} entries and the action values a "
                         f"multiple of {steps})")
    frames = [decode_frame(b) for b in frames_bytes]
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{where}: frames of different sizes {sorted({f.shape for f in frames})}")
    return {
        "obs": np.stack(frames),
        "action": actions.reshape(steps, -1),
        "reward": np.asarray(flat("steps/reward"), dtype=np.float32),
        "is_first": np.asarray(flat("steps/is_first")).astype(bool),
        "is_last": np.asarray(flat("steps/is_last")).astype(bool),
        "is_terminal": np.asarray(flat("steps/is_terminal")).astype(bool),
    }


def import_shards(shards: Sequence[str | Path], out: str | Path, env: str = "unknown", camera: int = 0,
                  action_repeat: int = 2, policy: str = "dmc_vb", overwrite: bool = False) -> int:
    """Convert every episode of ``shards`` (in order) into ``out``; returns the number of episodes written.

    All shards are checked to exist before anything is written. An existing ``out`` is an error unless
    ``overwrite``. A bad record stops the import with a ValueError; episodes already written stay valid.
    """
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("no shards given")
    absent = [str(s) for s in shards if not s.is_file()]
    if absent:
        raise FileNotFoundError(f"TFRecord shard(s) not found: {absent}")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        out.unlink()
    if env != "unknown":
        from VRNN.dmc_envs import resolve_env_name

        env = resolve_env_name(env).name
    writer: EpisodeWriter | None = None
    written = 0
    try:
        for shard in shards:
            for i, record in enumerate(read_tfrecord(shard)):
                episode = parse_episode(record, where=f"{shard} record {i}")
                if writer is None:
                    writer = EpisodeWriter(out, {
                        "env": env, "camera": int(camera), "action_repeat": int(action_repeat), "policy": policy,
                        "image_size": int(episode["obs"].shape[1]), "action_dim": int(episode["action"].shape[1]),
                        "source": ",".join(s.name for s in shards)})
                writer.write_episode(episode, seed=-1)
                written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ValueError(f"no episodes found in {[str(s) for s in shards]}")
    logger.info("imported %d episodes into %s", written, out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert DMC-VB TFRecord shards (RLDS episodes) to HDF5.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("shards", nargs="+", type=Path, help="TFRecord files, one RLDS episode per record")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument("--env", default="unknown", help="task the shards come from, e.g. walker-walk")
    parser.add_argument("--camera", type=int, default=0, help="camera id recorded in the file attributes")
    parser.add_argument("--action-repeat", type=int, default=2, help="action repeat recorded in the attributes")
    parser.add_argument("--policy", default="dmc_vb", help="behaviour label recorded in the attributes")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n = import_shards(args.shards, args.out, args.env, args.camera, args.action_repeat, args.policy, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {n} episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
