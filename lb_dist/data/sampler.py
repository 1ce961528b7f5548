"""Sharding a dataset over data-parallel ranks: one global permutation per epoch, disjoint shares.

Epoch e's permutation ``perm_e`` of ``range(dataset_len)`` is a function of ``(seed, e)`` only, so
every rank computes the same one without communication. Rank r of K takes the positions
``r, r+K, r+2K, ...`` of ``perm_e`` (as ``torch.utils.data.DistributedSampler``). Hence, with a
per-rank batch of b = B/K consecutive entries of its share, step s of every rank together covers
exactly the B entries ``perm_e[s*B : (s+1)*B]``: B distinct samples of the epoch's permutation
(:func:`global_batch_indices` returns them).

* ``drop_last=True`` (default): the tail ``dataset_len mod K`` of the permutation is dropped, every
  rank gets ``dataset_len // K`` samples, and no sample is seen twice in an epoch;
* ``drop_last=False``: the permutation is padded by wrapping around to a multiple of K, every rank
  gets ``ceil(dataset_len / K)`` samples, and every sample is seen at least once.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ShardedSampler", "epoch_permutation", "global_batch_indices"]


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def epoch_permutation(dataset_len: int, epoch: int, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """The permutation of ``range(dataset_len)`` used in ``epoch`` (identity when not shuffling).
    A deterministic function of ``(seed, epoch)``: the generator is seeded with a hash of both, so
    neighbouring seeds or epochs do not share streams."""
    _int("dataset_len", dataset_len, 1)
    _int("epoch", epoch, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not shuffle:
        return torch.arange(dataset_len)
    digest = hashlib.blake2b(f"lb_dist.data:{seed}:{epoch}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randperm(dataset_len, generator=g)


class ShardedSampler(Sampler[int]):
    """This rank's share of the epoch's permutation (see the module docstring).

    Args:
        dataset_len: number of samples.
        rank, world_size: this process's data-parallel rank and the number of ranks K.
        seed: the permutations are a function of ``(seed, epoch)``.
        shuffle: False keeps the dataset order (still split over ranks the same way).
        drop_last: drop the tail that does not split evenly (True) or pad by wrapping (False).

    Call :meth:`set_epoch` at the start of every epoch (as with ``DistributedSampler``).
    """

    def __init__(self, dataset_len: int, *, rank: int, world_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        _int("dataset_len", dataset_len, 1)
        _int("world_size", world_size, 1)
        _int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if drop_last and dataset_len < world_size:
            raise ValueError(f"dataset_len={dataset_len} is smaller than world_size={world_size}: with "
                             f"drop_last=True some ranks would get no sample")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, bool(shuffle), bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _int("epoch", epoch, 0)

    def __len__(self) -> int:
        k = self.world_size
        return self.dataset_len // k if self.drop_last else -(-self.dataset_len // k)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order, as a tensor."""
        perm = epoch_permutation(self.dataset_len, self.epoch, self.seed, self.shuffle)
        total = len(self) * self.world_size
        if total <= perm.numel():
            perm = perm[:total]
        else:  # pad by wrapping around (possibly several times for tiny datasets)
            reps = -(-total // perm.numel())
            perm = perm.repeat(reps)[:total]
        return perm[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.set_epoch(state["epoch"])


def global_batch_indices(dataset_len: int, global_batch: int, step: int, epoch: int, seed: int = 0, *,
                         rank: int | None = None, world_size: int | None = None,
                         shuffle: bool = True) -> torch.Tensor:
    """The B = ``global_batch`` sample indices of optimizer step ``step`` (counted within the epoch)
    of ``epoch``: ``perm_e[step*B : (step+1)*B]``; with ``rank``/``world_size``, that rank's B/K of
    them (positions ``rank::K`` of the block), which is what :class:`ShardedSampler` with the same
    seed feeds a DataLoader of batch size B/K at that step (``drop_last=True``)."""
    _int("global_batch", global_batch, 1)
    _int("step", step, 0)
    steps = dataset_len // global_batch if dataset_len >= global_batch else 0
    if step >= steps:
        raise ValueError(f"step {step} is past the end of the epoch: {dataset_len} samples make "
                         f"{steps} full global batches of {global_batch}")
    block = epoch_permutation(dataset_len, epoch, seed, shuffle)[step * global_batch:(step + 1) * global_batch]
    if rank is None and world_size is None:
        return block
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    _int("world_size", world_size, 1)
    _int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} is not divisible by world_size={world_size}")
    return block[rank::world_size]
