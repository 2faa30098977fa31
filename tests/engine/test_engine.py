"""The shared engine: seed derivation, phase timer, the optimiser step and its scheduler rule, the PPO update."""

from __future__ import annotations

import copy
import itertools
import time

import lightning as L
import pytest
import torch
from conftest import tiny_actor_critic, tiny_lm
from torch import nn

from lit_align.engine import PhaseTimer, PPOConfig, derive_seed, generator, optimizer_step, ppo_update, row_generators
from lit_align.losses.ppo import ppo_policy_loss, ppo_value_loss
from lit_align.rollout.experience import make_experience, minibatches
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

VOCAB, PAD, EOS = 128, 0, 127


# -- seeds ----------------------------------------------------------------------------------------
def test_derived_seeds_are_distinct_across_seeds_steps_purposes_and_examples():
    names = list(itertools.product(range(3), range(50), ("sample", "shuffle", "pool"), (None, 0, 1, 7)))
    seeds = [derive_seed(*name) for name in names]
    assert len(set(seeds)) == len(names)
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2, "sample", 3) == derive_seed(1, 2, "sample", 3)  # a function of the name alone
    # the old formula seed * 1_000_003 + step * 4 + salt collided: (seed 1, step 0, salt 0) == (seed 0, step 250000,
    # salt 3); named draws cannot
    assert derive_seed(1, 0, "sample") != derive_seed(0, 250_000, "sample")


@pytest.mark.parametrize("bad", [(-1, 0, "x"), (0, -1, "x"), (0, 0, ""), (0, 0, "x", -2), (True, 0, "x")])
def test_derive_seed_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="derive_seed|purpose"):
        derive_seed(*bad)


def test_an_example_samples_the_same_on_one_rank_or_two():
    """Per-row generators from the examples' global indices: sampling 4 prompts in one batch (one rank) equals
    sampling them as two batches of 2 (two ranks), example by example."""
    model = tiny_lm("qwen2", vocab_size=VOCAB, hidden_size=32, seed=0)
    prompts = [[5, 17, 31], [88, 23, 7], [40, 19, 3], [3, 15, 99]]
    config = SamplingConfig(max_new_tokens=8, do_sample=True, top_k=50)

    def run(indices):
        ids, mask = left_pad([prompts[i] for i in indices], PAD)
        return sample(model, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD,
                      generator=row_generators(0, 3, "sample", indices)).response_ids

    one = run([0, 1, 2, 3])
    two = torch.cat([run([0, 2]), run([1, 3])])[[0, 2, 1, 3]]  # rank-interleaved shards, then back in order
    width = min(one.shape[1], two.shape[1])
    assert torch.equal(one[:, :width], two[:, :width])
    other_step = sample(model, *left_pad(prompts, PAD), config, eos_token_id=EOS, pad_token_id=PAD,
                        generator=row_generators(0, 4, "sample", range(4))).response_ids
    assert not torch.equal(one[:, :2], other_step[:, :2])  # another step draws otherwise
    with pytest.raises(ValueError, match="3 generators for 4 prompts"):
        sample(model, *left_pad(prompts, PAD), config, eos_token_id=EOS, pad_token_id=PAD,
               generator=row_generators(0, 3, "sample", range(3)))


# -- timer ----------------------------------------------------------------------------------------
def test_seeded_rng_repeats_its_draws_and_leaves_the_callers_stream_alone():
    """Inside: the global generator seeded with the given seed (the same draws every time); after the block, the
    caller's stream goes on as if the block had not run, also when it raised."""
    from lit_align.engine import seeded_rng

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded_rng(7):
        first = torch.rand(4)
    with pytest.raises(RuntimeError), seeded_rng(7):
        assert torch.equal(torch.rand(4), first)
        raise RuntimeError("inside the block")
    assert torch.equal(torch.rand(3), expected)


