"""Baseline aggregators beside RGB ("sum", "pcgrad") and the name registry `get_aggregator`.

All share `GradientAggregator`'s interface: `aggregate(G [T, D]) -> [D]`, `backward(losses, params)`,
`state_dict()` / `load_state_dict()`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .rgb_optimizer import RGB, GradientAggregator, GradReduceHook, gram_stats, mean_pair_conflict


class SumAggregator(GradientAggregator):
    """Plain sum of the task gradients: the same update as `sum(losses).backward()`."""

    name = "sum"

    def _aggregate(self, G: Tensor) -> tuple[Tensor, dict[str, object]]:
        norms, cos, active = gram_stats(G)
        conflict = mean_pair_conflict(cos[active][:, active])
        return G.sum(dim=0), {"grad_norms": norms.float(), "cosines": cos.float(), "active": active,
                              "conflict_before": conflict, "conflict_after": conflict}


class PCGrad(GradientAggregator):
    """Projecting conflicting gradients (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning").

    For each task i, in a random order of the other tasks j: if <g_i', g_j> < 0, remove the component
    of g_i' along g_j (g_i' -= <g_i', g_j>/‖g_j‖² g_j). The result is sum_i g_i'. Zero-gradient tasks
    are skipped (nothing to project on). The projections are carried out on coefficients over the rows
    of G with the T x T Gram matrix, so D is touched only once for the Gram matrix and once for the sum.

    Args:
        seed: seeds the torch.Generator that draws the task orders (its state is in `state_dict`).
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0, grad_reduce_hook: GradReduceHook | None = None,
                 batched_grads: bool = True):
        super().__init__(grad_reduce_hook=grad_reduce_hook, batched_grads=batched_grads)
        self.generator = torch.Generator().manual_seed(int(seed))

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if "generator" not in state:
            raise ValueError(f"PCGrad.load_state_dict: missing key 'generator', got {sorted(state)}")
        self.generator.set_state(state["generator"])

    def _aggregate(self, G: Tensor) -> tuple[Tensor, dict[str, object]]:
        T = G.shape[0]
        norms, cos, active = gram_stats(G)
        K = cos * norms[:, None] * norms[None, :]           # Gram matrix, float64 [T, T]
        C = torch.eye(T, dtype=torch.float64)               # g_i' = sum_k C[i, k] g_k
        for i in active.nonzero().flatten().tolist():
            for j in torch.randperm(T, generator=self.generator).tolist():
                if j == i or not active[j]:
                    continue
                dot = C[i] @ K[:, j]
                if dot < 0:
                    C[i, j] -= dot / K[j, j]
        Kp = C @ K @ C.T                                    # Gram matrix of the projected gradients
        pn = Kp.diagonal().clamp_min(0).sqrt()
        inv = torch.where(pn > 0, 1.0 / pn.clamp_min(1e-300), torch.zeros_like(pn))
        cos_p = Kp * inv[:, None] * inv[None, :]
        cdt = torch.float64 if G.dtype == torch.float64 else torch.float32
        out = C.sum(dim=0).to(G.device, cdt) @ G.to(cdt)
        return out, {"grad_norms": norms.float(), "cosines": cos.float(), "active": active,
                     "conflict_before": mean_pair_conflict(cos[active][:, active]),
                     "conflict_after": mean_pair_conflict(cos_p[active][:, active])}


AGGREGATORS: dict[str, type[GradientAggregator]] = {
    RGB.name: RGB,
    SumAggregator.name: SumAggregator,
    PCGrad.name: PCGrad,
}


def get_aggregator(name: str, **kwargs) -> GradientAggregator:
    """Build the aggregator registered under `name` ("rgb", "sum", "pcgrad") with its keyword arguments."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](**kwargs)
