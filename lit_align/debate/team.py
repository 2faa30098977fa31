"""Building, sharding and exporting the debate team's two players (:class:`~lit_align.models.PlayerPolicies`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.models.fsdp import fsdp2_parallelize, load_from_rank0
from lit_align.models.players import PlayerPolicies
from lit_align.models.spec import ModelSpec

__all__ = ["build_team", "configure_team", "export_player", "initial_agent"]


def build_team(specs: Mapping[str, ModelSpec], tokenizer: PreTrainedTokenizerBase, *, share_base: bool, reference: str,
               mesh=None, rank: int = 0, device=None, bf16: bool = False) -> PlayerPolicies:
    """The players, unsharded, or under FSDP2 (``mesh``: the data-parallel mesh): every rank builds them on the
    meta device, rank 0 alone loads the weights (and initialises the adapters), and each model (the shared base
    with every adapter, or one per player, and the frozen copies) is sharded layer by layer, the adapters with
    their layers, then filled from rank 0's copy."""
    build = dict(share_base=share_base, reference=reference)
    if mesh is None:
        return PlayerPolicies(specs, tokenizer, **build)
    source = PlayerPolicies(specs, tokenizer, **build) if rank == 0 else None
    players = PlayerPolicies(specs, tokenizer, meta=True, **build)
    mp_policy = None
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for group in ("policies", "references"):
        for key, model in getattr(players, group).items():
            fsdp2_parallelize(model, mesh, mp_policy=mp_policy, trainable=group == "policies")
            load_from_rank0(model, getattr(source, group)[key] if source is not None else None, device)
    return players


def configure_team(players: PlayerPolicies, optimisation: Sequence):
    """``configure_optimizers`` for the players (:class:`~lit_align.engine.Player` objects, in order): each over
    its own adapter's parameters, every adapter counted as trainable (on a shared base only the active one is)."""
    from lit_align.engine import configure_players

    params = {p.name: list(players.trainable(p.name).values()) for p in optimisation}
    flags = [(t, t.requires_grad) for ps in params.values() for t in ps]
    for t, _ in flags:
        t.requires_grad_(True)
    try:
        return configure_players(optimisation, params)
    finally:
        for t, flag in flags:
            t.requires_grad_(flag)


def initial_agent(players: PlayerPolicies, player: str):
    """The debate agent (a context factory) of ``player`` as it started the run: the base with its adapter off,
    or its frozen copy (the untrained team, and the released scripts' rollout actor)."""
    @contextmanager
    def initial() -> Iterator[nn.Module]:
        with players.acting(player) as policy:
            model, context = players.reference(player, policy)
            with context() if context is not None else nullcontext():
                yield model
    return initial


def export_player(players: PlayerPolicies, player: str, specs: Mapping[str, ModelSpec],
                  tokenizer: PreTrainedTokenizerBase, rank: int) -> nn.Module:
    """The player's model for ``save_pretrained`` (its adapter merged on a shared base). With FSDP2 shards of a
    shared base every rank gathers the full weights (a collective) and rank 0 exports them from an unsharded
    copy of the players; the other ranks get an empty module (they write nothing)."""
    from torch.distributed.tensor import DTensor

    if not players.shared or not any(isinstance(p, DTensor) for p in players.parameters()):
        return players.export(player)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(players.policies["shared"],
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return nn.Module()
    whole = PlayerPolicies(specs, tokenizer, share_base=True, reference="adapter")
    whole.policies["shared"].load_state_dict(state)
    return whole.export(player)
