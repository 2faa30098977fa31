"""Contrastive rewards (Shen et al. 2024, "Improving Reinforcement Learning from Human Feedback Using Contrastive
Rewards", arXiv 2403.07708): the reward of a sample minus a per-prompt baseline from the *starting* policy.

Before PPO starts, an offline stage samples k responses per training prompt from the starting (SFT) policy,
**sampled, not greedy**, scores them with the same reward source, through the same code path, truncation and EOS
handling as the online rewards, and aggregates each prompt's k scores into ``b(x)`` (the mean by default; the
paper does not say which: ``aggregate``). PPO then uses ``r_CR(x, y) = r(x, y) - b(x)``, ``b`` looked up by the
prompt's stable id (never by batch position). ``b(x)`` comes from the frozen SFT distribution, unlike the online
baselines of RLOO and GRPO: the reward becomes the improvement over what the SFT model typically achieves on the
prompt, so a per-prompt offset of the reward model cancels, and hard prompts are not punished for being hard.

When the PPO rewards are also whitened over the batch (``model.whiten_scores``), that happens *after* the
subtraction: whitening alone removes the batch mean, not the per-prompt one.

The table is cached on disk, keyed by the prompts' ids, the reward's and the starting policy's fingerprints,
the sampling settings, k and the aggregate, and is stored in every checkpoint: a resumed run reads it back and
never recomputes it from trained weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lit_align.checkpoint import atomic_save, load_checkpoint
from lit_align.engine.distributed import all_gather_objects
from lit_align.errors import ConfigError, DataError

__all__ = ["BaselineTable", "ContrastiveRewards", "baseline_key", "compute_baseline", "rank_chunks"]


@dataclass
class ContrastiveRewards:
    """The offline baseline of contrastive rewards (``model.contrastive``); the paper publishes none of these
    values (k, aggregate, baseline temperature): each is our assumption, set here."""

    samples: int = 4
    """k, baseline responses per prompt (>= 1; not published)."""
    aggregate: Literal["mean", "median"] = "mean"
    """How a prompt's k scores become ``b(x)`` (the paper's form is unverified; mean by default)."""
    batch_size: int = 8
    """Prompts per generation batch of the offline stage (memory only; the table does not depend on it)."""
    cache: str | None = None
    """The table's file; ``None``: ``<cache dir>/contrastive/<key>.pt`` (``$LIT_ALIGN_CACHE`` or
    ``~/.cache/lit_align``). A file made for another reward model, policy, prompt set or sampling is refused."""

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"model.contrastive.samples must be an int >= 1, got {self.samples!r}")
        if self.aggregate not in ("mean", "median"):
            raise ConfigError(f"model.contrastive.aggregate must be 'mean' or 'median', got {self.aggregate!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"model.contrastive.batch_size must be an int >= 1, got {self.batch_size!r}")


@dataclass
class BaselineTable:
    """``b(x)`` per prompt id, with the k scores it was aggregated from and the key it was made under."""

    uids: list[str]
    scores: Tensor
    """(N, k) float32, each prompt's baseline scores."""
    baseline: Tensor
    """(N,) float32, ``b(x)``."""
    key: dict[str, str]

    def __post_init__(self) -> None:
        self._row = {u: i for i, u in enumerate(self.uids)}

    def lookup(self, uids: Sequence[str]) -> Tensor:
        """(B,) ``b(x)`` of each prompt id; an unknown id is a prompt the baseline never saw (the prompt set or
        its ids changed since the table was made)."""
        missing = [u for u in uids if u not in self._row]
        if missing:
            raise DataError(f"contrastive rewards: prompt id {missing[0]!r} is not in the baseline table "
                            f"({len(self.uids)} prompts; {self.key.get('prompts', '?')}): the prompts changed since "
                            "the table was made. Delete model.contrastive.cache (or the checkpoint's table) to "
                            "recompute it from the starting policy")
        return self.baseline[torch.tensor([self._row[u] for u in uids], dtype=torch.long)]

    def state(self) -> dict:
        return {"uids": list(self.uids), "scores": self.scores, "baseline": self.baseline, "key": dict(self.key)}

    @classmethod
    def from_state(cls, state: dict) -> BaselineTable:
        return cls(list(state["uids"]), state["scores"], state["baseline"], dict(state["key"]))