def test_phase_timer_accumulates_a_phase_entered_twice_and_resets():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("update"):
            time.sleep(0.01)
    with timer("generate"):
        pass
    metrics = timer.metrics()
    assert set(metrics) == {"time/update", "time/generate"} and metrics["time/update"] >= 0.02
    timer.reset()
    assert timer.metrics() == {}


# -- optimiser step ---------------------------------------------------------------------------------
class _TwoMinibatches(L.LightningModule):
    """Manual optimisation: two optimiser steps per batch, as a PPO update with two minibatches takes."""

    def __init__(self, clip: float | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 1)
        self.clip, self.norms, self.moves = clip, [], []

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.5**n)]

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        for half in batch[0].chunk(2):
            before = self.layer.weight.detach().clone()
            loss = 1000.0 * self.layer(half).pow(2).mean()
            optimizer_step(self, opt, loss, clip=self.clip, scheduler=sched)
            self.moves.append(float((self.layer.weight.detach() - before).norm()))
            assert all(p.grad is None for p in self.parameters()), "gradients are freed after the step"


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_optimizer_step_advances_the_scheduler_per_step_and_clips(clip, tmp_path):
    """3 batches x 2 steps: the LR halves at each of the 6 optimiser steps (0.1 * 0.5^6 at the end), and with
    clip = 1e-3 each SGD move is at most lr * 1e-3 (the loss's gradient is far larger)."""
    module = _TwoMinibatches(clip)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=4)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    lrs = [0.1 * 0.5**n for n in range(6)]
    if clip:
        assert all(move <= lr * clip * (1 + 1e-5) for move, lr in zip(module.moves, lrs))
    else:
        assert max(module.moves) > 0.1 * 1e-3 * 10


