"""The command-line surface of the scripts: every flag in --help, misspelt flags refused, env spellings,
the SLURM script's syntax and directives. (End-to-end runs are in tests/test_trainer.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from VRNN.cli import CONFIG_FLAGS, add_training_flags, build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["VRNN/main.py", "VRNN/training_vrnn.py"]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _all_flags() -> list[str]:
    parser = build_parser("x", [])
    add_training_flags(parser)
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(script):
    out = _run([script, "--help"])
    assert out.returncode == 0, out.stderr
    flags = _all_flags()
    assert len(flags) > 30
    missing = [f for f in flags if not re.search(re.escape(f) + r"\b", out.stdout)]
    assert not missing, f"{script} --help lacks {missing}"
    # defaults follow the preset: smoke's batch size shows up in --help when asked for smoke
    smoke = _run([script, "--preset", "smoke", "--help"])
    assert re.search(r"--batch-size BATCH_SIZE\s+sequences per optimiser step.*\(default: 2\)",
                     smoke.stdout.replace("\n", " ")), smoke.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_misspelt_flag_is_an_error(script, tmp_path):
    out = _run([script, "--env", "cheetah-run", "--max-step", "3", "--run-dir", str(tmp_path / "r")])
    assert out.returncode == 2
    assert "unrecognized arguments: --max-step" in out.stderr or "ambiguous" in out.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_environment_is_a_clear_error(tmp_path):
    out = _run(["VRNN/training_vrnn.py", "--env", "cheetah-runn", "--preset", "smoke",
                "--data-dir", str(tmp_path / "d"), "--run-dir", str(tmp_path / "r")])
    assert out.returncode == 2
    assert "unknown DMC environment 'cheetah-runn'" in out.stderr and "cheetah-run" in out.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("spelling", ["cheetah-run", "cheetah_run", "dmc_cheetah_run", "Cheetah-Run"])
def test_env_spellings_resolve_to_one_name(spelling):
    from VRNN.run_setup import prepare_config

    parser = build_parser("x", ["--preset", "smoke"])
    add_training_flags(parser)
    args = parser.parse_args(["--preset", "smoke", "--env", spelling])
    assert prepare_config(args).env == "cheetah-run"


def test_config_flags_reach_the_config():
    from VRNN.cli import explicit_config_flags

    parser = build_parser("x", ["--preset", "smoke"])
    add_training_flags(parser)
    args = parser.parse_args(["--preset", "smoke", "--n-critic", "3", "--aggregator", "pcgrad", "--amp"])
    config = config_from_args(args)
    assert (config.n_critic, config.aggregator, config.amp, config.hidden_dim) == (3, "pcgrad", True, 16)
    assert set(CONFIG_FLAGS) <= set(_all_flags())
    # the pillar switches: --no-X turns one off, the others keep the preset's value
    off = config_from_args(parser.parse_args(["--preset", "smoke", "--no-discriminator"]))
    assert (off.use_discriminator, off.use_perceiver, off.use_attention) == (False, True, True)
    assert explicit_config_flags(parser, parser.parse_args(["--no-attention"])) == {"use_attention": False}


def test_set_reaches_any_config_field_and_refuses_what_it_cannot():
    from VRNN.cli import explicit_config_flags

    parser = build_parser("x", ["--preset", "smoke"])
    add_training_flags(parser)
    args = parser.parse_args(["--preset", "smoke", "--set", "residual_cell_max_side=0",
                              "--set", "decoder_upsample=transposed", "--set", "free_nats=0.5"])
    config = config_from_args(args)
    assert (config.residual_cell_max_side, config.decoder_upsample, config.free_nats) == (0, "transposed", 0.5)
    assert explicit_config_flags(parser, args) == {"residual_cell_max_side": 0, "decoder_upsample": "transposed",
                                                   "free_nats": 0.5}
    for item, message in [("no_such_field=1", "unknown AIMEConfig field 'no_such_field'"),
                          ("batch_size=3", "--set batch_size is invalid: that field has its own flag --batch-size"),
                          ("free_nats", "expected KEY=VALUE, got 'free_nats'"),
                          ("decoder_upsample=bilinear", "AIMEConfig.decoder_upsample='bilinear' is invalid")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_args(parser.parse_args(["--preset", "smoke", "--set", item]))


def test_explicit_flags_are_detected():
    from VRNN.cli import explicit_config_flags

    parser = build_parser("x", ["--preset", "smoke"])
    add_training_flags(parser)
    args = parser.parse_args(["--preset", "smoke", "--latent-dim", "7", "--seed", "0"])
    assert explicit_config_flags(parser, args) == {"latent_dim": 7}


def test_slurm_script_syntax_and_directives():
    script = ROOT / "VRNN/run_VRNN_minimum.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    check = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    for directive in ("--nodes=", "--gpus-per-node=", "--time=", "--requeue", "--signal=B:USR1@120"):
        assert re.search(r"^#SBATCH\s+" + re.escape(directive), text, re.MULTILINE), directive
    for needle in ("srun", "torch.distributed.run", "--rdzv-backend=c10d", "--rdzv-endpoint=", "scontrol requeue",
                   "--resume", "trap on_preempt USR1 TERM", 'ENV_NAME="${ENV_NAME:-', 'PRESET="${PRESET:-',
                   'RUN_DIR="${RUN_DIR:-', "VRNN/training_vrnn.py"):
        assert needle in text, needle
    # every flag the script passes exists in the shared parser
    passed = set(re.findall(r"(--[a-z][a-z-]+)", text.rsplit("VRNN/training_vrnn.py", 1)[1]))
    assert passed <= set(_all_flags()), passed - set(_all_flags())


def test_slurm_script_stops_and_requeues_on_usr1(tmp_path):
    """Run the batch script with fake srun/scontrol: USR1 must create the stop file, wait, then requeue."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # fake srun: a long-running "training" that exits 0 as soon as the stop file appears
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\necho srun \"$@\" >> {log}\nfor i in $(seq 100); do\n"
        f"  [ -f \"$STOP_FILE_PATH\" ] && {{ echo stopped >> {log}; exit 0; }}\n  sleep 0.1\ndone\nexit 1\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho scontrol \"$@\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.h5").write_bytes(b"")
    (data_dir / "eval.h5").write_bytes(b"")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(run_dir),
           "DATA_DIR": str(data_dir), "SLURM_JOB_ID": "4242", "STOP_FILE_PATH": str(run_dir / "STOP")}
    proc = subprocess.Popen(["bash", str(ROOT / "VRNN/run_VRNN_minimum.sh")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time
    for _ in range(100):
        if log.exists() and "srun" in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(__import__("signal").SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = log.read_text()
    assert "stopped" in calls and "scontrol requeue 4242" in calls, calls
    assert calls.index("stopped") < calls.index("scontrol requeue")
    assert "--stop-file" in calls and str(run_dir / "STOP") in calls


def test_given_flags_counts_typed_flags_even_at_their_default():
    from VRNN.cli import given_flags

    argv = ["--preset", "smoke", "--batch-size", "2", "--max-steps=9", "--resume", "--run-dir", "r"]
    parser = build_parser("x", argv)
    add_training_flags(parser)
    # --batch-size 2 is smoke's default, but it was typed: --resume must compare it with the run's value
    assert given_flags(parser, argv) == {"preset": "--preset", "batch_size": "--batch-size",
                                         "max_steps": "--max-steps", "resume": "--resume", "run_dir": "--run-dir"}


def test_resume_help_names_the_flags_that_may_differ():
    from VRNN.cli import RESUME_CHANGEABLE

    parser = build_parser("x", [])
    add_training_flags(parser)
    text = " ".join(parser.format_help().split())
    resume_help = text[text.index("--resume "):text.index("--eval-only ")]
    for flag in RESUME_CHANGEABLE:
        assert flag in resume_help, flag
    assert set(RESUME_CHANGEABLE) <= set(_all_flags())
    # the flags that shape the weights are not among them
    assert not {"--max-steps", "--seed", "--preset", "--env", "--batch-size", "--learning-rate"} & set(RESUME_CHANGEABLE)
