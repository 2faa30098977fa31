"""KGW green-list watermark (Kirchenbauer et al., 2023, "A Watermark for Large Language Models",
https://arxiv.org/abs/2301.10226), the statistical baseline of the RL-trained watermark of Xu, Yao, Liu (2024,
"Learning to Watermark LLM-generated Text via Reinforcement Learning", arXiv 2403.10553). The defaults
γ = 0.5, δ = 2.0 are those of ``WatermarkLogitsProcessor`` in its released code (``baseline_lib/klw.py``);
that file's evaluation wrappers pass γ = 0.25, δ = 1.0 instead.

**Embedding.** At every decoding step the vocabulary is split into a green list (a fraction γ
of the tokens) and a red list, seeded by a secret key and the previous token; δ is added to the
logits of the green tokens before sampling, so green tokens become more likely.

**Detection.** Over the T scored tokens of a text (every token that has a predecessor), count
the green ones, ``|s|_G``, and compute the one-proportion z-statistic

    z = (|s|_G − γ T) / sqrt(T γ (1 − γ)).

Text written without the key has ``|s|_G ~ Binomial(T, γ)``, so z ≈ N(0, 1); watermarked text
has an excess of green tokens and a large z. ``z > 4`` is the paper's threshold.

**Green list as a hash (the vectorised form used here).** The paper draws, for each previous
token, a seeded random permutation of the vocabulary and calls its first ``γ|V|`` entries green.
Materialising that per step costs a permutation of V ids, and a (V, V) table is out of the
question. Instead, membership of every (previous token, token) pair is a keyed integer hash:

    green(p, v)  <=>  (A(p) · G(v) mod 2³²) ⊕ 2³¹ < γ · 2³²

with ``A(p)`` an odd 31-bit number and ``G(v)`` a 32-bit number, both obtained from the key and
the id by a 32-bit avalanche mixer (``G`` is precomputed for the vocabulary). The product step is
multiply-shift hashing (Dietzfelbinger et al.): its top bits depend on every bit of both factors,
and it is cheap per (row, token). (The ⊕ 2³¹ makes the rule a plain signed comparison of the
wrapped int32 product, which is how the generation path evaluates it, without int64 products
or boolean tensors, both slow on CPU; :meth:`KGWWatermark.is_green` is the exact int64
reference and the tests check that both agree.)
For a fixed key
each pair is green with probability γ independently of every other pair (up to the quality of
the hash), which is all the z-test assumes: the green lists have size ≈ γ|V| (Binomial, not
exactly γ|V|), and under the null hypothesis each scored token is green with probability γ, as
with the seeded permutation. Membership is pure integer arithmetic, so it is identical on every
device and for every batch shape, costs a few element-wise ops per (row, token), and works for
a whole (B, T) batch (detection) or a (B, V) grid (generation) without Python loops.

In the int64 reference all integers stay below 2³² and the multipliers below 2³¹, so no
product overflows; the int32 generation path relies on two's-complement wrap-around of int32
multiplication (what every PyTorch backend does).

Example::

    wm = KGWWatermark(vocab_size=tokenizer.vocab_size)          # γ = 0.5, δ = 2.0
    rollout = watermarked_sample(model, ids, mask, SamplingConfig(max_new_tokens=64), wm,
                                 eos_token_id=eos, pad_token_id=pad)
    z, green, scored = wm.score(rollout.sequences, rollout.attention_mask,
                                score_mask=torch.cat([torch.zeros_like(rollout.prompt_mask),
                                                      rollout.response_mask], dim=1))
    is_watermarked = wm.detect(z)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["KGWScore", "KGWWatermark", "WatermarkedLM", "watermarked_sample"]

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a (< 2**32) * (< 2**31) product fits in int64 without overflow.
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_SIGN32 = 0x80000000
_TOKEN_SALT = 0x5BD1E995  # separates the token mix G from the previous-token mix H(key ⊕ p)


def _mix32(h: Tensor) -> Tensor:
    """Avalanche mixer on int64 tensors holding values in [0, 2**32): every input bit flips
    about half of the output bits. Same element-wise shape in and out."""
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK32
    return h ^ (h >> 16)


class KGWScore(NamedTuple):
    """What :meth:`KGWWatermark.score` returns for a batch of B texts."""

    z: Tensor
    """(B,) float32 z-statistic ``(|s|_G − γT) / sqrt(T γ (1 − γ))``; 0 where T = 0."""
    green_count: Tensor
    """(B,) int64 number of green tokens among the scored ones, ``|s|_G``."""
    scored_count: Tensor
    """(B,) int64 number of scored tokens, T."""


class KGWWatermark:
    """KGW green-list watermark with previous-token seeding: embedding (:meth:`bias_logits`)
    and z-score detection (:meth:`score`, :meth:`detect`). See the module docstring for the
    paper, the formula and the hash-based green list.

    Args:
        vocab_size: Size of the vocabulary; the per-token mix is precomputed for this many ids
            (ids beyond it, e.g. a padded LM head, are handled on the fly).
        gamma: Fraction of the vocabulary that is green, 0 < γ < 1.
        delta: Logit bias added to green tokens during generation (>= 0).
        key: Secret key (a non-negative integer below 2**32) that seeds the green lists.
        ignore_repeated_ngrams: Score each distinct (previous token, token) bigram of a row only
            once, as the paper's detector optionally does against repetitive text. Off by default.
    """

    def __init__(
        self,
        vocab_size: int,
        gamma: float = 0.5,
        delta: float = 2.0,
        key: int = 15485863,
        *,
        ignore_repeated_ngrams: bool = False,
    ) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"KGWWatermark.vocab_size must be a positive int, got {vocab_size!r}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"KGWWatermark.gamma must satisfy 0 < gamma < 1, got {gamma}")
        if not (math.isfinite(delta) and delta >= 0.0):
            raise ValueError(f"KGWWatermark.delta must be a finite number >= 0, got {delta}")
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK32:
            raise ValueError(f"KGWWatermark.key must be an int in [0, 2**32), got {key!r}")
        self.vocab_size = vocab_size
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.key = key
        self.ignore_repeated_ngrams = ignore_repeated_ngrams
        # green <=> hash < threshold; kept even so that the int32 path can halve it exactly.
        self._threshold = min(max(2 * round(self.gamma * 2**31), 2), 2**32 - 2)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (f"KGWWatermark(vocab_size={self.vocab_size}, gamma={self.gamma}, delta={self.delta}, "
                f"key=<secret>, ignore_repeated_ngrams={self.ignore_repeated_ngrams})")

    # -- green lists -------------------------------------------------------------------------
    def _prev_mix(self, prev: Tensor) -> Tensor:
        """A(p): an odd number below 2**31 mixed from the key and the int64 ids ``prev`` (any shape)."""
        return (_mix32((prev & _MASK32) ^ self.key) >> 1) | 1

    def _token_mix(self, tokens: Tensor) -> Tensor:
        """G(v) for int64 ids ``tokens`` (any shape)."""
        return _mix32(((tokens & _MASK32) * 0x1B873593 & _MASK32) ^ (self.key ^ _TOKEN_SALT))

    def _vocab_tables(self, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """int32 tables (A(v) (N,), G(v) as a two's-complement int32 (size,)) for the ids 0..N-1,
        N = max(size, vocab_size), cached per device."""
        cached = self._tables.get(device)
        if cached is None or cached[0].numel() < size:
            ids = torch.arange(max(size, self.vocab_size), device=device, dtype=torch.long)  # (N,)
            token_mix = self._token_mix(ids)  # (N,) in [0, 2**32)
            cached = (self._prev_mix(ids).to(torch.int32), ((token_mix ^ _SIGN32) - _SIGN32).to(torch.int32))
            self._tables[device] = cached
        return cached[0], cached[1][:size]

    def is_green(self, prev: Tensor, tokens: Tensor) -> Tensor:
        """Whether each ``tokens`` id is green given its previous token ``prev`` (broadcast).

        ``prev`` (B, T) with ``tokens`` (B, T) scores a batch of texts; ``prev`` (B, 1) with
        ``tokens`` (1, V) gives each row's whole green list. Returns a bool tensor of the
        broadcast shape; identical on every device.
        """
        prev, tokens = prev.long(), tokens.long()
        return ((self._prev_mix(prev) * self._token_mix(tokens)) ^ _SIGN32) & _MASK32 < self._threshold

    def _green_sign(self, prev: Tensor, vocab: int) -> Tensor:
        """(B, V) int32: -1 where token v is green after ``prev[b]``, else 0 (the fast path).

        The wrapped int32 product is the signed form of ``(A·G mod 2³²) ⊕ 2³¹ − 2³¹``, so green
        means ``product < threshold − 2³¹``; halving both sides (the threshold is even) keeps the
        difference inside int32, and its sign bit is the answer.
        """
        prev_mix, token_mix = self._vocab_tables(vocab, prev.device)  # (N,), (V,)
        pm = prev_mix[prev.long().reshape(-1)].unsqueeze(1)  # (B, 1)
        h = pm * token_mix  # (B, V) int32, wraps mod 2**32
        if self._threshold == 2**31:  # γ = 0.5: green <=> product < 0, the sign bit alone
            return h.bitwise_right_shift_(31)  # (B, V) in {-1, 0}
        half = (self._threshold - 2**31) // 2
        return h.bitwise_right_shift_(1).sub_(half).bitwise_right_shift_(31)  # (B, V) in {-1, 0}

    def green_mask(self, prev: Tensor, vocab: int | None = None) -> Tensor:
        """(B, V) bool green lists for the (B,) previous tokens ``prev`` (V = ``vocab`` or vocab_size).

        Reads precomputed per-id tables, so ``prev`` ids must be below ``max(V, vocab_size)``
        (always true for ids a model with V logits can embed).
        """
        return self._green_sign(prev, self.vocab_size if vocab is None else vocab) != 0

    # -- embedding ---------------------------------------------------------------------------
    def bias_logits(self, input_ids: Tensor, logits: Tensor) -> Tensor:
        """Add δ to the green logits of each row, seeded by the row's last token.

        Args:
            input_ids: (B, t) the tokens so far (only the last column is read).
            logits: (B, V) next-token logits.

        Returns:
            (B, V) ``logits + δ · green``, in the dtype of ``logits`` (a new tensor). Usable as
            a logits processor (``processor(input_ids, logits)``, the HF signature).
        """
        if input_ids.ndim != 2 or logits.ndim != 2 or input_ids.shape[0] != logits.shape[0]:
            raise ValueError(f"bias_logits expects input_ids (B, t) and logits (B, V), got "
                             f"{tuple(input_ids.shape)} and {tuple(logits.shape)}")
        sign = self._green_sign(input_ids[:, -1], logits.shape[-1])  # (B, V) -1 on green
        return logits.sub(sign, alpha=self.delta)  # no bool tensors: they are slow on CPU

    __call__ = bias_logits

    # -- detection ---------------------------------------------------------------------------
    def score(self, ids: Tensor, mask: Tensor | None = None, *, score_mask: Tensor | None = None) -> KGWScore:
        """z-statistic of every row of a batch of token ids.

        Token t is scored when it and its predecessor t-1 are both real (``mask``), and, if
        ``score_mask`` is given, ``score_mask[t]`` is 1 (e.g. only a continuation, whose first
        token is seeded by the last prompt token). The first real token of a row has no
        predecessor and is never scored. Left or right padding are both fine.

        Args:
            ids: (B, T) token ids.
            mask: (B, T) 1 on real tokens (default: all real).
            score_mask: (B, T) optional, 1 on the tokens eligible for scoring.

        Returns:
            :class:`KGWScore` ``(z, green_count, scored_count)``, each (B,). Rows with nothing
            to score get z = 0.
        """
        if ids.ndim != 2:
            raise ValueError(f"score expects ids of shape (B, T), got {tuple(ids.shape)}")
        for name, m in (("mask", mask), ("score_mask", score_mask)):
            if m is not None and m.shape != ids.shape:
                raise ValueError(f"score: {name} shape {tuple(m.shape)} does not match ids shape {tuple(ids.shape)}")
        ids = ids.long()
        prev, tok = ids[:, :-1], ids[:, 1:]  # (B, T-1) each
        scored = torch.ones_like(tok, dtype=torch.bool) if mask is None else (mask[:, :-1].bool() & mask[:, 1:].bool())
        if score_mask is not None:
            scored = scored & score_mask[:, 1:].bool()  # (B, T-1)
        if self.ignore_repeated_ngrams:
            scored = scored & self._first_occurrences(prev, tok, scored)
        green = self.is_green(prev, tok) & scored  # (B, T-1)
        green_count = green.sum(-1)  # (B,)
        scored_count = scored.sum(-1)  # (B,)
        return KGWScore(self.z_score(green_count, scored_count), green_count, scored_count)

    @staticmethod
    def _first_occurrences(prev: Tensor, tok: Tensor, scored: Tensor) -> Tensor:
        """(B, T-1) bool: True at the first scored occurrence of each (prev, tok) bigram in its row."""
        n = prev.shape[-1]
        if n == 0:
            return scored
        # A bigram's key (< 2**64 would overflow: ids are folded to 31 bits each, ample for any vocabulary).
        key = ((prev & 0x7FFFFFFF) << 31) | (tok & 0x7FFFFFFF)  # (B, n)
        key = key.masked_fill(~scored, -1)  # unscored positions share one key, dropped below
        # Stable sort keeps equal keys in position order, so the first of a run is the first occurrence.
        sorted_key, order = key.sort(dim=-1, stable=True)  # (B, n)
        first = torch.ones_like(sorted_key, dtype=torch.bool)
        first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
        out = torch.empty_like(first)
        out.scatter_(-1, order, first)
        return out

    def z_score(self, green_count: Tensor, scored_count: Tensor) -> Tensor:
        """(B,) float32 ``(G − γT) / sqrt(T γ (1 − γ))``; 0 where T = 0."""
        t = scored_count.float()
        g = green_count.float()
        denom = (t * self.gamma * (1.0 - self.gamma)).sqrt()
        return torch.where(t > 0, (g - self.gamma * t) / denom.clamp_min(1e-12), torch.zeros_like(t))

    @staticmethod
    def detect(z: Tensor, threshold: float = 4.0) -> Tensor:
        """(B,) bool: watermarked when z exceeds ``threshold`` (4.0 in the paper, one-sided FPR ≈ 3e-5)."""
        return z > threshold


class WatermarkedLM(nn.Module):
    """A causal LM whose last-position logits carry the KGW bias, for any sampler.

    :func:`lit_align.rollout.sampler.sample` has no logits-processor hook, so the bias is
    applied in the model's output instead: at each forward, the logits of the **last** input
    position are biased with the green list seeded by the last input token. In the sampler's
    prefill the last input token is the last prompt token (prompts are left-padded); in each
    cached step it is the token just sampled, so every sampled token is drawn from the biased
    distribution exactly as in KGW. Other positions' logits are returned unchanged. Biased
    logits are upcast to float32 (the sampler does that anyway).
    """

    def __init__(self, model: nn.Module, watermark: KGWWatermark) -> None:
        super().__init__()
        self.model = model
        self.watermark = watermark
        self.config = getattr(model, "config", None)
        self._drop_logits_to_keep = not _accepts(model, "logits_to_keep")

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        if self._drop_logits_to_keep:
            kwargs.pop("logits_to_keep", None)
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits  # (B, L, V)
        last = self.watermark.bias_logits(input_ids, logits[:, -1].float())  # (B, V)
        out.logits = last.unsqueeze(1) if logits.shape[1] == 1 else torch.cat([logits[:, :-1].float(), last[:, None]], 1)
        return out


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def watermarked_sample(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, config: Any,
                       watermark: KGWWatermark, *, eos_token_id: int | list[int], pad_token_id: int,
                       generator: torch.Generator | None = None):
    """:func:`~lit_align.rollout.sampler.sample` with the KGW bias on every sampled token.

    Same arguments and :class:`~lit_align.rollout.sampler.Rollout` as ``sample`` (plus the
    watermark). ``Rollout.logps`` are log-probs under the *biased* distribution, the one the
    tokens were drawn from. If ``SamplingConfig`` gains a ``logits_processor`` field, it is used
    directly; otherwise the model is wrapped in :class:`WatermarkedLM`.
    """
    import dataclasses

    from lit_align.rollout.sampler import sample

    if any(f.name == "logits_processor" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, logits_processor=watermark.bias_logits)
    else:
        model = WatermarkedLM(model, watermark)
    return sample(model, prompt_ids, prompt_mask, config, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, generator=generator)
