"""Which samples go into which micro-batch on which rank: the batch layout of one optimizer step.

Epoch e visits the training set in the order of one permutation ``perm_e`` that depends only on
``(seed, e)`` (:func:`lb_dist.data.epoch_permutation`), so every rank computes it without
communication and a resumed run sees the same order. Optimizer step s of the epoch takes the global
batch ``perm_e[s*B : (s+1)*B]`` (the tail that does not fill a batch is dropped). With K ranks and A
accumulation micro-batches per step, the batch is cut into ``K*A`` slots of ``n = B/(K*A)``
consecutive entries, and micro-batch j of rank r is slot ``j*K + r``.

So the union over ranks and micro-batches is the B samples of the global batch, and a run with K
ranks and A micro-batches computes on exactly the same micro-batches as a run with 1 rank and K*A
micro-batches (BatchNorm statistics included): micro-batch j of rank r there is micro-batch ``j*K+r``
here. A sample's *position* in its global batch (``slot*n + i``) indexes the sample-wise GradientMix
weights, independently of the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["BatchLayout", "StepBatchSampler", "epoch_order"]


def epoch_order(dataset_len: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation of epoch ``epoch`` (the data package's, so both agree on "the epoch's order")."""
    from lb_dist.data import epoch_permutation
    return epoch_permutation(dataset_len, epoch, seed)


@dataclass(frozen=True)
class BatchLayout:
    """Global batch B on K ranks with A micro-batches each (n = B/(K*A) samples per micro-batch)."""

    batch_size: int
    world_size: int
    rank: int
    accumulation_steps: int

    def __post_init__(self):
        if self.batch_size % (self.world_size * self.accumulation_steps):
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world_size x accumulation_steps "
                             f"= {self.world_size} x {self.accumulation_steps}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.world_size * self.accumulation_steps)

    @property
    def local_batch_size(self) -> int:
        """Samples one rank processes per optimizer step (the b of the DDP hook's statistics)."""
        return self.micro_batch_size * self.accumulation_steps

    def steps_per_epoch(self, dataset_len: int) -> int:
        return dataset_len // self.batch_size

    def positions(self, micro: int) -> torch.Tensor:
        """Positions in the global batch (``[0, B)``) of micro-batch ``micro`` of this rank."""
        n = self.micro_batch_size
        slot = micro * self.world_size + self.rank
        return torch.arange(slot * n, (slot + 1) * n)

    def micro_batch_indices(self, order: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """Dataset indices of micro-batch ``micro`` of this rank at step ``step`` of the epoch."""
        return order[step * self.batch_size + self.positions(micro)]


class StepBatchSampler(Sampler[list]):
    """Yields this rank's micro-batches (lists of dataset indices) of one epoch, from ``start_step``
    on, A per optimizer step, for ``torch.utils.data.DataLoader(batch_sampler=...)``."""

    def __init__(self, layout: BatchLayout, dataset_len: int, epoch: int, seed: int, start_step: int = 0):
        self.layout, self.dataset_len, self.epoch, self.seed = layout, dataset_len, epoch, seed
        self.start_step = start_step
        self.steps = layout.steps_per_epoch(dataset_len)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.layout.accumulation_steps

    def __iter__(self) -> Iterator[list]:
        order = epoch_order(self.dataset_len, self.epoch, self.seed)
        for step in range(self.start_step, self.steps):
            for micro in range(self.layout.accumulation_steps):
                yield self.layout.micro_batch_indices(order, step, micro).tolist()
