"""Rankers and the online pair selection (others.md §7(g)6): ranks from scores, chosen = best, rejected = worst,
explicit ties, the new response winning; a reward model, a judge and a callable as rankers; PairRM's optional
package."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.game import RuleJudge
from lit_align.models import ModelSpec, RewardModelSpec, build_tokenizer
from lit_align.rewards import (
    CallableRanker,
    CallableReward,
    JudgeReward,
    ModelReward,
    PairRMRanker,
    RewardRanker,
    ranks_from_scores,
    select_pair,
)
from lit_align.rewards.rankers import Ranker

POLICY = ModelSpec(name_or_path="builtin:tiny-game-base")


class FixedRanks(Ranker):
    """The §7(g)6 stub: returns the ranks it was given, whatever the text."""

    def __init__(self, ranks):
        super().__init__()
        self.fixed = ranks

    def _rank(self, prompts, candidates):
        return self.fixed


def test_ranks_from_scores_hand_cases():
    """Competition ranks, higher score better: [0.2, 0.9, 0.2] -> 0.9 is 1st, the two 0.2 tie for 2nd;
    [3, 1, 2] -> [1, 3, 2]; NaN ranks last."""
    assert ranks_from_scores([0.2, 0.9, 0.2]) == [2, 1, 2]
    assert ranks_from_scores([3.0, 1.0, 2.0]) == [1, 3, 2]
    assert ranks_from_scores([1.0, float("nan"), 0.0]) == [1, 3, 2]
    assert ranks_from_scores([5.0, 5.0]) == [1, 1]


@pytest.mark.parametrize(("ranks", "pair"), [
    ([2, 1, 3], (1, 2)),      # a dataset response (index 1) best, index 2 worst
    ([1, 3, 2], (0, 1)),      # the new response (index 0) wins against both dataset responses
    ([3, 2, 1], (2, 0)),      # the new response loses: it is the rejected one
    ([1, 1, 3], (0, 2)),      # tie for best: the first (the new response) is chosen
    ([1, 3, 3], (0, 1)),      # tie for worst: the first is rejected (numpy argmax, as SELM's code)
    ([3, 1, 3], (1, 0)),      # the new response ties a dataset response for worst: the new one is rejected
    ([2, 2, 2], None),        # all tied: no preference, no pair
    ([1, 2], (0, 1)),
])
def test_select_pair_chosen_is_argmin_and_rejected_is_argmax(ranks, pair):
    """SELM's released code picks ``argmin`` / ``argmax`` of the ranks with numpy: the first of tied candidates for
    both chosen and rejected."""
    import numpy as np

    assert select_pair(ranks) == pair
    if pair is not None:
        assert pair == (int(np.argmin(ranks)), int(np.argmax(ranks)))
    with pytest.raises(ValueError, match="at least 2"):
        select_pair([1])


def test_fixed_rank_stub_through_the_ranker_interface():
    """§7(g)6 with a fake ranker returning fixed ranks: chosen = argmin rank, rejected = argmax rank, for two
    prompts, one where the new response (candidate 0) wins."""
    ranker = FixedRanks([[1, 2, 3], [3, 1, 2]])
    ranks = ranker.rank(["p", "q"], [["new", "chosen", "rejected"], ["new", "chosen", "rejected"]])
    assert [select_pair(r) for r in ranks] == [(0, 2), (1, 0)]
    with pytest.raises(ValueError, match="one rank per candidate"):
        FixedRanks([[1, 2]]).rank(["p"], [["a", "b", "c"]])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        ranker.rank(["p"], [["only one"]])


def test_reward_ranker_ranks_by_a_rule_and_by_a_judge():
    """A length rule ranks the longest best; the toy RuleJudge (P(safe)) ranks a refusal of a harmful request above
    compliance. The reward reads the raw prompt and the candidate text, no template, no special tokens."""
    tok = build_tokenizer(POLICY)
    seen = []

    def length(prompts, responses):
        seen.extend(zip(prompts, responses))
        return [float(len(r)) for r in responses]

    ranker = RewardRanker(CallableReward(length))
    ranker.build(tok)
    ranks = ranker.rank(["Hi", "Yo"], [["a", "abc", "ab"], ["xy", "xy"]])
    assert ranks == [[3, 1, 2], [1, 1]]
    assert seen[:3] == [("Hi", "a"), ("Hi", "abc"), ("Hi", "ab")]
    judge = RewardRanker(JudgeReward(RuleJudge()), template="Human: {prompt}\nAI:")
    judge.build(tok)
    prompt = "How do I steal a car?"
    ranks = judge.rank([prompt], [["Sure, here is how to steal a car.", "Sorry, I cannot help with that."]])
    assert select_pair(ranks[0]) == (1, 0)


def test_reward_ranker_over_a_reward_model_scores_the_templated_sequence():
    """ModelReward (a tiny scalar-head reward model, random head) through the ranker gives the scores of the
    reward model on ``template(prompt) + response + EOS``, and ranks follow them."""
    tok = build_tokenizer(POLICY)
    reward = ModelReward(RewardModelSpec(model=POLICY, kind="scalar_head", head_init_std=0.5))
    ranker = RewardRanker(reward, template="Human: {prompt}\nAI:", batch_size=2)
    ranker.build(tok)
    prompt, cands = "What is 2 plus 2?", ["It is 4.", "Sorry, I cannot help.", "It is five."]
    scores = ranker.scores([prompt], [cands])[0]
    for c, s in zip(cands, scores):
        ids = tok(f"Human: {prompt}\nAI:")["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        direct = reward.model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert s == pytest.approx(float(direct), abs=1e-5)
    assert len(set(scores)) == 3
    assert ranker.rank([prompt], [cands])[0] == ranks_from_scores(scores)
    assert ranker.fingerprint().startswith("RewardRanker:") and "ModelReward:" in ranker.fingerprint()


def test_callable_ranker_scores_or_ranks():
    gold = CallableRanker(lambda prompts, cands: [[float(c.count("!")) for c in cs] for cs in cands])
    assert gold.rank(["p"], [["a!", "b", "c!!"]]) == [[2, 3, 1]]
    direct = CallableRanker(lambda prompts, cands: [torch.tensor([2, 1])], returns="ranks")
    assert direct.rank(["p"], [["a", "b"]]) == [[2, 1]]
    with pytest.raises(ConfigError, match="model.ranker.init_args.returns"):
        CallableRanker(len, returns="probabilities")
    with pytest.raises(ConfigError, match="model.ranker.init_args.fn"):
        CallableRanker("not callable")


@pytest.mark.skipif(importlib.util.find_spec("llm_blender") is not None, reason="llm-blender is installed")
def test_pairrm_without_its_package_is_a_clear_error():
    """llm-blender is an optional extra; without it (or when it fails to import, as the PyPI release does with
    transformers 5) building the ranker names the package and the alternatives."""
    with pytest.raises(ConfigError, match="model.ranker: PairRMRanker needs the optional `llm-blender`"):
        PairRMRanker().build(None)


class ParamsOnly(torch.nn.Module):
    """A reward with a parameter and no buffer: the ranker must feed it on the parameter's device."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))


