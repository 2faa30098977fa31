"""ACC-Collab pair rules and prompt hygiene (``lit_align.debate.pairs``), spec core.md §1.13 items 2 and 4."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from lit_align.data.qa import QAExample
from lit_align.debate import (
    HINT_PREFIX,
    PairCandidate,
    build_pairs,
    check_prompt_hygiene,
    code_round_ranges,
    code_rule,
    guided_responses,
    make_candidates,
    paper_rule,
    run_debate,
    target_hint,
)
from lit_align.debate.rewards import GuidedResponse
from lit_align.debate.rules import CodeRule, CorrectnessQuality, PairRule, PaperRule, RolloutQuality, strategy
from lit_align.errors import ConfigError
from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer
from lit_align.models.spec import TinyArch
from lit_align.rollout.sampler import SamplingConfig


@pytest.mark.parametrize(
    ("r_natural", "r_toward", "r_away", "expected"),
    [
        (0.2, 0.9, 0.1, "toward"),  # Δy = 0.7 >= 0.5: (z_y ≻ z)
        (0.8, 0.9, 0.1, "away"),  # Δy = 0.1, Δ!y = 0.7: (z ≻ z_!y)
        (0.5, 0.6, 0.4, None),  # Δy = Δ!y = 0.1: no pair
        (0.1, 0.6, 0.0, "toward"),  # both branches qualify: the positive one has priority
        (0.5, 1.0, 0.5, "toward"),  # Δy = 0.5 exactly: boundary included
    ],
)
def test_paper_rule_table(r_natural, r_toward, r_away, expected):
    assert paper_rule(r_natural, r_toward, r_away, epsilon=0.5) == expected


@pytest.mark.parametrize(
    ("q_toward", "q_away", "threshold", "kept"),
    [
        (1.0, 0.0, 0.6, True),
        (0.7, 0.1, 0.6, True),  # 0.6 up to float error: boundary included
        (0.6, 0.0, 0.6, True),
        (0.6, 0.1, 0.6, False),
        (0.0, 1.0, 0.6, False),
        (0.6, 0.1, 0.5, True),  # the threshold is honoured
        (1.0, 0.1, 0.95, False),
    ],
)
def test_code_rule_table(q_toward, q_away, threshold, kept):
    assert code_rule(q_toward, q_away, threshold) is kept


def _cand(rn, ry, rx, *, player="actor", rnd=1, natural="nat", toward="tow", away="awy", prompt="natural prompt"):
    return PairCandidate(player=player, round=rnd, question_index=7, trial=2, prompt=prompt, natural=natural,
                         toward=toward, away=away, reward_natural=rn, reward_toward=ry, reward_away=rx,
                         guided_prompts=("guided prompt y", "guided prompt !y"))


def test_build_pairs_paper_and_code_rules():
    cands = [_cand(0.2, 0.9, 0.1), _cand(0.8, 0.9, 0.1), _cand(0.5, 0.6, 0.4)]
    paper = build_pairs(cands, PaperRule(epsilon=0.5))
    assert [(p.chosen, p.rejected) for p in paper] == [("tow", "nat"), ("nat", "awy")]
    assert (paper[0].reward_chosen, paper[0].reward_rejected) == (0.9, 0.2)
    assert (paper[1].reward_chosen, paper[1].reward_rejected) == (0.8, 0.1)
    assert all(p.prompt == "natural prompt" and (p.player, p.round, p.question_index, p.trial) == ("actor", 1, 7, 2)
               for p in paper)
    code = build_pairs(cands, CodeRule(threshold=0.6))
    assert [(p.chosen, p.rejected) for p in code] == [("tow", "awy"), ("tow", "awy")]
    assert build_pairs(cands, CodeRule(threshold=0.85)) == []


def test_identical_texts_and_round_ranges_are_filtered():
    same = _cand(0.0, 1.0, 0.0, player="critic", toward="same", away="same")
    assert build_pairs([same], CodeRule()) == []
    ranges = code_round_ranges(3)
    assert list(ranges["actor"]) == [1, 2] and list(ranges["critic"]) == [0, 1, 2]
    cands = [_cand(0.0, 1.0, 0.0, rnd=r) for r in range(3)]
    assert [p.round for p in build_pairs(cands, CodeRule(), rounds=ranges["actor"])] == [1, 2]
    with pytest.raises(ValueError, match="natural response.s reward"):
        build_pairs([_cand(None, 1.0, 0.0)], PaperRule())


def test_paper_rule_class_picks_the_branch_and_keeps_its_rewards():
    rule = PaperRule(epsilon=0.5)
    assert rule.needs_natural_reward and not rule.keeps_natural_critic
    assert rule.choose(_cand(0.2, 0.9, 0.1)) == ("tow", "nat", 0.9, 0.2)  # Δy first
    assert rule.choose(_cand(0.8, 0.9, 0.1)) == ("nat", "awy", 0.8, 0.1)  # else Δ!y
    assert rule.choose(_cand(0.5, 0.6, 0.4)) is None
    assert PaperRule(epsilon=0.1).choose(_cand(0.5, 0.6, 0.4)) == ("tow", "nat", 0.6, 0.5)
    assert isinstance(rule.actor_quality(), RolloutQuality)
    with pytest.raises(ConfigError, match="model.pair_rule.init_args.epsilon"):
        PaperRule(epsilon=1.5)


def test_code_rule_class_pairs_guided_responses_with_its_actor_quality():
    rule = CodeRule(threshold=0.6)
    assert not rule.needs_natural_reward and rule.keeps_natural_critic
    assert rule.choose(_cand(None, 0.7, 0.1)) == ("tow", "awy", 0.7, 0.1)  # 0.6 passes (float tolerance)
    assert rule.choose(_cand(None, 0.6, 0.1)) is None
    assert isinstance(rule.actor_quality(), RolloutQuality)
    released = CodeRule(actor_quality={"class_path": "lit_align.debate.rules.CorrectnessQuality"})
    assert released.actor_quality() == CorrectnessQuality()
    with pytest.raises(ConfigError, match="model.pair_rule.init_args.threshold"):
        CodeRule(threshold=-0.1)


def test_actor_quality_classes():
    guided = [GuidedResponse(0, 1, "actor", 0, "A", True, "n", "g", "Answer: A", "A", True),
              GuidedResponse(1, 1, "actor", 0, "B", False, "n", "g", "Answer: B", "B", False)]
    assert CorrectnessQuality().values(guided) == [1.0, 0.0]
    assert RolloutQuality().values(guided) is None  # estimated by one-step rollouts instead


def test_strategies_are_built_from_class_paths_and_bad_ones_name_the_key():
    rule = strategy({"class_path": "lit_align.debate.rules.PaperRule", "init_args": {"epsilon": 0.25}}, PairRule,
                    "model.pair_rule")
    assert rule == PaperRule(epsilon=0.25)
    with pytest.raises(ConfigError, match=r"model.pair_rule.class_path: cannot import 'lit_align.debate.rules.Nope'"):
        strategy({"class_path": "lit_align.debate.rules.Nope"}, PairRule, "model.pair_rule")
    with pytest.raises(ConfigError, match="is not a PairRule"):
        strategy({"class_path": "lit_align.debate.rules.RolloutQuality"}, PairRule, "model.pair_rule")
    with pytest.raises(ConfigError, match="model.pair_rule must be a PairRule"):
        strategy("paper", PairRule, "model.pair_rule")


def test_hygiene_check_raises_on_a_leaked_hint():
    ex = QAExample("Pick one.", "A", "multiple_choice", options=("x", "y"))
    leaked = f"Pick one.\n{target_hint(ex, 'A')}"
    with pytest.raises(ValueError, match="guided hint"):
        build_pairs([_cand(0.0, 1.0, 0.0, prompt=leaked)], CodeRule())
    with pytest.raises(ValueError, match="guided prompt"):
        build_pairs([_cand(0.0, 1.0, 0.0, prompt="guided prompt y")], CodeRule())
    with pytest.raises(ValueError, match="not the natural prompt"):
        check_prompt_hygiene("a", natural_prompt="b")
    check_prompt_hygiene("clean", natural_prompt="clean", hints=[target_hint(ex, "B")])


def test_pairs_from_generated_records_keep_the_natural_prompt():
    """End to end on a tiny model: natural debate, guided actor responses, code-rule pairs with hand
    rewards (1 toward, 0 away). Every pair prompt is byte-identical to the natural prompt of its
    round and contains no hint (spec §1.13 item 2)."""
    spec = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
    tok = build_tokenizer(spec)
    model = build_causal_lm(replace(spec, seed=5), tok).eval()
    examples = [QAExample("Is ice cold?", "yes", "yes_no", index=0),
                QAExample("Pick the vowel.", "B", "multiple_choice", options=("k", "e", "t"), index=1)]
    sampling = SamplingConfig(max_new_tokens=6)
    gen = torch.Generator().manual_seed(0)
    natural = run_debate(model, model, tok, examples, 2, sampling, generator=gen, max_tries=0)
    pairs = []
    for rnd in range(2):
        toward = guided_responses(model, tok, natural, rnd, "actor", "correct", 1, sampling, generator=gen)
        away = guided_responses(model, tok, natural, rnd, "actor", "wrong", 1, sampling, generator=gen,
                                rng=random.Random(0))
        cands = make_candidates(natural, toward, away, [1.0] * 2, [0.0] * 2)
        pairs += build_pairs(cands, CodeRule(), rounds=code_round_ranges(2)["actor"])
    assert len(pairs) == 2 and {p.round for p in pairs} == {1}
    for p in pairs:
        tr = natural[p.question_index]
        assert p.prompt == tr.turns[p.round].actor_prompt
        assert HINT_PREFIX not in p.prompt
        for target in ("yes", "no") if tr.example.kind == "yes_no" else ("A", "B", "C"):
            assert target_hint(tr.example, target) not in p.prompt
