"""How the debate splits its work between ranks so that N ranks equal one process.

Questions, pairs to score and DPO minibatches are lists every rank knows in full (the phase's questions are
a seeded permutation of the training split; pairs are gathered after each generate step). Rank ``r`` of
``W`` handles positions ``r, r + W, ...`` (:func:`rank_share`), padded to the same count on every rank by
repeating a row whose results are dropped: every rank then runs the same forwards, as FSDP2's sharded
weights (gathered in every forward) require. :func:`gather_share` puts the per-rank results back in
position order on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_align.engine.distributed import all_gather_objects, rank_and_world

__all__ = ["assign_full", "full_tensor", "gather_share", "global_means", "rank_share"]


def rank_share(n: int) -> tuple[list[int], int]:
    """``(positions, real)``: the positions of ``n`` items this rank handles, ``ceil(n / W)`` of them on every
    rank (the last ones repeat position 0 where this rank's share is short: padding rows), and how many are
    its own (the first ``real``)."""
    rank, world = rank_and_world()
    mine = list(range(rank, n, world))
    size = math.ceil(n / world)
    return mine + [0] * (size - len(mine)), len(mine)


def gather_share(local: Tensor, n: int) -> Tensor:
    """Every rank's :func:`rank_share` results (``(ceil(n / W), ...)`` each, on the CPU) as one ``(n, ...)``
    tensor in position order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return local[:n]
    parts = all_gather_objects(local.cpu())
    out = torch.stack(parts, dim=1).flatten(0, 1)  # row j * W + r is rank r's j-th
    return out[:n]


def global_means(values: dict[str, Tensor], real: int, total: int, device) -> dict[str, Tensor]:
    """Means over a global minibatch of ``total`` rows from each rank's means over its ``real`` rows (the same
    on every rank; one collective)."""
    from lit_align.engine.distributed import sum_over_ranks

    names = sorted(values)
    local = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    sums = sum_over_ranks(local * real) / total
    return {k: sums[i].float() for i, k in enumerate(names)}


def full_tensor(param: Tensor) -> Tensor:
    """A detached full copy of ``param`` (gathered from the ranks' shards when it is an FSDP2 DTensor, a
    collective: every rank calls it); the same on every rank."""
    from torch.distributed.tensor import DTensor

    value = param.detach()
    return (value.full_tensor() if isinstance(value, DTensor) else value).clone()


@torch.no_grad()
def assign_full(param: nn.Parameter, full: Tensor) -> None:
    """Copy a full tensor from :func:`full_tensor` into ``param`` (this rank's shard of it under FSDP2)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        param.copy_(distribute_tensor(full.to(param.device), param.device_mesh, param.placements))
    else:
        param.copy_(full.to(param.device))