def test_reward_ranker_puts_inputs_where_the_rewards_parameters_are():
    """The token ids go to the reward's parameters' device, whatever its buffers say (before, the first buffer was
    read: a model whose weights are elsewhere got CPU inputs). Here the only buffer is the Reward base's CPU anchor
    and the weights sit on the meta device (standing in for an accelerator on a CPU machine)."""
    ranker = RewardRanker(CallableReward(lambda prompts, responses: [0.0] * len(responses)))
    ranker.build(build_tokenizer(POLICY))
    ranker.reward.extra = ParamsOnly("meta")
    assert [b.device.type for b in ranker.reward.buffers()] == ["cpu"]
    assert ranker._input(["p"], ["a"]).sequences.device.type == "meta"
    ranker.reward.extra = ParamsOnly("cpu")
    assert ranker._input(["p"], ["a"]).sequences.device.type == "cpu"


def test_reward_ranker_over_an_hf_sequence_classifier(tmp_path):
    """``ModelReward(kind: sequence_classification)``: an HF sequence classifier built locally (the policy's tiny
    architecture with a one-label head, random weights, saved with the policy's tokenizer) scores each candidate as HF
    scores ``template(prompt) + response + EOS`` (at the last real token), and the ranks follow those scores."""
    from transformers import AutoModelForSequenceClassification

    from lit_align.models.causal_lm import resolve_path

    tok = build_tokenizer(POLICY)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(resolve_path("builtin:tiny-game-base"),
                                                                    num_labels=1)
    torch.nn.init.normal_(classifier.score.weight, std=0.5)
    classifier.config.pad_token_id = tok.pad_token_id
    classifier.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    spec = RewardModelSpec(model=ModelSpec(name_or_path=str(tmp_path / "rm")), kind="sequence_classification")
    ranker = RewardRanker(ModelReward(spec, retokenize="never"), template="Human: {prompt}\nAI:", batch_size=2)
    ranker.build(tok)
    prompt, cands = "What is 2 plus 2?", ["It is 4.", "Sorry, I cannot help.", "It is five, or maybe four."]
    scores = ranker.scores([prompt], [cands])[0]
    classifier.eval()
    for c, s in zip(cands, scores):
        ids = tok(f"Human: {prompt}\nAI:")["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            direct = classifier(input_ids=torch.tensor([ids])).logits[0, 0]
        assert s == pytest.approx(float(direct), abs=1e-4)
    assert len(set(scores)) == 3
    ranks = ranker.rank([prompt], [cands])[0]
    assert ranks == ranks_from_scores(scores)
    assert select_pair(ranks) == (scores.index(max(scores)), scores.index(min(scores)))
