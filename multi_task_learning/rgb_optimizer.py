"""RGB: rotation-based gradient balancing of task gradients (MODEL.md §5), and the aggregator interface.

Every aggregator maps a task-gradient matrix G [T, D] (row i = gradient of task i w.r.t. the flattened
shared parameters) to one update direction [D] (`aggregate`), and wraps that in `backward(losses, params)`
which computes G with autograd and writes `.grad`. `RGB` lives here together with the base class it
defines; the simpler `"sum"` / `"pcgrad"` aggregators and the name registry are in `aggregators.py`.

RGB, with ĝ_i = g_i/‖g_i‖ over the tasks whose gradient is not zero (T_a of them):
    d   <- normalise(mu d + (1 - mu) normalise(mean_i ĝ_i))           (consensus, kept across calls)
    w_i  = normalise(d - <ĝ_i, d> ĝ_i)                                 (unit, orthogonal to ĝ_i)
    r_i  = cos(a_i) ĝ_i + sin(a_i) w_i,  a_i in [0, pi/2)              (ĝ_i turned towards d)
    a    = a few projected gradient steps on
           J(a) = sum_{i<j} (1 - <r_i, r_j>) / (T_a (T_a - 1)) + lam sum_i ‖r_i - ĝ_i‖² / (4 T_a)
    out  = sum_i ‖g_i‖ r_i / T_a     (scale="norm")   or   mean_i r_i   (scale="unit")

Choices where MODEL.md is silent (documented as it asks):
- T_a (the number of non-zero tasks) replaces T in the objective and in the average, so adding a task
  whose gradient is zero changes nothing; that task's angle state is not touched.
- Never forming w_i or r_i: all inner products follow from the T x T Gram matrix of G and from G d
  (<ĝ_i, w_j> = (rho_i - rho_j A_ij)/nu_j, <w_i, w_j> = (1 - 2 rho_i rho_j + rho_i rho_j A_ij)/(nu_i nu_j)
  with A the cosine matrix, rho_i = <ĝ_i, d>, nu_i = sqrt(1 - rho_i²)), so the angle search costs
  O(T²) per step and a call costs two passes over G. The output is a linear combination of the rows
  of G and d.
- A task whose ĝ_i is (numerically) parallel to d (nu_i < 1e-3, i.e. within ~0.06 degrees) has no
  rotation plane: its angle is held at 0.
- Warm start: the previous call's angles, unless the zero angles give a lower objective for the current
  gradients. Each step is a gradient step of size `inner_lr`, halved (up to 8 times) until J does not
  increase, then clipped to [0, pi/2 - 1e-3]. Hence J(final) <= J(0) = conflict of the ĝ_i, and since
  the proximity term is >= 0, the rotated vectors never conflict more than the normalised gradients.
  Each r_i keeps <r_i, ĝ_i> = cos a_i > 0, i.e. ‖r_i - ĝ_i‖² = 2 - 2 cos a_i < 2.
- The gradient of J w.r.t. the angles is in closed form (`_objective_grad`), on T-sized float64 tensors.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

GradReduceHook = Callable[[Tensor], Tensor]
Losses = Sequence[Tensor] | Mapping[str, Tensor]

ZERO_NORM = 1e-12        # a task gradient with a smaller L2 norm counts as zero (left out of the step)
_DEGENERATE_NU = 1e-3    # sin of the angle between ĝ_i and d below which there is no rotation plane
_MAX_ANGLE = math.pi / 2 - 1e-3
_MAX_HALVINGS = 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _normalise_losses(losses: Losses) -> tuple[list[str], list[Tensor]]:
    if isinstance(losses, Mapping):
        names, tensors = [str(k) for k in losses], list(losses.values())
    elif isinstance(losses, (list, tuple)):
        names, tensors = [str(i) for i in range(len(losses))], list(losses)
    else:
        raise ValueError(f"losses must be a sequence or a mapping of scalar tensors, got {type(losses).__name__}")
    if not tensors:
        raise ValueError("losses is empty: expected at least one task loss")
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor) or t.numel() != 1:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"loss {name!r} must be a scalar tensor, got {got}")
    return names, tensors


def per_task_gradients(losses: Sequence[Tensor], params: Sequence[Tensor], batched: bool = True,
                       retain_graph: bool = False) -> list[Tensor | None]:
    """Gradients of each of T scalar losses w.r.t. each parameter.

    Args:
        losses: T scalar tensors (those that do not require grad get zero gradients).
        params: P tensors that require grad.
        batched: one vmapped backward pass (`is_grads_batched=True` over the one-hot grad_outputs of the
            stacked losses) instead of T separate passes. Errors of the batched pass propagate.
        retain_graph: keep the graph after the (last) backward pass.
    Returns:
        per parameter a tensor [T, *param.shape], or None where no task reaches that parameter.
    """
    T = len(losses)
    live = [i for i, l in enumerate(losses) if l.requires_grad]
    rows: list[list[Tensor | None]] = []  # rows[k][p]: grad of live task k w.r.t. param p
    if live and params:
        if batched:
            stacked = torch.stack([losses[i].reshape(()) for i in live])
            eye = torch.eye(len(live), dtype=stacked.dtype, device=stacked.device)
            grads = torch.autograd.grad(stacked, params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True, retain_graph=retain_graph)
            if len(live) == T:  # already [T, *shape] per parameter: no copy
                return list(grads)
            rows = [[None if g is None else g[k] for g in grads] for k in range(len(live))]
        else:
            for k, i in enumerate(live):
                keep = retain_graph or k < len(live) - 1
                rows.append(list(torch.autograd.grad(losses[i], params, allow_unused=True, retain_graph=keep)))
    out: list[Tensor | None] = []
    for p_idx, p in enumerate(params):
        per_task = [rows[k][p_idx] for k in range(len(live))]
        if all(g is None for g in per_task):
            out.append(None)
            continue
        full = p.new_zeros((T,) + tuple(p.shape))
        for k, i in enumerate(live):
            if per_task[k] is not None:
                full[i] = per_task[k]
        out.append(full)
    return out


class GradientAggregator:
    """Common interface: `aggregate(G [T, D]) -> [D]`, `backward(losses, params)`, `state_dict()`.

    Args:
        grad_reduce_hook: called as hook(G [T, D]) -> [T, D] before aggregation (e.g. an all-reduce mean
            across data-parallel ranks so every rank applies the same update).
        batched_grads: try the single vmapped backward pass first; on its first failure the instance logs
            the error (debug level) and uses T separate passes from then on.
    """

    name = "base"

    def __init__(self, grad_reduce_hook: GradReduceHook | None = None, batched_grads: bool = True):
        if grad_reduce_hook is not None and not callable(grad_reduce_hook):
            raise ValueError(f"grad_reduce_hook must be callable or None, got {type(grad_reduce_hook).__name__}")
        self.grad_reduce_hook = grad_reduce_hook
        self.batched_grads = bool(batched_grads)
        self._batched_verified = False
        self.last_diagnostics: dict[str, object] = {}

    # -------------------------------------------------------------- to implement
    def _aggregate(self, G: Tensor) -> tuple[Tensor, dict[str, object]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    # -------------------------------------------------------------- shared
    def aggregate(self, grads: Tensor) -> Tensor:
        """Combine task gradients.

        Args:
            grads: G [T, D], row i the flattened gradient of task i.
        Returns:
            [D] update direction (in G's dtype; add it to .grad like a plain backward would).
        """
        if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
            got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
            raise ValueError(f"{type(self).__name__}.aggregate: grads must be a [T, D] tensor with T, D >= 1, got {got}")
        if not grads.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}.aggregate: grads must be floating point, got {grads.dtype}")
        if self.grad_reduce_hook is not None:
            reduced = self.grad_reduce_hook(grads)
            if not isinstance(reduced, Tensor) or reduced.shape != grads.shape:
                got = tuple(reduced.shape) if isinstance(reduced, Tensor) else type(reduced).__name__
                raise ValueError(f"grad_reduce_hook must return a tensor of shape {list(grads.shape)}, got {got}")
            grads = reduced
        out, diag = self._aggregate(grads)
        self.last_diagnostics = diag
        return out.to(grads.dtype)

    def backward(self, losses: Losses, shared_params, retain_graph: bool = False,
                 task_params: Mapping[str, Sequence[Tensor]] | Sequence[Sequence[Tensor]] | None = None,
                 min_relative_norm: float = 0.0) -> dict[str, object]:
        """Per-task gradients of the shared parameters, aggregated and written to `.grad`.

        With ``task_params`` (per task, by name or position, the parameters that task trains), each task's
        gradient is taken with respect to its own parameters only (autograd then walks only the part of the
        graph that leads to them). Parameters that exactly one task reaches take that task's gradient as it
        is; only the parameters that several tasks reach are aggregated. Tasks whose gradient on those
        shared parameters is below ``min_relative_norm`` times the largest are left out of the aggregation
        and added plainly (they cannot bend the others' update). Without ``task_params`` every task's
        gradient is taken over all of ``shared_params`` and aggregated, as before.

        Args:
            losses: T scalar task losses, as a sequence or a {name: loss} mapping.
            shared_params: iterable of parameters; those with requires_grad=False are skipped.
            retain_graph: keep the autograd graph (as in `Tensor.backward`).
        Returns:
            diagnostics: `task_names` (list), `grad_norms` [T], `cosines` [T, T] (raw task gradients),
            `active` [T] bool, `conflict_before` / `conflict_after` (mean over task pairs of 1 - cos,
            before and after the aggregator's per-task transformation), `batched` (bool), plus
            aggregator-specific keys (RGB: `angles` [T]).
        A parameter that no task reaches keeps its `.grad` (None stays None); otherwise the aggregated
        gradient is added to an existing `.grad` or set where it is None.
        """
        names, loss_list = _normalise_losses(losses)
        if task_params is not None:
            return self._backward_by_task(names, loss_list, task_params, retain_graph, float(min_relative_norm))
        params, seen = [], set()
        for p in shared_params:
            if not isinstance(p, Tensor):
                raise ValueError(f"shared_params must hold tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:  # a tied parameter listed twice is written once
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("backward: shared_params holds no tensor that requires grad")
        per_param, used_batched = self._per_task_gradients(loss_list, params, retain_graph)
        used = [(p, g) for p, g in zip(params, per_param) if g is not None]
        if not used:
            logger.debug("backward: no task reaches any shared parameter; nothing written")
            T = len(loss_list)
            return {"task_names": names, "grad_norms": torch.zeros(T), "cosines": torch.zeros(T, T),
                    "active": torch.zeros(T, dtype=torch.bool), "conflict_before": 0.0, "conflict_after": 0.0,
                    "batched": used_batched}
        dtype = used[0][1].dtype
        for _, g in used[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        G = torch.cat([g.reshape(len(loss_list), -1).to(dtype) for _, g in used], dim=1)  # [T, D]
        combined = self.aggregate(G)
        self._write(used, combined)
        diag = dict(self.last_diagnostics)
        diag.update(task_names=names, batched=used_batched)
        return diag

    def _backward_by_task(self, names: list[str], losses: list[Tensor], task_params, retain_graph: bool,
                          min_relative_norm: float) -> dict[str, object]:
        T = len(losses)
        if isinstance(task_params, Mapping):
            unknown = sorted(set(task_params) - set(names))
            if unknown:
                raise ValueError(f"task_params names {unknown} are not among the losses {names}")
            per_task = [list(task_params.get(n, [])) for n in names]
        else:
            per_task = [list(ps) for ps in task_params]
            if len(per_task) != T:
                raise ValueError(f"task_params has {len(per_task)} entries for {T} losses")
        # Shared = declared by several tasks. The set is fixed by the declaration, not by which tasks give a
        # gradient this step, so the aggregator's dimension D stays the same when a task is switched off for
        # a while (a loss without a graph, e.g. the adversarial task before adversarial_start_steps): its
        # rows are zeros, which aggregators skip.
        declared: dict[int, tuple[Tensor, set[int]]] = {}
        for i, ps in enumerate(per_task):
            for p in ps:
                if p.requires_grad:
                    declared.setdefault(id(p), (p, set()))[1].add(i)
        # grads[id(p)] = (p, {task index: gradient})
        grads: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}
        live = [i for i in range(T) if losses[i].requires_grad and any(p.requires_grad for p in per_task[i])]
        for k, i in enumerate(live):
            params = list({id(p): p for p in per_task[i] if p.requires_grad}.values())
            keep = retain_graph or k < len(live) - 1
            for p, g in zip(params, torch.autograd.grad(losses[i], params, allow_unused=True, retain_graph=keep)):
                if g is not None:
                    grads.setdefault(id(p), (p, {}))[1][i] = g
        single = [(p, next(iter(grads[id(p)][1].values()))) for p, tasks in declared.values()
                  if len(tasks) == 1 and id(p) in grads]
        shared = [(p, grads[id(p)][1] if id(p) in grads else {}) for p, tasks in declared.values() if len(tasks) > 1]
        if single:
            flat = torch.cat([g.reshape(-1) for _, g in single]).unsqueeze(0)
            if self.grad_reduce_hook is not None:  # data-parallel: the same mean over ranks as G gets
                flat = self.grad_reduce_hook(flat)
            self._write(single, flat[0])
        diag: dict[str, object] = {"task_names": names, "batched": False,
                                   "shared_numel": sum(p.numel() for p, _ in shared),
                                   "single_numel": sum(p.numel() for p, _ in single)}
        if not shared:
            diag.update(grad_norms=torch.zeros(T), cosines=torch.zeros(T, T), active=torch.zeros(T, dtype=torch.bool),
                        conflict_before=0.0, conflict_after=0.0, left_out=[])
            return diag
        dtype = torch.float32
        for _, gs in shared:
            for g in gs.values():
                dtype = torch.promote_types(dtype, g.dtype)
        G = torch.cat([torch.stack([gs[i].reshape(-1).to(dtype) if i in gs else
                                    torch.zeros(p.numel(), dtype=dtype, device=p.device) for i in range(T)])
                       for p, gs in shared], dim=1)  # [T, D_shared]
        if self.grad_reduce_hook is not None:
            G = self.grad_reduce_hook(G)
        norms = G.norm(dim=1)
        small = (norms < min_relative_norm * norms.max()) & (norms > 0)
        left_out = [names[i] for i in range(T) if bool(small[i])]
        # Left-out tasks become zero rows (aggregators skip those), so T and D stay what the state expects.
        Gk = G.masked_fill(small[:, None], 0.0) if left_out else G
        hook, self.grad_reduce_hook = self.grad_reduce_hook, None  # G is already reduced
        try:
            combined = self.aggregate(Gk)
        finally:
            self.grad_reduce_hook = hook
        if left_out:
            combined = combined + G[small].sum(dim=0)
        # Parameters that no task reached this step keep their .grad (None stays None).
        offsets, start = [], 0
        for p, _ in shared:
            offsets.append((start, start + p.numel()))
            start += p.numel()
        reached = [k for k, (_, gs) in enumerate(shared) if gs]
        if len(reached) == len(shared):
            self._write([(p, None) for p, _ in shared], combined)
        elif reached:
            self._write([(shared[k][0], None) for k in reached],
                        torch.cat([combined[offsets[k][0]:offsets[k][1]] for k in reached]))
        diag.update(self.last_diagnostics)
        diag["left_out"] = left_out
        return diag

    @staticmethod
    def _write(pairs, flat: Tensor) -> None:
        """Add consecutive slices of flat [D] to the ``.grad`` of each parameter in pairs (p, _)."""
        offset = 0
        with torch.no_grad():
            for p, _ in pairs:
                n = p.numel()
                g = flat[offset:offset + n].view(p.shape).to(p.dtype)
                offset += n
                if p.grad is None:
                    p.grad = g.clone(memory_format=torch.contiguous_format)
                else:
                    p.grad.add_(g)

    def _per_task_gradients(self, losses: list[Tensor], params: list[Tensor],
                            retain_graph: bool) -> tuple[list[Tensor | None], bool]:
        if self.batched_grads:
            try:
                # until the batched pass has worked once, keep the graph so a fallback can still walk it
                keep = retain_graph or not self._batched_verified
                grads = per_task_gradients(losses, params, batched=True, retain_graph=keep)
                self._batched_verified = True
                return grads, True
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                self.batched_grads = False
                logger.debug("batched per-task gradients failed (%s: %s); using %d separate backward passes "
                             "from now on", type(err).__name__, err, len(losses))
        return per_task_gradients(losses, params, batched=False, retain_graph=retain_graph), False


def gram_stats(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Task-gradient geometry of G [T, D]: norms [T], cosines [T, T] (0 for zero tasks), active [T] bool.

    Computed in float64 on the CPU (these are T x T numbers that drive Python-side decisions) from one
    [T, T] Gram matrix (norms are its diagonal).
    """
    K = (G @ G.T).double().cpu()
    bad = ~torch.isfinite(K.diagonal())  # a NaN/inf entry makes its row's squared norm non-finite
    if bad.any():
        raise ValueError(f"non-finite gradients (NaN/inf, or a squared norm that overflows) for tasks "
                         f"{bad.nonzero().flatten().tolist()}")
    norms = K.diagonal().clamp_min(0).sqrt()
    active = norms > ZERO_NORM
    inv = torch.where(active, 1.0 / norms.clamp_min(ZERO_NORM), torch.zeros_like(norms))
    cos = K * inv[:, None] * inv[None, :]
    return norms, cos, active


def mean_pair_conflict(cos: Tensor) -> float:
    """Mean over the pairs i < j of (1 - cos_ij) for a [T, T] cosine matrix; 0 when T < 2."""
    T = cos.shape[0]
    if T < 2:
        return 0.0
    iu = torch.triu_indices(T, T, offset=1)
    return float((1.0 - cos[iu[0], iu[1]]).mean())


def _rotated_geometry(alpha: Tensor, A: Tensor, Bgw: Tensor, Wm: Tensor) -> tuple[Tensor, Tensor]:
    """<r_i, r_j> [T, T] and ‖r_i - ĝ_i‖² [T] for angles alpha [T] (all float64)."""
    c, s = torch.cos(alpha), torch.sin(alpha)
    R = (c[:, None] * c[None, :] * A + c[:, None] * s[None, :] * Bgw
         + s[:, None] * c[None, :] * Bgw.T + s[:, None] * s[None, :] * Wm)
    prox = (c - 1) ** 2 * A.diagonal() + 2 * (c - 1) * s * Bgw.diagonal() + s ** 2 * Wm.diagonal()
    return R, prox


class RGB(GradientAggregator):
    """Rotation-based gradient balancing (MODEL.md §5); see the module docstring for the maths.

    Args:
        mu: momentum of the consensus direction d.
        lam: weight of the proximity term (keeps r_i near ĝ_i).
        alpha_steps: projected gradient steps on the angles per call.
        inner_lr: step size of those steps (radians per unit gradient).
        scale: "norm" -> sum_i ‖g_i‖ r_i / T_a; "unit" -> mean_i r_i.
        grad_reduce_hook, batched_grads: see `GradientAggregator`.
    State (`state_dict`): d [D] (None before the first call), angles [T], step (calls so far).
    """

    name = "rgb"
    SCALES = ("norm", "unit")

    def __init__(self, mu: float = 0.9, lam: float = 1.0, alpha_steps: int = 3, inner_lr: float = 0.2,
                 scale: str = "norm", grad_reduce_hook: GradReduceHook | None = None,
                 batched_grads: bool = True):
        super().__init__(grad_reduce_hook=grad_reduce_hook, batched_grads=batched_grads)
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"RGB: mu must be in [0, 1), got {mu!r}")
        if lam < 0:
            raise ValueError(f"RGB: lam must be >= 0, got {lam!r}")
        if not isinstance(alpha_steps, int) or alpha_steps < 0:
            raise ValueError(f"RGB: alpha_steps must be an int >= 0, got {alpha_steps!r}")
        if inner_lr <= 0:
            raise ValueError(f"RGB: inner_lr must be > 0, got {inner_lr!r}")
        if scale not in self.SCALES:
            raise ValueError(f"RGB: scale must be one of {self.SCALES}, got {scale!r}")
        self.mu, self.lam, self.alpha_steps, self.inner_lr, self.scale = float(mu), float(lam), alpha_steps, \
            float(inner_lr), scale
        self.reset()

    def reset(self) -> None:
        """Forget d, the angles and the step count."""
        self.d: Tensor | None = None
        self.angles: Tensor | None = None
        self.step = 0

    def state_dict(self) -> dict[str, object]:
        return {"d": None if self.d is None else self.d.detach().clone(),
                "angles": None if self.angles is None else self.angles.clone(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        missing = {"d", "angles", "step"} - set(state)
        if missing:
            raise ValueError(f"RGB.load_state_dict: missing keys {sorted(missing)}")
        d, angles = state["d"], state["angles"]
        self.d = None if d is None else torch.as_tensor(d).detach().clone()
        self.angles = None if angles is None else torch.as_tensor(angles, dtype=torch.float64).clone()
        self.step = int(state["step"])

    def _objective(self, alpha: Tensor, A: Tensor, Bgw: Tensor, Wm: Tensor) -> Tensor:
        Ta = alpha.shape[0]
        R, prox = _rotated_geometry(alpha, A, Bgw, Wm)
        conflict = (1.0 - R).triu(diagonal=1).sum() / (Ta * (Ta - 1)) if Ta > 1 else R.new_zeros(())
        return conflict + self.lam * prox.sum() / (4 * Ta)

    def _objective_grad(self, alpha: Tensor, A: Tensor, Bgw: Tensor, Wm: Tensor) -> Tensor:
        """dJ/dalpha [T] in closed form (checked against autograd in the tests).

        With sum(R) = c'Ac + 2c'Bs + s'Ws, dc/da = -s, ds/da = c and sum_{i<j} R_ij = (sum(R) - tr R)/2.
        """
        Ta = alpha.shape[0]
        c, s = torch.cos(alpha), torch.sin(alpha)
        a_d, b_d, w_d = A.diagonal(), Bgw.diagonal(), Wm.diagonal()
        d_sum = -2 * s * (A @ c) + 2 * (-s * (Bgw @ s) + c * (Bgw.T @ c)) + 2 * c * (Wm @ s)
        d_tr = -2 * c * s * a_d + 2 * (c * c - s * s) * b_d + 2 * s * c * w_d
        d_prox = -2 * (c - 1) * s * a_d + 2 * (c * (c - 1) - s * s) * b_d + 2 * s * c * w_d
        d_conflict = -(d_sum - d_tr) / (2 * Ta * (Ta - 1)) if Ta > 1 else torch.zeros_like(alpha)
        return d_conflict + self.lam * d_prox / (4 * Ta)

    def _solve_angles(self, start: Tensor, frozen: Tensor, A: Tensor, Bgw: Tensor, Wm: Tensor) -> Tensor:
        zero = torch.zeros_like(start)
        J = self._objective(start, A, Bgw, Wm)
        J_zero = self._objective(zero, A, Bgw, Wm)
        alpha, J = (start, J) if J <= J_zero else (zero, J_zero)
        for _ in range(self.alpha_steps):
            grad = self._objective_grad(alpha, A, Bgw, Wm).masked_fill(frozen, 0.0)
            if not bool(grad.abs().max() > 0):
                break
            lr = self.inner_lr
            for _ in range(_MAX_HALVINGS):
                cand = (alpha - lr * grad).clamp(0.0, _MAX_ANGLE)
                J_cand = self._objective(cand, A, Bgw, Wm)
                if J_cand <= J:
                    alpha, J = cand, J_cand
                    break
                lr *= 0.5
            else:
                break
        return alpha

    def _aggregate(self, G: Tensor) -> tuple[Tensor, dict[str, object]]:
        T, D = G.shape
        cdt = _compute_dtype(G.dtype)
        G = G.to(cdt)
        if self.angles is not None and self.angles.shape[0] != T:
            raise ValueError(f"RGB was used with T={self.angles.shape[0]} tasks and now gets T={T}; "
                             "call reset() to start over")
        if self.d is not None and self.d.shape[0] != D:
            raise ValueError(f"RGB was used with D={self.d.shape[0]} parameters and now gets D={D}; "
                             "call reset() to start over")
        norms, cos, active = gram_stats(G)  # validates (non-finite rows) before any state changes
        if self.angles is None:
            self.angles = torch.zeros(T, dtype=torch.float64)
        self.step += 1
        diag: dict[str, object] = {"grad_norms": norms.float(), "cosines": cos.float(), "active": active,
                                   "conflict_before": mean_pair_conflict(cos[active][:, active])}
        idx = active.nonzero().flatten()
        Ta = idx.numel()
        if Ta == 0:
            diag.update(conflict_after=0.0, angles=self.angles.float().clone())
            return G.new_zeros(D), diag
        dev = G.device
        n = norms[idx]                                   # [Ta] float64
        A = cos[idx][:, idx]                             # [Ta, Ta] cosines of the active tasks
        Ga = G if Ta == T else G[idx]                    # [Ta, D] (no copy when every task is active)
        # consensus direction
        mean_dir = (1.0 / (n * Ta)).to(cdt).to(dev) @ Ga
        mean_dir = mean_dir / mean_dir.norm().clamp_min(ZERO_NORM)
        d = mean_dir * (1 - self.mu) if self.d is None else self.d.to(dev, cdt) * self.mu + (1 - self.mu) * mean_dir
        d_norm = float(d.norm())
        d = d / d_norm if d_norm > ZERO_NORM else torch.zeros_like(d)
        self.d = d
        dn = 1.0 if d_norm > ZERO_NORM else 0.0          # ‖d‖²: 0 only when the gradients cancel exactly
        rho = (Ga @ d).double().cpu() / n                      # <ĝ_i, d>
        nu = (dn - rho.square()).clamp_min(0).sqrt()     # ‖d - rho_i ĝ_i‖
        frozen = nu < _DEGENERATE_NU
        inv_nu = torch.where(frozen, torch.zeros_like(nu), 1.0 / nu.clamp_min(_DEGENERATE_NU))
        Bgw = (rho[:, None] - rho[None, :] * A) * inv_nu[None, :]                 # <ĝ_i, w_j>
        Wm = (dn - 2 * rho[:, None] * rho[None, :] + rho[:, None] * rho[None, :] * A) \
            * inv_nu[:, None] * inv_nu[None, :]                                     # <w_i, w_j>
        start = self.angles[idx].clamp(0.0, _MAX_ANGLE).masked_fill(frozen, 0.0)
        alpha = self._solve_angles(start, frozen, A, Bgw, Wm)
        self.angles[idx] = alpha
        R, prox = _rotated_geometry(alpha, A, Bgw, Wm)
        # out = sum_i weight_i (c_i ĝ_i + s_i (d - rho_i ĝ_i)/nu_i), written on the rows of G and on d
        weight = (n if self.scale == "norm" else torch.ones_like(n)) / Ta
        c, s = torch.cos(alpha), torch.sin(alpha)
        coef_g = weight * (c - s * rho * inv_nu) / n
        coef_d = float((weight * s * inv_nu).sum())
        out = coef_g.to(cdt).to(dev) @ Ga + coef_d * d
        diag.update(conflict_after=mean_pair_conflict(R), angles=self.angles.float().clone(),
                    proximity=prox.float(), consensus_alignment=rho.float())
        return out, diag
