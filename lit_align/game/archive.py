"""Past attackers and averaged policies: the snapshot pool and each player's running mean of its weights.

Both hold clones of a player's trainable parameters (by name): under FSDP2 this rank's shards. Checkpoints
hold them whole (:meth:`PolicyArchive.state_dict` gathers, a collective every rank calls), so that Lightning's
metadata file, written by rank 0 alone, serves every rank; :meth:`PolicyArchive.load_state_dict` cuts each
rank's shards back out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from lit_align.checkpoint import atomic_save
from lit_align.game.config import PoolConfig
from lit_align.game.sharding import full_tensors, shard_like

__all__ = ["PolicyArchive", "swap_weights"]

Weights = dict[str, Tensor]


def _kept(param: Tensor) -> Tensor:
    """A parameter's value to keep aside: on the CPU, or where it is when sharded (a DTensor keeps its mesh)."""
    from torch.distributed.tensor import DTensor

    return param.detach() if isinstance(param, DTensor) else param.detach().cpu()


@contextmanager
def swap_weights(params: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Copy ``weights`` into ``params`` (by name) for the block, then restore them."""
    current = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])


class PolicyArchive:
    """The attacker's snapshot pool and every player's running mean (:class:`PoolConfig`)."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.pool: list[Weights] = []  # attacker snapshots, oldest first
        self.averages: dict[str, Weights] = {}  # player -> running mean of its trainable weights

    def record(self, player: str, params: Mapping[str, Tensor], updates: int) -> None:
        """After the player's ``updates``-th update: fold its weights into its mean; every
        ``snapshot_every`` attacker updates, add a snapshot to the pool (the ``size`` most recent kept)."""
        if self.config.average_policies:
            avg = self.averages.setdefault(player, {k: _kept(p).float().clone() for k, p in params.items()})
            if updates > 1:
                for k, p in params.items():
                    avg[k] += (_kept(p).float() - avg[k]) / updates
        every = self.config.snapshot_every
        if player == "attacker" and every and updates % every == 0:
            self.pool.append({k: _kept(p).clone() for k, p in params.items()})
            del self.pool[: max(0, len(self.pool) - self.config.size)]

    def draw(self, generator: torch.Generator) -> Weights | None:
        """A random snapshot with probability ``prob`` (``None`` otherwise or with an empty pool)."""
        if not self.pool or self.config.prob <= 0:
            return None
        if torch.rand((), generator=generator) >= self.config.prob:
            return None
        return self.pool[int(torch.randint(len(self.pool), (), generator=generator))]

    def state_dict(self) -> dict:
        """Pool and averages gathered whole on the CPU (a collective under FSDP2: every rank calls it)."""
        return {"pool": [full_tensors(s) for s in self.pool],
                "averages": {p: full_tensors(w) for p, w in self.averages.items()}}

    def load_state_dict(self, state: dict, params: Callable[[str], Mapping[str, Tensor]] | None) -> None:
        """Take a :meth:`state_dict` back; ``params(player)``: the player's parameters to cut shards like
        (``None``: keep the whole tensors)."""
        def shard(weights: Weights, player: str) -> Weights:
            return dict(weights) if params is None else shard_like(weights, params(player))

        self.pool = [shard(s, "attacker") for s in state["pool"]]
        self.averages = {p: {k: v.float() for k, v in shard(w, p).items()} for p, w in state["averages"].items()}

    def save_averages(self, directory: Path, write: bool) -> None:
        """Write each player's mean to ``<directory>/<player>.pt`` (``write``: this rank writes; every rank
        must call it, the gathering is a collective)."""
        averages = {p: full_tensors(w) for p, w in self.averages.items()}
        if write and averages:
            directory.mkdir(parents=True, exist_ok=True)
            for player, weights in averages.items():
                atomic_save(weights, directory / f"{player}.pt")
