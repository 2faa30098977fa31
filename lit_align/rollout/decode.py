"""A lean single-token decoding step for Llama-family HF causal LMs, used by :func:`lit_align.rollout.sampler.sample`.

Why. A decoding step through ``model(...)`` runs one new token through the whole HF module stack: at small sizes
(and on a GPU without CUDA graphs) its cost is mostly Python: module calls and their hooks machinery, keyword
deprecation wrappers, output dataclasses, config attribute lookups, and a ``torch.cat`` of the whole KV cache per
layer and step. Measured on one CPU thread, a 2-layer hidden-64 Qwen2 with a 1,024-token vocabulary, 16 rows of
14-22 prompt tokens, 32 sampled tokens: 41 ms per :func:`~lit_align.rollout.sampler.sample` call through
``model(...)``, 28 ms with :class:`LeanDecoder`; generation is most of an online DPO or GRPO step at this size
(``benchmarks/online_dpo_step.py``, ``benchmarks/online_step.py``).

What it computes. Exactly the model's own decoding forward for one new token, operation for operation: the token
embedding, per layer RMSNorm (float32 statistics, as HF's ``*RMSNorm``), the q/k/v projections (with their biases,
and Qwen3's per-head q/k norms), rotary embeddings from the model's own ``rotary_emb`` module (so every RoPE
scaling type the model supports), attention through transformers' own ``sdpa_attention_forward`` (its GQA handling
included), the output projection, the gated MLP, the final norm and the LM head. The prompt's prefill still runs
through ``model(...)``; its ``DynamicCache`` is copied once into preallocated (B, H_kv, P + N, D) key and value
buffers, and each step writes its one new position in place instead of concatenating the cache. The outputs are
bit for bit those of ``model(...)`` on CPU (``tests/rollout/test_decode.py``, Llama, Qwen2 and Qwen3, padded and
unpadded prompts, float32 and bfloat16).

Scope. :meth:`LeanDecoder.supports` says which models take this path; every other model is decoded through its
forward as before: exactly ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (a subclass or a
wrapper such as a PEFT/LoRA model may change the forward), SDPA attention, full attention in every layer (no
sliding window), plain ``nn.Linear`` projections (no quantised or adapter layers), no FSDP2-sharded (DTensor)
weights, and no forward hooks or pre-hooks on any submodule (they would not run). ``SamplingConfig.lean_decode:
false`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half

#: The model classes whose decoding forward :class:`LeanDecoder` reproduces (checked by exact type name).
LEAN_MODELS = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})

#: Model types whose decoder layers take a prepared 4D boolean mask as is (``transformers.masking_utils``).
FULL_ATTENTION_TYPES = frozenset({"llama", "qwen2", "qwen3"})


def full_attention_sdpa(model: nn.Module) -> bool:
    """Whether ``model`` is a Llama / Qwen2 / Qwen3 model with SDPA attention and full causal attention in every
    layer (no sliding window): then a decoding step's attention mask is the (B, 1, 1, L) boolean padding mask
    itself, which the sampler prepares once (``sampler._decode_masks``) and :class:`LeanDecoder` needs."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in FULL_ATTENTION_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "sliding_window", None) is None
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))


Norm = tuple[Tensor, float]  # an RMSNorm's (weight, epsilon)


def _norm(module: nn.Module) -> Norm:
    return module.weight, module.variance_epsilon