def baseline_key(uids: Sequence[str], reward: str, policy: str, sampling: str, config: ContrastiveRewards) -> dict:
    """What a table depends on, each part hashed; ``id`` (over all of them) names its cache file."""
    parts = {"prompts": hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()[:16],
             "reward": hashlib.sha256(reward.encode()).hexdigest()[:16],
             "policy": hashlib.sha256(policy.encode()).hexdigest()[:16],
             "sampling": hashlib.sha256(sampling.encode()).hexdigest()[:16],
             "samples": str(config.samples), "aggregate": config.aggregate}
    parts["id"] = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:24]
    return parts


def aggregate_scores(scores: Tensor, how: str) -> Tensor:
    """(N, k) -> (N,): the mean, or the median (the lower middle value for even k, as ``torch.median``)."""
    return scores.mean(-1) if how == "mean" else scores.median(-1).values


def rank_chunks(num_prompts: int, rank: int, world: int, size: int) -> list[list[int]]:
    """This rank's share of the prompt indices (every ``world``-th from ``rank``) in chunks of ``size``; a short
    share is padded with its first index (scored twice, to the same value), so every rank runs as many
    generation batches as the others: FSDP2's collectives need that."""
    mine = list(range(rank, num_prompts, world)) or [0]
    mine += mine[:1] * (-(-num_prompts // world) - len(mine))
    return [mine[s:s + size] for s in range(0, len(mine), size)]


def compute_baseline(batches: Iterable, score_samples: Callable[[object], Tensor], uids_of: Callable[[object], list],
                     config: ContrastiveRewards, key: dict) -> BaselineTable:
    """Score k samples of every prompt of this rank's ``batches`` (``score_samples(batch)``: (B * k,) scores,
    each prompt's k contiguous) and gather every rank's rows into one table, the same on every rank."""
    uids, rows = [], []
    for batch in batches:
        scores = score_samples(batch).float().cpu().view(-1, config.samples)  # (B, k)
        uids.extend(uids_of(batch))
        rows.append(scores)
    local = (uids, torch.cat(rows) if rows else torch.zeros(0, config.samples))
    table: dict[str, Tensor] = {}
    for rank_uids, rank_scores in all_gather_objects(local):
        table.update(zip(rank_uids, rank_scores))  # a prompt seen twice (padding of a shard) scores the same
    order = sorted(table)
    scores = torch.stack([table[u] for u in order]) if order else torch.zeros(0, config.samples)
    return BaselineTable(order, scores, aggregate_scores(scores, config.aggregate), key)


def cache_path(config: ContrastiveRewards, key: dict, cache_dir: str) -> Path:
    return Path(config.cache) if config.cache else Path(cache_dir) / "contrastive" / f"{key['id']}.pt"


def load_cached(path: Path, key: dict) -> BaselineTable | None:
    """The table cached at ``path`` (``None`` when there is none); one made under another key is refused,
    naming what differs."""
    if not path.is_file():
        return None
    table = BaselineTable.from_state(load_checkpoint(path))
    differ = [part for part in ("reward", "policy", "prompts", "sampling", "samples", "aggregate")
              if table.key.get(part) != key[part]]
    if differ:
        what = {"reward": "another reward model", "policy": "another starting policy", "prompts": "other prompts",
                "sampling": "other sampling settings", "samples": "another k", "aggregate": "another aggregate"}
        raise ConfigError(f"model.contrastive.cache={str(path)!r} holds a baseline made with "
                          f"{', '.join(what[d] for d in differ)}; point model.contrastive.cache at a new file (or "
                          "leave it unset to key the cache automatically), or delete this one to recompute it")
    return table


def save_cached(table: BaselineTable, path: Path) -> None:
    atomic_save(table.state(), path)
