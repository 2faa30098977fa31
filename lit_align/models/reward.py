"""Scalar scorers: reward models, classifiers and detectors share one builder.

Two kinds, both giving ``score(input_ids, attention_mask) -> (B,)``:

* ``sequence_classification``: an HF ``AutoModelForSequenceClassification`` with one label, read
  (for decoder classifiers) at the last non-pad token located from the attention mask
  (hub reward models such as ``OpenAssistant/reward-model-deberta-v3-large-v2`` or
  ``Skywork/Skywork-Reward-Llama-3.1-8B``); encoders (BERT, RoBERTa, DeBERTa) pool as HF does, and
  their tokenizers need no EOS token;
* ``scalar_head``: a causal-LM backbone (hub, local or tiny, optionally with LoRA) plus a
  linear head (:class:`ScalarHead`, with or without bias: ``head_bias``) read at the **last non-pad
  token**, located from the attention mask, so the score is the same with left or right padding
  and with any number of pad tokens appended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from lit_align.models.causal_lm import apply_lora, build_causal_lm, build_tokenizer
from lit_align.models.spec import ModelSpec
from lit_align.rollout.logps import causal_lm_parts, position_ids_from_mask

__all__ = ["LAST_LAYER_FAMILIES", "RewardModel", "RewardModelSpec", "ScalarHead", "build_reward_model",
           "hidden_before_last_layer", "last_layer_at", "last_layer_is_separable", "last_token_index"]


@dataclass
class RewardModelSpec:
    """A scalar scorer: which backbone and how the score is read."""

    model: ModelSpec
    """The backbone (``name_or_path`` or ``tiny``; LoRA optional)."""
    kind: Literal["scalar_head", "sequence_classification"] = "scalar_head"
    """``scalar_head``: causal-LM backbone + new linear head; ``sequence_classification``: an HF reward model."""
    head_init_std: float = 0.0
    """Std of the new head's weights (0: zeros, so every score starts at 0)."""
    last_layer_at_score_only: bool | None = None
    """Run the decoder's last layer at the scored (last real) token only: layers ``0 .. L-2`` on every token,
    then the last layer's attention for that one query (keys and values from every position) and its MLP on
    that one position, then the head. The same scores and gradients as the full forward up to float rounding
    (the summation order differs), less work; used where that holds: Qwen2- and Llama-family decoders,
    unsharded, no sliding window, attention dropout or (LoRA) dropout on the last layer in training; anything
    else runs the full forward. None: the default of the method that builds it: on for
    :class:`~lit_align.methods.RewardModelModule`, off elsewhere (detectors, critics, reward sources keep
    their bit-for-bit scores: the tiny watermark co-training run takes another course from last-bit changes)."""
    head_bias: bool | None = None
    """Whether the ``scalar_head`` has a bias (initialised to 0). None: the default of the method that
    builds it: bias-free for :class:`~lit_align.methods.WatermarkModule`'s detector and critic, the rule
    of the watermark's released code (Xu, Yao, Liu 2024, arXiv 2403.10553: ``model_utils.RewardModel``,
    adapted from DeepSpeed-Chat, scores with a linear ``v_head`` without bias; the paper does not say);
    with a bias elsewhere (lit_align's earlier rule, e.g. the game's critics). Either form loads a head
    saved by the other: a missing bias reads as 0, and a saved bias that is 0 is dropped (a nonzero one
    is refused with a message naming this field)."""


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B,) position of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (attention_mask.long() * positions).argmax(dim=1)


