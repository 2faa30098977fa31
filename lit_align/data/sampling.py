"""Deterministic, rank-sharded, resumable sampling.

:class:`ShardedSampler` is a ``DistributedSampler`` (so Lightning never swaps it out) whose
permutation depends only on ``seed`` and the epoch, and which can skip the batches already
consumed in the current epoch. :class:`ResumableDataLoader` exposes Lightning's
``state_dict``/``load_state_dict`` interface: its state is the epoch and the number of batches
the training loop has *consumed* (counted by the DataModule when a batch reaches the step,
not when the loader yields it, since Lightning prefetches one batch ahead). Resuming from a
mid-epoch checkpoint therefore continues with exactly the batch that would have come next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ShardedSampler", "trainer_shard"]


def trainer_shard(trainer: Any) -> tuple[int, int]:
    """``(num_replicas, rank)`` of ``trainer``'s data-parallel strategy (its ``distributed_sampler_kwargs``);
    ``(1, 0)`` without a trainer or a data-parallel strategy."""
    if trainer is None:
        return 1, 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)


def _tail(order: list[int], pad: int) -> list[int]:
    """The last ``pad`` rows of ``order`` (cycled when ``pad`` exceeds its length), in order: the padding that
    keeps every rank's share of a sorted order sorted."""
    if pad <= 0 or not order:
        return []
    return (order * (pad // len(order) + 1))[-pad:]


class ShardedSampler(DistributedSampler):
    """Seeded (optionally shuffled) indices for one data-parallel rank, with a skip for resumption.

    Rank ``r`` of ``n`` takes positions ``r, r + n, ...`` of the epoch's order, so ``n`` ranks with
    batch ``b`` see the same examples per step as one process with batch ``n * b``. An order that
    does not divide among the ranks is padded with its **last** rows repeated (``DistributedSampler``
    repeats its first ones): an unshuffled order that runs easy to hard (a curriculum stage) then
    stays easy to hard on every rank; a shuffled order pads with rows as random either way.

    ``pad=False`` (evaluation) takes every row exactly once: rank ``r`` gets positions ``r, r + n, ...`` of
    the order and nothing more, so ranks may get one row fewer than others (fine where no step waits on the
    others, as in validation and test, whose metrics sync once at the end; not for training under DDP).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, pad: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if not pad and not drop_last:  # every row once: uneven shares instead of repeated rows
            self.total_size = len(dataset)
            self.num_samples = len(range(rank, self.total_size, num_replicas))
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already consumed)

    def resume(self, epoch: int, skip: int) -> None:
        """Skip the first ``skip`` samples the next time ``epoch`` is iterated (and only then)."""
        self._resume = (epoch, skip)

    @property
    def resuming(self) -> bool:
        """Whether the next iteration continues a partly consumed epoch."""
        return self._resume is not None and self._resume[0] == self.epoch and 0 < self._resume[1] < self.num_samples

    def _epoch_order(self) -> list[int]:
        """This epoch's order of dataset positions, padded (with its last rows) or cut to ``total_size``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            order = list(range(len(self.dataset)))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += _tail(order, self.total_size - len(order))
        return order

    def _skip(self) -> int:
        """Samples of this rank to skip now (a pending resume of this epoch), spending the resume."""
        skip = self._resume[1] if self.resuming else 0
        self._resume = None
        return skip

    def __iter__(self) -> Iterator[int]:
        order = self._epoch_order()
        mine = order[self.rank : self.total_size : self.num_replicas]
        # A checkpoint written after the last batch of epoch e resumes in epoch e + 1: no skip then.
        return iter(mine[self._skip():])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ShardedSampler` that Lightning saves and restores mid-epoch."""

    def __init__(self, dataset: Dataset, *, sampler: ShardedSampler, warn_truncated: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.consumed = 0  # batches handed to the training step in the current epoch
        self.warn_truncated = warn_truncated

    def __iter__(self):
        if not getattr(self.sampler, "resuming", False):  # a fresh epoch (Lightning swaps the sampler for predict)
            self.consumed = 0
        truncated = getattr(self.dataset, "truncated", 0)
        if truncated and self.warn_truncated:
            rank_zero_warn(
                f"epoch {getattr(self.sampler, 'epoch', 0)}: {truncated} of {len(self.dataset)} training examples "
                f"are longer than data.max_length={self.dataset.max_length}; their prompts were cut from the left (responses kept "
                "whole where they fit). Raise data.max_length to keep them whole.",
                category=UserWarning,
            )
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = state["consumed"]
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume(state["epoch"], self.consumed * self.batch_size)
