"""Per-task gradient norms and cosines, the running accumulator, and the cosine plot."""

import json
import math

import pytest
import torch
from PIL import Image

from VRNN.grad_diagnostics import (
    GradDiagnostics,
    cosine_records_from_metrics,
    gradient_norms_and_cosines,
    per_task_gradients,
    plot_gradient_cosines,
    stats_from_rgb_diagnostics,
)


def test_norms_and_cosines_known_values():
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0], [-3.0, -4.0, 0.0], [0.0, 0.0, 0.0]])
    norms, cos = gradient_norms_and_cosines(g)
    assert torch.allclose(norms, torch.tensor([5.0, 2.0, 5.0, 0.0]))
    assert cos[0, 1] == pytest.approx(0.8)
    assert cos[0, 2] == pytest.approx(-1.0)
    assert cos[1, 2] == pytest.approx(-0.8)
    assert torch.allclose(torch.diagonal(cos)[:3], torch.ones(3))
    assert torch.isnan(cos[3]).all() and torch.isnan(cos[:, 3]).all()   # zero gradient: no direction
    assert torch.allclose(cos[:3, :3], cos[:3, :3].T)
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        gradient_norms_and_cosines(torch.zeros(3))


def test_per_task_gradients_match_autograd():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    other = torch.nn.Parameter(torch.ones(2))
    x = torch.randn(5, 3)
    out = lin(x)
    losses = {"a": out.pow(2).mean(), "b": out.sum(), "c": (other * 0 + 1).sum().detach()}
    params = list(lin.parameters())
    G = per_task_gradients(losses, params)
    assert G.shape == (3, sum(p.numel() for p in params))
    ga = torch.autograd.grad(losses["a"], params, retain_graph=True)
    assert torch.allclose(G[0], torch.cat([g.flatten() for g in ga]))
    assert torch.count_nonzero(G[2]) == 0            # a constant loss reaches nothing
    assert all(p.grad is None for p in params)       # .grad untouched


def test_stats_from_rgb_dict_variants():
    norms = torch.tensor([1.0, 2.0])
    cos = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    n, c = stats_from_rgb_diagnostics({"grad_norms": norms, "cosines": cos, "alpha": torch.zeros(2)})
    assert torch.equal(n, norms) and torch.equal(c, cos)
    n, c = stats_from_rgb_diagnostics({"grads": torch.tensor([[1.0, 0.0], [0.0, 3.0]])})
    assert torch.allclose(n, torch.tensor([1.0, 3.0])) and c[0, 1] == pytest.approx(0.0)
    # RGB's layout: cosine 0 for a task without gradient, flagged by active=False.
    n, c = stats_from_rgb_diagnostics({"grad_norms": torch.tensor([1.0, 2.0, 0.0]),
                                       "cosines": torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                                       "active": torch.tensor([True, True, False])})
    assert c[0, 1] == pytest.approx(0.3) and torch.isnan(c[2]).all() and torch.isnan(c[:, 2]).all()
    with pytest.raises(ValueError, match="keys"):
        stats_from_rgb_diagnostics({"something": 1})


def test_accumulator_means_reset_and_json(tmp_path):
    diag = GradDiagnostics(("a", "b", "c"))
    assert diag.log_dict() == {}
    diag.update_from_grads(1, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    diag.update_from_grads(2, torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
    row = diag.log_dict()
    assert row["grad_norm/a"] == pytest.approx(2.0)
    assert row["grad_norm/b"] == pytest.approx(1.0)
    assert row["grad_cos/a__b"] == pytest.approx(0.5)        # mean of 0 and 1
    assert row["grad_cos/a__c"] == pytest.approx(-1.0)
    assert row["grad_cos/b__c"] == pytest.approx(-0.5)
    assert row["grad_conflict_frac"] == pytest.approx(2 / 3)
    json.dumps(row, allow_nan=False)                          # metrics.jsonl-safe
    assert diag.log_dict() == {}                              # window was reset
    assert len(diag.history) == 1 and diag.history[0][0] == 2


def test_accumulator_ignores_dead_task_and_checks_shape():
    diag = GradDiagnostics(("a", "b"))
    diag.update_from_grads(5, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    row = diag.log_dict()
    assert "grad_cos/a__b" not in row and row["grad_norm/b"] == 0.0
    assert all(math.isfinite(v) for v in row.values())
    with pytest.raises(ValueError, match="tasks"):
        diag.update(1, torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="distinct"):
        GradDiagnostics(("a", "a"))


def test_plot_from_history_and_from_metrics(tmp_path):
    diag = GradDiagnostics(("vae", "perceiver", "attention"))
    rows = []
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        diag.update_from_grads(step, torch.randn(3, 10, generator=g))
        rows.append({"step": step, "loss": 1.0, **diag.log_dict()})
    p1 = plot_gradient_cosines(diag, tmp_path / "a.png")
    p2 = plot_gradient_cosines(rows, tmp_path / "b.png")
    for p in (p1, p2):
        assert p.stat().st_size > 0
        with Image.open(p) as im:
            assert im.format == "PNG"
    series = cosine_records_from_metrics(rows)
    assert set(series) == {"vae__perceiver", "vae__attention", "perceiver__attention"}
    assert series["vae__perceiver"][0] == [1, 2, 3, 4, 5]
    assert plot_gradient_cosines([{"step": 1, "loss": 2.0}], tmp_path / "c.png") is None
