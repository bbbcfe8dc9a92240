"""The diagnostic benchmarks that pair config variants of the real step (config_step.py) and train the
encoder and decoder alone (autoencoder_capacity.py), on their smallest paths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_step_parses_variants_and_times_each_interleaved(one_thread):
    cs = _load("config_step")
    assert cs.parse_variant("enc=perceiver_features=encoder,use_discriminator=false") == (
        "enc", {"perceiver_features": "encoder", "use_discriminator": False})
    assert cs.parse_overrides(["batch_size=3", "learning_rate=1e-3"]) == {"batch_size": 3, "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cs.parse_overrides(["batch_size"])
    result = cs.measure("smoke", {"preset": {}, "enc": {"perceiver_features": "encoder",
                                                        "attention_features": "encoder"},
                                  "b4": {"batch_size": 4}},
                        repeats=2, device=torch.device("cpu"))
    rows = result["variants"]
    assert set(rows) == {"preset", "enc", "b4"} and rows["preset"]["ratio_to_first"] == 1.0
    # a variant with another batch counts its own frames in frames/s and GFLOP per frame
    b4, base = rows["b4"], rows["preset"]
    assert b4["frames_per_step"] == 2 * base["frames_per_step"]
    assert b4["fps"] == pytest.approx(b4["frames_per_step"] / b4["step_s_median"])
    assert b4["fps_ratio_to_first"] == pytest.approx(b4["fps"] / base["fps"])
    assert b4["gflop_per_frame"] == pytest.approx(base["gflop_per_frame"], rel=0.2)
    assert all(len(r["step_s"]) == 2 and r["fps"] > 0 for r in rows.values())
    # the encoder-map inputs drop the attention pyramid and the tokenizer's strided convolutions
    assert rows["enc"]["gflop_per_frame"] < rows["preset"]["gflop_per_frame"]
    assert rows["enc"]["parameters_m"] < rows["preset"]["parameters_m"]


def test_config_step_refuses_an_unknown_field():
    out = subprocess.run([sys.executable, "benchmarks/config_step.py", "--set", "no_such_field=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "no_such_field" in out.stderr


def test_autoencoder_capacity_learns_and_writes_its_curve(tiny_dmc_data, tmp_path):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    out = subprocess.run([sys.executable, "benchmarks/autoencoder_capacity.py", "--data-dir", str(tiny_dmc_data),
                          "--preset", "smoke", "--minutes", "0.15", "--eval-every", "10", "--batch", "8",
                          "--threads", "1", "--out", str(tmp_path / "ae")],
                         cwd=ROOT, capture_output=True, text=True, timeout=180, check=False, env=env)
    assert out.returncode == 0, out.stderr
    curve = json.loads((tmp_path / "ae" / "curve.json").read_text())
    psnrs = [row["test_psnr"] for row in curve["curve"]]
    assert len(psnrs) >= 2 and psnrs[-1] > psnrs[0]        # training moved the reconstruction
    assert (tmp_path / "ae" / "reconstruction.png").stat().st_size > 0
    missing = subprocess.run([sys.executable, "benchmarks/autoencoder_capacity.py", "--data-dir",
                              str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             check=False, env=env)
    assert missing.returncode == 2 and "collect the data first" in missing.stderr


def test_quality_waits_for_another_ladder_that_is_writing_the_data():
    """Two quality.py ladders started at once on one data folder: the second retries while the first holds
    a split's lock, and any other data error is raised at once."""
    from VRNN.hdf5_io import DataFileError

    q = _load("quality")
    calls = []

    def collect():
        calls.append(1)
        if len(calls) < 3:
            raise DataFileError("data/x/test_sine is being written by another process (locked); wait for it")
        return "splits"

    assert q._waiting_for_other_writers(collect, wait_s=5.0, poll_s=0.01) == "splits" and len(calls) == 3

    def broken():
        raise DataFileError("data/x/train/ep_000001.h5 is damaged")

    with pytest.raises(DataFileError, match="damaged"):
        q._waiting_for_other_writers(broken, wait_s=5.0, poll_s=0.01)


def test_cpu_kernels_pairs_each_kernel_with_pytorchs(one_thread, tmp_path, capsys):
    ck = _load("cpu_kernels")
    ck.main(["--repeats", "1", "--json", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert len(rows) == 2 + 2 * len(ck.ATTENTION_SHAPES)
    assert all(r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] == r["ours_ms"] / r["torch_ms"] for r in rows)
    assert "Gaussian likelihood, 64 frames" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ck.main(["--repeats", "0"])
