"""SYSTEM.md section 6 and issue 11: non-finite losses and gradients are skipped, counted and stop the run
with a clear message without overwriting the last good checkpoint; checkpoints from another config or action
size are refused with the differing fields named; ``--resume --run-dir R`` reads the run's own config and
refuses flags that differ (except the listed ones); a damaged ``latest.pt`` falls back to the newest intact
checkpoint; a ``model.save()`` file is not resumed; a full disk and bad flags end in one line, exit code 2.

Stop signals, kills inside checkpoint writes and resumes from the run directory alone are in
tests/test_fault_injection_training.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer

from VRNN.dmc_vb_transition_dynamics_trainer import NonFiniteTrainingError
from VRNN.run_setup import run_job
from VRNN.training_checkpoints import check_compatible
from VRNN.vrnn_utilities import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _inject(trainer, from_step: int, kind: str):
    real = trainer.model.compute_total_loss

    def patched(*args, **kwargs):
        losses, outputs = real(*args, **kwargs)
        if trainer.step >= from_step:
            if kind == "loss":
                losses["total_vae_loss"] = losses["total_vae_loss"] * float("nan")
            else:  # finite loss, NaN gradient (whichever parameters the task's gradient is taken over)
                losses["total_vae_loss"] = _NaNGradient.apply(losses["total_vae_loss"])
        return losses, outputs

    trainer.model.compute_total_loss = patched


class _NaNGradient(torch.autograd.Function):
    """The identity whose backward pass turns every gradient into NaN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


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


# --------------------------------------------------------------------------------------------------
# Resume, damaged checkpoints, a full disk and bad flags (issue 11). run_job runs in this process: the
# same code as the scripts, without a new interpreter per case; one subprocess checks stderr as a user
# sees it.
SMOKE = ["--env", "cheetah-run", "--preset", "smoke", "--device", "cpu"]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _smoke_run(data_dir: Path, run_dir: Path, *extra: str) -> int:
    return run_job([*SMOKE, "--data-dir", str(data_dir), "--run-dir", str(run_dir), *extra], "test", report=False)


@pytest.mark.parametrize("flag,value", [
    ("--minutes", "-1"), ("--minutes", "0"), ("--checkpoint-every", "0"), ("--eval-every", "0"),
    ("--log-every", "0"), ("--keep-checkpoints", "0"), ("--max-nonfinite-steps", "0"), ("--max-steps", "0"),
    ("--threads", "-1"), ("--num-workers", "-1"),
])
def test_bad_flags_are_one_line_errors_and_write_nothing(flag, value, tmp_path, caplog):
    code = run_job([*SMOKE, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), flag, value],
                   "test", report=False)
    assert code == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and f"{flag} {value} is invalid" in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_bad_flag_in_a_script_gives_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "VRNN/training_vrnn.py", *SMOKE, "--checkpoint-every", "0",
                          "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")],
                         cwd=ROOT, check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--checkpoint-every 0 is invalid: expected a positive integer" in errors[0]
    assert not (tmp_path / "run").exists()


