"""Log-probabilities of given tokens under a causal LM, without materialising (B, T, V).

The naive way to score a response runs the full model, takes the (B, T, V) logits, a (B, T, V)
log-softmax and gathers the targets: for a 150k vocabulary that tensor dominates memory. Here we:

1. run the decoder only (no LM head) to get hidden states (B, T, H);
2. keep the hidden states of the positions that predict a scored token (N rows, N <= B*T,
   typically only the response);
3. push those rows through the LM head in chunks of at most ``chunk_tokens`` rows, each
   chunk giving (n, V) logits that are reduced to ``logit[target] - logsumexp(logits)`` at
   once; each chunk is activation-checkpointed so backward recomputes its logits instead
   of keeping them (unless all logits together are small). Peak extra memory is
   O(chunk_tokens * V), independent of B and T.

Step 3 bypasses the model's own ``forward``, so the logit transforms some architectures apply
there after the LM head (Gemma-2/3 soft-capping, Cohere's ``logit_scale``, Granite's
``logits_scaling``, ...) are re-applied to each chunk's float32 logits before the log-softmax;
see :mod:`lit_align.rollout.logit_transforms`.

Values equal the naive computation (see ``tests/rollout/test_logps.py``). Positions are
always derived from the attention mask, so left- and right-padded batches both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_align.rollout.logit_transforms import LogitTransform, logit_transform

#: Name of the method :func:`~lit_align.models.fsdp.fsdp2_parallelize` registers on a sharded model,
#: so the whole computation runs inside one FSDP2 forward of the root (embeddings, norm, LM head).
FSDP_LOGPS_METHOD = "lit_align_token_logps"

__all__ = ["FSDP_LOGPS_METHOD", "TokenLogps", "compute_token_logps", "unwrap_causal_lm", "causal_lm_parts", "position_ids_from_mask", "sequence_logps", "token_logps"]

#: Elements of one (n, V) logits chunk when ``chunk_tokens`` is not given (128 MiB in fp32).
_DEFAULT_CHUNK_ELEMENTS = 1 << 25
#: Below this many logits elements in all (16 MiB in fp32) the head is not checkpointed:
#: recomputing it in backward would cost more time than the memory it saves.
_CHECKPOINT_MIN_ELEMENTS = 1 << 22


@dataclass
class TokenLogps:
    """Per-token log-probs aligned with ``input_ids``.

    Attributes:
        logps: (B, T) ``log p(input_ids[:, t] | input_ids[:, :t])``; 0 where ``mask`` is 0.
        mask: (B, T) float, 1 on the scored positions (the ``loss_mask`` given, minus column 0,
            which no position predicts).
    """

    logps: Tensor
    mask: Tensor

    def sum(self) -> Tensor:
        """(B,) summed log-probs of the scored tokens."""
        return self.logps.sum(-1)

    def mean(self) -> Tensor:
        """(B,) mean log-prob per scored token (0 for a row with none)."""
        return self.logps.sum(-1) / self.mask.sum(-1).clamp(min=1)


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a PEFT wrapper and/or ``torch.compile``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA lives inside it
    return getattr(base, "_orig_mod", base)


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return ``(decoder, lm_head)`` of an HF causal LM, a PEFT wrapper of one, or a compiled one."""
    base = unwrap_causal_lm(model)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__} is not a causal LM with a decoder and an output embedding")
    return decoder, head


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) position ids counting real tokens only, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor, transform: LogitTransform | None = None) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    if transform is not None:
        logits = transform(logits)  # the model's own post-head transform, e.g. soft-capping
    # fused log-softmax + gather: one pass over the logits fewer than gather - logsumexp, cheaper backward
    return -F.cross_entropy(logits, targets, reduction="none")  # (n,)


def token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    chunk_tokens: int | None = None,
) -> TokenLogps:
    """Log-probs of the tokens of ``input_ids`` selected by ``loss_mask``.

    Args:
        model: HF causal LM (optionally PEFT-wrapped).
        input_ids: (B, T) token ids, prompt and response concatenated, padded either side.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on the tokens to score (e.g. the response); column 0 is ignored.
        chunk_tokens: rows of hidden states pushed through the LM head at once; by default
            enough rows for a 2**25-element logits chunk. Only memory, never values, depends on it.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must have the same (B, T) shape"
        )
    base = unwrap_causal_lm(model)
    sharded = getattr(base, FSDP_LOGPS_METHOD, None)  # set by lit_align.models.fsdp.fsdp2_parallelize
    compute = sharded if sharded is not None else partial(compute_token_logps, base)
    logps, mask = compute(input_ids, attention_mask, loss_mask, chunk_tokens)
    return TokenLogps(logps=logps, mask=mask)


def compute_token_logps(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                 chunk_tokens: int | None) -> tuple[Tensor, Tensor]:
    """The computation of :func:`token_logps` on an unwrapped HF causal LM; returns (logps, mask)."""
    decoder, head = causal_lm_parts(base)
    transform = logit_transform(base)
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)

    scored = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    rows = scored.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows]  # (N, H)
    targets = input_ids[:, 1:][rows]  # (N,)

    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = chunk_tokens or max(16, _DEFAULT_CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab > _CHECKPOINT_MIN_ELEMENTS
    pieces = []
    for start in range(0, h.shape[0], chunk):
        h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
        if recompute:
            pieces.append(checkpoint(_chunk_logps, head, h_c, t_c, transform, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h_c, t_c, transform))
    flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)  # (N,)

    logps = torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device)  # (B, T-1)
    logps = logps.index_put(rows, flat)
    pad = logps.new_zeros(logps.shape[0], 1)
    return torch.cat([pad, logps], dim=1), torch.cat([pad, scored.float()], dim=1)


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    chunk_tokens: int | None = None,
) -> Tensor:
    """(B,) log-prob of the response: ``sum_t log p(y_t | x, y_<t)`` over ``loss_mask`` tokens.

    ``reduction="mean"`` divides by the number of scored tokens (the length-averaged log-prob
    that IPO and SimPO-style losses take). See :func:`token_logps` for arguments.
    """
    out = token_logps(model, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens)
    if reduction == "sum":
        return out.sum()
    if reduction == "mean":
        return out.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
