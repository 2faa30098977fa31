"""The watermark's detector and critic: built, loaded and (under FSDP2) sharded.

The detector (a causal-LM backbone and a scalar head, :class:`~lit_align.models.RewardModel`) and the PPO
critic (a :class:`~lit_align.models.ValueModel` starting as its copy) are trainable players. In one process
or under DDP each rank holds a replica. Under FSDP2 (``ModelParallelStrategy``) both are sharded like the
policy: each decoder layer is a ``fully_shard`` unit and the scorer itself the root unit (embeddings, final
norm, head), every rank builds them on the meta device, and rank 0 alone builds and loads the weights
(``detector_checkpoint`` included) and broadcasts them (:func:`~lit_align.models.fsdp.load_from_rank0`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor, nn

from lit_align.checkpoint import load_checkpoint
from lit_align.errors import ConfigError
from lit_align.models import ModelSpec, RewardModelSpec, ValueModel, build_reward_model, build_tokenizer, freeze
from lit_align.models.fsdp import bf16_policy, load_from_rank0, shard_scorer  # noqa: F401 (re-exported)

__all__ = ["bf16_policy", "build_alignment", "build_scorers", "check_vocabulary", "detector_spec", "detector_state",
           "freeze_lm_head", "full_state", "save_detector", "shard_scorer"]


def build_scorers(spec: RewardModelSpec, tokenizer, checkpoint: str | None = None, *, mesh=None, mp_policy=None,
                  device=None, rank: int = 0) -> tuple[nn.Module, ValueModel]:
    """The detector ``spec`` describes (loaded from ``checkpoint`` when given) and a critic starting as its
    copy (separate parameters). With a ``mesh`` (FSDP2) both are sharded, the weights coming from rank 0."""

    def built(meta: bool = False) -> nn.Module:
        detector = build_reward_model(spec, tokenizer, key="model.detector", meta=meta)
        if checkpoint is not None and not meta:
            detector.load_state_dict(detector_state(checkpoint), strict=True)
        return freeze_lm_head(detector)

    if mesh is None:
        detector = built()
        return detector, ValueModel.from_reward_model(detector)
    source = built() if rank == 0 else None
    detector = built(meta=True)
    critic = ValueModel.from_reward_model(detector)
    sources = (source, ValueModel.from_reward_model(source) if source is not None else None)
    for model, src in zip((detector, critic), sources):
        shard_scorer(model, mesh, mp_policy)
        load_from_rank0(model, src, device)
    return detector, critic


def detector_spec(spec: RewardModelSpec) -> RewardModelSpec:
    """The detector's spec, checked (a causal LM with a scalar head) and its ``head_bias`` defaulting to the
    reference code's bias-free head."""
    if spec.kind != "scalar_head":
        raise ConfigError(f"model.detector.kind={spec.kind!r}: the detector must be a causal LM with a scalar head "
                          "(kind: scalar_head) sharing the actor's tokenizer: it is trained on the actor's token ids "
                          "and the critic starts as its copy. A sequence classifier (e.g. an encoder reward model "
                          "with its own tokenizer) can serve as model.alignment.reward instead")
    return dataclasses.replace(spec, head_bias=False) if spec.head_bias is None else spec


def build_alignment(spec: RewardModelSpec, tokenizer) -> tuple[nn.Module, object | None]:
    """The frozen alignment reward model (any scorer of text: a decoder reward model or an encoder classifier, no
    EOS needed, any vocabulary) and its tokenizer when its vocabulary differs from ``tokenizer``'s (else None)."""
    own = build_tokenizer(spec.model, key="model.alignment.reward.model", needs_eos=False)
    model = freeze(build_reward_model(spec, own, key="model.alignment.reward"))
    return model, (None if own.get_vocab() == tokenizer.get_vocab() else own)


def check_vocabulary(spec: ModelSpec, actor: ModelSpec, tokenizer, key: str) -> None:
    """Refuse a model that reads the actor's token ids (``spec``) whose tokenizer differs from the actor's
    (``tokenizer``, built from ``actor``); ``key``: the config key of its tokenizer."""
    if (spec.tokenizer or spec.name_or_path) == (actor.tokenizer or actor.name_or_path):
        return
    if build_tokenizer(spec, key=key, needs_eos=False).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{key}: the {key.split('.')[1]} must be a causal LM sharing the actor's tokenizer (it "
                          f"reads the actor's token ids), and its tokenizer differs; give {key} the actor's "
                          "tokenizer. A reward model with another tokenizer (e.g. a BERT classifier) fits "
                          "model.alignment.reward")


def freeze_lm_head(scorer: nn.Module) -> nn.Module:
    """Freeze the backbone's LM head, which a scorer never reads (it reads the decoder's hidden states), unless
    it is tied to the input embeddings. Its optimiser then holds no state for it: an optimiser state that
    never appears (no gradient ever reaches the head) would not match the state a resumed FSDP2 run expects
    (torch's distributed optimiser state dict initialises every trainable parameter's)."""
    backbone = scorer.backbone
    head, embeddings = backbone.get_output_embeddings(), backbone.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(False)
    return scorer


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with full tensors on the CPU: gathered when sharded (a collective: every rank
    calls it), else detached copies."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def detector_state(path: str) -> dict[str, Tensor]:
    """``backbone.* / head.*`` weights of a detector from a Lightning checkpoint / state dict (``detector.``
    prefix; a ``.safetensors`` file, or a ``torch.save`` file read with ``weights_only=True``) or a
    ``WatermarkModule.save_detector`` directory (safetensors; ``head.pt`` of older exports is read
    with ``weights_only=True``). Nothing is unpickled beyond tensors and plain containers."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        from transformers import AutoModelForCausalLM

        head_files = [f for f in (p / "head.safetensors", p / "head.pt") if f.is_file()]
        if not head_files:
            raise FileNotFoundError(f"model.detector_checkpoint={path!r}: a save_detector directory holds "
                                    "head.safetensors (or head.pt), and this one has neither")
        head = load_file(str(head_files[0])) if head_files[0].suffix == ".safetensors" else load_checkpoint(head_files[0])
        backbone = AutoModelForCausalLM.from_pretrained(p)
        state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in head.items()})
        return state
    if not p.is_file():
        raise FileNotFoundError(f"model.detector_checkpoint={path!r}: no such file or directory")
    state = load_file(str(p)) if p.suffix == ".safetensors" else load_checkpoint(p)
    state = state.get("state_dict", state)
    out = {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
    if not out:
        raise ConfigError(f"model.detector_checkpoint={path!r} holds no 'detector.*' weights")
    return out


def save_detector(detector: nn.Module, tokenizer, path: str | Path, rank: int = 0) -> Path:
    """Write ``detector`` (backbone with ``save_pretrained``, head in ``head.safetensors``) and the tokenizer to
    ``path``. Rank 0 writes; when sharded, every rank must call it (the weights are gathered)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = full_state(detector)
    if rank != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    detector.backbone.save_pretrained(path, state_dict=backbone)
    tokenizer.save_pretrained(path)
    head = {k.removeprefix("head."): v.contiguous() for k, v in state.items() if k.startswith("head.")}
    save_file(head, str(path / "head.safetensors"))
    return path