def test_resume_reads_the_run_and_refuses_flags_that_differ(tiny_dmc_data, tmp_path, caplog, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # the default data dir of another environment would be data/<env> here
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    assert _smoke_run(tiny_dmc_data, run_dir, "--max-steps", "2", "--eval-every", "1000") == 0
    launch = json.loads((run_dir / "run.json").read_text())
    assert launch["preset"] == "smoke" and Path(launch["data_dir"]) == Path(tiny_dmc_data).resolve()
    config_before = (run_dir / "config.json").read_bytes()
    checkpoints_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    caplog.clear()
    assert run_job(["--resume", "--run-dir", str(run_dir), "--max-steps", "5", "--latent-dim", "5", "--seed", "3",
                    "--env", "walker-walk", "--preset", "cpu", "--set", "decoder_upsample=transposed"], "test", report=False) == 2
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    for field in ("max_steps: checkpoint 2, this run 5", "latent_dim: checkpoint 4, this run 5",
                  "seed: checkpoint 0, this run 3", "env: checkpoint 'cheetah-run', this run 'walker-walk'",
                  "preset: checkpoint 'smoke', this run 'cpu'",
                  "decoder_upsample: checkpoint 'nearest', this run 'transposed'", "--minutes", "--device"):
        assert field in errors[0], (field, errors[0])
    assert not (tmp_path / "data").exists(), "a dataset was collected for the other environment"
    assert (run_dir / "config.json").read_bytes() == config_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints_before

    # the allowed ones change this session (and are recorded); the same values as the run's are accepted
    caplog.clear()
    assert run_job(["--resume", "--run-dir", str(run_dir), "--log-every", "3", "--minutes", "5", "--max-steps", "2",
                    "--preset", "smoke", "--device", "cpu", "--set", "free_nats=1.0"], "test", report=False) == 0
    assert json.loads((run_dir / "config.json").read_text())["log_every"] == 3
    assert json.loads((run_dir / "run.json").read_text())["minutes"] == 5
    assert "already reached max_steps=2" in caplog.text

    caplog.clear()
    assert run_job(["--resume", *SMOKE], "test", report=False) == 2
    assert "--resume needs --run-dir" in _errors(caplog)[0]


def test_damaged_latest_falls_back_to_the_newest_intact_checkpoint(tiny_dmc_data, tmp_path, caplog, one_thread):
    run_dir = tmp_path / "run"
    make_trainer(tiny_dmc_data, run_dir, max_steps=3, checkpoint_every=1).train()
    folder = run_dir / "checkpoints"
    latest = folder / "latest.pt"
    with latest.open("r+b") as handle:  # a hard link: step_00000003.pt (and best.pt) are damaged with it
        handle.truncate(latest.stat().st_size // 2)
    leftovers = [folder / ".latest.pt.k2j3.tmp", folder / ".step_00000004.pt.x8c1.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    (folder / "notes.tmp").write_text("not ours")

    caplog.set_level(logging.INFO)
    assert _smoke_run(tiny_dmc_data, run_dir, "--resume", "--max-steps", "3", "--checkpoint-every", "1") == 0
    assert "does not read" in caplog.text and "resuming from step_00000002.pt (step 2)" in caplog.text
    assert "loaded" in caplog.text and "(step 2)" in caplog.text
    assert not any(p.exists() for p in leftovers) and (folder / "notes.tmp").exists()
    assert load_checkpoint(latest)["step"] == 3

    # nothing readable at all: a one-line refusal that names the files
    for path in folder.glob("*.pt"):
        path.write_bytes(b"garbage")
    caplog.clear()
    assert _smoke_run(tiny_dmc_data, run_dir, "--resume") == 2
    assert "no checkpoint in" in _errors(caplog)[0] and "latest.pt" in _errors(caplog)[0]


def test_a_model_save_file_is_not_resumed_and_says_what_to_do(tiny_dmc_data, tmp_path, caplog, one_thread):
    trainer = make_trainer(tiny_dmc_data, tmp_path / "other", max_steps=1)
    weights = trainer.model.save(tmp_path / "run" / "checkpoints" / "latest.pt", ema=trainer.ema.module)
    assert _smoke_run(tiny_dmc_data, tmp_path / "run", "--resume") == 2
    message = _errors(caplog)[0]
    assert "model weights only" in message and "model.save()" in message
    assert f"--eval-only --load-checkpoint {weights}" in message and "KeyError" not in caplog.text
    with pytest.raises(CheckpointError, match="model weights only"):
        trainer.load_checkpoint(weights)
    trainer.load_checkpoint(weights, training_state=False)  # a warm start is fine


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_says_so(tiny_dmc_data, tmp_path, caplog,
                                                                             monkeypatch, one_thread):
    from VRNN import training_checkpoints

    real_write = training_checkpoints._PausingWriter.write

    def write(self, data):
        if self.step >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(training_checkpoints._PausingWriter, "write", write)
    run_dir = tmp_path / "run"
    assert _smoke_run(tiny_dmc_data, run_dir, "--max-steps", "4", "--checkpoint-every", "1",
                      "--eval-every", "1000") == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    for part in ("step 2", "No space left on device", "step_00000001.pt", "intact", f"--resume --run-dir {run_dir}"):
        assert part in errors[0], (part, errors[0])
    folder = run_dir / "checkpoints"
    assert load_checkpoint(folder / "latest.pt")["step"] == 1
    assert not list(folder.glob(".*.tmp")) and not (folder / "step_00000002.pt").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, caplog):
    target = tmp_path / "run"
    target.write_text("notes")
    assert run_job([*SMOKE, "--data-dir", str(tmp_path / "data"), "--run-dir", str(target)], "test", report=False) == 2
    assert "--run-dir" in _errors(caplog)[0] and "is a file" in _errors(caplog)[0]
    assert target.read_text() == "notes" and not (tmp_path / "data").exists()
