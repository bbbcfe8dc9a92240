"""SYSTEM.md section 6: stop signals save a checkpoint and resume works; non-finite losses and gradients
are skipped, counted and stop the run with a clear message without overwriting the last good checkpoint;
checkpoints from another config or action size are refused with the differing fields named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer

from VRNN.dmc_vb_transition_dynamics_trainer import NonFiniteTrainingError
from VRNN.training_checkpoints import check_compatible
from VRNN.vrnn_utilities import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in rows if "total_vae_loss" in r]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_and_resumes(sig, tiny_dmc_data, tmp_path):
    run_dir = tmp_path / "run"
    common = ["VRNN/training_vrnn.py", "--env", "cheetah-run", "--preset", "smoke", "--data-dir", str(tiny_dmc_data),
              "--run-dir", str(run_dir), "--eval-every", "1000", "--checkpoint-every", "1000", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.Popen([sys.executable, *common, "--max-steps", "500"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_train_rows(run_dir)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert signal.Signals(sig).name in err and "--resume" in err
    payload = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    stopped = payload["step"]
    assert 2 <= stopped < 500 and payload["position"] == stopped
    assert not (run_dir / "eval.json").exists()  # a signal stop saves and leaves; no evaluation

    out = subprocess.run([sys.executable, *common, "--max-steps", str(stopped + 2), "--resume"], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == stopped + 2
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, stopped + 3))
    assert json.loads((run_dir / "eval.json").read_text())["step"] == stopped + 2


def _inject(trainer, from_step: int, kind: str):
    real = trainer.model.compute_total_loss
    first_param = next(iter(trainer.model.generator_parameters()))

    def patched(*args, **kwargs):
        losses, outputs = real(*args, **kwargs)
        if trainer.step >= from_step:
            if kind == "loss":
                losses["total_vae_loss"] = losses["total_vae_loss"] * float("nan")
            else:  # finite loss, NaN gradient
                losses["perceiver_loss"] = losses["perceiver_loss"] + _nan_gradient(first_param)
        return losses, outputs

    trainer.model.compute_total_loss = patched


def _nan_gradient(p: torch.Tensor) -> torch.Tensor:
    """A term whose value is 0 and whose gradient with respect to ``p`` is NaN."""
    y = p.sum() * 0.0
    y.register_hook(lambda g: g * float("nan"))
    return y


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_steps_stop_and_keep_the_good_checkpoint(kind, tiny_dmc_data, tmp_path, caplog):
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "run", max_steps=20, checkpoint_every=1, max_nonfinite_steps=3)
    _inject(trainer, from_step=2, kind=kind)
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteTrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert "3 non-finite steps in a row" in message and "step_00000002.pt" in message
    assert ("total_vae_loss=nan" in message) if kind == "loss" else ("non-finite gradient" in message)
    assert trainer.step == 2 and trainer.nonfinite_total == 3 and trainer.position == 5
    # the skipped steps changed nothing, and the last good checkpoint is the one of step 2
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert payload["step"] == 2
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], payload["model"][k]) for k in state)
    assert all(bool(torch.isfinite(v).all()) for v in payload["model"].values() if v.is_floating_point())
    assert any(not torch.equal(good[k], state[k]) for k in good)
    assert "skipped" in caplog.text


def test_a_nonfinite_model_never_overwrites_a_checkpoint(tiny_dmc_data, tmp_path):
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "run", max_steps=1)
    trainer.train()
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    with torch.no_grad():
        next(iter(trainer.model.parameters())).fill_(float("nan"))
    trainer.step += 1
    assert trainer.save_checkpoint() is None
    assert latest.read_bytes() == before


def test_checkpoint_from_another_config_or_action_size_is_refused(tiny_dmc_data, tmp_path):
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "run", max_steps=1)
    trainer.train()
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    other = make_trainer(tiny_dmc_data, tmp_path / "other", max_steps=1, latent_dim=6, max_components=3)
    with pytest.raises(CheckpointError) as info:
        other.load_checkpoint(path)
    assert "latent_dim: checkpoint 4, this run 6" in str(info.value)
    assert "max_components: checkpoint 4, this run 3" in str(info.value)
    payload = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="action size: checkpoint 6, this run 1"):
        check_compatible(payload, trainer.config.replace(action_dim=1), action_dim=1)
    # run-length fields may change on resume
    check_compatible(payload, trainer.config.replace(max_steps=99, eval_every=7), action_dim=6)
