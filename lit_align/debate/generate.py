"""A generate stage of ACC-Collab (Estornell et al. 2024, arXiv 2411.00053, Algorithm 1): on a batch of
questions, natural debates, guided responses of the phase's player toward the gold answer and toward a wrong
one, their one-step-rollout rewards, and the preference pairs of the pair rule. Pure choreography over
:mod:`~lit_align.debate.protocol`, :mod:`~lit_align.debate.rewards` and :mod:`~lit_align.debate.rules`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_align.data.qa import QAExample
from lit_align.debate.config import DebateSettings, GenerateSettings
from lit_align.debate.draws import RowSeeds
from lit_align.debate.pairs import PreferencePair, build_pairs, code_round_ranges, make_candidates
from lit_align.debate.protocol import Agent, DebateTranscript, run_debate
from lit_align.debate.rewards import RewardState, guided_responses, rollout_reward
from lit_align.debate.rules import PairRule
from lit_align.engine.distributed import all_gather_objects

__all__ = ["Stage", "gather_pairs", "phase_questions", "step_questions"]


@dataclass
class Stage:
    """What one generate stage needs: the agents, the tokenizer and the settings."""

    tokenizer: PreTrainedTokenizerBase
    debate: DebateSettings
    generate: GenerateSettings
    rule: PairRule
    actor: Agent
    """The actor of the natural debates and rollouts (the starting one for ``critic_rollout_actor: initial``)."""
    critic: Agent
    player: str
    """The phase's player, whose responses are guided and paired."""
    agent: Agent
    """The phase's player's agent (its guided responses)."""
    timer: Any = None
    """A :class:`~lit_align.engine.PhaseTimer` (``debate``, ``guided``, ``rewards``), or ``None``."""

    def _time(self, name: str):
        return self.timer(name) if self.timer is not None else nullcontext()

    def run(self, examples: Sequence[QAExample], real: int, seeds: RowSeeds) -> tuple[list[PreferencePair], dict]:
        """Pairs of the phase's player on ``examples`` (the first ``real`` of them; the rest are padding rows,
        run so that every rank makes the same forwards, and dropped), and sums over the real questions
        (``natural_correct``, ``candidates``, ``rollouts``). ``seeds``: the phase's draws (per trial)."""
        debate, settings = self.debate, self.generate
        rounds = code_round_ranges(debate.rounds)[self.player] if settings.pair_rounds == "code" else range(debate.rounds)
        pairs: list[PreferencePair] = []
        stats = {"natural_correct": 0.0, "candidates": 0.0, "rollouts": 0.0}
        for trial in range(settings.trials):
            draws = seeds.child(f"trial{trial}")
            with self._time("debate"):
                transcripts = run_debate(self.actor, self.critic, self.tokenizer, examples, debate.rounds,
                                         debate.sampling("actor"), critic_sampling=debate.sampling("critic"),
                                         generator=draws, max_tries=debate.max_tries, chat_template=debate.chat_template)
            stats["natural_correct"] += sum(t.final_correct for t in transcripts[:real])
            for t in rounds:
                with self._time("guided"):
                    guided = {target: guided_responses(
                        self.agent, self.tokenizer, transcripts, t, self.player, target, trial,
                        debate.sampling(self.player), generator=draws, chat_template=debate.chat_template,
                        natural_critic_at_trial0=self.rule.keeps_natural_critic) for target in ("correct", "wrong")}
                with self._time("rewards"):
                    rewards, rollouts = self._rewards(transcripts, t, guided, draws, real)
                stats["rollouts"] += rollouts
                candidates = make_candidates(transcripts, guided["correct"], guided["wrong"], rewards["toward"],
                                             rewards["away"], rewards.get("natural"))[:real]
                stats["candidates"] += len(candidates)
                pairs += build_pairs(candidates, self.rule)
        return pairs, stats

    def _rewards(self, transcripts: list[DebateTranscript], t: int, guided: dict, draws: RowSeeds, real: int
                 ) -> tuple[dict[str, list[float]], float]:
        """Rewards of the toward, away (and natural, for rules that need it) responses at round ``t`` in one
        batched rollout call, and the number of rollouts run for the real questions."""
        if self.player == "actor":
            own = {kind: self.rule.actor_quality().values(guided[target])
                   for kind, target in (("toward", "correct"), ("away", "wrong"))}
            if all(v is not None for v in own.values()):
                return own, 0.0
        kinds = ["toward", "away"] + (["natural"] if self.rule.needs_natural_reward else [])
        states, keys = [], []
        for j, kind in enumerate(kinds):
            for i, tr in enumerate(transcripts):
                turn = tr.turns[t]
                if kind == "natural":
                    response = turn.actor_response if self.player == "actor" else turn.critic_response
                else:
                    response = guided["correct" if kind == "toward" else "wrong"][i].response
                if self.player == "actor":
                    states.append(RewardState(tr.example, t, actor_response=response))
                else:
                    states.append(RewardState(tr.example, t, actor_response=turn.actor_response, critic_response=response))
                keys.append(tr.example.index * len(kinds) + j)  # the state's own rollout seeds
        debate = self.debate
        values = rollout_reward(self.actor, self.critic, self.tokenizer, states, k=self.generate.k,
                                rounds=debate.rounds, sampling=debate.sampling("actor"),
                                critic_sampling=debate.sampling("critic"), generator=draws,
                                max_tries=debate.max_tries, chat_template=debate.chat_template, keys=keys)
        n = len(transcripts)
        out = {kind: values[j * n:(j + 1) * n] for j, kind in enumerate(kinds)}
        real_states = [s for j in range(len(kinds)) for s in states[j * n:j * n + real]]
        rollouts = self.generate.k * sum(s.critic_response is not None or s.round < debate.rounds - 1
                                         for s in real_states)
        return out, float(rollouts)


