"""The reference policy in three modes, so a method never holds two copies when one will do.

* ``precomputed``: per-example reference log-probs computed once before the first step (each
  rank scores a shard), kept in memory and in checkpoints (a resumed run never recomputes them
  from trained weights, and refuses tables made for other data), and cached on disk under a key
  made of the model's weights and config, the tokenized data, the precision and the lit_align
  version: a changed model, dataset or precision misses the cache.
* ``adapter``: the policy with its LoRA adapters disabled (needs ``model.lora``).
* ``copy``: a frozen deep copy of the starting weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lit_align.checkpoint import atomic_save  # re-exported: it lived here first
from lit_align.containers import SequenceBatch
from lit_align.models.causal_lm import frozen_copy, is_peft_model
from lit_align.models.fsdp import full_params
from lit_align.modes import eval_mode
from lit_align.rollout.logps import TokenLogps, token_logps

__all__ = ["ReferenceMode", "ReferencePolicy", "atomic_save", "model_fingerprint"]

ReferenceMode = Literal["precomputed", "adapter", "copy"]

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's config and every parameter's name, shape, dtype and raw bytes.

    Any change of weights changes it (one element by one ulp, or two elements swapped, which
    sums and sums of squares would miss); it is one pass with one parameter on the CPU at a time,
    and identical on every rank and device (FSDP2-sharded parameters are gathered: a collective)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:  # rope scaling, soft-capping, attention implementation... change outputs too
        h.update(config.to_json_string(use_diff=False).encode())
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            full = p.full_tensor() if isinstance(p, DTensor) else p  # sharded: gathered (every rank calls it)
            h.update(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class ReferencePolicy(nn.Module):
    """Reference log-probs for a policy, in one of three modes (see module docstring).

    A method registers it as a submodule (so a ``copy`` moves with the module) and calls
    :meth:`attach` in ``configure_model`` with the base model, before LoRA is applied.
    """

    def __init__(self, mode: ReferenceMode) -> None:
        super().__init__()
        if mode not in ("precomputed", "adapter", "copy"):
            raise ValueError(f"reference must be 'precomputed', 'adapter' or 'copy', got {mode!r}")
        self.mode = mode
        self.copy: nn.Module | None = None
        #: split -> (N, K) summed reference log-probs and (N, K) scored-token counts, K sequences per example
        self.tables: dict[str, tuple[Tensor, Tensor]] = {}
        self.key: str | None = None  # cache key of ``tables``
        #: tag -> cache key of the tables precomputed under that tag (``<split>@<tag>``; a staged run's stages)
        self.tag_keys: dict[str, str] = {}
        #: whether a LoRA policy with its adapters off still is the reference (false once a staged run has
        #: refreshed a ``precomputed`` reference to a trained policy: only the tables know it then)
        self.adapter_is_reference = True

    def attach(self, base_model: nn.Module, lora_enabled: bool) -> None:
        """Set up from the starting weights (called once, before adapters are added)."""
        if self.mode == "adapter" and not lora_enabled:
            raise ValueError("reference: 'adapter' needs LoRA adapters to disable; set model.lora or use "
                             "reference: precomputed / copy")
        if self.mode == "copy" and self.copy is None:
            self.copy = frozen_copy(base_model)

    def can_score(self, policy: nn.Module) -> bool:
        """Whether reference log-probs of new sequences can be computed: always in ``adapter`` and
        ``copy`` modes; in ``precomputed`` mode only when the policy has LoRA adapters to switch off."""
        return self.mode != "precomputed" or (is_peft_model(policy) and self.adapter_is_reference)

    @torch.no_grad()
    def token_logps(self, policy: nn.Module, batch: SequenceBatch) -> TokenLogps:
        """Reference per-token log-probs of any ``batch`` (see :meth:`can_score`)."""
        if self.mode == "copy":
            model, ctx = self.copy, nullcontext()
        elif is_peft_model(policy) and self.adapter_is_reference:  # adapters off == start weights
            model, ctx = policy, policy.disable_adapter()
        elif self.mode == "adapter":
            raise ValueError("reference: 'adapter' needs a peft policy")
        else:
            raise RuntimeError("precomputed references of a full fine-tune (or refreshed to a trained policy) are "
                               "looked up with `lookup`: there are no reference weights left to score new sequences with")
        with ctx:
            return token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)

    # -- precomputed ---------------------------------------------------------------------------
    def lookup(self, split: str, index: Tensor, column: int, reduction: Literal["sum", "mean"]) -> Tensor:
        """(B,) cached reference log-probs of sequence ``column`` for the examples ``index``."""
        if split not in self.tables:
            raise RuntimeError(f"no precomputed reference log-probs for split {split!r}; was precompute run?")
        sums, counts = self.tables[split]  # kept on CPU (checkpointed with the module)
        rows = index.to(sums.device)
        s, c = sums[rows, column], counts[rows, column]
        out = s if reduction == "sum" else s / c.clamp(min=1)
        return out.to(index.device)  # on the batch's device (the GPU in GPU runs), like the policy's log-probs

    @staticmethod
    def cache_key(*parts: str) -> str:
        """Key of a reference table: model fingerprint, data fingerprint, precision, lit_align version."""
        from lit_align import __version__

        return hashlib.sha256("|".join([*parts, f"lit_align={__version__}"]).encode()).hexdigest()[:32]

    @staticmethod
    def table_name(split: str, tag: str | None = None) -> str:
        """The ``tables`` entry of a split: ``<split>``, or ``<split>@<tag>`` for tagged tables."""
        return split if tag is None else f"{split}@{tag}"

    @torch.no_grad()
    def precompute(self, module, sequences: Callable[[Any], list[SequenceBatch]], *, model_fp: str,
                   cache_dir: str | Path, tag: str | None = None) -> None:
        """Fill ``tables`` for every split of ``module.trainer.datamodule`` before training.

        ``sequences(batch)`` gives the K sequences of each example (DPO: chosen and rejected).
        Tables restored from a checkpoint are kept if their key matches the current model, data
        and precision (and rejected otherwise); else the disk cache is tried; else every rank scores
        its shard of each split with the current policy (the reference: the starting weights, or a
        staged run's policy at a stage start) under the trainer's precision context, the shards are
        summed across ranks, and rank 0 writes the cache atomically. With ``tag`` the tables are kept
        as ``<split>@<tag>`` beside any others (a staged run keeps one set per stage, see
        :meth:`drop_tag`), each tag with its own key.
        """
        trainer = module.trainer
        dm = trainer.datamodule
        loaders = dm.split_loaders(shard=True)
        data_fp = "|".join(f"{k}:{loaders[k].dataset.fingerprint()}" for k in sorted(loaders))
        key = self.cache_key(model_fp, data_fp, f"precision={trainer.precision}")
        stored = self.key if tag is None else self.tag_keys.get(tag)
        if stored is not None or (tag is None and self.tables):
            if stored != key:
                raise ValueError(
                    "the reference log-probs stored in this checkpoint were computed for another model, dataset "
                    "or precision than this run's; resume with the same model and data settings, or start a new "
                    "run (reference: copy or adapter recompute references on the fly)"
                )
            return
        path = Path(cache_dir) / "reference_logps" / f"{key}.pt"
        strategy = trainer.strategy
        tables = self._load_cache(path) if trainer.global_rank == 0 else None
        tables = strategy.broadcast(tables, src=0)
        if tables is None:
            tables = self.score(module, loaders, sequences)
            if trainer.global_rank == 0:
                atomic_save(tables, path)
        if tag is None:
            self.tables, self.key = tables, key
        else:
            self.tables.update({self.table_name(split, tag): t for split, t in tables.items()})
            self.tag_keys[tag] = key

    def drop_tag(self, tag: str) -> None:
        """Forget the tables precomputed under ``tag`` (a finished stage's: checkpoints stay small)."""
        self.tag_keys.pop(tag, None)
        for name in [n for n in self.tables if n.endswith(f"@{tag}")]:
            del self.tables[name]

    @torch.no_grad()
    def score(self, module, loaders: dict, sequences: Callable[[Any], list[SequenceBatch]]
              ) -> dict[str, tuple[Tensor, Tensor]]:
        """Score every example of each loader with ``module``'s policy as it is now: ``{name: (sums, counts)}``,
        ``(N, K)`` each on the CPU, the summed log-probs and scored-token counts of the K sequences
        ``sequences(batch)`` gives per example (row = the example's ``index``; N = ``len(loader.dataset)``).

        The policy runs in eval mode under the trainer's precision context (FSDP2 parameters gathered); each rank
        scores its shard of each loader (``shard=True`` loaders) and the tables are summed across ranks (a
        collective: every rank calls it). :meth:`precompute` fills the reference tables with it; Curry-DPO scores
        its training pairs' reference margins with it."""
        strategy, policy = module.trainer.strategy, module.policy
        tables = {}
        # eval mode: no dropout, the reference is the deterministic starting model; training numerics
        with eval_mode(policy), full_params(module.trainer), module.trainer.precision_plugin.forward_context():
            for split, loader in loaders.items():
                n = len(loader.dataset)
                sums = counts = seen = None
                for batch in loader:
                    # not strategy.batch_to_device: its DataModule hooks would count these batches as
                    # consumed training batches (the resumable loader's position) during on_train_start
                    batch = move_data_to_device(batch, strategy.root_device)
                    seqs = sequences(batch)
                    out = module.policy_logps(SequenceBatch.cat(seqs, module.tokenizer.pad_token_id))
                    k, idx = len(seqs), batch.index
                    if sums is None:
                        sums = torch.zeros(n, k, device=idx.device)
                        counts, seen = torch.zeros_like(sums), torch.zeros(n, 1, device=idx.device)
                    sums[idx] = out.sum().float().view(k, -1).T
                    counts[idx] = out.mask.sum(-1).float().view(k, -1).T
                    seen[idx] = 1.0
                # ranks scored disjoint shards (padding repeats a few examples: same values, divided out)
                sums, counts, seen = (strategy.reduce(t, reduce_op="sum") for t in (sums, counts, seen))
                tables[split] = ((sums / seen.clamp(min=1)).cpu(), (counts / seen.clamp(min=1)).cpu())
        return tables

    @staticmethod
    def _load_cache(path: Path) -> dict[str, tuple[Tensor, Tensor]] | None:
        if not path.is_file():
            return None
        tables = torch.load(path, map_location="cpu", weights_only=True)
        log.info("reference log-probs loaded from %s", path)
        return tables

    def state(self) -> dict:
        """What a checkpoint keeps (the tables are tiny: two numbers per sequence)."""
        return {"mode": self.mode, "key": self.key, "tag_keys": dict(self.tag_keys),
                "tables": {k: (s.cpu(), c.cpu()) for k, (s, c) in self.tables.items()}}

    def load_state(self, state: dict) -> None:
        self.tables = {k: (s, c) for k, (s, c) in state["tables"].items()}
        self.key = state.get("key")
        self.tag_keys = dict(state.get("tag_keys", {}))
