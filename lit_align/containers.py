"""The typed containers that cross layers: batches of token sequences and per-token log-prob statistics.

A leaf module (it imports only torch), so that data, models, rollout and losses can all use them without
importing each other: ``lit_align.data.batches`` and ``lit_align.rollout.logps`` re-export them where
they were first defined. Every tensor is on the batch's device; shapes in the field docs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AdversarialBatch", "ForgetRetainBatch", "PreferenceBatch", "SequenceBatch", "TokenKL", "TokenLogps", "TokenStats"]


@dataclass
class SequenceBatch:
    """Prompt and response concatenated, right-padded.

    Attributes:
        input_ids: (B, T) prompt tokens then response tokens then padding.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on response tokens (the ones scored / trained on).
        index: (B,) stable example index in its dataset (reference caches key on it).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    index: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> SequenceBatch:
        """A copy with every tensor on ``device``."""
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                             self.index.to(device))

    def select(self, rows: Tensor) -> SequenceBatch:
        """The rows ``rows`` ((N,) long indices or a (B,) bool mask) as a new batch."""
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], self.index[rows])

    @staticmethod
    def cat(parts: list[SequenceBatch], pad_token_id: int) -> SequenceBatch:
        """Stack batches row-wise, right-padding to the longest (one forward for chosen + rejected)."""
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(t: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return SequenceBatch(
            input_ids=torch.cat([pad(p.input_ids, pad_token_id) for p in parts]),
            attention_mask=torch.cat([pad(p.attention_mask, 0) for p in parts]),
            loss_mask=torch.cat([pad(p.loss_mask, 0) for p in parts]),
            index=torch.cat([p.index for p in parts]),
        )


@dataclass
class PreferenceBatch:
    """A batch of (prompt, chosen, rejected) triples; row i of ``chosen`` and ``rejected`` share a prompt.

    Attributes:
        chosen: prompt + preferred response, (B, T_c) tensors.
        rejected: prompt + dispreferred response, (B, T_r) tensors.
        index: (B,) stable example index.
        margin: (B,) float32 per-pair preference margin from the records' ``margin`` field (e.g. Llama 2's
            graded preference strength), or ``None`` when the records carry none.
    """

    chosen: SequenceBatch
    rejected: SequenceBatch
    index: Tensor
    margin: Tensor | None = None

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens


@dataclass
class ForgetRetainBatch:
    """A batch for unlearning: forget examples plus the rows paired with them.

    Attributes:
        forget: (B, T_f) prompt + the answer to forget; ``index`` = forget example index.
        retain: (B * R, T_r) retain examples, ``R`` per forget example (rows ``b * R .. b * R + R - 1``
            go with forget row ``b``); ``index`` = retain example index. ``None`` without a retain set.
        mismatch: (B * K, T_m) each forget prompt with ``K`` random answers from the mismatch pool (LLMU),
            rows ``b * K .. b * K + K - 1`` for forget row ``b``; ``index`` = forget index. ``None`` without a pool.
        refusal: (B, T_p) each forget prompt with a refusal answer (PO); ``index`` = forget index.
            ``None`` without refusals.
        index: (B,) = ``forget.index``.
    """

    forget: SequenceBatch
    retain: SequenceBatch | None
    mismatch: SequenceBatch | None
    refusal: SequenceBatch | None
    index: Tensor

    def __len__(self) -> int:
        """Number of forget examples."""
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens over every part."""
        return sum(p.num_tokens for p in (self.forget, self.retain, self.mismatch, self.refusal) if p is not None)


@dataclass
class AdversarialBatch:
    """A batch for continuous adversarial training (C-AdvUL / C-AdvIPO): adversarial pairs plus utility rows.

    Attributes:
        away: (A, T_a) behaviour prompt + one harmful target (``loss_mask`` on the target); ``index`` = pair
            index. ``None`` when the batch holds no adversarial row (with a 12.5% share, often).
        toward: (A, T_t) the SAME prompts, row for row and token for token, + the behaviour's safe response;
            ``index`` = pair index. The collator checks that every row's prompt ids equal its away row's, so a
            perturbation of the away prompt positions can be copied onto these by mask order. ``None`` with ``away``.
        utility: (U, T_u) clean utility rows (prompt + response, SFT); ``index`` = utility example index.
            ``None`` when the batch holds none (always, without utility data).
        index: (A,) long, ``away.index`` (empty when ``away`` is ``None``).
    """

    away: SequenceBatch | None
    toward: SequenceBatch | None
    utility: SequenceBatch | None
    index: Tensor

    def __len__(self) -> int:
        """Rows drawn from the mixed stream: adversarial pairs (one away + one toward row each) plus utility rows."""
        return self.index.shape[0] + (len(self.utility) if self.utility is not None else 0)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens over every part."""
        return sum(p.num_tokens for p in (self.away, self.toward, self.utility) if p is not None)


@dataclass
class TokenLogps:
    """Per-token log-probs aligned with ``input_ids``.

    Attributes:
        logps: (B, T) ``log p(input_ids[:, t] | input_ids[:, :t])``; 0 where ``mask`` is 0.
        mask: (B, T) float, 1 on the scored positions (the ``loss_mask`` given, minus each row's
            first real token, which no real position predicts).
    """

    logps: Tensor
    mask: Tensor

    def sum(self) -> Tensor:
        """(B,) summed log-probs of the scored tokens."""
        return self.logps.sum(-1)

    def mean(self) -> Tensor:
        """(B,) mean log-prob per scored token (0 for a row with none)."""
        return self.logps.sum(-1) / self.mask.sum(-1).clamp(min=1)


@dataclass
class TokenStats(TokenLogps):
    """:class:`TokenLogps` plus optional per-token statistics of the whole next-token distribution.

    Attributes:
        logps: (B, T) ``log p(input_ids[:, t] | input_ids[:, :t])``; 0 where ``mask`` is 0.
        mask: (B, T) float, 1 on the scored positions.
        mean_logps: (B, T) ``(1/V) sum_v log p(v | input_ids[:, :t])``, the mean over the vocabulary
            of the log-probs (``mean(z) - logsumexp(z)`` for the logits ``z`` after the model's own
            transforms); 0 where ``mask`` is 0. ``None`` unless asked for. Differentiable.
        correct: (B, T) bool, the argmax of the logits equals the target token; False where ``mask``
            is 0 (ties go to the lowest id, as ``argmax``). ``None`` unless asked for.
    """

    mean_logps: Tensor | None = None
    correct: Tensor | None = None


@dataclass
class TokenKL:
    """Per-token divergence from a reference's next-token distribution to the policy's.

    At the scored position ``t`` (the distribution that predicts ``input_ids[:, t]``), with
    ``p = p_ref(. | input_ids[:, :t])`` and ``q = p_theta(. | input_ids[:, :t])``:

    Attributes:
        kl: (B, T) ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` (forward KL, >= 0, 0 when the
            models agree); 0 where ``mask`` is 0. Gradient flows to the policy only.
        cross_entropy: (B, T) ``-sum_v p(v) log q(v) = kl + H(p)``: the form the LLMU reference code
            minimises. It differs from ``kl`` by the reference's entropy, a constant in the policy's
            weights, so both have the same gradient; it never reaches 0.
        mask: (B, T) float, 1 on the scored positions.
    """

    kl: Tensor
    cross_entropy: Tensor
    mask: Tensor

    @property
    def reference_entropy(self) -> Tensor:
        """(B, T) entropy ``H(p)`` of the reference's next-token distribution (0 where not scored)."""
        return (self.cross_entropy - self.kl).detach()
