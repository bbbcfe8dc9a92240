"""End to end: VRNN/run_perceiver_io_dmc_vb.py trains, evaluates, plots, checkpoints and resumes (smoke preset,
the session's tiny cheetah-run dataset)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "VRNN/run_perceiver_io_dmc_vb.py"
EVAL_KEYS = ("token_accuracy", "copy_token_accuracy", "chance_token_accuracy", "next_token_ce", "recon",
             "commitment", "psnr_prediction", "psnr_copy_last_frame", "psnr_tokenizer_recon", "psnr_open_loop",
             "psnr_open_loop_copy_last_frame", "codebook_perplexity")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _train_steps(metrics: Path) -> list[int]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["step"] for r in rows if "eval" not in r]


def test_train_evaluate_plot_then_resume(tiny_dmc_data, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--env", "cheetah-run", "--preset", "smoke", "--data-dir", str(tiny_dmc_data),
              "--run-dir", str(run_dir), "--threads", "1", "--log-every", "1"]
    first = _run(*common, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]

    result = json.loads((run_dir / "eval.json").read_text())
    for key in EVAL_KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), (key, result.get(key))
    assert result["step"] == 3 and 0.0 <= result["token_accuracy"] <= 1.0
    assert result["psnr_copy_last_frame"] > 0 and result["psnr_prediction"] > 0
    png = (run_dir / "predictions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    payload = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["step"] == 3 and payload["kind"] == "perceiver_io"
    assert json.loads((run_dir / "config.json").read_text())["env"] == "cheetah-run"

    resumed = _run(*common, "--max-steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed from .*latest\.pt at step 3", resumed.stderr), resumed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 5
    assert _train_steps(run_dir / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 5

    # A checkpoint is refused when the Perceiver it holds was configured differently.
    mismatch = _run(*common, "--max-steps", "6", "--resume", "--recon-loss", "mse")
    assert mismatch.returncode == 2
    assert "another Perceiver config" in mismatch.stderr and "recon_loss" in mismatch.stderr


def test_help_documents_every_flag_and_bad_use_exits_2(tmp_path):
    from VRNN.run_perceiver_io_dmc_vb import build_script_parser

    out = _run("--help")
    assert out.returncode == 0, out.stderr
    flags = sorted(s for a in build_script_parser([])._actions for s in a.option_strings if s.startswith("--"))
    for flag in ("--resume", "--minutes", "--recon-loss", "--label-smoothing", "--checkpoint-every", "--threads"):
        assert flag in flags
    missing = [f for f in flags if not re.search(re.escape(f) + r"\b", out.stdout)]
    assert not missing, missing
    bad = _run("--env", "cheetah-run", "--preset", "smoke", "--resume", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and "--resume needs --run-dir" in bad.stderr
    assert not (tmp_path / "d").exists()
