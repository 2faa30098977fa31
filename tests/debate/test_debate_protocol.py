"""ACC-Collab protocol (``lit_align.debate.protocol``): answer extraction, prompts, batched ``run_debate``.

Models are real tiny HF LMs built locally with the bundled tokenizer; "scripted" models are the same
LMs with a forward hook that overwrites the logits so that every sample follows given texts.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from debate_helpers import count_prefills, script, tiny_model

from lit_align.data.qa import QAExample
from lit_align.debate import (
    accuracy_by_round,
    actor_basic_prompt,
    actor_debate_prompt,
    answer_changes,
    critic_detail_prompt,
    extract_answer,
    format_prompt,
    is_correct,
    run_debate,
    target_hint,
    targeted_actor_prompt,
    targeted_critic_prompt,
)
from lit_align.debate.protocol import DebateTranscript, Turn
from lit_align.rollout.sampler import SamplingConfig

YN = QAExample("Is the sky blue on a clear day?", "yes", "yes_no", context="The sky looks blue.", index=0)
YN_NO = QAExample("Is snow hot?", "no", "yes_no", index=1)
MC = QAExample("Which city is the capital of France?", "B", "multiple_choice",
               options=("Berlin", "Paris", "Rome", "Madrid"), index=2)
NUM = QAExample("What is 2 + 2?", "4", "numeric", index=3)

# ------------------------------------------------------------------------------------------ extraction

CASES = [
    # yes / no
    ("", YN, None),
    ("I cannot tell from this.", YN, None),
    ("Yes, it is.", YN, "yes"),
    ("YES", YN, "yes"),
    ("the answer is no", YN, "no"),
    ("Could be yes, could be no.", YN, None),  # two answers, no marker: ambiguous
    ("No at first... Answer: yes", YN, "yes"),  # the marker beats the free text
    ("Answer: no. On reflection, Answer: Yes", YN, "yes"),  # the LAST marker wins
    ("answer: NO", YN, "no"),
    ("The answer is: no", YN, "no"),
    ("Answer: unsure\nYes overall.", YN, "yes"),  # an empty marker line falls back to the text
    # multiple choice: letters in several formats, option text, range
    ("(B)", MC, "B"),
    ("B) Paris", MC, "B"),
    ("I pick B.", MC, "B"),
    ("Answer: b", MC, "B"),
    ("Answer: (c)", MC, "C"),
    ("Answer: I think D", MC, "D"),
    ("It is Paris.", MC, "B"),  # option text -> letter
    ("Answer: paris", MC, "B"),  # case-insensitive option text
    ("Paris or Rome, hard to say.", MC, None),
    ("A) Berlin is wrong; Answer: C", MC, "C"),
    ("A cat sat on the mat.", MC, None),  # the article "A" is not a letter
    ("E) is my pick", MC, None),  # out of the 4 options
    ("(B) Paris", MC, "B"),  # letter and its own option text agree
    # numeric
    ("4", NUM, "4"),
    ("The total is 1,200.", NUM, "1200"),
    ("Answer: 3.50", NUM, "3.5"),
    ("Answer: -7", NUM, "-7"),
    ("It costs $12", NUM, "12"),
    ("2 + 2 = 4", NUM, None),  # three numbers, two distinct values, no marker
    ("2 + 2 = 4. Answer: 4", NUM, "4"),
    ("Answer: 4.0", NUM, "4"),
    ("no number here", NUM, None),
]


@pytest.mark.parametrize(("text", "example", "expected"), CASES)
def test_extract_answer_table(text, example, expected):
    assert extract_answer(text, example) == expected


def test_is_correct_none_is_wrong_and_numeric_by_value():
    assert not is_correct(None, YN)
    assert is_correct("yes", YN) and not is_correct("no", YN)
    assert is_correct("b", MC) and not is_correct("A", MC)
    assert is_correct("4.0", NUM) and not is_correct("5", NUM)


# ------------------------------------------------------------------------------------------ prompts


def test_prompts_contain_what_each_role_may_see():
    basic = actor_basic_prompt(MC)
    assert "capital of France" in basic and "B) Paris" in basic and "Answer:" in basic
    assert "The sky looks blue." in actor_basic_prompt(YN)  # context
    debate = actor_debate_prompt(MC, "ACTOR-PREV", "CRITIC-PREV")
    assert debate.index("Person 0 said: ACTOR-PREV") < debate.index("Person 1 said: CRITIC-PREV") < debate.index(
        "capital of France")
    critic = critic_detail_prompt(MC, "ACTOR-NOW")
    assert "ACTOR-NOW" in critic and "capital of France" in critic
    hint = target_hint(MC, "C")
    assert hint in targeted_actor_prompt(MC, "C") and hint in targeted_actor_prompt(MC, "C", ("a", "c"))
    assert "Person 0 said: a" in targeted_actor_prompt(MC, "C", ("a", "c"))
    assert all(hint not in p for p in (basic, debate, critic))
    styled = {targeted_critic_prompt(MC, "x", "C", trial) for trial in range(11)}
    assert len(styled) == 11 and all(hint in p and "debate assistant" in p for p in styled)


def test_format_prompt_uses_the_chat_template_when_available(tokenizer):
    ids = format_prompt(tokenizer, "hello", None)
    assert tokenizer.decode(ids).startswith("<|user|>")
    assert format_prompt(tokenizer, "hello", True) == ids
    assert "<|user|>" not in tokenizer.decode(format_prompt(tokenizer, "hello", False))


# ------------------------------------------------------------------------------------------ transcripts


def _turn(r: int, correct: bool) -> Turn:
    return Turn(r, "p", "r", "yes" if correct else "no", correct, "cp", "cr")


def test_accuracy_and_changes():
    a = DebateTranscript(YN, [_turn(0, True), _turn(1, False), _turn(2, True)])
    b = DebateTranscript(YN, [_turn(0, False), _turn(1, False), _turn(2, True)])
    assert accuracy_by_round([a, b]) == [0.5, 0.0, 1.0]
    assert a.changes() == (1, 1) and b.changes() == (0, 1)
    ch = answer_changes([a, b])
    assert (ch.right_to_wrong, ch.wrong_to_right) == (1, 2)


# ------------------------------------------------------------------------------------------ run_debate

SAMPLING = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0)


def test_run_debate_one_call_per_role_per_round_and_round_context(tokenizer):
    actor, critic = tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    n_actor, n_critic = count_prefills(actor), count_prefills(critic)
    examples = [YN, MC, NUM]
    out = run_debate(actor, critic, tokenizer, examples, 3, SAMPLING, generator=torch.Generator().manual_seed(0),
                     max_tries=0)
    assert (n_actor[0], n_critic[0]) == (3, 3)  # 3 rounds: one batched call per role per round
    assert len(out) == 3 and all(len(tr.turns) == 3 for tr in out)
    for tr, ex in zip(out, examples):
        assert tr.example is ex
        assert [t.round for t in tr.turns] == [0, 1, 2]
        assert tr.turns[0].actor_prompt == actor_basic_prompt(ex)
        for t in range(3):
            turn = tr.turns[t]
            assert turn.critic_prompt == critic_detail_prompt(ex, turn.actor_response)
            assert turn.correct == is_correct(turn.answer, ex)
            if t >= 1:
                prev = tr.turns[t - 1]
                assert turn.actor_prompt == actor_debate_prompt(ex, prev.actor_response, prev.critic_response)
        # round 2 sees round 1 only: round 0's responses are absent
        for old in (tr.turns[0].actor_response, tr.turns[0].critic_response):
            if old and old not in (tr.turns[1].actor_response, tr.turns[1].critic_response):
                assert old not in tr.turns[2].actor_prompt


def test_retries_are_batched_and_failures_count_wrong(tokenizer):
    actor = tiny_model(tokenizer, 2)  # random weights: essentially never an answer
    calls = count_prefills(actor)
    out = run_debate(actor, actor, tokenizer, [YN, MC, NUM], 2, SAMPLING,
                     generator=torch.Generator().manual_seed(1), max_tries=2)
    turns = [t for tr in out for t in tr.turns]
    failed = [t for t in turns if t.answer is None]
    assert failed and all(not t.correct and t.tries == 3 for t in failed)
    # per round: 1 actor call + at most 2 retry calls + 1 critic call (same module)
    assert calls[0] <= 2 * 4
    assert accuracy_by_round(out)[0] <= 1.0


def test_scripted_actor_and_adapter_context_factory(tokenizer):
    model = tiny_model(tokenizer, 3)
    handle = script(model, tokenizer, ["Answer: yes"], [1.0])
    calls = count_prefills(model)
    entered = []

    @contextlib.contextmanager
    def as_critic():  # stands for "switch to the critic's LoRA adapter, then back"
        entered.append(1)
        yield model

    out = run_debate(model, as_critic, tokenizer, [YN, YN_NO], 2, SAMPLING, max_tries=2)
    handle.remove()
    assert calls[0] == 4 and len(entered) == 2  # no retries: every answer parses
    assert [[t.answer for t in tr.turns] for tr in out] == [["yes", "yes"], ["yes", "yes"]]
    assert [tr.final_correct for tr in out] == [True, False]
    assert accuracy_by_round(out) == [0.5, 0.5]
    assert all(t.tries == 1 for tr in out for t in tr.turns)


def test_row_seeds_make_a_question_sample_the_same_in_any_batch(tokenizer):
    """With RowSeeds every row draws from its question's own generator: a question's debate (retries included)
    and its guided responses and rollouts are the same alone, in a batch, or beside a padding copy; another
    purpose draws differently. This is what makes N ranks equal one process."""
    from lit_align.debate import guided_responses, rollout_reward
    from lit_align.debate.draws import RowSeeds
    from lit_align.debate.rewards import RewardState

    actor, critic = tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    seeds = RowSeeds(seed=3, step=1, purpose="generate/trial0")

    def texts(transcripts):
        return [[(t.actor_response, t.critic_response, t.tries) for t in tr.turns] for tr in transcripts]

    together = run_debate(actor, critic, tokenizer, [YN, MC, NUM], 2, SAMPLING, generator=seeds, max_tries=1)
    alone = run_debate(actor, critic, tokenizer, [MC], 2, SAMPLING, generator=seeds, max_tries=1)
    padded = run_debate(actor, critic, tokenizer, [NUM, YN, YN], 2, SAMPLING, generator=seeds, max_tries=1)
    assert texts(alone) == texts(together)[1:2]
    assert texts(padded)[:2] == [texts(together)[2], texts(together)[0]]
    other = run_debate(actor, critic, tokenizer, [MC], 2, SAMPLING, generator=seeds.child("x"), max_tries=1)
    assert texts(other) != texts(alone)

    guided = [g.response for g in guided_responses(actor, tokenizer, together, 1, "actor", "wrong", 0, SAMPLING,
                                                   generator=seeds)]
    assert [g.response for g in guided_responses(actor, tokenizer, alone, 1, "actor", "wrong", 0, SAMPLING,
                                                 generator=seeds)] == guided[1:2]
    states = [RewardState(tr.example, 0, tr.turns[0].actor_response) for tr in together]
    values = rollout_reward(actor, critic, tokenizer, states, k=3, rounds=2, sampling=SAMPLING, generator=seeds,
                            keys=[7, 8, 9])
    assert rollout_reward(actor, critic, tokenizer, states[2:], k=3, rounds=2, sampling=SAMPLING, generator=seeds,
                          keys=[9]) == values[2:]
