"""DMCVBTrainer and the scripts end to end on the smoke preset and a tiny real cheetah-run dataset:
outputs of a run, --eval-only reproducing eval.json, exact resume, schedules and the data-order sampler."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from VRNN.aime_config import AIMEConfig
from VRNN.resumable_sampler import ResumableBatchSampler
from VRNN.schedules import WarmupCosine, adversarial_weight_at, beta_at

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("loss_curves.png", "reconstruction.png", "open_loop.png", "psnr_vs_horizon.png", "mixture_weights.png",
         "attention.png", "grad_cosines.png")


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # One thread: tiny ops on a busy 2-core machine are many times slower with OpenMP spinning threads.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def smoke_run(tiny_dmc_data, tmp_path_factory):
    """``python VRNN/main.py --env cheetah-run --preset smoke`` once for this module (4 steps)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    out = run_script("VRNN/main.py", "--env", "cheetah_run", "--preset", "smoke", "--data-dir", str(tiny_dmc_data),
                     "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_main_writes_every_output(smoke_run):
    run_dir = smoke_run
    config = AIMEConfig.from_json(run_dir / "config.json")
    assert config.env == "cheetah-run" and config.action_dim == 6 and config.max_steps == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "total_vae_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("beta", "lr", "grad_norm", "K_eff", "step_time_s", "perceiver_loss", "attention_loss",
                "adversarial_loss", "grad_norm/vae", "disc/disc_loss"):
        assert key in train_rows[-1], key
    assert train_rows[0]["beta"] == pytest.approx(0.5) and train_rows[-1]["beta"] == pytest.approx(1.0)
    assert any(k.startswith("grad_cos/") for k in train_rows[-1])
    assert any("eval/recon_psnr" in r for r in rows)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["step"] == 4 and evaluation["used_ema"] is True
    assert len(evaluation["pred_psnr"]) == config.eval_horizon and evaluation["bits_per_dim"] > 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "latest.pt", "step_00000002.pt", "step_00000004.pt"]
    for name in PLOTS:
        png = run_dir / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (run_dir / "report.md").read_text()
    assert "plots/open_loop.png" in report and "cheetah-run" in report


def test_checkpoint_contents(smoke_run):
    from VRNN.vrnn_utilities import load_checkpoint

    payload = load_checkpoint(smoke_run / "checkpoints" / "latest.pt")
    for key in ("config", "action_dim", "model", "ema", "optimizer", "disc_optimizer", "scheduler",
                "disc_scheduler", "aggregator", "step", "position", "rng", "best_bits_per_dim"):
        assert key in payload, key
    assert payload["step"] == 4 and payload["position"] == 4 and payload["aggregator"]["d"] is not None


def test_eval_only_reproduces_eval_json(smoke_run, tiny_dmc_data, tmp_path):
    out = run_script("VRNN/training_vrnn.py", "--eval-only", "--load-checkpoint",
                     str(smoke_run / "checkpoints" / "latest.pt"), "--data-dir", str(tiny_dmc_data),
                     "--run-dir", str(tmp_path / "again"))
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    original = json.loads((smoke_run / "eval.json").read_text())
    assert_json_close(again, original)