# -- PPO update -----------------------------------------------------------------------------------
def _experience():
    actor, critic = tiny_actor_critic(VOCAB)
    ids, mask = left_pad([[5, 17, 31, 44], [88, 23, 7], [40, 19], [3, 15, 99, 25]], PAD)
    rollout = sample(actor, ids, mask, SamplingConfig(max_new_tokens=6, do_sample=True), eos_token_id=EOS,
                     pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    exp = make_experience(actor, copy.deepcopy(actor), critic, rollout, torch.tensor([1.0, -0.5, 0.3, 2.0]),
                          kl_coef=0.05)
    return actor, critic, exp


def test_ppo_update_equals_the_minibatch_loop_it_replaces():
    """The loop the watermark and the game ran before the engine (epochs x shuffled minibatches; a policy step,
    then a critic step per minibatch) and ppo_update end with the same weights and metrics."""
    actor, critic, exp = _experience()
    config = PPOConfig(epochs=2, minibatch_size=2, clip=0.2, value_clip=0.2)
    runs = []
    for use_engine in (False, True):
        policy, value = copy.deepcopy(actor).train(), copy.deepcopy(critic)
        opt_p, opt_v = torch.optim.SGD(policy.parameters(), lr=0.05), torch.optim.SGD(value.parameters(), lr=0.05)

        def step(opt, loss):
            opt.zero_grad()
            loss.backward()
            opt.step()

        shuffle = torch.Generator().manual_seed(7)
        if use_engine:
            metrics = ppo_update(policy, value, exp, config, step_policy=lambda loss, o=opt_p: step(o, loss),
                                 step_critic=lambda loss, o=opt_v: step(o, loss), generator=shuffle)
        else:
            for _ in range(config.epochs):
                for mb in minibatches(exp, config.minibatch_size, shuffle=True, generator=shuffle):
                    logps = token_logps(policy, mb.sequences, mb.attention_mask, mb.action_mask).logps
                    loss, pm = ppo_policy_loss(logps, mb.old_logps, mb.advantages, mb.action_mask, clip=config.clip)
                    step(opt_p, loss)
                    values = value.action_values(mb.sequences, mb.attention_mask)
                    value_loss, _ = ppo_value_loss(values, mb.values, mb.returns, mb.action_mask,
                                                   clip=config.value_clip)
                    step(opt_v, value_loss)
            metrics = {"loss": loss.detach(), "critic/loss": value_loss.detach(), "epochs": torch.tensor(2.0)}
        runs.append((policy, value, metrics))
    (p0, v0, m0), (p1, v1, m1) = runs
    for a, b in zip([*p0.parameters(), *v0.parameters()], [*p1.parameters(), *v1.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(next(p0.parameters()), next(actor.parameters()))  # it did train
    for key in ("loss", "critic/loss", "epochs"):
        torch.testing.assert_close(m0[key], m1[key], rtol=0, atol=0)


def test_ppo_update_stops_early_on_approximate_kl():
    """With a tiny target_kl the first minibatch after a large step exceeds it: fewer epochs run than asked."""
    actor, critic, exp = _experience()
    policy = copy.deepcopy(actor).train()
    opt = torch.optim.SGD(policy.parameters(), lr=5.0)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    metrics = ppo_update(policy, None, exp, PPOConfig(epochs=5, minibatch_size=2, target_kl=1e-6), step_policy=step,
                         generator=torch.Generator().manual_seed(0))
    assert 1 <= metrics["epochs"].item() < 5 and "critic/loss" not in metrics
    full = ppo_update(copy.deepcopy(actor).train(), None, exp, PPOConfig(epochs=3), step_policy=lambda loss: None)
    assert full["epochs"].item() == 3


@pytest.mark.parametrize("field, value, match", [("epochs", 0, "ppo.epochs"), ("minibatch_size", 0, "ppo.minibatch_size"),
                                                 ("clip", 0.0, "ppo.clip"), ("value_clip", -1.0, "ppo.value_clip"),
                                                 ("target_kl", 0.0, "ppo.target_kl")])
def test_ppo_config_names_the_bad_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**{field: value})


def test_generator_is_on_the_device_asked():
    g = generator(0, 1, "sample", device="cpu")
    assert g.device.type == "cpu" and g.initial_seed() == derive_seed(0, 1, "sample")


def test_skipping_the_old_and_reference_forwards_gives_the_same_update():
    """kl_coef 0, one epoch over one minibatch: an experience made without the old and reference forwards, updated
    with the current log-probs as the old ones, ends where the full path ends (the forwards it skips are equal to
    what it uses instead); more than one pass is refused."""
    actor, critic = tiny_actor_critic(VOCAB)
    ids, mask = left_pad([[5, 17, 31, 44], [88, 23, 7], [40, 19], [3, 15, 99, 25]], PAD)
    rollout = sample(actor, ids, mask, SamplingConfig(max_new_tokens=6, do_sample=True), eos_token_id=EOS,
                     pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([1.0, -0.5, 0.3, 2.0])
    full = make_experience(actor, copy.deepcopy(actor), critic, rollout, scores, kl_coef=0.0)
    short = make_experience(actor, None, critic, rollout, scores, kl_coef=0.0, score_old=False)
    torch.testing.assert_close(short.advantages, full.advantages)
    torch.testing.assert_close(short.action_mask, full.action_mask)
    config = PPOConfig(epochs=1)
    ends = []
    for exp, shortcut in ((full, False), (short, True)):
        policy = copy.deepcopy(actor).train()
        opt = torch.optim.SGD(policy.parameters(), lr=0.05)

        def step(loss, opt=opt):
            opt.zero_grad()
            loss.backward()
            opt.step()

        ppo_update(policy, None, exp, config, step_policy=step, old_from_current=shortcut)
        ends.append(policy)
    for a, b in zip(ends[0].parameters(), ends[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one epoch over one minibatch"):
        ppo_update(ends[0], None, short, PPOConfig(epochs=2), step_policy=lambda loss: None, old_from_current=True)
    with pytest.raises(ValueError, match="kl_coef=0"):
        make_experience(actor, None, critic, rollout, scores, kl_coef=0.1, score_old=False)
