"""One-step rollout rewards and guided responses (``lit_align.debate.rewards``).

Real tiny HF LMs with the bundled tokenizer; "scripted" models overwrite the logits with a forward
hook so the next answer is known exactly (deterministic) or is "yes" with a known probability p.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from debate_helpers import count_prefills, script, tiny_model

from lit_align.data.qa import QAExample
from lit_align.debate import (
    RewardState,
    guided_responses,
    rollout_reward,
    run_debate,
    target_hint,
    wrong_answer,
)
from lit_align.rollout.sampler import SamplingConfig

YES = QAExample("Is water wet?", "yes", "yes_no", index=0)
NO = QAExample("Is fire cold?", "no", "yes_no", index=1)
MC = QAExample("Pick the even number.", "C", "multiple_choice", options=("1", "3", "4", "5", "7"), index=2)
NUM = QAExample("How many legs has a spider?", "8", "numeric", index=3)

SAMPLING = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0)


def test_deterministic_rollouts_give_exactly_zero_or_one(tokenizer):
    """The scripted actor always says "Answer: yes": the next answer is right iff the truth is yes.

    A final-round actor state is valued by its own text, without sampling."""
    model = tiny_model(tokenizer)
    script(model, tokenizer, ["Answer: yes"], [1.0])
    calls = count_prefills(model)
    states = [
        RewardState(YES, 0, "I think no."),  # actor state: critic replies, actor answers -> yes
        RewardState(NO, 0, "Answer: no"),
        RewardState(YES, 1, "Answer: no", "It is clearly no."),  # critic state: actor answers -> yes
        RewardState(NO, 1, "Answer: no", "Agreed."),
        RewardState(NO, 2, "Answer: no"),  # final round: own correctness
        RewardState(YES, 2, "Answer: no"),
    ]
    values = rollout_reward(model, model, tokenizer, states, k=4, rounds=3, sampling=SAMPLING,
                            generator=torch.Generator().manual_seed(0))
    assert values == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert calls[0] == 2  # one critic call (2 states x 4) + one actor call (4 states x 4)


def test_estimate_has_mean_p_and_binomial_variance(tokenizer):
    """Next answer " yes" w.p. p, " no" w.p. 1-p: each state's estimate is Binomial(K, p) / K.

    Over S states the mean of the estimates has std sqrt(p(1-p)/(S K)); we allow 4 of them. The
    sample variance of the estimates should be near p(1-p)/K (ratio within [0.4, 1.8] for S=60)."""
    p, k, n_states = 0.3, 8, 60
    model = tiny_model(tokenizer, 1)
    script(model, tokenizer, [" yes", " no"], [p, 1 - p])
    calls = count_prefills(model)
    states = [RewardState(YES, 0, "Answer: no", "Think again.") for _ in range(n_states)]
    values = torch.tensor(rollout_reward(model, model, tokenizer, states, k=k, rounds=2, sampling=SAMPLING,
                                         generator=torch.Generator().manual_seed(0)))
    assert calls[0] == 1  # all 480 rollouts in one sampler call
    assert all(float(v) * k == round(float(v) * k) for v in values)  # multiples of 1/K
    tol = 4 * math.sqrt(p * (1 - p) / (n_states * k))
    assert abs(values.mean().item() - p) < tol
    ratio = values.var().item() / (p * (1 - p) / k)
    assert 0.4 < ratio < 1.8


def test_rollout_reward_validates_inputs(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match="k"):
        rollout_reward(model, model, tokenizer, [RewardState(YES, 0, "x")], k=0, rounds=2, sampling=SAMPLING)
    with pytest.raises(ValueError, match="round 5"):
        rollout_reward(model, model, tokenizer, [RewardState(YES, 5, "x")], k=1, rounds=2, sampling=SAMPLING)


def test_wrong_answer_is_wrong_and_uniform_over_wrong_options():
    rng = random.Random(0)
    assert wrong_answer(YES, rng) == "no" and wrong_answer(NO, rng) == "yes"
    draws = [wrong_answer(MC, rng) for _ in range(400)]
    assert set(draws) == {"A", "B", "D", "E"}  # every wrong option, never the truth "C"
    assert all(60 < draws.count(c) < 140 for c in "ABDE")  # ~100 each
    nums = {wrong_answer(NUM, rng) for _ in range(50)}
    assert "8" not in nums and all(abs(int(n) - 8) <= 3 for n in nums)


def test_guided_responses_use_the_natural_context_and_redraw_targets(tokenizer):
    actor, critic = tiny_model(tokenizer, 2), tiny_model(tokenizer, 3)
    examples = [MC] * 6 + [YES]
    gen = torch.Generator().manual_seed(0)
    natural = run_debate(actor, critic, tokenizer, examples, 2, SAMPLING, generator=gen, max_tries=0)

    calls = count_prefills(actor)
    away = guided_responses(actor, tokenizer, natural, 1, "actor", "wrong", 0, SAMPLING, generator=gen,
                            rng=random.Random(1))
    assert calls[0] == 1 and len(away) == len(examples)
    assert len({g.target for g in away[:6]}) > 1  # re-drawn per sample
    for g, tr in zip(away, natural):
        assert g.target != tr.example.answer and not g.toward_truth
        assert g.natural_prompt == tr.turns[1].actor_prompt  # byte-identical natural prompt
        assert target_hint(tr.example, g.target) in g.guided_prompt
        assert target_hint(tr.example, g.target) not in g.natural_prompt
        assert tr.turns[0].actor_response in g.guided_prompt and tr.turns[0].critic_response in g.guided_prompt

    toward0 = guided_responses(actor, tokenizer, natural, 0, "actor", "correct", 0, SAMPLING, generator=gen)
    assert all(g.target == tr.example.answer and "Person 0" not in g.guided_prompt
               for g, tr in zip(toward0, natural))

    crit0 = guided_responses(critic, tokenizer, natural, 1, "critic", "correct", 0, SAMPLING, generator=gen)
    assert all(g.natural_copy and g.response == tr.turns[1].critic_response for g, tr in zip(crit0, natural))
    crit3 = guided_responses(critic, tokenizer, natural, 1, "critic", "wrong", 3, SAMPLING, generator=gen)
    for g, tr in zip(crit3, natural):
        assert not g.natural_copy and g.natural_prompt == tr.turns[1].critic_prompt
        assert tr.turns[1].actor_response in g.guided_prompt and "debate assistant" in g.guided_prompt