def _rms_norm(norm: Norm, hidden: Tensor) -> Tensor:
    """HF's Llama/Qwen ``RMSNorm.forward``: statistics in float32, the weight applied in the input's dtype."""
    weight, eps = norm
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def _linear(module: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return module.weight, module.bias


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@dataclass
class _Layer:
    """One decoder layer's weights, read once (module attribute lookups cost more than the small kernels they feed),
    and its preallocated key/value buffers (B, H_kv, P + N, D)."""

    attn: nn.Module  # for transformers' sdpa_attention_forward (its GQA grouping and scaling)
    input_norm: Norm
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    q_norm: Norm | None  # Qwen3's per-head norms
    k_norm: Norm | None
    o: tuple[Tensor, Tensor | None]
    post_norm: Norm
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    act: Callable[[Tensor], Tensor]
    keys: Tensor
    values: Tensor

    @classmethod
    def of(cls, layer: nn.Module, keys: Tensor, values: Tensor) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        has_qk_norm = hasattr(attn, "q_norm")
        act = F.silu if isinstance(mlp.act_fn, (nn.SiLU, SiLUActivation)) else mlp.act_fn
        return cls(attn, _norm(layer.input_layernorm), _linear(attn.q_proj), _linear(attn.k_proj),
                   _linear(attn.v_proj), _norm(attn.q_norm) if has_qk_norm else None,
                   _norm(attn.k_norm) if has_qk_norm else None, _linear(attn.o_proj),
                   _norm(layer.post_attention_layernorm), _linear(mlp.gate_proj), _linear(mlp.up_proj),
                   _linear(mlp.down_proj), act, keys, values)


class LeanDecoder:
    """Decode one token at a time for a supported model (:meth:`supports`) from the cache of its prefill.

    Build it with :meth:`from_prefill` right after the prompt's forward, then call :meth:`step` once per new token:
    it returns that token's (B, 1, V) logits and advances the cache by one position.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], length: int) -> None:
        self.layers = layers
        self.length = length  # positions filled in the buffers
        self.embed = model.model.embed_tokens.weight
        self.rotary = model.model.rotary_emb
        self.norm = _norm(model.model.norm)
        self.head = _linear(model.lm_head)
        self.head_dim = model.model.layers[0].self_attn.head_dim

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model``'s decoding forward is the one :meth:`step` reproduces (see the module docstring)."""
        if type(model).__name__ not in LEAN_MODELS or not full_attention_sdpa(model):
            return False
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            return False
        linears = [model.lm_head]
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        return all(type(m) is nn.Linear for m in linears) and not _has_hooks(model)

    @classmethod
    def from_prefill(cls, model: nn.Module, cache, total_length: int) -> LeanDecoder:
        """Copy the prefill's ``DynamicCache`` (every layer's (B, H_kv, P, D) keys and values) into buffers with
        room for ``total_length`` positions."""
        layers = []
        for layer, cached in zip(model.model.layers, cache.layers, strict=True):
            keys, values = cached.keys, cached.values
            b, heads, filled, dim = keys.shape
            key_buf = keys.new_empty(b, heads, total_length, dim)
            value_buf = values.new_empty(b, heads, total_length, dim)
            key_buf[:, :, :filled] = keys
            value_buf[:, :, :filled] = values
            layers.append(_Layer.of(layer, key_buf, value_buf))
        return cls(model, layers, filled)

    def step(self, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, 1, V) logits of the next token after ``tokens`` ((B, 1) ids at ``position_ids`` (B or 1, 1)), with
        the (B, 1, 1, L + 1) boolean padding mask over the cache plus the new token (``None`` without padding)."""
        hidden = F.embedding(tokens, self.embed)  # (B, 1, C)
        cos, sin = self.rotary(hidden, position_ids)  # (B or 1, 1, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B or 1, 1, 1, D)
        batch, start = hidden.shape[0], self.length
        end = start + 1
        heads = (batch, 1, -1, self.head_dim)
        for layer in self.layers:
            x = _rms_norm(layer.input_norm, hidden)
            q = F.linear(x, *layer.q).view(heads)  # (B, 1, H, D)
            k = F.linear(x, *layer.k).view(heads)  # (B, 1, H_kv, D)
            v = F.linear(x, *layer.v).view(heads).transpose(1, 2)  # (B, H_kv, 1, D)
            if layer.q_norm is not None:
                q, k = _rms_norm(layer.q_norm, q), _rms_norm(layer.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + rotate_half(q) * sin  # Qwen2 and Qwen3 define the same rotate_half
            k = k * cos + rotate_half(k) * sin
            layer.keys[:, :, start:end] = k
            layer.values[:, :, start:end] = v
            out, _ = sdpa_attention_forward(layer.attn, q, layer.keys[:, :, :end], layer.values[:, :, :end],
                                            attention_mask, dropout=0.0, scaling=layer.attn.scaling)
            hidden = hidden + F.linear(out.reshape(batch, 1, -1), *layer.o)
            x = _rms_norm(layer.post_norm, hidden)
            hidden = hidden + F.linear(layer.act(F.linear(x, *layer.gate)) * F.linear(x, *layer.up), *layer.down)
        self.length = end
        return F.linear(_rms_norm(self.norm, hidden), *self.head)  # (B, 1, V)

