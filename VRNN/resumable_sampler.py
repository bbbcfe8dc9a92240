"""Data order as a pure function of (seed, position): the sampler behind exact resume and data parallelism.

Global batch ``k`` (counting from 0 over the whole run) lies in epoch ``e = k // batches_per_epoch``; the
epoch's permutation of the dataset indices is drawn from a generator seeded with ``(seed, e)``, and the
batch takes the permutation's ``k % batches_per_epoch``-th slice of ``global_batch`` indices (the
incomplete tail of an epoch is dropped, as ``DistributedSampler(drop_last=True)`` does). Rank ``r`` of
``world_size`` takes the ``r``-th contiguous share of that global batch, so the union over ranks is
exactly the batch one process would see. Resuming only needs ``k``, which the trainer stores in its
checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler:
    """Infinite batch sampler for ``DataLoader(batch_sampler=...)``: yields lists of dataset indices.

    Args:
        num_samples: dataset length N.
        global_batch: examples per optimiser step over all ranks (B); must divide by ``world_size``.
        seed: data-order seed.
        rank, world_size: this process's share.
        start: index of the first global batch to yield (the resume position).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} is invalid: expected 0 <= rank < world_size")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"batch_size={global_batch} is invalid: expected a positive multiple of the "
                             f"number of processes ({world_size})")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} windows, fewer than one batch of {global_batch}: "
                             "collect more episodes or lower --batch-size / --sequence-length")
        if start < 0:
            raise ValueError(f"start={start} is invalid: expected a non-negative batch index")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.batches_per_epoch = num_samples // global_batch
        self._cached_epoch = -1
        self._cached_perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all N indices (int64 [N]), identical on every rank."""
        if epoch != self._cached_epoch:
            gen = torch.Generator()
            # Distinct seeds per (seed, epoch); the multiplier keeps nearby seeds' epochs apart.
            gen.manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            self._cached_perm = torch.randperm(self.num_samples, generator=gen)
            self._cached_epoch = epoch
        assert self._cached_perm is not None
        return self._cached_perm

    def global_indices(self, position: int) -> list[int]:
        """The B indices of global batch ``position``."""
        epoch, k = divmod(position, self.batches_per_epoch)
        perm = self.permutation(epoch)
        return perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def local_indices(self, position: int) -> list[int]:
        """This rank's share of global batch ``position``."""
        lo = self.rank * self.local_batch
        return self.global_indices(position)[lo:lo + self.local_batch]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.local_indices(position)
            position += 1