class ScalarHead(nn.Linear):
    """The ``hidden -> 1`` linear head of a scalar scorer (reward model, detector or critic).

    A plain :class:`torch.nn.Linear` whose state-dict loading bridges the two head forms (see
    :attr:`RewardModelSpec.head_bias`): a bias-free head accepts a saved bias only if it is 0 (the
    value it was initialised to: a head that was never trained with a bias scores the same without
    it), and a head with a bias takes 0 when the saved head has none.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key, weight = f"{prefix}bias", f"{prefix}weight"
        if self.bias is None and key in state_dict:
            saved = state_dict.pop(key)
            if bool(torch.as_tensor(saved).ne(0).any()):
                raise ValueError(
                    f"the saved scalar head has a nonzero bias ({key} = {torch.as_tensor(saved).flatten().tolist()}) "
                    "but this head has none: set head_bias: true on the reward-model / detector spec "
                    "(e.g. model.detector.head_bias or model.critic.head_bias) to load it")
        elif self.bias is not None and key not in state_dict and weight in state_dict:
            state_dict[key] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: decoder families whose layers are ``x + attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``
#: with rotary attention (``q/k/v/o_proj``, ``head_dim``, ``scaling``): :func:`last_layer_at` computes them
LAST_LAYER_FAMILIES = ("qwen2", "llama")


class _BeforeLastLayer(Exception):
    """Raised by a pre-hook on a decoder's last layer to stop the forward there, carrying that layer's input."""

    def __init__(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> None:
        super().__init__("stopped before the last decoder layer")
        self.hidden, self.position_embeddings = hidden, position_embeddings


def last_layer_is_separable(decoder: nn.Module) -> bool:
    """Whether :func:`last_layer_at` computes ``decoder``'s last layer exactly (see ``LAST_LAYER_FAMILIES``;
    not under FSDP2, whose layer units gather their weights only in their own forward)."""
    from torch.distributed.tensor import DTensor

    config, layers = getattr(decoder, "config", None), getattr(decoder, "layers", None)
    if config is None or getattr(config, "model_type", None) not in LAST_LAYER_FAMILIES or not layers:
        return False
    layer = layers[-1]
    attn = getattr(layer, "self_attn", None)
    if attn is None or getattr(attn, "sliding_window", None) is not None:
        return False
    if attn.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    if any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in layer.modules()):
        return False  # LoRA dropout: the shortcut would draw other masks (and fewer random numbers)
    return not any(isinstance(p, DTensor) for p in layer.parameters())


def hidden_before_last_layer(decoder: nn.Module, **inputs) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run ``decoder(**inputs)`` up to its last layer: that layer's input (N, T, H) and the rotary ``(cos, sin)``
    (N, T, D) the decoder made for it. A key/value cache among ``inputs`` gets every layer but the last."""
    def stop(module, args, kwargs):
        raise _BeforeLastLayer(args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    handle = decoder.layers[-1].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        decoder(**inputs)
    except _BeforeLastLayer as stopped:
        return stopped.hidden, stopped.position_embeddings
    finally:
        handle.remove()
    raise RuntimeError(f"{type(decoder).__name__} did not run its last layer")


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (..., heads, D) with ``cos``/``sin`` (..., D) (HF's ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def last_layer_at(decoder: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], key_mask: Tensor,
                  query: Tensor) -> Tensor:
    """(N, H) output of ``decoder``'s last layer, final norm applied, at position ``query`` (N,) of each row.

    ``hidden`` (N, T, H) is the layer's input and ``position_embeddings`` its rotary ``(cos, sin)``;
    ``key_mask`` (N, T) marks the positions the query attends to (the real tokens up to it). Keys and
    values are projected at every position, the query, output projection and MLP at ``query`` only."""
    layer = decoder.layers[-1]
    attn = layer.self_attn
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    cos, sin = position_embeddings
    normed = layer.input_layernorm(hidden)  # (N, T, H)
    n, t, d = hidden.shape[0], hidden.shape[1], attn.head_dim
    keys = _rotate(attn.k_proj(normed).view(n, t, -1, d), cos, sin).transpose(1, 2)  # (N, KV, T, D)
    values = attn.v_proj(normed).view(n, t, -1, d).transpose(1, 2)  # (N, KV, T, D)
    queries = _rotate(attn.q_proj(normed[rows, query]).view(n, -1, d), cos[rows, query], sin[rows, query])  # (N, h, D)
    out = F.scaled_dot_product_attention(queries.unsqueeze(2), keys, values, attn_mask=key_mask.bool()[:, None, None, :],
                                         scale=attn.scaling, enable_gqa=True)  # (N, h, 1, D)
    x = hidden[rows, query] + attn.o_proj(out.reshape(n, -1))  # (N, H)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return decoder.norm(x)


class RewardModel(nn.Module):
    """A backbone and a scalar head; :meth:`score` is the one entry point."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, kind: str,
                 last_layer_at_score_only: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.kind = backbone, head, kind
        self.last_layer_at_score_only = last_layer_at_score_only  # see RewardModelSpec

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) scalar score of each sequence (input_ids and attention_mask are (B, T))."""
        if self.kind == "sequence_classification":
            base = getattr(self.backbone, self.backbone.base_model_prefix, None)
            head = getattr(self.backbone, "score", None)
            if base is None or not isinstance(head, nn.Linear):
                # encoder classifiers (DeBERTa, RoBERTa, ...) pool their first token: HF's forward is right
                return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
            # decoder classifiers: HF finds the last token by comparing ids with pad_token_id, which
            # misreads a final EOS when pad == EOS; read it from the attention mask instead
            decoder, head_fn = base, lambda h: head(h)[:, 0]
        else:
            decoder, head_fn = causal_lm_parts(self.backbone)[0], lambda h: self.head(h).squeeze(-1)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        index = last_token_index(attention_mask)  # (B,)
        if self.separable_last_layer(decoder) and bool(attention_mask.any(1).all()):
            hidden, rotary = hidden_before_last_layer(decoder, **inputs)
            return head_fn(last_layer_at(decoder, hidden, rotary, attention_mask, index)).float()
        hidden = decoder(**inputs).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
        return head_fn(last).float()

    def separable_last_layer(self, decoder: nn.Module) -> bool:
        """Whether :meth:`score` runs ``decoder``'s last layer at the scored token only (see
        :attr:`RewardModelSpec.last_layer_at_score_only`)."""
        return self.last_layer_at_score_only and last_layer_is_separable(decoder)

    forward = score


def build_reward_model(spec: RewardModelSpec, tokenizer: PreTrainedTokenizerBase | None = None, *,
                       key: str | None = None, meta: bool = False) -> RewardModel:
    """Build the scorer described by ``spec`` (tokenizer defaults to the backbone's). ``key`` is the spec's
    config key (``model.alignment_reward``), named in errors. A ``sequence_classification`` scorer may be an
    encoder (BERT, RoBERTa, DeBERTa) whose tokenizer has no EOS token: it scores whole sequences. ``meta``
    (``scalar_head`` only): the architecture on the meta device, no weights read (FSDP2 ranks other than 0,
    see :func:`lit_align.models.fsdp.load_from_rank0`)."""
    model_key = f"{key}.model" if key else "model"
    if meta and spec.kind != "scalar_head":
        raise ValueError(f"build_reward_model(meta=True) builds 'scalar_head' scorers only, got kind {spec.kind!r}")
    tokenizer = tokenizer or build_tokenizer(spec.model, key=model_key, needs_eos=False)
    if spec.kind == "sequence_classification":
        if spec.model.name_or_path is None:
            raise ValueError(f"reward model kind 'sequence_classification' needs {model_key}.name_or_path")
        backbone = AutoModelForSequenceClassification.from_pretrained(
            spec.model.name_or_path, num_labels=1, revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
        )
        backbone.config.pad_token_id = tokenizer.pad_token_id
        return RewardModel(backbone, None, spec.kind, bool(spec.last_layer_at_score_only))
    backbone = apply_lora(build_causal_lm(spec.model, tokenizer, meta=meta), spec.model.lora, seed=spec.model.seed)
    # the decoder's output width: OPT projects it down to word_embed_proj_dim (512 for OPT-350M)
    hidden = getattr(backbone.config, "word_embed_proj_dim", None) or backbone.config.hidden_size
    # skip_init: no default (random) init, so building never draws from the global RNG
    bias = True if spec.head_bias is None else spec.head_bias
    head = nn.utils.skip_init(ScalarHead, hidden, 1, bias=bias, dtype=next(backbone.parameters()).dtype,
                              device="meta" if meta else "cpu")
    with torch.no_grad():
        if head.bias is not None:
            head.bias.zero_()
        if spec.head_init_std > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.model.seed + 1)
                head.weight.normal_(0.0, spec.head_init_std)
        else:
            head.weight.zero_()
    return RewardModel(backbone, head, spec.kind, bool(spec.last_layer_at_score_only))


# Specs are saved with the hyperparameters in every checkpoint; allow them in weights-only loads
# (``Trainer.fit(ckpt_path=...)`` of a module built in Python).
torch.serialization.add_safe_globals([RewardModelSpec])
