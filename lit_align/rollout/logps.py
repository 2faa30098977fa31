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

The same row-chunked pass gives more than the target's log-prob:

* :func:`token_stats`: optionally the mean over the vocabulary of ``log p(v | prefix)`` at each
  scored position (label-smoothed losses) and whether the argmax is the target (accuracy);
* :func:`token_kl`: the per-token KL divergence from a frozen reference's next-token
  distribution to the policy's, with both models' logits of one chunk alive at a time.

Under FSDP2 every computation that calls the decoder and the head separately runs through a
method registered on the (sharded) root, :data:`FSDP_RUN_METHOD`: the root's weights are then
gathered for the whole computation exactly as for ``model(...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_align.containers import TokenKL, TokenLogps, TokenStats  # re-exported: defined here first
from lit_align.rollout.logit_transforms import LogitTransform, logit_transform

#: Name of the method :func:`~lit_align.models.fsdp.fsdp2_parallelize` registers on a sharded model,
#: so the whole computation runs inside one FSDP2 forward of the root (embeddings, norm, LM head).
FSDP_LOGPS_METHOD = "lit_align_token_logps"
#: Name of the generic method registered the same way: ``root.lit_align_run(fn, *args)`` calls
#: ``fn(root, *args)`` inside one FSDP2 forward of the root (see :func:`run_on_causal_lm`).
FSDP_RUN_METHOD = "lit_align_run"

__all__ = [
    "FSDP_LOGPS_METHOD",
    "FSDP_RUN_METHOD",
    "TokenKL",
    "TokenLogps",
    "TokenStats",
    "causal_lm_parts",
    "compute_token_logps",
    "compute_token_stats",
    "position_ids_from_mask",
    "run_on_causal_lm",
    "sequence_logps",
    "token_kl",
    "token_logps",
    "token_stats",
    "unwrap_causal_lm",
]

#: Elements of one (n, V) logits chunk when ``chunk_tokens`` is not given (128 MiB in fp32).
_DEFAULT_CHUNK_ELEMENTS = 1 << 25
#: Below this many logits elements in all (16 MiB in fp32) the head is not checkpointed:
#: recomputing it in backward would cost more time than the memory it saves.
_CHECKPOINT_MIN_ELEMENTS = 1 << 22


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


def run_on_causal_lm(base: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(base, *args)``. Registered on FSDP2 roots as :data:`FSDP_RUN_METHOD`
    (:func:`~lit_align.models.fsdp.fsdp2_parallelize`) so that ``fn`` may call the decoder and the
    LM head separately while the root's own weights (embeddings, final norm, head) are gathered."""
    return fn(base, *args)


def run_gathered(base: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(base, *args)``, through the root's registered FSDP2 method when ``base`` is sharded: code that calls the
    embedding, the decoder or the LM head of an unwrapped causal LM by itself (not through its ``forward``) runs
    with the root's own weights gathered, and on an unsharded model exactly as called."""
    sharded = getattr(base, FSDP_RUN_METHOD, None)
    return sharded(fn, *args) if sharded is not None else fn(base, *args)


_run = run_gathered


def _check_shapes(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> None:
    if input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must have the same (B, T) shape"
        )


def _vocab_size(head: nn.Module) -> int:
    return head.weight.shape[0] if hasattr(head, "weight") else head.out_features


def _chunk_rows(head: nn.Module, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(16, _DEFAULT_CHUNK_ELEMENTS // _vocab_size(head))


def _scored_hidden(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Decoder pass; the hidden states of the N positions that predict a scored token.

    Returns ``(h, targets, scored, rows)``: h (N, H), targets (N,), scored (B, T-1) bool (position
    t predicts token t+1) and ``rows``, the (b, t) indices of the N scored positions in ``scored``.
    """
    decoder, _ = causal_lm_parts(base)
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    real = attention_mask.bool()
    # position t predicts token t+1; both must be real: the first real token of a left-padded row
    # is never scored (as column 0 of a right-padded one), whatever loss_mask says
    scored = loss_mask[:, 1:].bool() & real[:, 1:] & real[:, :-1]  # (B, T-1)
    rows = scored.nonzero(as_tuple=True)
    return hidden[:, :-1][rows], input_ids[:, 1:][rows], scored, rows  # (N, H), (N,)


def _scatter(flat: Tensor, scored: Tensor, rows: tuple[Tensor, Tensor]) -> Tensor:
    """(N,) values of the scored positions -> (B, T), 0 (False) elsewhere and in column 0."""
    out = flat.new_zeros(scored.shape).index_put(rows, flat)  # (B, T-1)
    return torch.cat([out.new_zeros(out.shape[0], 1), out], dim=1)


def _scored_mask(scored: Tensor) -> Tensor:
    """(B, T-1) bool -> (B, T) float mask aligned with ``input_ids`` (column 0 is never scored)."""
    return torch.cat([scored.new_zeros(scored.shape[0], 1), scored], dim=1).float()


def _chunked(fn: Callable[..., tuple[Tensor, ...]], head: nn.Module, h: Tensor, chunk: int, recompute: bool,
             *per_row: Tensor, extra: tuple = ()) -> list[Tensor]:
    """Apply ``fn(head, h_chunk, *per_row_chunks, *extra)`` to row chunks of ``h`` (activation-checkpointed
    when ``recompute``) and concatenate each of its outputs over the chunks."""
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, h.shape[0], chunk):
        args = (head, h[start : start + chunk], *(x[start : start + chunk] for x in per_row), *extra)
        pieces.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return [torch.cat(parts) for parts in zip(*pieces, strict=True)]


def _head_logits(head: nn.Module, hidden: Tensor, transform: LogitTransform | None) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    if transform is not None:
        logits = transform(logits)  # the model's own post-head transform, e.g. soft-capping
    return logits


def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor, transform: LogitTransform | None = None) -> Tensor:
    logits = _head_logits(head, hidden, transform)  # (n, V)
    # fused log-softmax + gather: one pass over the logits fewer than gather - logsumexp, cheaper backward
    return -F.cross_entropy(logits, targets, reduction="none")  # (n,)


def _chunk_stats(head: nn.Module, hidden: Tensor, targets: Tensor, transform: LogitTransform | None,
                 want_mean: bool, want_correct: bool) -> tuple[Tensor, ...]:
    """(n,) log-prob of the targets, and (n,) vocabulary-mean log-prob / (n,) argmax hits if asked."""
    if not (want_mean or want_correct):
        return (_chunk_logps(head, hidden, targets, transform),)
    logits = _head_logits(head, hidden, transform)  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - lse]
    if want_mean:
        out.append(logits.mean(-1) - lse)  # (n,) mean_v log p(v) = mean_v z_v - logsumexp(z)
    if want_correct:
        out.append(logits.detach().argmax(-1) == targets)  # (n,) bool
    return tuple(out)


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
        loss_mask: (B, T) 1 on the tokens to score (e.g. the response); each row's first real
            token is never scored.
        chunk_tokens: rows of hidden states pushed through the LM head at once; by default
            enough rows for a 2**25-element logits chunk. Only memory, never values, depends on it.
    """
    _check_shapes(input_ids, attention_mask, loss_mask)
    base = unwrap_causal_lm(model)
    sharded = getattr(base, FSDP_LOGPS_METHOD, None)  # set by lit_align.models.fsdp.fsdp2_parallelize
    compute = sharded if sharded is not None else partial(compute_token_logps, base)
    logps, mask = compute(input_ids, attention_mask, loss_mask, chunk_tokens)
    return TokenLogps(logps=logps, mask=mask)


def compute_token_logps(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                 chunk_tokens: int | None) -> tuple[Tensor, Tensor]:
    """The computation of :func:`token_logps` on an unwrapped HF causal LM; returns (logps, mask)."""
    logps, mask, _, _ = compute_token_stats(base, input_ids, attention_mask, loss_mask, chunk_tokens)
    return logps, mask


def token_stats(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    mean_logps: bool = False,
    correct: bool = False,
    chunk_tokens: int | None = None,
) -> TokenStats:
    """:func:`token_logps`, plus the vocabulary-mean log-prob and/or argmax accuracy of each scored token.

    The statistics come from the same (n, V) logits chunk as the target's log-prob, so asking for
    them costs no extra head pass; nothing of shape (B, T, V) is built. Arguments as
    :func:`token_logps`; ``mean_logps`` and ``correct`` fill the fields of :class:`TokenStats`
    of those names. ``mean_logps`` is taken over every logit the (transformed) head produces, so
    a model whose forward masks logits to the most negative float (Chameleon's image tokens)
    gets a hugely negative mean.
    """
    _check_shapes(input_ids, attention_mask, loss_mask)
    logps, mask, mean, hits = _run(unwrap_causal_lm(model), compute_token_stats, input_ids, attention_mask,
                                   loss_mask, chunk_tokens, mean_logps, correct)
    return TokenStats(logps=logps, mask=mask, mean_logps=mean, correct=hits)


def compute_token_stats(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                        chunk_tokens: int | None, mean_logps: bool = False, correct: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The computation of :func:`token_stats` on an unwrapped HF causal LM.

    Returns ``(logps, mask, mean_logps | None, correct | None)``, each (B, T).
    """
    _, head = causal_lm_parts(base)
    transform = logit_transform(base)
    h, targets, scored, rows = _scored_hidden(base, input_ids, attention_mask, loss_mask)  # (N, H), (N,)
    vocab = _vocab_size(head)
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab > _CHECKPOINT_MIN_ELEMENTS
    if h.shape[0]:
        flat = _chunked(_chunk_stats, head, h, _chunk_rows(head, chunk_tokens), recompute, targets,
                        extra=(transform, mean_logps, correct))
    else:  # nothing scored
        empty = h.new_zeros(0, dtype=torch.float32)
        flat = [empty] + ([empty] if mean_logps else []) + ([empty.bool()] if correct else [])
    logps = _scatter(flat[0], scored, rows)  # (B, T)
    mask = _scored_mask(scored)  # (B, T)
    rest = iter(flat[1:])
    mean = _scatter(next(rest), scored, rows) if mean_logps else None
    hits = _scatter(next(rest), scored, rows) if correct else None
    return logps, mask, mean, hits


def _chunk_kl(head: nn.Module, hidden: Tensor, ref_hidden: Tensor, transform: LogitTransform | None,
              ref_logps: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(n,) KL(p_ref || p_theta) and (n,) cross-entropy -sum p_ref log p_theta of one row chunk.

    The reference's (n, V) log-probs are computed here too (without gradient), so a checkpointed
    chunk keeps only the two (n, H) hidden-state chunks for backward and recomputes both logits."""
    ref = ref_logps(ref_hidden)  # (n, V) float32, no grad
    logq = _head_logits(head, hidden, transform).log_softmax(-1)  # (n, V)
    if ref.shape != logq.shape:
        raise ValueError(f"the reference's next-token distribution has {ref.shape[-1]} entries and the policy's "
                         f"{logq.shape[-1]}: KL needs the same vocabulary")
    p = ref.exp()  # (n, V)
    live = p > 0  # a token the reference rules out (log p = -inf: masked vocabulary) adds 0, not NaN
    kl = torch.where(live, p * (ref - logq), 0.0).sum(-1)  # (n,) sum_v p (log p - log q)
    cross_entropy = -torch.where(live, p * logq, 0.0).sum(-1)  # (n,)
    return kl, cross_entropy


def _reference_logps(base: nn.Module, hidden: Tensor) -> Tensor:
    """(n, V) float32 log-probs of the next token from ``base``'s LM head and logit transforms."""
    _, head = causal_lm_parts(base)
    return _head_logits(head, hidden, logit_transform(base)).log_softmax(-1)


def _reference_hidden(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    return _scored_hidden(base, input_ids, attention_mask, loss_mask)[0]  # (N, H)


def token_kl(
    policy: nn.Module,
    reference: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    chunk_tokens: int | None = None,
) -> TokenKL:
    """Per-token forward KL ``KL(p_ref || p_theta)`` of the next-token distributions, and its cross-entropy form.

    Used as a retain regulariser (LLMU's "normal" term, NPO+KL): see :class:`TokenKL` for the
    two forms. Computation, both models log-space throughout:

    1. the reference's decoder (no gradient, under ``reference_context``) gives the hidden states
       of the N scored positions, (N, H);
    2. the policy's decoder gives its own (N, H); then per chunk of rows, both heads give (n, V)
       logits, reduced at once to the chunk's KL and cross-entropy. Only one chunk's logits of each
       model exist at a time; a checkpointed chunk (large inputs under grad) recomputes both heads
       in backward instead of keeping their logits.

    Args:
        policy: HF causal LM being trained (optionally PEFT-wrapped); gradients flow into it.
        reference: the frozen model to stay close to, with the same vocabulary (a frozen copy,
            or the policy itself in adapter mode).
        input_ids: (B, T) token ids, padded either side.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on the positions to score (``attention_mask`` itself scores every
            real token but the first, which no position predicts).
        reference_context: zero-argument callable returning a context manager under which the
            reference is evaluated, e.g. ``lambda: policy.disable_adapter()`` with
            ``reference=policy`` (LoRA policies: adapters off == the starting weights).
        chunk_tokens: rows per head chunk, as in :func:`token_logps`.

    Returns:
        :class:`TokenKL` with (B, T) ``kl``, ``cross_entropy`` and ``mask``.
    """
    _check_shapes(input_ids, attention_mask, loss_mask)
    policy_base, reference_base = unwrap_causal_lm(policy), unwrap_causal_lm(reference)
    context = reference_context or nullcontext
    with torch.no_grad(), context():
        ref_hidden = _run(reference_base, _reference_hidden, input_ids, attention_mask, loss_mask)  # (N, H)

    def ref_logps(hidden: Tensor) -> Tensor:  # (n, H) -> (n, V)
        with torch.no_grad(), context():
            if reference_base is policy_base:  # adapter mode: already inside the policy's own (FSDP2) call
                return _reference_logps(reference_base, hidden)
            return _run(reference_base, _reference_logps, hidden)

    kl, cross_entropy, mask = _run(policy_base, _compute_token_kl, input_ids, attention_mask, loss_mask,
                                   ref_hidden, ref_logps, chunk_tokens)
    return TokenKL(kl=kl, cross_entropy=cross_entropy, mask=mask)


def _compute_token_kl(base: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                      ref_hidden: Tensor, ref_logps: Callable[[Tensor], Tensor], chunk_tokens: int | None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The policy side of :func:`token_kl` on an unwrapped HF causal LM; returns (kl, cross_entropy, mask)."""
    _, head = causal_lm_parts(base)
    transform = logit_transform(base)
    h, _, scored, rows = _scored_hidden(base, input_ids, attention_mask, loss_mask)  # (N, H)
    vocab = _vocab_size(head)
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab > _CHECKPOINT_MIN_ELEMENTS
    if h.shape[0]:
        kl, cross_entropy = _chunked(_chunk_kl, head, h, _chunk_rows(head, chunk_tokens), recompute, ref_hidden,
                                     extra=(transform, ref_logps))
    else:
        kl = cross_entropy = h.new_zeros(0, dtype=torch.float32)
    mask = _scored_mask(scored)  # (B, T)
    return _scatter(kl, scored, rows), _scatter(cross_entropy, scored, rows), mask


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
