"""Fault injection into real training processes (issue 11): SIGKILL, SIGTERM and SIGINT at the named points
of the checkpoint writer (``VRNN.fault_points``: the temporary file half written, complete but not renamed,
renamed but ``latest.pt`` not yet moved, ``latest.pt`` moved) and of the end of a run (final evaluation,
report); SIGUSR1 (SLURM's preemption warning) too. After every kill: each checkpoint in the folder still
reads, ``latest.pt`` is the last complete one, and ``--resume --run-dir R`` alone (no other flag) continues
the run; after the last resume the weights equal those of an uninterrupted run.

The counts of kills injected and survived are printed at the end of the module.
"""

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

from VRNN.vrnn_utilities import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TALLY = {"injected": 0, "survived": 0}
KILLS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _report_tally(request):
    yield
    line = (f"training fault injection: {TALLY['injected']} kills injected, {TALLY['survived']} survived "
            f"({'; '.join(KILLS)})")
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIME_FAULT_")}
    return {**env, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), **extra}


def _start(script: str, args: list[str], **fault: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=_env(**fault),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before the fault point:\n"
                                 + proc.communicate()[1][-3000:])
        assert time.monotonic() < deadline, "the fault point was not reached"
        time.sleep(0.05)
    return marker.read_text()


def _kill_at(script: str, args: list[str], point: str, sig: signal.Signals, tmp_path: Path) -> tuple[int, str]:
    """Run until ``point``, send ``sig``, let it go on (a caught signal), return (exit code, stderr)."""
    marker = tmp_path / "reached"
    marker.unlink(missing_ok=True)
    proc = _start(script, args, AIME_FAULT_POINT=point, AIME_FAULT_MARKER=str(marker), AIME_FAULT_PAUSE_S="120")
    try:
        reached = _wait_for(marker, proc)
        assert reached.split()[0] == point.split("@")[0], reached
        proc.send_signal(sig)
        TALLY["injected"] += 1
        KILLS.append(f"{sig.name} at {point}")
        time.sleep(0.3)  # the handler records the signal while the writer is paused
        marker.unlink(missing_ok=True)  # go on
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _checkpoints_intact(run_dir: Path) -> int:
    """Every checkpoint name reads; returns the step of latest.pt."""
    folder = run_dir / "checkpoints"
    for path in folder.glob("*.pt"):
        assert load_checkpoint(path)["step"] >= 1, path
    return load_checkpoint(folder / "latest.pt")["step"]


def _temporary(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


def _train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "total_vae_loss" in r]


def test_kills_inside_checkpoint_writes_then_resume_alone_equals_an_uninterrupted_run(tiny_dmc_data, tmp_path):
    script, run_dir = "VRNN/training_vrnn.py", tmp_path / "run"
    flags = ["--env", "cheetah-run", "--preset", "smoke", "--data-dir", str(tiny_dmc_data), "--run-dir", str(run_dir),
             "--max-steps", "8", "--checkpoint-every", "1", "--eval-every", "1000", "--threads", "1"]
    resume_only = ["--resume", "--run-dir", str(run_dir)]

    # 1. SIGKILL with the temporary file of step 2 half written: latest.pt stays at step 1
    code, err = _kill_at(script, flags, "checkpoint:partial@2", signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL, err[-3000:]
    assert _checkpoints_intact(run_dir) == 1
    assert any(name.startswith(".step_00000002.pt.") for name in _temporary(run_dir))

    # 2. SIGTERM with step_00000003.pt renamed but latest.pt not yet moved: the write finishes, the run stops
    code, err = _kill_at(script, resume_only, "checkpoint:renamed@3", signal.SIGTERM, tmp_path)
    assert code == 0, err[-3000:]
    assert "resuming from" not in err and "loaded" in err and "(step 1)" in err
    assert _temporary(run_dir) == [], "the temporary file of the SIGKILL was not cleaned at start-up"
    assert _checkpoints_intact(run_dir) == 3 and "stopped by signal:SIGTERM at step 3" in err
    TALLY["survived"] += 1  # kill 1: resumed from its last complete checkpoint

    # 3. SIGINT with latest.pt moved to step 5, before the old files are rotated
    code, err = _kill_at(script, resume_only, "checkpoint:linked@5", signal.SIGINT, tmp_path)
    assert code == 0, err[-3000:]
    assert "(step 3)" in err and _checkpoints_intact(run_dir) == 5 and "signal:SIGINT at step 5" in err
    TALLY["survived"] += 1

    # 4. SIGKILL with the temporary file of step 6 complete but not renamed
    code, err = _kill_at(script, resume_only, "checkpoint:written@6", signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL, err[-3000:]
    assert "(step 5)" in err and _checkpoints_intact(run_dir) == 5
    TALLY["survived"] += 1

    # 5. SIGUSR1 (SLURM's warning) during the final evaluation: the last step was saved before it; one line
    #    says what to do
    code, err = _kill_at(script, resume_only, "final_evaluation@8", signal.SIGUSR1, tmp_path)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "SIGUSR1 at step 8" in line]
    assert len(said) == 1 and "final evaluation" in said[0] and f"--resume --run-dir {run_dir}" in said[0], err[-3000:]
    assert _checkpoints_intact(run_dir) == 8 and not (run_dir / "eval.json").exists()
    assert _temporary(run_dir) == []
    TALLY["survived"] += 1  # kill 4

    # 6. SIGTERM while main.py draws the plots and report.md of the resumed run: eval.json is written first
    code, err = _kill_at("VRNN/main.py", resume_only, "report", signal.SIGTERM, tmp_path)
    assert code == 0, err[-3000:]
    TALLY["survived"] += 1  # kill 5: the resume finished training and evaluation
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "while drawing the plots and report.md" in line]
    assert len(said) == 1 and "--eval-only --load-checkpoint" in said[0], err[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 8 and not (run_dir / "report.md").exists()
    assert _checkpoints_intact(run_dir) == 8

    # 7. --eval-only redoes the evaluation and the report
    redo = subprocess.run([sys.executable, "VRNN/main.py", "--eval-only", "--load-checkpoint",
                           str(run_dir / "checkpoints" / "latest.pt"), "--data-dir", str(tiny_dmc_data),
                           "--run-dir", str(run_dir), "--threads", "1"], cwd=ROOT, env=_env(), check=False,
                          capture_output=True, text=True, timeout=300)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert (run_dir / "report.md").is_file() and (run_dir / "plots" / "open_loop.png").is_file()
    TALLY["survived"] += 1  # kill 6

    # the run is complete and equals an uninterrupted one
    assert _train_steps(run_dir) == list(range(1, 9))
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["max_steps"], config["checkpoint_every"], config["latent_dim"]) == (8, 1, 4)
    torch.set_num_threads(1)
    straight = make_trainer(tiny_dmc_data, tmp_path / "straight", max_steps=8)
    straight.train()
    resumed = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert resumed["step"] == 8 and resumed["position"] == 8
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(value.float(), resumed["model"][name].float(), atol=1e-6, rtol=0), name
    for name, value in straight.ema.state_dict().items():
        assert torch.allclose(value.float(), resumed["ema"][name].float(), atol=1e-6, rtol=0), name
