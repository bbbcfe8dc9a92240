"""benchmarks/run_all.py on its smallest path: the smoke preset, --quick, every section in this process.
Checks the results file's keys and that every ratio is finite; never a wall-clock figure."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    os.environ.setdefault("MUJOCO_GL", "egl")
    run_all = _load_run_all()
    out = tmp_path_factory.mktemp("bench") / "results.json"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the data section reads data/cheetah-run when present, else what the collection section wrote
        rc = run_all.main(["--quick", "--presets", "smoke", "--no-isolate", "--out", str(out), "--threads", "1",
                           "--collect-steps", "10", "--windows", "8", "--horizon", "2"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    return rc, results


def test_run_all_writes_every_section(smoke_results):
    rc, results = smoke_results
    assert results["meta"]["errors"] == [], {k: v.get("error") for k, v in results.items() if isinstance(v, dict)}
    assert rc == 0
    for key in ("meta", "steps", "tscale", "aggregator", "data", "collect", "imagine", "ratios", "table_markdown"):
        assert key in results, key
    step = results["steps"]["smoke"]
    for key in ("fps", "step_s_median", "gflop_per_frame", "achieved_gflops", "achieved_vs_matmul",
                "peak_memory_mib", "machine", "profile"):
        assert key in step, key
    assert step["skipped_steps"] == 0
    profile = step["profile"]
    for part in ("encoder", "perceiver", "prior loop", "attention", "decoder & likelihood", "per-task gradients",
                 "aggregator", "optimiser", "discriminator step", "EMA update"):
        assert part in profile["shares"], part
    assert sum(profile["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert profile["shares"]["per-task gradients"] > 0 and profile["shares"]["optimiser"] > 0
    assert 0 <= profile["loop_share"] <= 1


def test_ratios_are_finite(smoke_results):
    _, results = smoke_results
    ratios = results["ratios"]
    for key in ("smoke.step_fps", "smoke.achieved_vs_matmul", "smoke.loop_share", "tscale_ratio",
                "aggregator_ratio", "data_ratio", "collect_ratio", "imagine_realtime_ratio"):
        assert key in ratios, key
        assert math.isfinite(ratios[key]) and ratios[key] >= 0, (key, ratios[key])
    assert results["tscale"]["T"] == [4, 8]
    assert results["aggregator"]["aggregators"][0] == "rgb" and len(results["aggregator"]["step_s_median"]) == 3
    assert math.isfinite(results["aggregator"]["ratio_vs_sum_aggregator"])
    assert "| figure |" in results["table_markdown"]


def test_module_paths_map_to_parts():
    run_all = _load_run_all()
    part = run_all.trainer_step.part_of_module
    assert part("encoder.stages.0.conv") == "encoder"
    assert part("cell.attention.slot_attention.mlp.0") == "attention"
    assert part("cell.posterior.net.2") == "prior loop"
    assert part("perceiver.encoder.cross_attention") == "perceiver"
    assert part("decoder.head") == part("likelihood") == "decoder & likelihood"
    assert part("dynamics.transition_mlp") == "prior loop"  # a renamed cell still lands in the loop's part
    assert part("world_head.fc") == "other: world_head"


def test_shipped_section_times_the_tree_of_a_git_ref(tmp_path):
    """The shipped section extracts a git ref's tree and times that tree's step in a child process whose
    VRNN is imported from it (checked by the section); here the ref is HEAD, so the two sides are the same
    code and only the mechanism is tested."""
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    run_all = _load_run_all()
    out = run_all.shipped_section("HEAD", "smoke", repeats=1, rounds=1, threads=1, device="cpu", tmp=tmp_path)
    assert (tmp_path / "tree-HEAD" / "VRNN" / "__init__.py").exists()
    assert len(out["rounds"]) == 1 and out["shape"] == out["shipped_shape"]
    assert math.isfinite(out["ratio"]) and out["ratio"] > 0
    with pytest.raises(RuntimeError, match="git ref"):
        run_all.shipped_section("no-such-ref-0000", "smoke", 1, 1, 1, "cpu", tmp_path)
    table = run_all.markdown_table({"shipped": out})
    assert "as shipped, git HEAD" in table
