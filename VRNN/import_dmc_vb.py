"""Import DMC-VB (or any RLDS-in-TFRecord) episodes into a split folder of VRNN/hdf5_io.py, without
TensorFlow.

    python VRNN/import_dmc_vb.py shards/walker-train.tfrecord-* --out data/dmc_vb/walker-walk/train --env walker-walk

Layouts read (one TFRecord record = one RLDS episode of L steps; every step feature holds L entries):

* ``tf.train.Example`` with flattened step features, as TFDS 4.9 serialises an RLDS builder: the
  ``steps`` dataset becomes ``steps/<path>`` keys, each concatenating all L steps. Plain tensors:
  frames a bytes_list of L PNG (or JPEG) images, ``steps/action`` a float_list of L*A values
  (step-major), state fields float_lists, ``steps/reward`` / ``steps/discount`` float_lists of L,
  ``steps/is_first`` / ``is_last`` / ``is_terminal`` int64_lists of L. Tensors with TFDS's
  ``encoding='zlib'`` (or ``'bytes'``): a bytes_list of L entries, each the (zlib-compressed) raw bytes of
  one step's tensor, e.g. 8·A bytes of float64 actions or 64·64·3 bytes of a frame.
* ``tf.train.SequenceExample`` with the same names in ``feature_lists``: one Feature per step.

How each key is decoded: from ``features.json`` when it lies beside the shards (TFDS writes it with every
feature's dtype, shape and encoding; ``--features`` names another), otherwise by inspection: PNG and
JPEG by their signatures, zlib by a valid header that also decompresses (a raw frame that merely starts
with 0x78 stays raw), raw frames by their byte count, and the dtype of a bytes tensor from its byte count
and the step count (float64 or float32, whichever gives plausible values; an ambiguous key is an error
naming the shard, record and key). Frame keys: ``steps/observation/pixels`` (DMC-VB locomotion),
``.../image``, and the ant-maze cameras (``lowres_top_camera``, ``walker/egocentric_camera``,
``walker/follow_camera`` and their ``_hidden_target`` variants); ``--camera-key`` picks one. Episodes
are written in record order (TFDS stores them in hashed-key order, which is fine: every step stays in
order inside its episode). State fields and metadata are ignored.

Records are framed and checked as TFRecord specifies (length, masked CRC-32C of length and of data); a
bad checksum or a truncated record is an error naming the shard, the record and its byte offset. Each
episode is written as its own file, so an interrupted import keeps every finished episode, and running
it again with the same shards imports the rest.
RLDS rows already follow this project's convention (row t: x_t, a_t, r_t after a_t), so rows are copied
one to one. Seeds are unknown for imported data and stored as -1.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from VRNN.hdf5_io import DataFileError, DiskFullError, EpisodeWriter, Split, list_episode_files, remove_split

__all__ = ["FeatureSpec", "decode_frame", "import_shards", "load_features", "main", "parse_episode", "read_tfrecord"]

logger = logging.getLogger(__name__)

PIXEL_KEYS = ("steps/observation/pixels", "steps/observations/pixels", "steps/observation/image",
              "steps/observation/lowres_top_camera", "steps/observation/walker/egocentric_camera",
              "steps/observation/walker/follow_camera", "steps/observation/lowres_top_camera_hidden_target",
              "steps/observation/walker/egocentric_camera_hidden_target",
              "steps/observation/walker/follow_camera_hidden_target")
SCALAR_KEYS = ("steps/reward", "steps/is_first", "steps/is_last", "steps/is_terminal")
FEATURES_FILE = "features.json"
_MASK_DELTA = 0xA282EAD8
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


class FeatureSpec(NamedTuple):
    """One feature of ``features.json``: ``kind`` "image" or "tensor", numpy ``dtype``, per-step ``shape``
    (-1 for an unknown size), ``encoding`` "none" / "bytes" / "zlib" (tensors) or "png" / "jpeg" (images)."""

    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    encoding: str


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


# --------------------------------------------------------------------------------------------------
# features.json
def _get(node: dict, *names: str) -> Any:
    for name in names:
        if name in node:
            return node[name]
    return None


def _shape(node: dict) -> tuple[int, ...]:
    dims = (_get(node, "shape") or {}).get("dimensions", [])
    return tuple(int(d) for d in dims)


def _walk(node: dict, prefix: str, out: dict[str, FeatureSpec]) -> None:
    features = _get(node, "featuresDict", "features_dict")
    if features is not None:
        for name, child in features.get("features", {}).items():
            _walk(child, f"{prefix}/{name}" if prefix else name, out)
        return
    sequence = _get(node, "sequence")
    if sequence is not None:  # a Dataset / Sequence: its steps are flattened under the same prefix
        _walk(sequence.get("feature", {}), prefix, out)
        return
    image = _get(node, "image")
    if image is not None:
        fmt = str(_get(image, "encodingFormat", "encoding_format") or "png").lower()
        out[prefix] = FeatureSpec("image", np.dtype(image.get("dtype", "uint8")), _shape(image), fmt)
        return
    tensor = _get(node, "tensor")
    if tensor is not None:
        dtype = str(tensor.get("dtype", "float32"))
        out[prefix] = FeatureSpec("tensor", np.dtype("bool" if dtype == "bool" else dtype), _shape(tensor),
                                  str(tensor.get("encoding", "none") or "none").lower())


def load_features(path: str | Path) -> dict[str, FeatureSpec]:
    """``features.json`` (as TFDS writes it beside the shards) -> ``{"steps/action": FeatureSpec, ...}``."""
    path = Path(path)
    try:
        root = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable features.json ({err})") from err
    out: dict[str, FeatureSpec] = {}
    _walk(root, "", out)
    if not out:
        raise ValueError(f"{path}: no tensor or image features found (expected TFDS's FeaturesDict JSON)")
    return out


# --------------------------------------------------------------------------------------------------
# Decoding
def _zlib_header(blob: bytes) -> bool:
    return len(blob) >= 2 and blob[0] & 0x0F == 8 and blob[0] >> 4 <= 7 and ((blob[0] << 8) | blob[1]) % 31 == 0


def _try_zlib(blob: bytes) -> bytes | None:
    if not _zlib_header(blob):
        return None
    try:
        return zlib.decompress(blob)
    except zlib.error:
        return None


def _square_rgb(raw: bytes) -> np.ndarray | None:
    side = round((len(raw) / 3) ** 0.5)
    if side > 0 and side * side * 3 == len(raw):
        return np.frombuffer(raw, dtype=np.uint8).reshape(side, side, 3).copy()
    return None


def decode_frame(blob: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """PNG, JPEG, zlib-compressed raw or raw RGB bytes -> uint8 [H,W,3] (``shape``: the expected
    [H,W,3] of raw bytes, from features.json; without it raw frames must be square)."""
    if blob[:8] == _PNG or blob[:3] == _JPEG:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)
    size = int(np.prod(shape)) if shape and all(d > 0 for d in shape) else None
    if size is not None and len(blob) == size:  # raw, even when its first byte looks like a zlib header
        return np.frombuffer(blob, dtype=np.uint8).reshape(shape).copy()
    raw = _try_zlib(blob)
    if raw is not None:
        if size is not None and len(raw) == size:
            return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()
        frame = _square_rgb(raw)
        if frame is not None and size is None:
            return frame
    frame = _square_rgb(blob) if size is None else None
    if frame is None:
        expected = f"{size} bytes for shape {tuple(shape)}" if size else "a square RGB image"
        raise ValueError(f"frame of {len(blob)} bytes is neither PNG, JPEG, zlib nor raw ({expected})")
    return frame


def _plausible(values: np.ndarray) -> bool:
    finite = np.isfinite(values)
    if not finite.all():
        return False
    mags = np.abs(values[values != 0])
    return bool(mags.size == 0 or (mags.max() < 1e6 and mags.min() > 1e-30))


def _infer_bytes(entries: list[bytes], per_step: int | None, where: str) -> np.ndarray:
    """Tensors stored as bytes without features.json: [L, n] values, dtype inferred from the byte count."""
    raws = [_try_zlib(b) or b for b in entries]
    sizes = {len(r) for r in raws}
    if len(sizes) != 1:
        raise ValueError(f"{where}: steps hold different byte counts {sorted(sizes)}; put the dataset's "
                         f"{FEATURES_FILE} beside the shards")
    nbytes = sizes.pop()
    buffer = b"".join(raws)
    candidates = []
    for dtype in (np.float64, np.float32):
        width = np.dtype(dtype).itemsize
        if nbytes % width or (per_step is not None and nbytes != per_step * width):
            continue
        values = np.frombuffer(buffer, dtype=dtype).reshape(len(raws), nbytes // width)
        if _plausible(values):
            candidates.append(values)
    if len(candidates) != 1:
        fits = "both float64 and float32" if candidates else "neither float64 nor float32"
        raise ValueError(f"{where}: cannot tell the dtype of {nbytes} bytes per step ({fits} fit); put the "
                         f"dataset's {FEATURES_FILE} beside the shards or pass --features")
    return candidates[0]


def _decode_tensor(entries: list, spec: FeatureSpec, steps: int, where: str) -> np.ndarray:
    """[L, *shape] values of one tensor key, decoded as ``spec`` says."""
    if spec.encoding in ("zlib", "bytes"):
        if not all(isinstance(e, bytes) for e in entries):
            raise ValueError(f"{where}: features.json says encoding '{spec.encoding}' but the values are not bytes")
        try:
            raws = [zlib.decompress(e) if spec.encoding == "zlib" else e for e in entries]
        except zlib.error as err:
            raise ValueError(f"{where}: a step does not decompress with zlib ({err})") from err
        values = np.frombuffer(b"".join(raws), dtype=spec.dtype.newbyteorder("<"))
    else:
        values = np.asarray(entries, dtype=np.float32 if spec.dtype.kind == "f" else np.int64)
        if spec.dtype.kind == "b":
            values = values.astype(bool)
    per_step = int(np.prod(spec.shape)) if all(d > 0 for d in spec.shape) else None
    if (values.size != steps * per_step) if per_step is not None else (values.size % steps != 0 or not values.size):
        raise ValueError(f"{where}: {values.size} values for {steps} steps of shape {spec.shape} "
                         f"(dtype {spec.dtype}, encoding {spec.encoding})")
    return values.reshape(steps, -1)


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


def parse_episode(record: bytes, where: str = "record", features: dict[str, FeatureSpec] | None = None,
                  camera_key: str | None = None) -> dict[str, np.ndarray]:
    """One serialised RLDS episode -> rows: obs uint8 [L,H,W,3], action float32 [L,A], reward float32 [L],
    is_first / is_last / is_terminal bool [L]. ``features``: from ``load_features`` (None: inspect)."""
    feats = _step_features(record)
    if camera_key is not None:
        key = camera_key if camera_key.startswith("steps/") else f"steps/observation/{camera_key}"
        if key not in feats:
            raise ValueError(f"{where}: camera key {key} not found; frame keys present: "
                             f"{sorted(k for k in feats if k in PIXEL_KEYS) or 'none'}")
        pixel_key = key
    else:
        pixel_key = next((k for k in PIXEL_KEYS if k in feats), None)
    missing = [k for k in ("steps/action",) + SCALAR_KEYS if k not in feats]
    if pixel_key is None or missing:
        raise ValueError(f"{where}: missing step features {missing + ([] if pixel_key else [PIXEL_KEYS[0]])}; "
                         f"found {sorted(feats)}")
    features = features or {}

    def flat(key: str) -> list:
        return [v for entry in feats[key] for v in entry]

    frames_bytes = flat(pixel_key)
    steps = len(frames_bytes)
    if steps == 0:
        raise ValueError(f"{where}: episode has no steps")
    counts = {pixel_key: steps}
    decoded: dict[str, np.ndarray] = {}
    for key in ("steps/action",) + SCALAR_KEYS:
        entries = flat(key)
        spec = features.get(key)
        if spec is not None:
            decoded[key] = _decode_tensor(entries, spec, steps, f"{where} key {key}")
        elif entries and isinstance(entries[0], bytes):
            counts[key] = len(entries)
            if len(entries) == steps:
                decoded[key] = _infer_bytes(entries, None if key == "steps/action" else 1, f"{where} key {key}")
        else:
            values = np.asarray(entries, dtype=np.float32 if key in ("steps/action", "steps/reward") else np.float64)
            if key == "steps/action":
                if len(feats[key]) > 1 and len(feats[key]) != steps:
                    counts["steps/action (per-step entries)"] = len(feats[key])
                if values.size % steps or values.size == 0:
                    counts[f"{key} values"] = values.size
                else:
                    decoded[key] = values.reshape(steps, -1)
            else:
                counts[key] = values.size
                decoded[key] = values
    if any(c != steps for c in counts.values()) or len(decoded) != len(SCALAR_KEYS) + 1:
        raise ValueError(f"{where}: inconsistent step counts {counts} (expected every step feature to hold "
                         f"{steps} entries and the action values a multiple of {steps})")
    spec = features.get(pixel_key)
    frame_shape = spec.shape if spec is not None else None
    try:
        frames = [decode_frame(b, frame_shape) for b in frames_bytes]
    except ValueError as err:
        raise ValueError(f"{where} key {pixel_key}: {err}") from err
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{where} key {pixel_key}: frames of different sizes {sorted({f.shape for f in frames})}")
    if frames[0].shape[0] != frames[0].shape[1]:
        raise ValueError(f"{where} key {pixel_key}: frames are {frames[0].shape[:2]}, this project needs square frames")
    return {
        "obs": np.stack(frames),
        "action": decoded["steps/action"].reshape(steps, -1).astype(np.float32),
        "reward": decoded["steps/reward"].reshape(steps).astype(np.float32),
        "is_first": decoded["steps/is_first"].reshape(steps).astype(bool),
        "is_last": decoded["steps/is_last"].reshape(steps).astype(bool),
        "is_terminal": decoded["steps/is_terminal"].reshape(steps).astype(bool),
    }


def import_shards(shards: Sequence[str | Path], out: str | Path, env: str = "unknown", camera: int = 0,
                  action_repeat: int = 2, policy: str = "dmc_vb", overwrite: bool = False,
                  features: str | Path | None = None, camera_key: str | None = None) -> int:
    """Convert every episode of ``shards`` (in order) into the split folder ``out`` (one file per episode);
    returns the number of episodes of ``shards`` that ``out`` holds (written now or by an earlier run).

    ``features``: a TFDS ``features.json`` (default: the one beside the first shard, when present). All
    shards are checked to exist before anything is written. An ``out`` holding episodes of the same
    shards (an interrupted import) is completed; one holding other episodes is an error unless
    ``overwrite``. A bad record stops the import with a ValueError; episodes already written stay.
    """
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("no shards given")
    absent = [str(s) for s in shards if not s.is_file()]
    if absent:
        raise FileNotFoundError(f"TFRecord shard(s) not found: {absent}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a split folder (e.g. data/dmc_vb/walker-walk/train)")
    source = ",".join(s.name for s in shards)
    done: set[int] = set()
    if out.is_dir() and list_episode_files(out):
        if overwrite:
            remove_split(out)
        else:
            existing = Split(out)  # DataFileError naming a damaged episode
            if existing.attrs.get("source") != source:
                raise FileExistsError(f"{out} holds episodes of other shards; pass --overwrite to replace them")
            done = set(existing.indices)  # an interrupted import of these shards: resume it
            logger.info("%s holds %d episodes of these shards; importing the rest", out, len(done))
    features_path = Path(features) if features is not None else shards[0].parent / FEATURES_FILE
    specs = load_features(features_path) if (features is not None or features_path.is_file()) else None
    if specs is not None:
        logger.info("decoding by %s", features_path)
    if env != "unknown":
        from VRNN.dmc_envs import resolve_env_name

        env = resolve_env_name(env).name
    writer: EpisodeWriter | None = None
    written = 0
    try:
        for shard in shards:
            for i, record in enumerate(read_tfrecord(shard)):
                if written in done:
                    written += 1
                    continue
                episode = parse_episode(record, where=f"{shard} record {i}", features=specs, camera_key=camera_key)
                if writer is None:
                    writer = EpisodeWriter(out, {
                        "env": env, "camera": int(camera), "action_repeat": int(action_repeat), "policy": policy,
                        "image_size": int(episode["obs"].shape[1]), "action_dim": int(episode["action"].shape[1]),
                        "source": source}, split=out.name)
                writer.write_episode(episode, seed=-1, index=written)
                written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ValueError(f"no episodes found in {[str(s) for s in shards]}")
    logger.info("imported %d episodes into %s", written, out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert DMC-VB TFRecord shards (RLDS episodes) into a split folder "
                                                 "(one HDF5 file per episode).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("shards", nargs="+", type=Path, help="TFRecord files, one RLDS episode per record")
    parser.add_argument("--out", type=Path, required=True,
                        help="split folder to write, e.g. data/dmc_vb/walker-walk/train")
    parser.add_argument("--env", default="unknown", help="task the shards come from, e.g. walker-walk")
    parser.add_argument("--camera", type=int, default=0, help="camera id recorded in the attributes")
    parser.add_argument("--camera-key", default=None,
                        help="frame feature to import, e.g. walker/egocentric_camera (default: the first of "
                             "pixels, image, lowres_top_camera, walker/egocentric_camera, walker/follow_camera)")
    parser.add_argument("--features", type=Path, default=None,
                        help=f"TFDS {FEATURES_FILE} giving each feature's dtype, shape and encoding "
                             f"(default: the one beside the first shard, if any)")
    parser.add_argument("--action-repeat", type=int, default=2, help="action repeat recorded in the attributes")
    parser.add_argument("--policy", default="dmc_vb", help="behaviour label recorded in the attributes")
    parser.add_argument("--overwrite", action="store_true", help="replace the episodes in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n = import_shards(args.shards, args.out, args.env, args.camera, args.action_repeat, args.policy,
                          args.overwrite, args.features, args.camera_key)
    except (ValueError, DataFileError, DiskFullError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
