"""Data-parallel training (SYSTEM.md section 5): two gloo processes under torchrun on CPU end with identical
parameters, equal (within float tolerance) to one process trained on the same global batch.

This file is also the worker that torchrun starts (``python -m torch.distributed.run ... tests/test_ddp.py``).

Why the two runs can agree: the global batch of 4 windows is split 2 + 2 across ranks
(``ResumableBatchSampler``), every loss is a mean over the batch, RGB aggregates the rank-averaged [T, D]
task-gradient matrix, discriminator gradients are averaged, and the VQ codebook's batch statistics are
summed over ranks. What would still differ, and how the test removes it:
- sampling noise (Kumaraswamy sticks, the KL's Monte Carlo draws) is drawn per batch, not per example,
  so a [2, ...] draw on each rank differs from a [4, ...] draw in one process: the worker switches it off
  by replacing ``torch.rand`` with 0.5 and ``torch.randn`` with 0 after the model is built (and
  ``alpha_samples=0`` takes the exact expectation over the concentration);
- the VQ codebook initialises itself from, and restarts dead codes with, vectors of the local batch:
  the worker marks the codebook initialised and turns restarts off.
Rank 1 also perturbs its freshly built weights, to check that the trainer broadcasts rank 0's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def switch_off_sampling_noise(model: torch.nn.Module) -> None:
    """Test-only: deterministic 'samples' (u = 0.5, eps = 0) and no batch-local codebook events."""
    torch.rand = lambda *shape, generator=None, dtype=None, device=None, **kw: torch.full(
        tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape,
        0.5, dtype=dtype, device=device)
    torch.randn = lambda *shape, generator=None, dtype=None, device=None, **kw: torch.zeros(
        tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape,
        dtype=dtype, device=device)
    for module in model.modules():
        if hasattr(module, "dead_code_threshold"):
            module.dead_code_threshold = 0.0
        if isinstance(getattr(module, "initialized", None), torch.Tensor):
            module.initialized.fill_(True)


def worker(data_dir: Path, out_dir: Path) -> None:
    from VRNN.aime_config import AIMEConfig
    from VRNN.ddp_utils import cleanup_distributed, init_distributed
    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.hdf5_io import find_splits
    from VRNN.run_setup import build_model, load_datasets
    from VRNN.vrnn_utilities import seed_everything

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    config = AIMEConfig.preset("smoke", batch_size=4, max_steps=STEPS, eval_every=1000, checkpoint_every=1000,
                               alpha_samples=0)
    train, _, evaluation = load_datasets(config, *find_splits(data_dir))
    config = config.replace(action_dim=train.action_dim)
    seed_everything(config.seed)
    model = build_model(config, train.action_dim, ctx.device)
    if ctx.rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    switch_off_sampling_noise(model)
    run_dir = out_dir / f"run_{ctx.world_size}"
    trainer = DMCVBTrainer(model, train, evaluation, config, run_dir, dist=ctx, progress=False)
    if ctx.rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                   out_dir / f"init_world{ctx.world_size}.pt")
    trainer.train()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               out_dir / f"params_world{ctx.world_size}_rank{ctx.rank}.pt")
    cleanup_distributed()


def _torchrun(nproc: int, data_dir: Path, out_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", "tests/test_ddp.py", str(data_dir), str(out_dir)],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_match_each_other_and_one_process(tiny_dmc_data, tmp_path):
    two = _torchrun(2, tiny_dmc_data, tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    one = _torchrun(1, tiny_dmc_data, tmp_path)
    assert one.returncode == 0, one.stderr[-4000:]
    r0 = torch.load(tmp_path / "params_world2_rank0.pt")
    r1 = torch.load(tmp_path / "params_world2_rank1.pt")
    single = torch.load(tmp_path / "params_world1_rank0.pt")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    # Float tolerance, measured on the updates (trained - initial): summation order differs between a [4]
    # batch and two all-reduced [2] batches, and Adam turns ~1e-10 noise in gradients that are zero in
    # exact arithmetic (e.g. conv biases in front of a GroupNorm) into steps of order lr. So: the update as
    # a whole agrees to 1e-4 relative, and all but a few elements agree to 1e-5 absolute.
    init = torch.load(tmp_path / "init_world1.pt")
    init2 = torch.load(tmp_path / "init_world2.pt")
    floats = [k for k in r0 if r0[k].is_floating_point()]
    assert all(torch.equal(init[k], init2[k]) for k in floats)
    num = sum(((r0[k] - init[k]).double() - (single[k] - init[k]).double()).pow(2).sum().item() for k in floats)
    den = sum((single[k] - init[k]).double().pow(2).sum().item() for k in floats)
    assert den > 0, "no parameter moved"
    assert (num / den) ** 0.5 < 1e-4, f"relative update difference {(num / den) ** 0.5}"
    off = sum(((r0[k] - single[k]).abs() > 1e-5).sum().item() for k in floats)
    total = sum(r0[k].numel() for k in floats)
    assert off / total < 1e-3, f"{off} of {total} parameters differ by more than 1e-5"
    # training did happen: parameters moved away from the initialisation
    from VRNN.vrnn_utilities import load_checkpoint

    payload = load_checkpoint(tmp_path / "run_2" / "checkpoints" / "latest.pt")
    assert payload["step"] == STEPS and payload["world_size"] == 2
    assert (tmp_path / "run_2" / "metrics.jsonl").is_file() and (tmp_path / "run_2" / "eval.json").is_file()


def test_training_script_runs_under_torchrun(tiny_dmc_data, tmp_path):
    """``VRNN/training_vrnn.py`` unchanged under torchrun: rank 0 writes the run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "VRNN/training_vrnn.py", "--env", "dmc_cheetah_run", "--preset", "smoke", "--batch-size", "4",
                          "--max-steps", "2", "--data-dir", str(tiny_dmc_data), "--run-dir", str(run_dir)],
                         cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    from VRNN.vrnn_utilities import load_checkpoint

    payload = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert payload["step"] == 2 and payload["world_size"] == 2 and payload["position"] == 2
    assert (run_dir / "eval.json").is_file() and (run_dir / "config.json").is_file()
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"total_vae_loss"' in r and '"eval/' not in r for r in rows) == 2  # rank 0 logs, once per step


def test_stop_file_stops_every_rank_with_a_checkpoint(tiny_dmc_data, tmp_path):
    """What run_VRNN_minimum.sh does on preemption: the stop file makes both ranks stop at the same step."""
    import json
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    run_dir, stop_file = tmp_path / "run", tmp_path / "STOP"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "VRNN/training_vrnn.py", "--preset", "smoke", "--batch-size", "4", "--max-steps", "500",
                             "--eval-every", "1000", "--checkpoint-every", "1000", "--data-dir", str(tiny_dmc_data),
                             "--run-dir", str(run_dir), "--stop-file", str(stop_file)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        stop_file.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    from VRNN.vrnn_utilities import load_checkpoint

    payload = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert 2 <= payload["step"] < 500 and payload["world_size"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == payload["step"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
