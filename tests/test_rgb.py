"""multi_task_learning: RGB maths (checked against an explicit reconstruction), state, backward, baselines."""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

from multi_task_learning import RGB, PCGrad, SumAggregator, get_aggregator, per_task_gradients


def _explicit(G: torch.Tensor, d: torch.Tensor, angles: torch.Tensor):
    """ĝ, w, r formed as vectors from RGB's state (independent of its implicit Gram-matrix algebra)."""
    n = G.norm(dim=1, keepdim=True)
    g_hat = G / n
    w = d[None] - (g_hat @ d)[:, None] * g_hat
    w = w / w.norm(dim=1, keepdim=True)
    a = angles.to(G.dtype)[:, None]
    return g_hat, w, torch.cos(a) * g_hat + torch.sin(a) * w


def _conflict(V: torch.Tensor) -> float:
    T = V.shape[0]
    iu = torch.triu_indices(T, T, 1)
    return float((1 - (V @ V.T)[iu[0], iu[1]]).mean())


def _conflicting(T=4, D=40, seed=0, overlap=0.3):
    """T gradients with negative pairwise cosines and different norms."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, T, generator=g, dtype=torch.float64))
    Q = Q.T                                                    # orthonormal rows
    G = Q - overlap * (Q.sum(0, keepdim=True) - Q)             # g_i = q_i - overlap * sum_{j != i} q_j
    return G * torch.linspace(0.5, 3.0, T, dtype=torch.float64)[:, None]


# ----------------------------------------------------------------------------------------------- RGB maths
@pytest.mark.parametrize("scale", ["norm", "unit"])
def test_parallel_gradients_give_common_direction(scale):
    u = torch.randn(30, dtype=torch.float64)
    u = u / u.norm()
    G = torch.stack([1.0 * u, 2.0 * u, 3.0 * u])
    rgb = RGB(scale=scale)
    for _ in range(3):
        out = rgb.aggregate(G)
    expected = 2.0 * u if scale == "norm" else u           # mean norm (1+2+3)/3 = 2, or unit
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert rgb.state_dict()["angles"].abs().max() == 0


def test_conflicting_gradients_rotated_towards_consensus():
    G = _conflicting()
    g_hat0 = G / G.norm(dim=1, keepdim=True)
    assert (g_hat0 @ g_hat0.T).triu(1)[torch.triu(torch.ones(4, 4), 1).bool()].max() < 0
    rgb = RGB(alpha_steps=5)
    for call in range(6):
        out = rgb.aggregate(G)
        st = rgb.state_dict()
        g_hat, _, r = _explicit(G, st["d"], st["angles"])
        # the implicit algebra equals the explicit construction
        n = G.norm(dim=1)
        torch.testing.assert_close(out, (n[:, None] * r).sum(0) / 4, atol=1e-10, rtol=0)
        torch.testing.assert_close(r.norm(dim=1), torch.ones(4, dtype=G.dtype))
        # conflict lowered, and the diagnostics report it
        assert _conflict(r) < _conflict(g_hat) - 1e-3
        assert rgb.last_diagnostics["conflict_after"] == pytest.approx(_conflict(r), abs=1e-9)
        assert rgb.last_diagnostics["conflict_before"] == pytest.approx(_conflict(g_hat), abs=1e-9)
        # proximity: each rotated vector stays a descent direction of its own task
        angles = st["angles"]
        assert (angles >= 0).all() and (angles < torch.pi / 2).all()
        prox = (r - g_hat).square().sum(1)
        torch.testing.assert_close(prox, 2 - 2 * torch.cos(angles))
        assert (prox < 2).all() and ((r * g_hat).sum(1) > 0).all()
        # rotation never moves a task away from the consensus when it is >= 45 degrees off it
        rho, rho_r = g_hat @ st["d"], r @ st["d"]
        far = rho <= 2 ** -0.5
        assert (rho_r[far] >= rho[far] - 1e-12).all()
    assert rgb.step == 6 and (angles > 0).all()


def test_closed_form_angle_gradient_matches_autograd():
    from multi_task_learning.rgb_optimizer import _rotated_geometry  # noqa: F401 - same module internals

    g = torch.Generator().manual_seed(0)
    T = 4
    X = torch.randn(2 * T, 2 * T, generator=g, dtype=torch.float64)
    K = X @ X.T                                            # any Gram matrix of [ĝ; w] will do
    A, Bgw, Wm = K[:T, :T], K[:T, T:], K[T:, T:]
    rgb = RGB(lam=0.7)
    alpha = torch.rand(T, generator=g, dtype=torch.float64).requires_grad_(True)
    (auto,) = torch.autograd.grad(rgb._objective(alpha, A, Bgw, Wm), alpha)
    torch.testing.assert_close(rgb._objective_grad(alpha.detach(), A, Bgw, Wm), auto, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_conflict_never_increases_on_random_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    rgb = RGB()
    for _ in range(4):  # fresh gradients each call: the warm start must not make things worse
        G = torch.randn(4, 64, generator=g, dtype=torch.float64) + 0.3 * torch.randn(64, generator=g,
                                                                                       dtype=torch.float64)
        rgb.aggregate(G)
        diag = rgb.last_diagnostics
        assert diag["conflict_after"] <= diag["conflict_before"] + 1e-12


def test_zero_gradient_task_changes_nothing():
    G = _conflicting(T=3, seed=1)
    G0 = torch.cat([G[:1], torch.zeros(1, G.shape[1], dtype=G.dtype), G[1:]])
    a, b = RGB(), RGB()
    b.load_state_dict({"d": None, "angles": torch.tensor([0.0, 0.3, 0.0, 0.0], dtype=torch.float64), "step": 0})
    for _ in range(3):
        torch.testing.assert_close(a.aggregate(G), b.aggregate(G0), atol=1e-12, rtol=0)
    assert b.state_dict()["angles"][1] == 0.3
    assert b.last_diagnostics["active"].tolist() == [True, False, True, True]
    assert b.aggregate(torch.zeros_like(G0)).abs().max() == 0


def test_state_dict_round_trip_reproduces_next_step():
    g = torch.Generator().manual_seed(0)
    rgb = RGB()
    for _ in range(3):
        rgb.aggregate(torch.randn(4, 100, generator=g))
    buf = io.BytesIO()
    torch.save(rgb.state_dict(), buf)
    buf.seek(0)
    clone = RGB()
    clone.load_state_dict(torch.load(buf))
    G = torch.randn(4, 100, generator=g)
    assert torch.equal(rgb.aggregate(G), clone.aggregate(G))
    assert torch.equal(rgb.state_dict()["angles"], clone.state_dict()["angles"])
    fresh = RGB()
    assert not torch.allclose(fresh.aggregate(G), clone.aggregate(G))  # the state matters


def test_aggregate_errors():
    rgb = RGB()
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        rgb.aggregate(torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        rgb.aggregate(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]))
    rgb.aggregate(torch.randn(3, 4))
    with pytest.raises(ValueError, match="T=3"):
        rgb.aggregate(torch.randn(4, 4))
    with pytest.raises(ValueError, match="scale"):
        RGB(scale="max")


# ----------------------------------------------------------------------------------------------- backward
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
        self.unused = nn.Linear(4, 4)

    def losses(self, x):
        h = self.trunk(x)
        return {f"task{i}": (head(h).squeeze(-1) - float(i)).square().mean() for i, head in enumerate(self.heads)}


def _net_and_losses(seed=0):
    torch.manual_seed(seed)
    net = _Net().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    return net, (lambda: net.losses(x))


def _manual_grads(net, losses, params):
    rows = []
    for loss in losses.values():
        gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, gs)]))
    return torch.stack(rows)


@pytest.mark.parametrize("batched", [True, False])
def test_backward_equals_aggregate_of_manual_grads(batched):
    net, make_losses = _net_and_losses()
    params = list(net.parameters())
    used = [p for n, p in net.named_parameters() if not n.startswith("unused")]
    expected = RGB().aggregate(_manual_grads(net, make_losses(), used))
    net.trunk[0].bias.grad = torch.ones_like(net.trunk[0].bias)  # accumulates onto an existing grad
    rgb = RGB(batched_grads=batched)
    diag = rgb.backward(make_losses(), params)
    assert diag["batched"] is batched and diag["task_names"] == ["task0", "task1", "task2"]
    assert diag["grad_norms"].shape == (3,) and diag["cosines"].shape == (3, 3) and diag["angles"].shape == (3,)
    got = []
    for p in used:
        g = p.grad.flatten()
        if p is net.trunk[0].bias:
            g = g - 1.0
        got.append(g)
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-12, rtol=0)
    assert net.unused.weight.grad is None and net.unused.bias.grad is None


def test_tied_parameter_listed_twice_is_written_once():
    net, make_losses = _net_and_losses()
    SumAggregator().backward(make_losses(), net.parameters())
    ref = net.trunk[0].weight.grad.clone()
    net.zero_grad(set_to_none=True)
    SumAggregator().backward(make_losses(), [*net.parameters(), net.trunk[0].weight])
    torch.testing.assert_close(net.trunk[0].weight.grad, ref, atol=0, rtol=0)


def test_batched_and_fallback_paths_agree():
    grads = {}
    for batched in (True, False):
        net, make_losses = _net_and_losses(seed=3)
        losses = [*make_losses().values(), torch.tensor(1.0, dtype=torch.float64)]  # last: no graph
        per = per_task_gradients(losses, list(net.parameters()), batched=batched)
        grads[(batched, "full")] = per_task_gradients(list(make_losses().values()), list(net.parameters()),
                                                      batched=batched)
        grads[batched] = per
    for key_a, key_b in ((True, False), ((True, "full"), (False, "full"))):
        for a, b in zip(grads[key_a], grads[key_b], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for a, b in zip(grads[True], grads[(True, "full")], strict=True):
        if a is not None:
            assert a[3].abs().max() == 0
            torch.testing.assert_close(a[:3], b, atol=1e-12, rtol=0)


def test_batched_failure_falls_back_once_and_is_remembered(monkeypatch, caplog):
    real_grad = torch.autograd.grad
    calls = {"batched": 0, "plain": 0}

    def flaky_grad(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            calls["batched"] += 1
            raise RuntimeError("no batching rule for this op")
        if isinstance(args[1], (list, tuple)):  # a backward pass over the parameters (not RGB's angle search)
            calls["plain"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", flaky_grad)
    net, make_losses = _net_and_losses()
    rgb = RGB()
    with caplog.at_level(logging.DEBUG, logger="multi_task_learning.rgb_optimizer"):
        diag = rgb.backward(make_losses(), net.parameters())
    assert diag["batched"] is False and "no batching rule" in caplog.text
    assert calls == {"batched": 1, "plain": 3}
    rgb.backward(make_losses(), net.parameters())
    assert calls == {"batched": 1, "plain": 6} and rgb.batched_grads is False


def test_loss_without_graph_is_a_zero_task():
    net, make_losses = _net_and_losses()
    losses = make_losses()
    losses["adv"] = torch.tensor(0.0, dtype=torch.float64)   # e.g. a task switched off during warm-up
    diag = RGB().backward(losses, net.parameters())
    assert diag["active"].tolist() == [True, True, True, False]


def test_sum_equals_plain_backward():
    net, make_losses = _net_and_losses()
    sum(make_losses().values()).backward()
    ref = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    get_aggregator("sum").backward(make_losses(), net.parameters())
    got = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, atol=1e-12, rtol=0)


def test_grad_reduce_hook_is_called_before_aggregation():
    seen = []

    def hook(G):
        seen.append(tuple(G.shape))
        return 2 * G

    net, make_losses = _net_and_losses()
    agg = SumAggregator(grad_reduce_hook=hook)
    agg.backward(make_losses(), net.parameters())
    n_used = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("unused"))
    assert seen == [(3, n_used)]
    G = torch.randn(3, 5)
    torch.testing.assert_close(agg.aggregate(G), 2 * G.sum(0))
    with pytest.raises(ValueError, match="grad_reduce_hook"):
        SumAggregator(grad_reduce_hook=lambda G: G[:1]).aggregate(G)


# ----------------------------------------------------------------------------------------------- PCGrad
def test_pcgrad_two_tasks_removes_conflict():
    g1 = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    out = PCGrad(seed=0).aggregate(torch.stack([g1, g2]))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(out, p1 + p2)
    assert out @ g1 >= 0 and out @ g2 >= 0
    # without conflict PCGrad is the plain sum
    torch.testing.assert_close(PCGrad().aggregate(torch.stack([g1, g1 + 0.1])), 2 * g1 + 0.1)


def test_pcgrad_seeded_and_resumable():
    G = _conflicting(T=4, seed=2)
    a = PCGrad(seed=7)
    a.aggregate(G)
    state = copy.deepcopy(a.state_dict())
    b = PCGrad(seed=123)
    b.load_state_dict(state)
    assert torch.equal(a.aggregate(G), b.aggregate(G))
    assert torch.equal(PCGrad(seed=7).aggregate(G), PCGrad(seed=7).aggregate(G))
    d = a.last_diagnostics
    assert d["conflict_after"] < d["conflict_before"]


def test_registry():
    assert isinstance(get_aggregator("rgb", mu=0.5), RGB)
    assert isinstance(get_aggregator("pcgrad", seed=1), PCGrad)
    with pytest.raises(ValueError, match=r"\['pcgrad', 'rgb', 'sum'\]"):
        get_aggregator("mgda")


def test_task_params_backward_aggregates_only_shared_parameters():
    """Parameters one task trains get its gradient as is; only those several tasks train are aggregated;
    a task far below the largest on the shared block is left out of the aggregation and added plainly."""
    torch.manual_seed(0)
    w1, w2, w3 = (torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 4))

    def losses():
        return {"a": (w1 ** 2).sum() + (w2 * w1[:3]).sum(), "b": (w2 ** 3).sum() + w3.sum(),
                "c": 1e-6 * w3.pow(2).sum()}

    owners = {"a": [w1, w2], "b": [w2, w3], "c": [w3]}
    for name in ("sum", "rgb", "pcgrad"):
        agg = get_aggregator(name, batched_grads=False)
        for p in (w1, w2, w3):
            p.grad = None
        diag = agg.backward(losses(), [w1, w2, w3], task_params=owners, min_relative_norm=0.01)
        got = [p.grad.clone() for p in (w1, w2, w3)]
        for p in (w1, w2, w3):
            p.grad = None
        sum(losses().values()).backward()
        ref = [p.grad.clone() for p in (w1, w2, w3)]
        assert diag["left_out"] == ["c"] and diag["shared_numel"] == 7 and diag["single_numel"] == 5
        torch.testing.assert_close(got[0], ref[0])       # w1: task a alone, its plain gradient
        if name == "sum":
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r)
    with pytest.raises(ValueError, match="not among the losses"):
        get_aggregator("sum").backward(losses(), [w1], task_params={"zz": [w1]})
