"""PPO experience on real tiny HF models and sampled rollouts; the critic built from a reward model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_lm
from torch import nn

from lit_align.losses.ppo import gae
from lit_align.models.reward import RewardModel, RewardModelSpec, build_reward_model, last_token_index
from lit_align.models.spec import ModelSpec, TinyArch
from lit_align.models.value import ValueModel, build_value_model
from lit_align.rollout.experience import Experience, make_experience, minibatches, response_actions
from lit_align.rollout.sampler import Rollout, SamplingConfig, left_pad, sample

VOCAB = 256
PAD = 0
EOS = list(range(200, 230))  # ~12% of a random model's mass: rows stop at different lengths
PROMPTS = [[5, 17, 31, 44, 9], [88, 23, 7], [40, 19], [3, 150, 99, 25]]


def _lm(seed: int = 0) -> nn.Module:
    return tiny_lm("qwen2", vocab_size=VOCAB, hidden_size=32, seed=seed, max_position_embeddings=64)


def _reward_model(seed: int = 1) -> RewardModel:
    head = nn.Linear(32, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=0.5)
        nn.init.normal_(head.bias, std=0.5)
    return RewardModel(_lm(seed), head, "scalar_head").eval()


def _rollout(actor: nn.Module, *, eos=EOS, do_sample: bool = True, max_new: int = 6, seed: int = 0) -> Rollout:
    ids, mask = left_pad(PROMPTS, PAD)
    config = SamplingConfig(max_new_tokens=max_new, do_sample=do_sample)
    return sample(actor, ids, mask, config, eos_token_id=eos, pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    actor = _lm()
    rm = _reward_model()
    rollout = _rollout(actor)
    lengths = rollout.response_lengths.tolist()
    assert min(lengths) >= 2 and len(set(lengths)) > 1, f"want rows of different lengths >= 2, got {lengths}"
    return actor, rm, rollout


def test_value_model_from_reward_model_scores_at_the_last_token():
    """At initialisation the critic's value at the last real token is the reward model's score,
    for right and left padding; its parameters are copies, not shared."""
    rm = _reward_model()
    critic = ValueModel.from_reward_model(rm)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(critic.parameters(), rm.parameters(), strict=True))
    rows = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12]), torch.tensor([13, 14, 15])]
    for side in ("right", "left"):
        ids, mask = torch.full((3, 7), PAD), torch.zeros(3, 7, dtype=torch.long)
        for i, r in enumerate(rows):
            s = 0 if side == "right" else 7 - len(r)
            ids[i, s : s + len(r)], mask[i, s : s + len(r)] = r, 1
        with torch.no_grad():
            values = critic(ids, mask)  # (B, T)
            scores = rm.score(ids, mask)  # (B,)
            shifted = critic.action_values(ids, mask)
        assert values.shape == (3, 7) and scores.abs().min() > 0
        torch.testing.assert_close(values[torch.arange(3), last_token_index(mask)], scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shifted[:, 1:], values[:, :-1])
        assert torch.equal(shifted[:, 0], torch.zeros(3))
    with torch.no_grad():
        critic.head.weight.add_(1.0)
    assert not torch.equal(critic.head.weight, rm.head.weight)


def test_build_value_model_from_a_detector_checkpoint(tmp_path):
    """A reward model saved inside a LightningModule-style checkpoint (``detector.`` prefix) loads into a
    critic of the same spec; without ``init_from`` the head is zero (every value 0)."""
    spec = RewardModelSpec(model=ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                                         intermediate_size=64)), head_init_std=0.5, head_bias=True)
    detector = build_reward_model(spec)
    with torch.no_grad():
        detector.head.bias.fill_(0.3)
    state = {f"detector.{k}": v for k, v in detector.state_dict().items()}
    state["actor.x"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "stage1.ckpt")
    critic = build_value_model(RewardModelSpec(model=spec.model, head_bias=True), init_from=tmp_path / "stage1.ckpt")
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(critic(ids, mask)[:, -1], detector.score(ids, mask), rtol=1e-5, atol=1e-5)
        assert torch.equal(build_value_model(RewardModelSpec(model=spec.model))(ids, mask), torch.zeros(1, 4))
    with pytest.raises(FileNotFoundError, match="init_from"):
        build_value_model(spec, init_from=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="head_bias"):  # a trained bias cannot be dropped silently
        build_value_model(RewardModelSpec(model=spec.model, head_bias=False), init_from=tmp_path / "stage1.ckpt")


def test_make_experience_shapes_alignment_and_rewards_at_init(setup):
    """Reference == actor: ref_logps == old_logps, so every reward is 0 but the clipped score at the last
    generated token. Old log-probs match the sampler's (temperature 1), values are the critic's
    ``V`` of the state before each action, and advantages/returns are GAE of those."""
    actor, rm, rollout = setup
    critic = ValueModel.from_reward_model(rm)
    reference = copy.deepcopy(actor)
    actor.train()
    scores = torch.tensor([9.0, -0.5, -12.0, 2.0])
    exp = make_experience(actor, reference, critic, rollout, scores, kl_coef=0.1, reward_clip=5.0, gamma=1.0,
                          lam=0.95, whiten_advantages=False)
    assert actor.training, "make_experience must restore the actor's mode"
    assert isinstance(exp, Experience) and len(exp) == 4 and exp.num_dropped == 0
    B, T = rollout.sequences.shape
    P = rollout.prompt_ids.shape[1]
    for name in ("sequences", "attention_mask", "action_mask", "old_logps", "ref_logps", "values", "rewards",
                 "advantages", "returns"):
        assert getattr(exp, name).shape == (B, T), name
    assert torch.equal(exp.action_mask[:, P:], rollout.response_mask.float())
    assert torch.equal(exp.action_mask[:, :P], torch.zeros(B, P))

    torch.testing.assert_close(exp.old_logps[:, P:], rollout.logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exp.ref_logps, exp.old_logps)

    last = P + rollout.response_lengths - 1  # (B,) last generated token
    expected = torch.zeros(B, T)
    expected[torch.arange(B), last] = scores.clamp(-5, 5)
    torch.testing.assert_close(exp.rewards, expected, rtol=0, atol=1e-6)

    with torch.no_grad():
        raw = critic(exp.sequences, exp.attention_mask)  # (B, T) head(h_t)
    torch.testing.assert_close(exp.values[:, 1:], raw[:, :-1] * exp.action_mask[:, 1:], rtol=1e-5, atol=1e-6)
    adv, ret = gae(exp.rewards, exp.values, exp.action_mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(exp.advantages, adv)
    torch.testing.assert_close(exp.returns, ret)
    # the last action: A = r_L - V_L
    rows = torch.arange(B)
    torch.testing.assert_close(exp.advantages[rows, last], exp.rewards[rows, last] - exp.values[rows, last])
    assert exp.metrics["kl"].abs() < 1e-6 and exp.metrics["dropped"] == 0
    torch.testing.assert_close(exp.metrics["response_length"], rollout.response_lengths.float().mean())


def test_make_experience_reference_context_and_whitening(setup):
    """The reference may be the actor itself under a context (LoRA adapters disabled): ref_logps are then
    the base model's, old_logps the adapted one's, and the KL-shaped rewards are non-zero."""
    from peft import LoraConfig, get_peft_model

    _, rm, rollout = setup
    actor = get_peft_model(_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    base = _lm()
    exp = make_experience(actor, actor, ValueModel.from_reward_model(rm), rollout, torch.zeros(4),
                          kl_coef=0.1, reward_clip=5.0, gamma=1.0, lam=0.95, whiten_advantages=True,
                          reference_context=lambda: actor.disable_adapter())
    again = make_experience(base, base, ValueModel.from_reward_model(rm), rollout, torch.zeros(4), kl_coef=0.1,
                            reward_clip=5.0, gamma=1.0, lam=0.95, whiten_advantages=True)
    torch.testing.assert_close(exp.ref_logps, again.old_logps, rtol=1e-5, atol=1e-5)
    m = exp.action_mask.bool()
    assert (exp.old_logps - exp.ref_logps)[m].abs().max() > 1e-3
    torch.testing.assert_close(exp.rewards[m], -0.1 * (exp.old_logps - exp.ref_logps)[m])
    torch.testing.assert_close(exp.advantages[m].mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(exp.advantages[m].std(), torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    assert torch.equal(exp.advantages[~m], torch.zeros(int((~m).sum())))


def test_empty_generations_are_dropped_and_counted(setup):
    """Greedy decoding with EOS = the first greedy token of row 0 makes row 0 (and any row with the same
    first token) generate only that EOS: <= 1 generated token, dropped and counted."""
    actor, rm, _ = setup
    first = _rollout(actor, do_sample=False, max_new=1).response_ids[:, 0]  # (B,)
    rollout = _rollout(actor, eos=int(first[0]), do_sample=False)
    short = rollout.response_lengths <= 1
    assert short[0] and not short.all()
    critic = ValueModel.from_reward_model(rm)
    scores = torch.arange(4, dtype=torch.float32)
    exp = make_experience(actor, actor, critic, rollout, scores, kl_coef=0.1, reward_clip=5.0, gamma=1.0, lam=0.95,
                          whiten_advantages=False)
    assert exp.num_dropped == int(short.sum()) and exp.metrics["dropped"] == exp.num_dropped
    assert len(exp) == 4 - exp.num_dropped
    assert torch.equal(exp.scores, scores[~short])
    assert torch.equal(exp.sequences, rollout.sequences[~short])
    assert (exp.action_mask.sum(-1) >= 2).all()

    everything = make_experience(actor, actor, critic, rollout, scores, kl_coef=0.1, reward_clip=5.0, gamma=1.0,
                                 lam=0.95, whiten_advantages=False, min_response_tokens=100)
    assert len(everything) == 0 and everything.num_dropped == 4 and list(minibatches(everything, 2)) == []


def test_make_experience_bad_scores(setup):
    actor, rm, rollout = setup
    with pytest.raises(ValueError, match="scores"):
        make_experience(actor, actor, ValueModel.from_reward_model(rm), rollout, torch.zeros(3), kl_coef=0.1,
                        reward_clip=5.0, gamma=1.0, lam=0.95, whiten_advantages=False)


def test_minibatches_cover_every_row_once(setup):
    actor, rm, rollout = setup
    exp = make_experience(actor, actor, ValueModel.from_reward_model(rm), rollout, torch.arange(4.0), kl_coef=0.1,
                          reward_clip=5.0, gamma=1.0, lam=0.95, whiten_advantages=False)
    batches = list(minibatches(exp, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 1]
    seen = torch.cat([b.scores for b in batches])
    assert sorted(seen.tolist()) == [0.0, 1.0, 2.0, 3.0]
    for b in batches:  # rows stay together across fields
        for i, s in enumerate(b.scores.long().tolist()):
            assert torch.equal(b.sequences[i], exp.sequences[s]) and torch.equal(b.advantages[i], exp.advantages[s])
    again = list(minibatches(exp, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(batches, again, strict=True))
    whole = list(minibatches(exp, 8, shuffle=False))
    assert len(whole) == 1 and torch.equal(whole[0].scores, exp.scores)
    with pytest.raises(ValueError, match="size"):
        list(minibatches(exp, 0))


def test_eos_is_a_gae_step_but_not_an_action_with_eos_token_id(setup):
    """The reference rule (``eos_token_id`` given), on a hand-made rollout with EOS = 200 and prompts of
    length 3: row 0 ``[7, 8, EOS]`` ended with EOS, row 1 ``[7, 8, 9]`` hit the length cap, row 2
    ``[7, EOS]`` has one token besides EOS.

    * actions: row 0 its columns 3, 4 (not the EOS at 5); row 1 columns 3-5; row 2 is dropped (<= 1
      generated token besides EOS), while without ``eos_token_id`` it is kept (2 tokens, EOS counted);
    * the clipped score sits at the last generated token either way (row 0: on the EOS column), and
      rewards, values and the advantages of the actions are those of the EOS-as-action experience
      (the EOS column stays a GAE step); the EOS column's advantage and return are 0, so the policy
      and value losses skip it.
    """
    actor, rm, _ = setup
    eos = 200
    prompts, prompt_mask = left_pad([[5, 17, 31], [88, 23, 7], [40, 19, 3]], PAD)
    response = torch.tensor([[7, 8, eos], [7, 8, 9], [7, eos, PAD]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    rollout = Rollout(prompts, prompt_mask, response, response_mask, torch.zeros(3, 3))
    assert response_actions(rollout, eos).tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert torch.equal(response_actions(rollout), response_mask)
    critic = ValueModel.from_reward_model(rm)
    scores = torch.tensor([9.0, -2.0, 1.0])
    kw = dict(kl_coef=0.1, reward_clip=5.0, gamma=1.0, lam=0.95, whiten_advantages=False)
    ref = _lm(seed=4)  # a different reference: nonzero KL terms, the EOS's included
    ref_exp = make_experience(actor, ref, critic, rollout, scores, eos_token_id=eos, **kw)
    act_exp = make_experience(actor, ref, critic, rollout, scores, **kw)
    assert ref_exp.num_dropped == 1 and act_exp.num_dropped == 0
    assert ref_exp.action_mask[:, 3:].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert act_exp.action_mask[:, 3:].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    kept = act_exp.select(torch.tensor([0, 1]))
    torch.testing.assert_close(ref_exp.rewards, kept.rewards)
    torch.testing.assert_close(ref_exp.values, kept.values)
    assert ref_exp.rewards[0, 5] != 0 and ref_exp.values[0, 5] != 0  # the EOS column: KL + 5, V(last state)
    kl_eos = -0.1 * (ref_exp.old_logps[0, 5] - ref_exp.ref_logps[0, 5])
    torch.testing.assert_close(ref_exp.rewards[0, 5], kl_eos + 5.0)
    torch.testing.assert_close(ref_exp.rewards[1, 5], -0.1 * (ref_exp.old_logps[1, 5] - ref_exp.ref_logps[1, 5]) - 2.0)
    m = ref_exp.action_mask.bool()
    torch.testing.assert_close(ref_exp.advantages[m], kept.advantages[m])
    assert ref_exp.advantages[0, 5] == 0 and ref_exp.returns[0, 5] == 0 and kept.advantages[0, 5] != 0
    # the last action before EOS bootstraps from the EOS column: A_4 = r_4 + V_5 - V_4 + lam * (r_5 - V_5)
    r, v = ref_exp.rewards[0], ref_exp.values[0]
    torch.testing.assert_close(ref_exp.advantages[0, 4], r[4] + v[5] - v[4] + 0.95 * (r[5] - v[5]))
