"""Data-parallel helpers (SYSTEM.md section 5): process-group set-up from the ``torchrun`` environment,
rank queries, and the collective operations the trainer needs to keep every rank identical.

The trainer does not wrap the model in ``DistributedDataParallel``: RGB needs the per-task gradient
matrix [T, D], so ranks exchange that matrix (``grad_reduce_hook``, an all-reduce mean) before aggregation
and every rank applies the same update. The discriminator's gradients are all-reduce-averaged the same
way, batch statistics of submodules with a ``reduce_hook`` (the VQ codebook) are summed over ranks, and
rank 0's buffers are broadcast after each step.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every helper is a no-op
and ``DistContext`` describes a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from VRNN.vrnn_utilities import resolve_device

__all__ = [
    "DistContext",
    "all_reduce_flag",
    "all_reduce_gradients",
    "all_reduce_mean_",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "broadcast_module",
    "cleanup_distributed",
    "init_distributed",
    "install_statistics_hooks",
    "is_distributed",
    "make_grad_reduce_hook",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is invalid: expected an integer") from exc


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group described by ``torchrun``'s variables (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    NCCL on CUDA (each process takes GPU ``LOCAL_RANK``), gloo on CPU. A single process gets a
    ``DistContext`` with ``world_size == 1`` and no process group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world_size, dev)
    return DistContext(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean of ``tensor`` over ranks (any shape); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_flag(flag: bool, op: str = "any") -> bool:
    """``any`` / ``all`` of a boolean over ranks, so that every rank takes the same branch."""
    if not is_distributed():
        return bool(flag)
    if op not in ("any", "all"):
        raise ValueError(f"op={op!r} is invalid: expected 'any' or 'all'")
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_grad_reduce_hook() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The hook RGB calls on its gradient matrix G [T, D] before aggregating: the mean over ranks.

    ``None`` in a single process (RGB then uses G as is).
    """
    if not is_distributed():
        return None

    def hook(grads: torch.Tensor) -> torch.Tensor:
        reduced = grads.detach().clone()
        return all_reduce_mean_(reduced)

    return hook


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flat buffer; a missing grad counts as zeros on that rank."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    all_reduce_mean_(flat)
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left as it is)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def install_statistics_hooks(module: torch.nn.Module) -> int:
    """Point every submodule's ``reduce_hook`` (batch statistics such as the VQ codebook's per-code counts
    and sums) at an all-reduce SUM, so the statistics are those of the global batch on every rank.
    Returns how many hooks were installed (0 in a single process)."""
    if not is_distributed():
        return 0
    count = 0
    for sub in module.modules():
        if hasattr(sub, "reduce_hook") and sub.reduce_hook is None:
            sub.reduce_hook = all_reduce_sum
            count += 1
    return count


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (running statistics, the VQ codebook) to every rank.

    Batch statistics are already global through ``install_statistics_hooks``; what may still differ is
    state a module derives from its local batch alone (e.g. codebook initialisation or dead-code restarts
    from local vectors), and rank ``src``'s version is taken so that the ranks stay identical.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=src)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (identical initialisation)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)
