"""DMC-VB import: synthetic TFRecord shards written with the `tfrecord` package's writer (an
implementation independent of the importer's reader), several multi-step episodes, every step checked."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tfrecord.writer import TFRecordWriter

from VRNN.hdf5_check import verify
from VRNN.hdf5_io import Split, summary
from VRNN.import_dmc_vb import decode_frame, import_shards, load_features, parse_episode, read_tfrecord

REPO = Path(__file__).resolve().parents[1]
A = 3


def _episode(rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    flags = np.zeros(steps, dtype=np.int64)
    return {
        "obs": rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (steps, A)).astype(np.float32),
        "reward": rng.uniform(0, 1, steps).astype(np.float32),
        "is_first": np.eye(1, steps, 0, dtype=np.int64)[0],
        "is_last": np.eye(1, steps, steps - 1, dtype=np.int64)[0],
        "is_terminal": flags,
    }


def _assert_same(got: dict, expected: dict) -> None:
    assert np.array_equal(got["obs"], expected["obs"])  # every step, not only step 0
    np.testing.assert_array_equal(got["action"], np.asarray(expected["action"]).astype(np.float32))
    np.testing.assert_array_equal(got["reward"], np.asarray(expected["reward"]).astype(np.float32))
    for key in ("is_first", "is_last", "is_terminal"):
        assert np.array_equal(got[key], np.asarray(expected[key]).astype(bool)), key


def _encode(frame: np.ndarray, how: str) -> bytes:
    if how == "png":
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        return buf.getvalue()
    return zlib.compress(frame.tobytes())


def _write_shard(path: Path, episodes: list[dict], layout: str, encoding: str) -> None:
    writer = TFRecordWriter(str(path))
    for ep in episodes:
        pixels = [_encode(f, encoding) for f in ep["obs"]]
        if layout == "example":  # flattened: every steps/... feature holds all steps
            writer.write({
                "steps/observation/pixels": (pixels, "byte"),
                "steps/action": (ep["action"].reshape(-1).tolist(), "float"),
                "steps/reward": (ep["reward"].tolist(), "float"),
                "steps/is_first": (ep["is_first"].tolist(), "int"),
                "steps/is_last": (ep["is_last"].tolist(), "int"),
                "steps/is_terminal": (ep["is_terminal"].tolist(), "int"),
                "episode_id": (7, "int"),
            })
        else:  # SequenceExample: one Feature per step
            writer.write({"episode_id": (7, "int")}, {
                "steps/observation/pixels": ([[p] for p in pixels], "byte"),
                "steps/action": ([a.tolist() for a in ep["action"]], "float"),
                "steps/reward": ([[r] for r in ep["reward"].tolist()], "float"),
                "steps/is_first": ([[v] for v in ep["is_first"].tolist()], "int"),
                "steps/is_last": ([[v] for v in ep["is_last"].tolist()], "int"),
                "steps/is_terminal": ([[v] for v in ep["is_terminal"].tolist()], "int"),
            })
    writer.close()


@pytest.mark.parametrize("layout, encoding", [("example", "png"), ("example", "zlib"), ("sequence", "png")])
def test_round_trip_every_step(tmp_path, layout, encoding):
    rng = np.random.default_rng(0)
    shard_a = [_episode(rng, 5), _episode(rng, 7)]
    shard_b = [_episode(rng, 4)]
    _write_shard(tmp_path / "a.tfrecord", shard_a, layout, encoding)
    _write_shard(tmp_path / "b.tfrecord", shard_b, layout, encoding)
    out = tmp_path / "dmcvb" / "train"
    n = import_shards([tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"], out, env="walker_walk")
    assert n == 3
    assert verify(out) == []
    info = summary(out)
    assert info["episodes"] == 3 and info["episode_lengths"] == [5, 7, 4] and info["action_dim"] == A
    assert info["env"] == "walker-walk"
    split = Split(out)
    for i, expected in enumerate(shard_a + shard_b):
        _assert_same(split.read(i), expected)


def test_cli_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    _write_shard(tmp_path / "s.tfrecord", [_episode(rng, 3), _episode(rng, 6)], "example", "png")
    out = tmp_path / "o"
    cmd = [sys.executable, "VRNN/import_dmc_vb.py", str(tmp_path / "s.tfrecord"), "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert "2 episodes" in first.stdout and verify(out) == []
    first_bytes = (out / "ep_000001.h5").read_bytes()
    (out / "ep_000001.h5").unlink()  # as if the first run had been killed after one episode
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and "2 episodes" in again.stdout, again.stderr
    assert (out / "ep_000001.h5").read_bytes() == first_bytes and verify(out) == []
    _write_shard(tmp_path / "t.tfrecord", [_episode(rng, 4)], "example", "png")
    other = subprocess.run(cmd[:2] + [str(tmp_path / "t.tfrecord"), "--out", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=False)
    assert other.returncode == 2 and "--overwrite" in other.stderr and "Traceback" not in other.stderr
    replaced = subprocess.run(cmd + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert replaced.returncode == 0 and verify(out) == [] and summary(out)["episodes"] == 2
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope.tfrecord"), "--out", str(tmp_path / "z")],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr
    (tmp_path / "file").write_text("x")
    to_file = subprocess.run(cmd[:3] + ["--out", str(tmp_path / "file")], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=False)
    assert to_file.returncode == 2 and "is a file" in to_file.stderr and (tmp_path / "file").read_text() == "x"


def test_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
        import_shards([tmp_path / "nope.tfrecord"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_corrupt_record_is_reported_and_earlier_episodes_survive(tmp_path):
    rng = np.random.default_rng(2)
    shard = tmp_path / "c.tfrecord"
    _write_shard(shard, [_episode(rng, 3), _episode(rng, 3)], "example", "zlib")
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # flip a byte inside the second record's payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"record 1 at byte \d+ is corrupt \(data checksum mismatch\)"):
        import_shards([shard], tmp_path / "o")
    assert verify(tmp_path / "o") == [] and summary(tmp_path / "o")["episodes"] == 1
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        list(read_tfrecord(shard))


def test_inconsistent_step_counts(tmp_path):
    rng = np.random.default_rng(3)
    ep = _episode(rng, 4)
    shard = tmp_path / "i.tfrecord"
    writer = TFRecordWriter(str(shard))
    writer.write({
        "steps/observation/pixels": ([_encode(f, "png") for f in ep["obs"]], "byte"),
        "steps/action": (ep["action"].reshape(-1).tolist(), "float"),
        "steps/reward": (ep["reward"][:3].tolist(), "float"),  # one reward short
        "steps/is_first": (ep["is_first"].tolist(), "int"),
        "steps/is_last": (ep["is_last"].tolist(), "int"),
        "steps/is_terminal": (ep["is_terminal"].tolist(), "int"),
    })
    writer.close()
    with pytest.raises(ValueError, match=r"inconsistent step counts .*'steps/reward': 3"):
        import_shards([shard], tmp_path / "o")
    record = next(read_tfrecord(shard))
    with pytest.raises(ValueError, match="missing step features"):
        parse_episode(record[:0] + b"")


def test_decode_frame_variants():
    frame = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    assert np.array_equal(decode_frame(_encode(frame, "png")), frame)
    assert np.array_equal(decode_frame(_encode(frame, "zlib")), frame)
    assert np.array_equal(decode_frame(frame.tobytes()), frame)
    with pytest.raises(ValueError, match="a square RGB image"):
        decode_frame(b"\x01\x02\x03\x04")
    # a raw frame whose first bytes happen to form a zlib header stays raw
    raw = frame.copy()
    raw[0, 0, :2] = (0x78, 0x9C)
    assert np.array_equal(decode_frame(raw.tobytes()), raw)
    assert np.array_equal(decode_frame(raw.tobytes(), (64, 64, 3)), raw)
    # JPEG frames are decoded (lossy: compare with Pillow's own decoding of the same bytes)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(decode_frame(buf.getvalue()), expected)


# --------------------------------------------------------------------------------------------------
# The exact layout TFDS 4.9 writes for an RLDS builder, with its features.json
TFDS = "tensorflow_datasets.core.features."


def _tensor(shape: tuple, dtype: str, encoding: str, cls: str = "tensor_feature.Tensor") -> dict:
    shape_json = {"dimensions": [str(d) for d in shape]} if shape else {}
    return {"pythonClassName": TFDS + cls, "tensor": {"shape": shape_json, "dtype": dtype, "encoding": encoding}}


def _features_json(encoding: str) -> dict:
    """features.json as TFDS serialises the FeaturesDict of a DMC-VB-like RLDS dataset."""
    if encoding == "zlib":
        pixels = _tensor((64, 64, 3), "uint8", "zlib")
    else:
        pixels = {"pythonClassName": TFDS + "image_feature.Image",
                  "image": {"shape": {"dimensions": ["64", "64", "3"]}, "dtype": "uint8", "encodingFormat": "png"}}
    state = "zlib" if encoding == "zlib" else "none"
    step = {"featuresDict": {"features": {
        "action": _tensor((A,), "float64", state),
        "discount": _tensor((), "float64", "none", "scalar.Scalar"),
        "is_first": _tensor((), "bool", "none", "scalar.Scalar"),
        "is_last": _tensor((), "bool", "none", "scalar.Scalar"),
        "is_terminal": _tensor((), "bool", "none", "scalar.Scalar"),
        "observation": {"pythonClassName": TFDS + "features_dict.FeaturesDict", "featuresDict": {"features": {
            "orientations": _tensor((14,), "float64", state), "velocity": _tensor((9,), "float64", state),
            "pixels": pixels}}},
        "reward": _tensor((), "float64", "none", "scalar.Scalar"),
    }}, "pythonClassName": TFDS + "features_dict.FeaturesDict"}
    return {"pythonClassName": TFDS + "features_dict.FeaturesDict", "featuresDict": {"features": {
        "episode_id": _tensor((), "int64", "none"),
        "steps": {"pythonClassName": TFDS + "dataset_feature.Dataset", "sequence": {"feature": step, "length": "-1"}},
    }}}


def _tfds_episode(rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    ep = _episode(rng, steps)
    ep["action"] = rng.uniform(-1, 1, (steps, A))  # float64, as DMC-VB stores actions
    ep["reward"] = rng.uniform(0, 1, steps)
    ep["orientations"] = rng.normal(size=(steps, 14))
    ep["velocity"] = rng.normal(size=(steps, 9))
    return ep


def _write_tfds_shard(path: Path, episodes: list[dict], encoding: str) -> None:
    writer = TFRecordWriter(str(path))
    for i, ep in enumerate(episodes):
        if encoding == "zlib":
            pixels = [zlib.compress(f.tobytes()) for f in ep["obs"]]
            action = ([zlib.compress(a.astype("<f8").tobytes()) for a in ep["action"]], "byte")
            state = {k: ([zlib.compress(v.astype("<f8").tobytes()) for v in ep[k]], "byte")
                     for k in ("orientations", "velocity")}
        else:
            pixels = [_encode(f, "png") for f in ep["obs"]]
            action = (ep["action"].reshape(-1).tolist(), "float")
            state = {k: (ep[k].reshape(-1).tolist(), "float") for k in ("orientations", "velocity")}
        writer.write({
            "episode_id": (i, "int"),
            "steps/observation/pixels": (pixels, "byte"),
            "steps/observation/orientations": state["orientations"],
            "steps/observation/velocity": state["velocity"],
            "steps/action": action,
            "steps/reward": (ep["reward"].tolist(), "float"),
            "steps/discount": ([1.0] * len(ep["reward"]), "float"),
            "steps/is_first": (ep["is_first"].tolist(), "int"),
            "steps/is_last": (ep["is_last"].tolist(), "int"),
            "steps/is_terminal": (ep["is_terminal"].tolist(), "int"),
        })
    writer.close()


@pytest.mark.parametrize("encoding", ["plain", "zlib"])
@pytest.mark.parametrize("with_features", [True, False])
def test_tfds_layout_every_value_exact(tmp_path, encoding, with_features):
    import json

    rng = np.random.default_rng(4)
    episodes = [_tfds_episode(rng, n) for n in (6, 3, 5)]
    order = [2, 0, 1]  # TFDS stores episodes in hashed-key order, not generation order
    shard = tmp_path / "walker-train.tfrecord-00000-of-00001"
    _write_tfds_shard(shard, [episodes[i] for i in order], encoding)
    if with_features:
        (tmp_path / "features.json").write_text(json.dumps(_features_json(encoding)))
        specs = load_features(tmp_path / "features.json")
        assert specs["steps/action"].encoding == ("zlib" if encoding == "zlib" else "none")
        assert specs["steps/observation/pixels"].shape == (64, 64, 3)
    out = tmp_path / "out"
    assert import_shards([shard], out, env="walker-walk") == 3
    assert verify(out) == []
    split = Split(out)
    assert split.lengths == [episodes[i]["reward"].size for i in order]
    for position, i in enumerate(order):
        got, expected = split.read(position), episodes[i]
        _assert_same(got, expected)  # float64 actions become their float32 values exactly


def test_tfds_bytes_without_features_json_fail_by_name(tmp_path):
    rng = np.random.default_rng(5)
    ep = _tfds_episode(rng, 4)
    ep["action"] = np.zeros((4, A))  # zero bytes fit float64 x3 and float32 x6 alike
    shard = tmp_path / "s.tfrecord"
    _write_tfds_shard(shard, [ep], "zlib")
    with pytest.raises(ValueError, match=r"s.tfrecord record 0 key steps/action: cannot tell the dtype of 24 bytes"):
        import_shards([shard], tmp_path / "out")
    import json

    (tmp_path / "features.json").write_text(json.dumps(_features_json("zlib")))
    assert import_shards([shard], tmp_path / "out") == 1  # features.json settles it
    np.testing.assert_array_equal(Split(tmp_path / "out").read(0)["action"], np.zeros((4, A), np.float32))


def test_ant_maze_camera_keys(tmp_path):
    rng = np.random.default_rng(6)
    ep = _episode(rng, 3)
    other = rng.integers(0, 256, ep["obs"].shape, dtype=np.uint8)
    writer = TFRecordWriter(str(tmp_path / "ant.tfrecord"))
    writer.write({
        "steps/observation/lowres_top_camera": ([_encode(f, "png") for f in ep["obs"]], "byte"),
        "steps/observation/walker/egocentric_camera": ([_encode(f, "png") for f in other], "byte"),
        "steps/action": (ep["action"].reshape(-1).tolist(), "float"),
        "steps/reward": (ep["reward"].tolist(), "float"),
        "steps/is_first": (ep["is_first"].tolist(), "int"),
        "steps/is_last": (ep["is_last"].tolist(), "int"),
        "steps/is_terminal": (ep["is_terminal"].tolist(), "int"),
    })
    writer.close()
    import_shards([tmp_path / "ant.tfrecord"], tmp_path / "top")
    assert np.array_equal(Split(tmp_path / "top").read(0)["obs"], ep["obs"])
    import_shards([tmp_path / "ant.tfrecord"], tmp_path / "ego", camera_key="walker/egocentric_camera")
    assert np.array_equal(Split(tmp_path / "ego").read(0)["obs"], other)
    with pytest.raises(ValueError, match="camera key steps/observation/nope not found"):
        import_shards([tmp_path / "ant.tfrecord"], tmp_path / "x", camera_key="nope")
