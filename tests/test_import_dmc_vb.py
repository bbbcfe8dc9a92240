"""DMC-VB import: synthetic TFRecord shards written with the `tfrecord` package's writer (an
implementation independent of the importer's reader), several multi-step episodes, every step checked."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from tfrecord.writer import TFRecordWriter

from VRNN.hdf5_io import read_episode, summary, verify
from VRNN.import_dmc_vb import decode_frame, import_shards, parse_episode, read_tfrecord

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
    out = tmp_path / "dmcvb.h5"
    n = import_shards([tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"], out, env="walker_walk")
    assert n == 3
    assert verify(out) == []
    info = summary(out)
    assert info["episodes"] == 3 and info["episode_lengths"] == [5, 7, 4] and info["action_dim"] == A
    assert info["env"] == "walker-walk"
    with h5py.File(out, "r") as f:
        for i, expected in enumerate(shard_a + shard_b):
            got = read_episode(f, f"episode_{i:06d}")
            assert np.array_equal(got["obs"], expected["obs"])  # every step, not only step 0
            np.testing.assert_array_equal(got["action"], expected["action"])
            np.testing.assert_array_equal(got["reward"], expected["reward"])
            for key in ("is_first", "is_last", "is_terminal"):
                assert np.array_equal(got[key], expected[key].astype(bool))


def test_cli_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    _write_shard(tmp_path / "s.tfrecord", [_episode(rng, 3), _episode(rng, 6)], "example", "png")
    out = tmp_path / "o.h5"
    cmd = [sys.executable, "VRNN/import_dmc_vb.py", str(tmp_path / "s.tfrecord"), "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert "2 episodes" in first.stdout and verify(out) == []
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope.tfrecord"), "--out", str(tmp_path / "z.h5")],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
        import_shards([tmp_path / "nope.tfrecord"], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_corrupt_record_is_reported_and_earlier_episodes_survive(tmp_path):
    rng = np.random.default_rng(2)
    shard = tmp_path / "c.tfrecord"
    _write_shard(shard, [_episode(rng, 3), _episode(rng, 3)], "example", "zlib")
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # flip a byte inside the second record's payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"record 1 at byte \d+ is corrupt \(data checksum mismatch\)"):
        import_shards([shard], tmp_path / "o.h5")
    assert verify(tmp_path / "o.h5") == [] and summary(tmp_path / "o.h5")["episodes"] == 1
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
        import_shards([shard], tmp_path / "o.h5")
    record = next(read_tfrecord(shard))
    with pytest.raises(ValueError, match="missing step features"):
        parse_episode(record[:0] + b"")


def test_decode_frame_variants():
    frame = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    assert np.array_equal(decode_frame(_encode(frame, "png")), frame)
    assert np.array_equal(decode_frame(_encode(frame, "zlib")), frame)
    assert np.array_equal(decode_frame(frame.tobytes()), frame)
    with pytest.raises(ValueError, match="not a square RGB image"):
        decode_frame(b"\x01\x02\x03\x04")
