"""ACC-Collab preference pairs: the paper's Δ-vs-natural rule and the released code's guided-vs-guided rule.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab: An Actor-Critic Approach to Multi-Agent LLM Collaboration"
(arXiv 2411.00053): the pair rule of its Eq. 5 / Algorithm 1, and the released code's rule
(github.com/LlenRotse/ACC-Collab: ``data.py`` ``build_preference_dataset``, ``DPO.py``). As in the released
code (``gen_answerer_traget_data`` in ``debate_eval.py``), a pair's DPO prompt is the natural prompt, never the
guided one.

* Paper rule (:func:`paper_rule`), with rewards r of the natural response z and of the guided
  responses z_y (toward the truth) and z_!y (away from it):
  ``Δy = r(z_y) - r(z) >= ε`` -> (z_y ≻ z); **else if** ``Δ!y = r(z) - r(z_!y) >= ε`` -> (z ≻ z_!y);
  else no pair. The ordered if/else-if (priority to the positive branch) follows a third-party
  reimplementation of Algorithm 1; the paper's exact branching is unverified.
* Code rule (:func:`code_rule`): (z_y ≻ z_!y) iff ``q(z_y) - q(z_!y) >= threshold`` (0.6 in the
  released ``DPO.py``); actor quality is the guided response's own correctness or a rollout value,
  critic quality a rollout value (the caller computes either). Released round ranges:
  :func:`code_round_ranges`.

Every pair's prompt passes :func:`check_prompt_hygiene` (the builder raises otherwise), and pairs
with identical chosen and rejected texts are dropped (they carry no DPO gradient).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lit_align.debate.protocol import HINT_PREFIX, DebateTranscript
from lit_align.debate.rewards import GuidedResponse

if TYPE_CHECKING:
    from lit_align.debate.rules import PairRule

__all__ = [
    "PairCandidate",
    "PreferencePair",
    "build_pairs",
    "check_prompt_hygiene",
    "code_round_ranges",
    "code_rule",
    "make_candidates",
    "paper_rule",
]

_TOL = 1e-9  # reward differences are means of K samples: 0.7 - 0.1 must pass a 0.6 threshold


@dataclass(frozen=True)
class PreferencePair:
    """One DPO pair of one player at one (question, round, trial)."""

    prompt: str
    """The natural prompt text of that round (never the guided one, never containing a hint)."""
    chosen: str
    rejected: str
    player: Literal["actor", "critic"]
    round: int
    question_index: int
    trial: int
    reward_chosen: float
    reward_rejected: float


@dataclass(frozen=True)
class PairCandidate:
    """Natural and guided responses of one (player, question, round, trial), with their rewards."""

    player: Literal["actor", "critic"]
    round: int
    question_index: int
    trial: int
    prompt: str
    """The natural prompt."""
    natural: str
    toward: str
    """Response guided toward the truth (z_y)."""
    away: str
    """Response guided toward a wrong answer (z_!y)."""
    reward_natural: float | None
    """r(z); only the paper rule needs it."""
    reward_toward: float
    reward_away: float
    guided_prompts: tuple[str, ...] = ()
    """The prompts that produced ``toward``/``away`` (for the hygiene check)."""


def paper_rule(r_natural: float, r_toward: float, r_away: float, epsilon: float) -> Literal["toward", "away"] | None:
    """``"toward"``: (z_y ≻ z) since Δy >= ε; else ``"away"``: (z ≻ z_!y) since Δ!y >= ε; else None."""
    if r_toward - r_natural >= epsilon - _TOL:
        return "toward"
    if r_natural - r_away >= epsilon - _TOL:
        return "away"
    return None


def code_rule(q_toward: float, q_away: float, threshold: float = 0.6) -> bool:
    """Released-code rule: keep (z_y ≻ z_!y) iff ``q(z_y) - q(z_!y) >= threshold`` (boundary included)."""
    return q_toward - q_away >= threshold - _TOL


def code_round_ranges(rounds: int) -> dict[str, range]:
    """Rounds the released code builds pairs from: actor 1..R-1 (round 0 excluded), critic 0..R-1."""
    return {"actor": range(1, rounds), "critic": range(0, rounds)}


def check_prompt_hygiene(prompt: str, *, natural_prompt: str | None = None, guided_prompts: Sequence[str] = (),
                         hints: Sequence[str] = (), where: str = "pair") -> None:
    """Raise ``ValueError`` if a DPO prompt could leak the guided target (it must be
    the natural prompt, the one the agent sees at test time).

    Checks: the prompt is byte-identical to ``natural_prompt`` (when given), differs from every
    guided prompt, and contains neither :data:`HINT_PREFIX` nor any of ``hints`` (the exact target
    hint sentences). A bare target letter is not checked: the natural prompt lists every option.
    """
    if natural_prompt is not None and prompt != natural_prompt:
        raise ValueError(f"{where}: the DPO prompt is not the natural prompt of its round; build pairs from "
                         "the natural prompt only (the guided prompt contains the answer)")
    for text in (HINT_PREFIX, *hints):
        if text and text in prompt:
            raise ValueError(f"{where}: the DPO prompt contains the guided hint {text!r}; use the natural prompt")
    if any(prompt == g for g in guided_prompts):
        raise ValueError(f"{where}: the DPO prompt is a guided prompt; use the natural prompt")


def make_candidates(
    transcripts: Sequence[DebateTranscript],
    toward: Sequence[GuidedResponse],
    away: Sequence[GuidedResponse],
    reward_toward: Sequence[float],
    reward_away: Sequence[float],
    reward_natural: Sequence[float] | None = None,
) -> list[PairCandidate]:
    """Zip natural transcripts with aligned guided responses (same order, same round/player/trial)."""
    n = len(transcripts)
    lengths = {len(toward), len(away), len(reward_toward), len(reward_away)}
    if reward_natural is not None:
        lengths.add(len(reward_natural))
    if lengths != {n}:
        raise ValueError(f"make_candidates: {n} transcripts but guided/reward lists of lengths {sorted(lengths)}")
    out = []
    for i, (tr, ty, tn) in enumerate(zip(transcripts, toward, away)):
        if (ty.player, ty.round, ty.trial, ty.question_index) != (tn.player, tn.round, tn.trial, tn.question_index):
            raise ValueError(f"make_candidates: row {i} pairs guided responses of different player/round/trial/question")
        if ty.question_index != tr.example.index:
            raise ValueError(f"make_candidates: row {i} guided question {ty.question_index} != transcript "
                             f"question {tr.example.index}")
        turn = tr.turns[ty.round]
        natural_prompt, natural = ((turn.actor_prompt, turn.actor_response) if ty.player == "actor"
                                   else (turn.critic_prompt, turn.critic_response))
        out.append(PairCandidate(
            player=ty.player, round=ty.round, question_index=ty.question_index, trial=ty.trial,
            prompt=natural_prompt, natural=natural, toward=ty.response, away=tn.response,
            reward_natural=None if reward_natural is None else float(reward_natural[i]),
            reward_toward=float(reward_toward[i]), reward_away=float(reward_away[i]),
            guided_prompts=(ty.guided_prompt, tn.guided_prompt),
        ))
    return out


def build_pairs(
    candidates: Sequence[PairCandidate],
    rule: PairRule,
    *,
    rounds: Collection[int] | None = None,
) -> list[PreferencePair]:
    """Preference pairs from candidates under one rule.

    Args:
        candidates: See :func:`make_candidates`.
        rule: a :class:`~lit_align.debate.rules.PairRule` (:class:`~lit_align.debate.rules.PaperRule`: Δ vs
            natural, needs ``reward_natural``; :class:`~lit_align.debate.rules.CodeRule`: guided vs guided).
        rounds: Keep only candidates from these rounds (e.g. ``code_round_ranges(R)[player]``); None = all.

    Raises:
        ValueError: On a missing natural reward for the paper rule, or a prompt failing
            :func:`check_prompt_hygiene`.
    """
    pairs = []
    for c in candidates:
        if rounds is not None and c.round not in rounds:
            continue
        where = f"{c.player} pair (question {c.question_index}, round {c.round}, trial {c.trial})"
        check_prompt_hygiene(c.prompt, guided_prompts=c.guided_prompts, where=where)
        choice = rule.choose(c)
        if choice is None:
            continue
        chosen, rejected, rc, rr = choice
        if chosen == rejected:
            continue  # identical texts (e.g. critic trial 0 keeps the natural response): no DPO signal
        pairs.append(PreferencePair(prompt=c.prompt, chosen=chosen, rejected=rejected, player=c.player,
                                    round=c.round, question_index=c.question_index, trial=c.trial,
                                    reward_chosen=rc, reward_rejected=rr))
    return pairs