def assert_json_close(a, b, path="eval.json"):
    """Same keys and values, floats within 1e-5 relative (the same weights on the same windows). Two
    processes' float32 per-frame NLL totals (~7e4 nats, one float32 step is 0.008 nats) can differ in the last
    bit, so the z/h swap gaps (differences of such totals) agree to 0.05 nats per frame and the standard
    errors (``*_se``, spreads of such totals) to 1e-3 relative."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for key in b:
            assert_json_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-3 if path.rsplit("/", 1)[-1].split("[")[0].endswith("_se") else 1e-5,
                                  abs=0.05 if "swap_gap" in path else 1e-6), path
    else:
        assert a == b, path


def test_resume_with_another_config_is_refused(smoke_run, tiny_dmc_data):
    out = run_script("VRNN/training_vrnn.py", "--env", "cheetah-run", "--preset", "smoke", "--resume",
                     "--latent-dim", "5", "--hidden-dim", "12", "--data-dir", str(tiny_dmc_data),
                     "--run-dir", str(smoke_run))
    assert out.returncode == 2
    assert "differing fields" in out.stderr and "latent_dim: checkpoint 4, this run 5" in out.stderr
    assert "hidden_dim: checkpoint 16, this run 12" in out.stderr
    # the run directory is untouched: same config, same checkpoints
    assert AIMEConfig.from_json(smoke_run / "config.json").latent_dim == 4
    out = run_script("VRNN/training_vrnn.py", "--eval-only", "--load-checkpoint",
                     str(smoke_run / "checkpoints" / "latest.pt"), "--preset", "smoke", "--latent-dim", "5",
                     "--data-dir", str(tiny_dmc_data))
    assert out.returncode == 2 and "latent_dim (checkpoint 4, flag 5)" in out.stderr


# --------------------------------------------------------------------------------------------------
# In-process trainer tests
def make_trainer(data_dir: Path, run_dir: Path, **overrides):
    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.hdf5_io import find_splits
    from VRNN.run_setup import build_model, load_datasets
    from VRNN.vrnn_utilities import seed_everything

    config = AIMEConfig.preset("smoke", **{"eval_every": 1000, "checkpoint_every": 1000, **overrides})
    train, _, evaluation = load_datasets(config, *find_splits(data_dir))
    config = config.replace(action_dim=train.action_dim)
    seed_everything(config.seed)
    model = build_model(config, train.action_dim, torch.device("cpu"))
    return DMCVBTrainer(model, train, evaluation, config, run_dir, progress=False)


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_equals_uninterrupted(tiny_dmc_data, tmp_path):
    torch.set_num_threads(1)
    straight = make_trainer(tiny_dmc_data, tmp_path / "straight", max_steps=4)
    straight.train()
    first = make_trainer(tiny_dmc_data, tmp_path / "resumed", max_steps=4)
    result = first.train(until=2)
    assert result.reason == "until" and result.step == 2
    # Disturb the global RNG between the two halves: the resumed run must not depend on it.
    torch.rand(123)
    second = make_trainer(tiny_dmc_data, tmp_path / "resumed", max_steps=4)
    second.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert second.step == 2 and second.position == 2
    second.train()
    a, b = _params(straight), _params(second)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    ema_a, ema_b = straight.ema.state_dict(), second.ema.state_dict()
    assert max((ema_a[k].float() - ema_b[k].float()).abs().max().item() for k in ema_a) <= 1e-6
    assert straight.aggregator.state_dict()["step"] == second.aggregator.state_dict()["step"] == 4
    # metrics.jsonl of the resumed run reads like one run
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "total_vae_loss" in r]
    assert steps == [1, 2, 3, 4]


def test_aggregator_choice_and_parameter_groups(tiny_dmc_data, tmp_path):
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "sum", aggregator="sum", max_steps=1)
    assert type(trainer.aggregator).__name__ == "SumAggregator"
    names = {g.get("name") for g in trainer.optimizer.param_groups}
    assert {"perceiver", "attention", "base"} <= {n.split("/")[0] for n in names}
    # The fused AdamW kernel on CPU and CUDA, for the generator and the discriminator alike.
    assert all(g["fused"] for g in trainer.optimizer.param_groups + trainer.disc_optimizer.param_groups)
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in trainer.model.generator_parameters())
    before = [p.detach().clone() for p in trainer.model.discriminator_parameters()]
    trainer.train()
    after = list(trainer.model.discriminator_parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, after)), "the discriminator did not train"


# --------------------------------------------------------------------------------------------------
def test_schedules():
    assert beta_at(0, 1.0, 4) == pytest.approx(0.25) and beta_at(3, 1.0, 4) == 1.0 and beta_at(99, 2.0, 4) == 2.0
    assert adversarial_weight_at(0, 0) == 1.0
    assert [adversarial_weight_at(s, 2, start=3) for s in range(6)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    f = WarmupCosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    # A wall-clock budget half spent moves the cosine to its middle; it never moves back, nor the warm-up.
    f.set_budget_fraction(0.5)
    assert f(20) == pytest.approx(0.55) and f(85) == pytest.approx(f.min_ratio + 0.9 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert f(0) == pytest.approx(0.1)
    f.set_budget_fraction(0.2)
    assert f.budget_fraction == 0.5
    f.set_budget_fraction(3.0)
    assert f(20) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="fraction=nan"):
        f.set_budget_fraction(float("nan"))


@pytest.mark.parametrize("follows", [True, False])
def test_learning_rate_follows_the_wall_clock_budget(tiny_dmc_data, tmp_path, follows):
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "run", max_steps=10_000, warmup_steps=1,
                           lr_follows_budget=follows)
    trainer.minutes = 0.03   # 1.8 s: a handful of smoke steps, far from max_steps
    result = trainer.train()
    assert result.reason == "budget" and 1 <= result.step < 1000
    peak = trainer.config.learning_rate
    lr = trainer.optimizer.param_groups[-1]["lr"] / trainer.optimizer.param_groups[-1]["initial_lr"] * peak
    spent = trainer.scheduler.lr_lambdas[0].budget_fraction
    if follows:
        # the step alone would leave the cosine at ~1; the budget (most of it spent) takes it down
        assert spent > 0.5 and lr < 0.6 * peak
        assert trainer.disc_scheduler.lr_lambdas[0].budget_fraction == spent
        # the fraction is checkpointed: a resumed trainer goes on from it
        again = make_trainer(tiny_dmc_data, tmp_path / "run", max_steps=10_000, warmup_steps=1, lr_follows_budget=True)
        again.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
        assert again.scheduler.lr_lambdas[0].budget_fraction == pytest.approx(spent)
    else:
        assert spent == 0.0 and lr > 0.99 * peak


def test_sampler_is_a_function_of_seed_and_position():
    full = ResumableBatchSampler(10, 4, seed=3)
    it = iter(full)
    seq = [next(it) for _ in range(7)]
    assert all(len(b) == 4 for b in seq)
    # each epoch (2 batches of 4 out of 10) uses distinct indices
    assert len(set(seq[0] + seq[1])) == 8
    resumed = iter(ResumableBatchSampler(10, 4, seed=3, start=5))
    assert [next(resumed) for _ in range(2)] == seq[5:7]
    ranks = [ResumableBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for pos in range(4):
        assert ranks[0].local_indices(pos) + ranks[1].local_indices(pos) == full.global_indices(pos)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ResumableBatchSampler(10, 3, seed=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatchSampler(3, 4, seed=0)


def test_training_facade_reexports_the_canonical_objects():
    import training
    import VRNN.dmc_dataset
    import VRNN.dmc_vb_transition_dynamics_trainer as canonical

    assert training.DMCVBTrainer is canonical.DMCVBTrainer
    assert training.DMCVBDataset is VRNN.dmc_dataset.DMCVBDataset is canonical.DMCVBDataset
    assert set(training.__all__) == {"DMCVBTrainer", "DMCVBDataset", "TrainResult", "NonFiniteTrainingError"}


def test_amp_on_cpu_trains_in_bf16_or_falls_back_with_a_warning(tiny_dmc_data, tmp_path, monkeypatch, caplog):
    """config.amp on a CPU: bf16 autocast where oneDNN has native bf16, float32 with a warning elsewhere;
    either way a step trains every task and stays finite."""
    from VRNN import dmc_vb_transition_dynamics_trainer as trainer_module

    torch.set_num_threads(1)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    trainer = make_trainer(tiny_dmc_data, tmp_path / "amp", amp=True, max_steps=1)
    assert trainer._amp is native
    if native:
        with trainer._autocast():
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    before = _params(trainer)
    trainer.train()
    after = _params(trainer)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING"):
        assert trainer_module.amp_supported(True, torch.device("cpu")) is False
    assert "float32" in caplog.text
    assert trainer_module.amp_supported(False, torch.device("cpu")) is False


def test_adversarial_start_keeps_the_discriminator_out_until_its_step(tiny_dmc_data, tmp_path):
    """adversarial_start_steps=2: steps 0 and 1 neither train the discriminator nor give the generator an
    adversarial loss; from step 2 both run."""
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_dmc_data, tmp_path / "late", adversarial_start_steps=2, adversarial_warmup_steps=1,
                           max_steps=3)
    disc = lambda: [p.detach().clone() for p in trainer.model.discriminator_parameters()]
    loader = iter(trainer._loader())
    before = disc()
    for _ in range(2):
        scalars = trainer.train_step(next(loader))
        assert scalars["adversarial_weight"] == 0.0 and scalars["adversarial_loss"] == 0.0
        assert "disc/disc_loss" not in scalars
    assert all(torch.equal(a, b) for a, b in zip(before, disc()))
    assert trainer.disc_scheduler.last_epoch == 0   # its warm-up starts with its first step
    scalars = trainer.train_step(next(loader))
    assert scalars["adversarial_weight"] == 1.0 and "disc/disc_loss" in scalars
    assert trainer.disc_scheduler.last_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, disc()))


def test_large_blocks_stay_mapped_after_the_allocator_setting():
    """keep_large_blocks_mapped: a freed 64 MiB block is reused without new page faults (glibc only).
    Run in a fresh interpreter, since the setting is process-wide."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, torch
        from VRNN.vrnn_utilities import keep_large_blocks_mapped
        def faults():
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                torch.empty(16 * 2**20).fill_(1.0)        # 64 MiB, freed at once
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5
        before = faults()
        applied = keep_large_blocks_mapped()
        for _ in range(5):
            faults()   # the heap grows until freed neighbours coalesce into a block that fits (about 8 blocks)
        print(applied, before, faults())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    applied, before, after = out[0] == "True", float(out[1]), float(out[2])
    if not applied:
        pytest.skip("not Linux with glibc: the setting does nothing here")
    assert before > 10000          # 16384 pages of 4 KiB touched anew every time
    assert after < 0.05 * before
