"""Several trainable policies in one method: LoRA adapters on one shared base, or a model per player.

Two-player methods (the adversary/defender game, the ACC-Debate actor and critic) train two causal
LMs that usually start from the same checkpoint. :class:`PlayerPolicies` builds them once:

* **shared base** (both specs name the same base and both have LoRA, ``share_base``): one base model
  with one named LoRA adapter per player (peft), so the base weights exist once; the references are
  that base with the adapters switched off (no copy), or one frozen copy for all players
  (``reference: copy``);
* **a model per player** otherwise: each with its own adapter (``default``) or full weights; its
  reference is the adapter-off model (LoRA) or a frozen copy.

:meth:`PlayerPolicies.acting` makes a player's adapter the active one for a block (peft's
``set_adapter`` also makes only that adapter trainable) and restores the previous one afterwards;
:meth:`PlayerPolicies.reference` gives the model and context that score a player's reference;
:meth:`PlayerPolicies.trainable` its trainable parameters by name (for its optimiser).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.models.causal_lm import (
    add_lora_adapter,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    frozen_copy,
    is_peft_model,
)
from lit_align.models.spec import ModelSpec

__all__ = ["PlayerPolicies"]


def _tokenizer_name(spec: ModelSpec) -> str | None:
    return spec.tokenizer or spec.name_or_path


class PlayerPolicies(nn.Module):
    """The players' policies and references (see the module docstring).

    Submodules: ``policies`` (``shared`` or one entry per player) and ``references`` (frozen copies;
    empty when references are adapters switched off). Checkpoints should leave ``references`` out:
    they are rebuilt from the specs.
    """

    def __init__(self, specs: Mapping[str, ModelSpec], tokenizer: PreTrainedTokenizerBase, *, share_base: bool = True,
                 reference: Literal["auto", "adapter", "copy"] = "auto", key: str = "model", meta: bool = False) -> None:
        """
        Args:
            specs: player name -> its model spec (the first player's tokenizer is the module's).
            tokenizer: the players' common tokenizer (built from the first spec).
            share_base: put the players' LoRA adapters on one base when their specs name the same base.
            reference: ``adapter`` (LoRA off), ``copy`` (a frozen copy of the starting weights) or
                ``auto`` (adapter where the player has LoRA, else copy).
            key: the config key holding the specs (``model.<player>``), for error messages.
            meta: build every model on the meta device, reading no weights (FSDP2: the shards are then
                allocated and filled from rank 0's copy, :func:`lit_align.models.fsdp.load_from_rank0`).
        """
        super().__init__()
        self.names = tuple(specs)
        first = self.names[0]
        for name in self.names[1:]:
            mine, theirs = _tokenizer_name(specs[name]), _tokenizer_name(specs[first])
            if mine != theirs and build_tokenizer(specs[name], key=f"{key}.{name}").get_vocab() != tokenizer.get_vocab():
                raise ValueError(f"{key}.{name}'s tokenizer ({mine or 'bundled'}) differs from {key}.{first}'s "
                                 f"({theirs or 'bundled'}): the players read each other's token ids; give "
                                 f"{key}.{name}.tokenizer the {first}'s tokenizer")
        if reference == "adapter" and any(s.lora is None for s in specs.values()):
            raise ValueError(f"{key}.reference: 'adapter' needs LoRA on every player; use 'copy' or 'auto'")
        self.reference_mode = reference
        self.references = nn.ModuleDict()
        policies: dict[str, nn.Module] = {}
        if self.can_share(specs, share_base):
            spec = specs[first]
            base = build_causal_lm(spec, tokenizer, meta=meta)
            if reference == "copy":
                self.references["shared"] = frozen_copy(base)
            model = apply_lora(base, spec.lora, seed=spec.seed, adapter_name=first)
            seeds = {spec.seed}
            for name in self.names[1:]:
                other = specs[name]
                seed = other.seed
                while seed in seeds:  # distinct adapter initialisations even with equal spec seeds
                    seed += 1
                seeds.add(seed)
                add_lora_adapter(model, name, other.lora, seed=seed)
            model.set_adapter(first)
            policies["shared"] = model.train()
        else:
            for name, spec in specs.items():
                base = build_causal_lm(spec, tokenizer, meta=meta)
                if reference == "copy" or (reference == "auto" and spec.lora is None):
                    self.references[name] = frozen_copy(base)
                policies[name] = apply_lora(base, spec.lora, seed=spec.seed).train()  # adapter "default"
        self.policies = nn.ModuleDict(policies)

    @staticmethod
    def can_share(specs: Mapping[str, ModelSpec], share_base: bool = True) -> bool:
        """Whether the players can be adapters on one base (same base, LoRA on each)."""
        bases = {repr(replace(s, lora=None, seed=0)) for s in specs.values()}
        return share_base and len(bases) == 1 and all(s.lora is not None for s in specs.values())

    @property
    def shared(self) -> bool:
        return "shared" in self.policies

    @contextmanager
    def acting(self, player: str) -> Iterator[nn.Module]:
        """The player's policy, with its adapter active on a shared base (the previous one restored after)."""
        if not self.shared:
            yield self.policies[player]
            return
        model = self.policies["shared"]
        previous = model.active_adapter
        model.set_adapter(player)
        try:
            yield model
        finally:
            model.set_adapter(previous)

    def reference(self, player: str, policy: nn.Module) -> tuple[nn.Module, Callable | None]:
        """(model, context factory) that score the player's reference: a frozen copy, or ``policy`` (the
        player's model from :meth:`acting`) with its adapters switched off."""
        key = "shared" if "shared" in self.references else player
        if key in self.references:
            return self.references[key], None
        if not is_peft_model(policy):
            raise RuntimeError(f"the {player} has neither a reference copy nor LoRA adapters to switch off")
        return policy, policy.disable_adapter

    def trainable(self, player: str) -> dict[str, nn.Parameter]:
        """The player's trainable parameters by name (its adapter on a shared base)."""
        if self.shared:
            return {n: p for n, p in self.policies["shared"].named_parameters() if f".{player}." in n}
        return {n: p for n, p in self.policies[player].named_parameters() if p.requires_grad}

    def frozen_keys(self, prefix: str = "") -> set[str]:
        """State-dict keys (under ``prefix``) of the frozen weights: the references, and the base weights under
        LoRA adapters. Both are rebuilt from the specs, so checkpoints leave them out (at 7B the base alone
        is about 14 GB a save); full-weight players and every adapter, active or not, are kept."""
        keys = {f"{prefix}references.{k}" for k in self.references.state_dict()}
        for key, model in self.policies.items():
            if not is_peft_model(model):
                continue
            keep = {n for player in (self.names if key == "shared" else (key,)) for n in self.trainable(player)}
            keys |= {f"{prefix}policies.{key}.{k}" for k in model.state_dict() if k not in keep and "lora_" not in k}
        return keys

    def export(self, player: str) -> nn.Module:
        """The player's model for ``save_pretrained``: its own model, or (on a shared base) a copy with the
        other adapters removed and the player's merged in."""
        import copy

        if not self.shared:
            return self.policies[player]
        model = copy.deepcopy(self.policies["shared"])
        for other in self.names:
            if other != player:
                model.delete_adapter(other)
        model.set_adapter(player)
        return model.merge_and_unload()
