"""The game under data parallelism: what is sharded, what is replicated, and the state every rank shares.

* **Sharded under FSDP2** (:func:`shard_players`, :func:`shard_critic`): the players' policies (one shared
  base with both LoRA adapters sharded once, the adapters with their layers, or one model per player), the
  frozen reference copies, and the critics. Every rank builds them whole from their specs, rank 0's weights
  are broadcast (so a seeded initialisation can never differ between ranks) and each rank then keeps its
  shards.
* **Replicated** on every rank: the safety judge, the evaluation judge and the sentence encoder. They are
  frozen and read text, so each rank runs them on its own rows with no collective at all (the encoder's
  embeddings of a training batch are then gathered with the prompts, :func:`lit_align.game.play.diversity_terms`).
* **Per-row state**: pool snapshots and averaged weights are clones of the players' parameters, so under
  FSDP2 they are sharded like them; checkpoints hold them whole (:func:`full_tensors`) and a resumed rank
  takes its shard back (:func:`shard_like`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_align.models.fsdp import decoder_layers, fsdp2_parallelize

__all__ = ["broadcast_from_rank0", "full_tensors", "shard_critic", "shard_game", "shard_like", "shard_players", "unsharded_copy"]


def broadcast_from_rank0(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (in place)."""
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=0)


def shard_players(players: nn.Module, mesh, *, mp_policy=None) -> None:
    """FSDP2 over a :class:`~lit_align.models.players.PlayerPolicies`: each policy (a shared base holds both
    players' adapters: one sharding of the base) and each frozen reference copy."""
    broadcast_from_rank0(players)
    for policy in players.policies.values():
        fsdp2_parallelize(policy, mesh, mp_policy=mp_policy)
    for reference in players.references.values():
        fsdp2_parallelize(reference, mesh, mp_policy=mp_policy, trainable=False)


def shard_critic(critic: nn.Module, mesh, *, mp_policy=None) -> None:
    """FSDP2 over a :class:`~lit_align.models.ValueModel`: each decoder layer is a unit, and the critic itself
    the root unit (embeddings, final norm and value head), gathered whenever it is called (``action_values``
    calls it)."""
    from torch.distributed.fsdp import fully_shard

    broadcast_from_rank0(critic)
    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for layer in decoder_layers(critic.backbone):
        fully_shard(layer, **kwargs)
    fully_shard(critic, **kwargs)


def full_tensors(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` with each sharded (DTensor) entry gathered whole on the CPU; a collective under FSDP2:
    every rank calls it."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in weights.items()}


def shard_like(weights: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole ``weights`` cut to this rank's shards of ``params`` (the same names; unsharded parameters take
    the whole tensor), on the parameters' device. No communication: every rank holds the whole tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, value in weights.items():
        param = params[name]
        if isinstance(param, DTensor):
            out[name] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
        else:
            out[name] = value
    return out


def shard_game(players: nn.Module, critics: nn.ModuleDict, mesh, precision: str) -> None:
    """FSDP2 over the game's trainable and reference models (bf16 parameters with fp32 reductions under a
    ``bf16`` precision); judges and encoder stay replicated."""
    mp_policy = None
    if str(precision).startswith("bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_players(players, mesh, mp_policy=mp_policy)
    for critic in critics.values():
        shard_critic(critic, mesh, mp_policy=mp_policy)


def unsharded_copy(players: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A whole copy of sharded players: ``build()`` makes them from their specs, then every rank gathers the
    trained weights into it (a collective); the reference copies are rebuilt as they were."""
    whole = build()
    state = full_tensors(players.state_dict())
    whole.load_state_dict({k: v for k, v in state.items() if not k.startswith("references.")}, strict=False)
    return whole
