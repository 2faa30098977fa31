"""ACC-Collab partial-trajectory rewards (one-step rollouts) and guided (off-policy) responses.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab: An Actor-Critic Approach to Multi-Agent LLM Collaboration"
(arXiv 2411.00053): the partial-trajectory reward and its one-step roll-out estimate (the paper's Sec. 4.2),
and guided trajectories as prompted in the released code (github.com/LlenRotse/ACC-Collab, ``questions.py``:
``targeted_basic_prompt``, ``targeted_debate_prompt``, ``targeted_detail_prompt``).

The value of a state (question, transcript up to an intermediate response) is the probability that
the actor's **next** answer is correct, estimated with K one-step rollouts:

* an actor response at round t < T: the critic replies, then the actor answers round t+1;
* an actor response at the final round T: its own correctness (nothing follows it);
* a critic response at round t (any t, the last included): the actor answers round t+1.

All K copies of all states go through one sampler call per role (plus the batched retries of
unparseable answers, as in the protocol).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from lit_align.data.qa import LETTERS, QAExample
from lit_align.debate.draws import RowSeeds
from lit_align.debate.protocol import (
    Agent,
    DebateTranscript,
    Draw,
    actor_debate_prompt,
    critic_detail_prompt,
    extract_answer,
    generate,
    is_correct,
    sample_answers,
    targeted_actor_prompt,
    targeted_critic_prompt,
)
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["GuidedResponse", "RewardState", "guided_responses", "rollout_reward", "wrong_answer"]


@dataclass(frozen=True)
class RewardState:
    """A partial trajectory whose last element is ``critic_response`` if given, else ``actor_response``.

    Only the round-t responses matter: the actor at round t+1 sees round t alone (as in the
    released ``debaters.py``).
    """

    example: QAExample
    round: int
    actor_response: str
    critic_response: str | None = None


def rollout_reward(
    actor: Agent,
    critic: Agent,
    tokenizer: PreTrainedTokenizerBase,
    states: Sequence[RewardState],
    *,
    k: int,
    rounds: int,
    sampling: SamplingConfig,
    critic_sampling: SamplingConfig | None = None,
    generator: Draw = None,
    max_tries: int = 2,
    chat_template: bool | None = None,
    keys: Sequence[int] | None = None,
) -> list[float]:
    """One-step rollout estimate of each state's value, in [0, 1] (multiples of 1/k).

    Args:
        actor: The actor that answers the next round (paper: the updated actor; a config choice).
        critic: The critic that replies to actor-response states.
        tokenizer: Tokenizer with a pad token.
        states: The states to value.
        k: Rollouts per state (>= 1; the released critic data uses 10).
        rounds: Number of rounds T + 1 of the protocol: an actor response at round ``rounds - 1``
            is valued by its own correctness, without rollouts.
        sampling: Actor sampling settings; ``critic_sampling`` (default the same) for the critic.
        generator: RNG for reproducible sampling, or :class:`~lit_align.debate.draws.RowSeeds`: rollout ``c``
            of state ``i`` then draws from the key ``keys[i] * k + c`` (independent of the other states).
        max_tries: Re-samples of an unparseable next answer, as in :func:`run_debate`; then it counts wrong.
        chat_template: As in :func:`~lit_align.debate.protocol.format_prompt`.
        keys: A distinct int per state (default: its position), for per-row seeds.

    Returns:
        One value per state: the mean correctness of the K next-round actor answers.
    """
    if k < 1:
        raise ValueError(f"k (rollouts per state) must be >= 1, got {k}")
    keys = list(range(len(states))) if keys is None else list(keys)
    values: list[float | None] = [None] * len(states)
    # Final-round actor responses: their own correctness.
    for i, s in enumerate(states):
        if s.round < 0 or s.round >= rounds:
            raise ValueError(f"state {i}: round {s.round} outside 0..{rounds - 1}")
        if s.critic_response is None and s.round == rounds - 1:
            values[i] = float(is_correct(extract_answer(s.actor_response, s.example), s.example))

    # Actor-response states: K critic replies (one call), then they join the critic-response states.
    need_critic = [i for i, s in enumerate(states) if values[i] is None and s.critic_response is None]
    critic_prompts = [critic_detail_prompt(states[i].example, states[i].actor_response)
                      for i in need_critic for _ in range(k)]
    replies = generate(critic, tokenizer, critic_prompts, critic_sampling or sampling, generator=generator,
                       chat_template=chat_template, keys=[keys[i] * k + c for i in need_critic for c in range(k)],
                       call="rollout/critic")
    owners: list[int] = []  # state index of each next-answer rollout
    prompts: list[str] = []
    row_keys: list[int] = []
    for j, i in enumerate(need_critic):
        for c, r in enumerate(replies[j * k : (j + 1) * k]):
            owners.append(i)
            prompts.append(actor_debate_prompt(states[i].example, states[i].actor_response, r))
            row_keys.append(keys[i] * k + c)
    for i, s in enumerate(states):
        if values[i] is None and s.critic_response is not None:
            owners += [i] * k
            prompts += [actor_debate_prompt(s.example, s.actor_response, s.critic_response)] * k
            row_keys += [keys[i] * k + c for c in range(k)]

    # Next-round actor answers of every rollout: one call (plus batched retries).
    examples = [states[i].example for i in owners]
    answers = sample_answers(actor, tokenizer, prompts, examples, sampling, max_tries=max_tries,
                             generator=generator, chat_template=chat_template, keys=row_keys, call="rollout/actor")
    hits = [0] * len(states)
    for i, ex, (_, ans, _) in zip(owners, examples, answers):
        hits[i] += is_correct(ans, ex)
    return [v if v is not None else hits[i] / k for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------ guided responses


def wrong_answer(example: QAExample, rng: random.Random) -> str:
    """A wrong target ``!y``: the opposite for yes/no; a uniformly random wrong letter for multiple
    choice; for numeric answers ``y + d`` with ``d`` a uniformly random non-zero integer in
    ``[-m, m]``, ``m = max(3, round(0.1 * |y|))`` (so the lure stays plausible in scale)."""
    if example.kind == "yes_no":
        truth = example.answer.strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"yes/no question {example.index}: answer must be 'yes' or 'no', got {example.answer!r}")
        return "no" if truth == "yes" else "yes"
    if example.kind == "multiple_choice":
        wrong = [c for c in LETTERS[: len(example.options)] if c != example.answer.strip().upper()]
        if not wrong:
            raise ValueError(f"multiple-choice question {example.index} has no wrong option")
        return rng.choice(wrong)
    y = float(example.answer.replace(",", ""))
    m = max(3, round(0.1 * abs(y)))
    d = rng.choice([d for d in range(-m, m + 1) if d != 0])
    value = y + d
    return str(int(value)) if value == int(value) else repr(value)


@dataclass(frozen=True)
class GuidedResponse:
    """A response sampled toward a target answer from the natural context of one (question, round, trial)."""

    question_index: int
    """``example.index`` of the question."""
    round: int
    player: Literal["actor", "critic"]
    trial: int
    target: str
    """The answer the prompt steered toward (normalised: yes/no, letter, number)."""
    toward_truth: bool
    natural_prompt: str
    """The natural prompt of that round and player: the only prompt a DPO pair may use."""
    guided_prompt: str
    """The prompt that produced ``response`` (contains the hint; never stored for DPO)."""
    response: str
    answer: str | None
    """Actor: the extracted answer of ``response``; critic: None."""
    correct: bool
    """Actor: ``is_correct(answer)``; critic: False."""
    natural_copy: bool = False
    """Critic trial 0: the natural response kept as is (released-code behaviour)."""


def guided_responses(
    agent: Agent,
    tokenizer: PreTrainedTokenizerBase,
    transcripts: Sequence[DebateTranscript],
    round: int,
    player: Literal["actor", "critic"],
    target: Literal["correct", "wrong"],
    trial: int,
    sampling: SamplingConfig,
    *,
    generator: Draw = None,
    rng: random.Random | None = None,
    chat_template: bool | None = None,
    natural_critic_at_trial0: bool = True,
) -> list[GuidedResponse]:
    """Sample one guided response per transcript at ``round``, in one sampler call.

    The context is the natural one of that round: the actor sees round-1's natural (actor, critic)
    responses (none at round 0), the critic sees the round's natural actor response. Only the
    instruction differs (:func:`targeted_actor_prompt` / :func:`targeted_critic_prompt`, the latter's
    style chosen by ``trial``).

    Args:
        agent: The agent being steered (the actor or the critic).
        tokenizer: Tokenizer with a pad token.
        transcripts: Natural transcripts of trial ``trial`` (one per question).
        round: The round t to replace.
        player: ``"actor"`` or ``"critic"``.
        target: ``"correct"`` (toward y) or ``"wrong"`` (toward a wrong answer, re-drawn for every
            response by :func:`wrong_answer`).
        trial: Trial index (stored on the result; picks the critic style).
        sampling: Sampling settings.
        generator: RNG of the sampler, or :class:`~lit_align.debate.draws.RowSeeds` (each question's draws, its
            wrong target included, from its ``example.index``).
        rng: RNG of the wrong-target draws (default ``random.Random(0)``; ignored with ``RowSeeds``).
        chat_template: As in :func:`~lit_align.debate.protocol.format_prompt`.
        natural_critic_at_trial0: Critic at trial 0: keep the natural response instead of sampling
            (released code); such pairs have identical texts and are filtered by the pair builders.
    """
    if player not in ("actor", "critic"):
        raise ValueError(f"player must be 'actor' or 'critic', got {player!r}")
    if target not in ("correct", "wrong"):
        raise ValueError(f"target must be 'correct' or 'wrong', got {target!r}")
    rng = rng or random.Random(0)
    call = f"guided/{player}/round{round}/{target}"
    rows = []
    for tr in transcripts:
        if not 0 <= round < len(tr.turns):
            raise ValueError(f"question {tr.example.index}: round {round} outside its {len(tr.turns)} rounds")
        ex = tr.example
        row_rng = generator.rng(f"{call}/wrong", ex.index) if isinstance(generator, RowSeeds) else rng
        goal = ex.answer.strip() if target == "correct" else wrong_answer(ex, row_rng)
        if ex.kind == "multiple_choice":
            goal = goal.upper()
        turn = tr.turns[round]
        if player == "actor":
            prev = (tr.turns[round - 1].actor_response, tr.turns[round - 1].critic_response) if round > 0 else None
            rows.append((tr, goal, turn.actor_prompt, targeted_actor_prompt(ex, goal, prev)))
        else:
            rows.append((tr, goal, turn.critic_prompt, targeted_critic_prompt(ex, turn.actor_response, goal, trial)))
    keep_natural = player == "critic" and trial == 0 and natural_critic_at_trial0
    if keep_natural:
        responses = [tr.turns[round].critic_response for tr, *_ in rows]
    else:
        responses = generate(agent, tokenizer, [g for *_, g in rows], sampling, generator=generator,
                             chat_template=chat_template, keys=[tr.example.index for tr, *_ in rows], call=call)
    out = []
    for (tr, goal, natural, guided), resp in zip(rows, responses):
        ans = extract_answer(resp, tr.example) if player == "actor" else None
        out.append(GuidedResponse(
            question_index=tr.example.index, round=round, player=player, trial=trial, target=goal,
            toward_truth=target == "correct", natural_prompt=natural, guided_prompt=guided, response=resp,
            answer=ans, correct=player == "actor" and is_correct(ans, tr.example), natural_copy=keep_natural,
        ))
    return out