def phase_questions(examples: Sequence[QAExample], seed: int, settings: GenerateSettings) -> tuple[list[QAExample], int]:
    """The questions every phase generates on, and how many of them are training ones: the first
    ``questions_per_phase`` of a seeded permutation of the training split (the same set for both players and
    every iteration, as the released ``scripts/run_dpo.sh``'s 6000), then the next ``dpo_val_questions``
    (DPO validation, its 1000)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = settings.dpo_val_questions
    n_train = len(order) - n_val if settings.questions_per_phase is None else settings.questions_per_phase
    if n_train < 1 or n_train + n_val > len(order):
        from lit_align.errors import DataError

        raise DataError(f"the training split has {len(order)} questions: too few for model.generate.questions_per_phase "
                        f"({settings.questions_per_phase}) plus model.generate.dpo_val_questions ({n_val}); lower "
                        "them or add questions")
    return [examples[i] for i in order[: n_train + n_val]], n_train


def step_questions(questions: Sequence[QAExample], n_train: int, done: int, size: int) -> tuple[list[QAExample], bool]:
    """The next ``size`` questions after the ``done`` ones (never straddling the training / DPO-validation
    boundary), and whether they are DPO-validation ones."""
    validating = done >= n_train
    return list(questions[done:min(done + size, len(questions) if validating else n_train)]), validating


def gather_pairs(pairs: list[PreferencePair], stats: dict[str, float], chunk: Sequence[QAExample]
                 ) -> tuple[list[PreferencePair], dict[str, float]]:
    """Every rank's pairs of a generate step, in the order one process makes them (trial, round, then the
    question's place in the step's questions), and the stats summed over the ranks: the same on every rank."""
    parts = all_gather_objects((pairs, stats))
    place = {ex.index: i for i, ex in enumerate(chunk)}
    merged = sorted((p for rank_pairs, _ in parts for p in rank_pairs),
                    key=lambda p: (p.trial, p.round, place[p.question_index]))
    return merged, {k: sum(rank_stats[k] for _, rank_stats in parts) for k in stats}
