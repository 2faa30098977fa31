"""Sharding HF decoders.

* :func:`fsdp2_parallelize`: the FSDP2 (``fully_shard``) plan, called from a method's
  ``configure_model`` under Lightning's ``ModelParallelStrategy`` (CPU/gloo here, NCCL on GPUs).
  Each decoder layer is one unit; the causal LM itself is the root unit (embeddings, final norm,
  LM head; tied or not). :func:`~lit_align.rollout.logps.token_logps` calls the decoder and the
  head separately, so it is registered as an FSDP forward method of the root: the root's weights
  are gathered for the whole computation exactly as for ``model(...)``. So is the generic
  :func:`~lit_align.rollout.logps.run_on_causal_lm` (``root.lit_align_run(fn, *args)``), which
  ``token_stats`` and ``token_kl`` go through.
* :class:`DecoderLayerPolicy`: an auto-wrap policy for Lightning's ``FSDPStrategy`` (FSDP1 on
  GPUs) that wraps every decoder layer of whatever HF model is built, so YAML need not name
  architecture classes. See ``callbacks/fsdp.yaml``.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lit_align.rollout.logps import (
    FSDP_LOGPS_METHOD,
    FSDP_RUN_METHOD,
    compute_token_logps,
    run_on_causal_lm,
    unwrap_causal_lm,
)

__all__ = ["DecoderLayerPolicy", "bf16_policy", "decoder_layers", "fsdp2_parallelize", "full_params", "load_from_rank0",
           "shard_scorer"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (classes listed in its ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no decoder layer classes (_no_split_modules)")
    return layers


def fsdp2_parallelize(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True,
                      trainable: bool = True) -> nn.Module:
    """Apply ``fully_shard`` to a causal LM (optionally peft-wrapped) in place and return it.

    Args:
        model: the HF causal LM (LoRA adapters already applied, so frozen and trainable weights
            of a layer are sharded together).
        mesh: the data-parallel ``DeviceMesh`` (``self.device_mesh["data_parallel"]`` in Lightning).
        mp_policy: ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce).
        reshard_after_forward: free gathered layer weights after forward (ZeRO-3); False keeps them (ZeRO-2).
        trainable: False for frozen copies (references): nothing is reduced for them.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    base = unwrap_causal_lm(model)
    fully_shard(base, reshard_after_forward=reshard_after_forward, **kwargs)
    for name, fn in ((FSDP_LOGPS_METHOD, compute_token_logps), (FSDP_RUN_METHOD, run_on_causal_lm)):
        setattr(base, name, types.MethodType(fn, base))
        register_fsdp_forward_method(base, name)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_from_rank0(model: nn.Module, source: nn.Module | None, device) -> None:
    """Give an FSDP2-sharded ``model`` built on the meta device the weights of rank 0's ``source``.

    Only rank 0 ever holds the full weights (``source``: the same architecture built normally, on
    the CPU; ``None`` on the other ranks). Every rank allocates just its shards on ``device``, the
    parameters and persistent buffers are broadcast shard by shard from rank 0
    (``set_model_state_dict(..., broadcast_from_rank0=True)``), and the non-persistent buffers
    (rotary ``inv_freq`` and the like, in no state dict) are broadcast whole.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src_buffers = dict(source.named_buffers()) if source is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if source is not None:
                buffer.copy_(src_buffers[name])
            dist.broadcast(buffer, src=0)


class DecoderLayerPolicy:
    """FSDP1 auto-wrap policy: wrap each decoder layer (``_no_split_modules`` class) of any HF model.

    Use in YAML as ``auto_wrap_policy: {class_path: lit_align.models.fsdp.DecoderLayerPolicy}``.

    FSDP1's auto-wrap asks the policy ``recurse=True`` of the root first, then of every module on
    the way down, and ``recurse=False`` of each module once its children are done. The ``recurse=True``
    calls always descend and collect the class names in any ``_no_split_modules`` they meet (as
    :func:`decoder_layers` does); a ``recurse=False`` call wraps exactly the modules of those classes.
    So ``GPTNeoXLayer`` is wrapped, while a ``*SparseMoeBlock`` inside a decoder layer is not wrapped
    on its own. The names accumulate over calls, so one instance can serve several models.
    """

    def __init__(self) -> None:
        self.layer_names: set[str] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            self.layer_names.update(getattr(module, "_no_split_modules", None) or ())
            return True
        return type(module).__name__ in self.layer_names


@contextmanager
def full_params(trainer) -> Iterator[None]:
    """Gather FSDP1-sharded weights for work done outside a training step (reference precompute,
    sample generation, export); a no-op for every other strategy. FSDP2 needs nothing: its units
    gather themselves whenever they are called.

    FSDP1 (Lightning's ``FSDPStrategy``) only gathers the root's weights (embeddings, final norm,
    LM head) inside the wrapped LightningModule's forward, i.e. inside ``training_step``.
    Not exercised by the test suite (``FSDPStrategy`` needs GPUs).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True):
        yield


def shard_scorer(model: nn.Module, mesh, mp_policy=None) -> nn.Module:
    """``fully_shard`` a scalar scorer in place: each decoder layer of its backbone one unit, the scorer the
    root unit. Its entry points (``score`` of a reward model; a value model's ``forward``, which
    ``action_values`` calls) gather the root's weights: the scorers call the decoder, not the LM's forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the scores and values come back as views (a squeezed head output); nothing modifies them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(RewardModel|ValueModel)\) returned a view")
    kwargs = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "score"):
        register_fsdp_forward_method(model, "score")
    return model


def bf16_policy(precision):
    """FSDP2's bf16 mixed-precision policy under ``trainer.precision: bf16*`` (as the policy's), else None."""
    if not str(precision).startswith("bf16"):
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
