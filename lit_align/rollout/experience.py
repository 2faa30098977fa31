"""PPO experience: everything a PPO update needs about one sampled batch, computed once without grad.

:func:`make_experience` turns a :class:`~lit_align.rollout.sampler.Rollout` and its sequence scores
(from any reward source: a reward model, the detector, a rule or a weighted mix) into an
:class:`Experience`. This is PPO with per-token KL-shaped rewards and GAE in the DeepSpeed-Chat style, as
the released code of the RL watermark runs it (Xu, Yao, Liu 2024, arXiv 2403.10553; code:
github.com/xiaojunxu/learning-to-watermark-llm, ``main.py``: each training step generates, scores without
grad, then builds the shaped rewards and GAE of its PPO update):

1. drop the rows with fewer than ``min_response_tokens`` actions (that code drops samples with <= 1
   generated token), counting them;
2. old (actor) and reference token log-probs of the response tokens, recomputed by
   :func:`~lit_align.rollout.logps.token_logps` on the full sequences (not the sampler's
   KV-cache/temperature log-probs), the reference optionally being the actor under a context
   (LoRA adapters disabled);
3. the critic's values ``V_t`` of the state before each response token;
4. KL-shaped per-token rewards with the clipped score at the last generated token, then GAE and,
   optionally, whitened advantages.

Which generated tokens are actions (:func:`response_actions`): every one, or, given ``eos_token_id``,
every one but a final EOS. The released watermark code (``utils.train_rlhf``, from DeepSpeed-Chat) pads
with EOS, so its attention and action masks are 0 on the EOS: the EOS column still enters the GAE (its
KL term, the clipped score placed there, and the critic's value of the state after the last real token,
i.e. read at the last token before EOS), but no policy or value loss is taken on it, and a sample is
dropped when it has <= 1 generated token besides the EOS. The paper does not say.
:func:`minibatches` then cuts the experience into shuffled row minibatches for the PPO epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from lit_align.losses.ppo import kl_shaped_rewards
from lit_align.modes import eval_mode
from lit_align.rollout.advantages import GAE, AdvantageEstimator
from lit_align.rollout.logps import TokenLogps, token_logps
from lit_align.rollout.sampler import Rollout

__all__ = ["Experience", "make_experience", "minibatches", "response_actions"]

#: The per-row tensor fields of :class:`Experience` (sliced together by :meth:`Experience.select`).
_ROW_FIELDS = ("sequences", "attention_mask", "action_mask", "old_logps", "ref_logps", "values", "rewards",
               "advantages", "returns", "scores")


@dataclass
class Experience:
    """One batch of PPO experience. Every (B, T) tensor is aligned with ``sequences`` like
    :class:`~lit_align.rollout.TokenLogps`: column ``t`` is the action "emit token ``t``", and
    every float field is 0 where ``action_mask`` is 0, except on a final EOS that is not an action
    (``make_experience(eos_token_id=...)``): its ``old_logps``, ``ref_logps``, ``values`` and
    ``rewards`` are kept there (they enter the GAE of the tokens before it); its advantage and
    return are 0.

    Attributes:
        sequences: (B, T) long, left-padded prompt then right-padded response (``Rollout.sequences``).
        attention_mask: (B, T) long, 1 on real prompt tokens and generated tokens (EOS included).
        action_mask: (B, T) float, 1 on the actions (:func:`response_actions`: the generated tokens,
            a final EOS included or not), 0 on prompt and padding: the policy and value losses' mask.
        old_logps: (B, T) float32, token log-probs under the actor that sampled.
        ref_logps: (B, T) float32, token log-probs under the reference.
        values: (B, T) float32, the critic's ``V_t`` of the state before token ``t``
            (:meth:`~lit_align.models.value.ValueModel.action_values`).
        rewards: (B, T) float32, KL-shaped rewards with the clipped score at each row's last generated
            token (an EOS that is not an action included).
        advantages: (B, T) float32, GAE advantages (whitened over the batch's actions if asked).
        returns: (B, T) float32, value targets ``A + V`` (from the unwhitened advantages).
        scores: (B,) float32, the raw (unclipped) sequence scores.
        num_dropped: rows of the rollout left out for having too few generated tokens.
        metrics: detached scalars for logging (KL, score, reward, response length, dropped rows);
            empty in minibatches.
    """

    sequences: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    old_logps: Tensor
    ref_logps: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    num_dropped: int = 0
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: Tensor) -> Experience:
        """The rows ``index`` ((N,) long or (B,) bool) as a new experience, without metrics."""
        return Experience(**{name: getattr(self, name)[index] for name in _ROW_FIELDS})

    def to(self, device: torch.device | str) -> Experience:
        """A copy with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({name: moved[name].to(device) for name in _ROW_FIELDS})
        moved["metrics"] = {k: v.to(device) for k, v in self.metrics.items()}
        return Experience(**moved)


def response_actions(rollout: Rollout, eos_token_id: int | Sequence[int] | None = None) -> Tensor:
    """(B, R) long, 1 on the generated tokens that are PPO actions.

    ``eos_token_id=None``: every generated token (``rollout.response_mask``, a final EOS included).
    Otherwise a generated token equal to (one of) ``eos_token_id`` is not an action; the sampler stops
    a row at its first EOS, so that is only ever a row's last generated token.

    Hand check: response ``[[7, 8, EOS], [7, 8, 9]]`` with mask ``[[1, 1, 1], [1, 1, 1]]`` gives
    ``[[1, 1, 0], [1, 1, 1]]`` with ``eos_token_id=EOS`` and the mask itself without.
    """
    mask = rollout.response_mask.long()
    if eos_token_id is None:
        return mask
    eos = torch.as_tensor(eos_token_id, device=rollout.response_ids.device).reshape(-1)
    return mask * ~torch.isin(rollout.response_ids, eos)


def _check_args(rollout: Rollout, scores: Tensor, min_response_tokens: int) -> None:
    batch = rollout.response_ids.shape[0]
    if not isinstance(scores, Tensor) or scores.shape != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a (B,) tensor with B = {batch} (one per rollout row), got {shape}")
    if isinstance(min_response_tokens, bool) or not isinstance(min_response_tokens, int) or min_response_tokens < 1:
        raise ValueError(f"min_response_tokens must be an int >= 1, got {min_response_tokens!r}")


def _empty(rollout: Rollout, scores: Tensor, dropped: int) -> Experience:
    """An experience with no rows (every row was dropped)."""
    seq = rollout.sequences[:0]  # (0, T)
    zeros = torch.zeros(seq.shape, dtype=torch.float32, device=seq.device)
    return Experience(sequences=seq, attention_mask=rollout.attention_mask[:0], action_mask=zeros,
                      old_logps=zeros, ref_logps=zeros, values=zeros, rewards=zeros, advantages=zeros,
                      returns=zeros, scores=scores[:0].float(), num_dropped=dropped,
                      metrics={"dropped": torch.tensor(float(dropped))})


@torch.no_grad()
def make_experience(
    actor: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None,
    rollout: Rollout,
    scores: Tensor,
    *,
    kl_coef: float = 0.1,
    reward_clip: float | None = 5.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = False,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    min_response_tokens: int = 2,
    eos_token_id: int | Sequence[int] | None = None,
    keep_shape: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
    estimator: AdvantageEstimator | None = None,
    score_old: bool = True,
) -> Experience:
    """Score a rollout for PPO: log-probs, values, KL-shaped rewards and GAE (no gradient).

    Every model is run in eval mode (each submodule's mode is restored afterwards).

    Args:
        actor: the HF causal LM that sampled ``rollout`` (optionally PEFT-wrapped).
        reference: the frozen reference LM (may be ``actor`` itself with ``reference_context``), or ``None``
            when nothing reads the KL (``kl_coef`` 0 and no KL in the loss): no forward, ``ref_logps`` are the
            old ones.
        critic: a :class:`~lit_align.models.value.ValueModel` (anything with ``action_values``), or ``None``
            for a critic-free estimator (the values are then 0).
        rollout: the sampled batch (:func:`~lit_align.rollout.sampler.sample`).
        scores: (B,) sequence score of each rollout row (computed by the caller on the full
            rollout: reward model, detector, rule or mix); unclipped.
        kl_coef, reward_clip: see :func:`~lit_align.losses.ppo.kl_shaped_rewards`.
        gamma, lam: see :func:`~lit_align.losses.ppo.gae`.
        whiten_advantages: whiten the advantages over the batch's action tokens (returns are
            computed before whitening).
        estimator: how rewards become advantages (:mod:`lit_align.rollout.advantages`: ``GAE``, ``RLOO``,
            ``GRPO``); ``None``: :class:`~lit_align.rollout.advantages.GAE` with ``gamma``, ``lam`` and
            ``whiten_advantages``. A group estimator needs the rollout's rows grouped by prompt and
            ``keep_shape`` (a dropped row would shift the groups).
        score_old: compute the old log-probs. ``False`` (only with ``kl_coef`` 0, which is all that reads them
            here) leaves them 0 for a PPO update that takes the current ones, detached, as the old ones
            (``ppo_update(old_from_current=True)``: one epoch over one minibatch, where they are equal): one
            forward less, as TRL's GRPO does.
        reference_context: zero-argument callable returning a context manager under which the
            reference runs, e.g. ``lambda: actor.disable_adapter()`` with ``reference=actor``.
        min_response_tokens: rows with fewer actions (:func:`response_actions`) are dropped and
            counted in ``num_dropped``; 2 drops the samples with <= 1 generated token, as the
            released watermark code does.
        eos_token_id: None: every generated token is an action, a final EOS included. Given: a
            generated EOS is not an action (the watermark reference code's rule, see the module
            docstring): it stays a step of the KL-shaped rewards and the GAE, and the score sits on
            it, but ``action_mask`` is 0 there, so the PPO losses skip it, and it does not count
            towards ``min_response_tokens``.
        keep_shape: keep the rows that are too short as rows with no actions (every mask 0: no reward, no
            loss, out of the whitening and the metrics) instead of removing them. Data-parallel ranks then
            all hold the same number of rows, so they run the same number of forwards and minibatches
            (FSDP2 and DDP need that); with the losses' global token means the result is unchanged.
        reduce: sums a tensor over data-parallel ranks, for global whitening (see
            :func:`~lit_align.losses.ppo.whiten`); ``None``: this rank's batch alone.

    Returns:
        The :class:`Experience` of the kept rows, with ``metrics``: ``kl``, ``kl_token``, ``score``,
        ``score_clipped``, ``reward`` (see :func:`~lit_align.losses.ppo.kl_shaped_rewards`),
        ``response_length`` (mean generated tokens), ``value`` (mean ``V``) and ``dropped``. If
        every row is dropped, an experience with B = 0 (no model is run).
    """
    _check_args(rollout, scores, min_response_tokens)
    estimator = estimator or GAE(gamma=gamma, lam=lam, whiten=whiten_advantages)
    if estimator.group_size > 1 and not keep_shape:
        raise ValueError("make_experience: a group estimator needs keep_shape=True (dropping a row would break the "
                         "groups of samples of one prompt)")
    if estimator.needs_critic and critic is None:
        raise ValueError(f"make_experience: {type(estimator).__name__} needs a critic")
    actions = response_actions(rollout, eos_token_id)  # (B, R)
    keep = actions.sum(-1) >= min_response_tokens  # (B,)
    dropped = int((~keep).sum())
    if keep_shape:
        actions = actions * keep[:, None]
    elif dropped == len(keep):
        return _empty(rollout, scores, dropped)
    elif dropped:
        rollout = Rollout(**{f.name: getattr(rollout, f.name)[keep] for f in fields(rollout)})
        scores, actions = scores[keep], actions[keep]
        keep = keep[keep]

    sequences = rollout.sequences  # (B, T)
    attention_mask = rollout.attention_mask  # (B, T)
    steps = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)  # (B, T) every generated token
    context = reference_context or nullcontext

    if not score_old and kl_coef != 0:
        raise ValueError("make_experience(score_old=False) needs kl_coef=0: the KL-shaped rewards read the old log-probs")
    with eval_mode(*(m for m in (actor, reference, critic) if m is not None)):
        old = token_logps(actor, sequences, attention_mask, steps) if score_old else TokenLogps(
            torch.zeros(steps.shape, device=steps.device), _scored(steps, attention_mask))
        if reference is None:
            ref = old
        else:
            with context():
                ref = token_logps(reference, sequences, attention_mask, steps)
        values = critic.action_values(sequences, attention_mask) if critic is not None else torch.zeros_like(old.logps)

    mask = old.mask * keep[:, None]  # (B, T) float == steps of the kept rows (a prompt's first token is never generated)
    action_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), actions], dim=1).to(mask)  # (B, T)
    values = values.float() * mask
    rewards, _ = kl_shaped_rewards(old.logps, ref.logps, scores, mask, kl_coef=kl_coef, reward_clip=reward_clip)
    rows = keep if keep.any() else torch.ones_like(keep)  # metrics over the kept rows (all: none is kept)
    _, metrics = kl_shaped_rewards(old.logps[rows], ref.logps[rows], scores[rows], mask[rows], kl_coef=kl_coef,
                                   reward_clip=reward_clip)
    advantages, returns = estimator(rewards, values, mask, action_mask, reduce=reduce)
    metrics["response_length"] = mask[rows].sum(-1).mean()
    metrics["value"] = (values.sum() / mask.sum().clamp(min=1))
    metrics["dropped"] = torch.tensor(float(dropped), device=mask.device)
    return Experience(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                      old_logps=old.logps.float(), ref_logps=ref.logps.float(), values=values, rewards=rewards,
                      advantages=advantages, returns=returns, scores=scores.float(), num_dropped=dropped,
                      metrics=metrics)


def _scored(steps: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) float: the positions :func:`~lit_align.rollout.logps.token_logps` scores for ``steps`` (every
    generated token; a row's first real token is a prompt token, so nothing is removed)."""
    return (steps * attention_mask).float()


def minibatches(
    exp: Experience, size: int, *, shuffle: bool = True, generator: torch.Generator | None = None
) -> Iterator[Experience]:
    """Row minibatches of ``size`` (the last one may be smaller) covering ``exp`` once: one PPO epoch.

    Args:
        exp: the experience.
        size: rows per minibatch (>= 1); ``size >= len(exp)`` gives the whole batch (the released watermark
            code's setting: a single minibatch holding the whole batch).
        shuffle: permute the rows first (with ``generator``, a CPU generator, for reproducibility).
        generator: RNG for the permutation.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1 (rows per minibatch), got {size!r}")
    n = len(exp)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(exp.sequences.device)
    for start in range(0, n, size):
        yield exp.select(order[start : start + size])
