"""Online RL of one policy on any reward: PPO with a critic, RLOO, GRPO, and contrastive rewards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_align.data.prompts import PromptBatch
from lit_align.engine import (
    GAE,
    AdvantageEstimator,
    Optimization,
    PhaseTimer,
    Player,
    PPOConfig,
    overlapped_steps,
    ppo_update,
)
from lit_align.engine.distributed import refuse_fsdp1, sum_over_ranks, sums_over_ranks
from lit_align.engine.player import configure_players, resolve_optimization
from lit_align.engine.seeds import generator, row_generators
from lit_align.errors import ConfigError
from lit_align.losses.ppo import whiten
from lit_align.methods.base import ReferencedPolicyModule, default_cache_dir, online_reference, prompt_predictions
from lit_align.models import ModelSpec
from lit_align.models.reference import model_fingerprint
from lit_align.models.value import CriticSpec, build_critic
from lit_align.modes import eval_mode
from lit_align.rewards import BaselineTable, ContrastiveRewards, Reward, RewardInput
from lit_align.rewards import contrastive as cr
from lit_align.rollout.experience import make_experience
from lit_align.rollout.sampler import Rollout, SamplingConfig, sample

__all__ = ["PPOModule"]

#: Each player's optimisation unless ``model.optimization`` says otherwise: Adam (betas 0.9, 0.95) at
#: OpenRLHF's order of rates (actor 5e-7, critic 9e-6), clip 1.0.
PLAYERS = {"policy": Optimization(lr=1e-6), "critic": Optimization(lr=1e-5)}
_SAMPLING = SamplingConfig(max_new_tokens=64)
_PPO = PPOConfig()


def _adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))


class PPOModule(ReferencedPolicyModule):
    """RLHF of one policy (Ouyang et al. 2022, arXiv 2203.02155; Stiennon et al. 2020, arXiv 2009.01325).

    Each step, on this rank's prompts (:class:`~lit_align.data.prompts.PromptBatch`):

    1. **generate** k = ``estimator.group_size`` samples of every prompt (1 for GAE), each seeded from
       ``(sample_seed, step, its prompt's global index, j)``: the same on any number of ranks and on resume;
       the k samples of a prompt sit next to each other on one rank;
    2. **score** them with ``reward`` (any :class:`~lit_align.rewards.Reward`); with ``contrastive`` subtract the
       prompt's offline baseline ``b(x)`` (:mod:`lit_align.rewards.contrastive`), then (``whiten_scores``)
       whiten over every rank's rows;
    3. **experience**: old, reference and (GAE) critic values, KL-shaped rewards, then the ``estimator``'s
       advantages: :class:`~lit_align.engine.GAE` (critic), :class:`~lit_align.engine.RLOO` or
       :class:`~lit_align.engine.GRPO` (no critic is built);
    4. **PPO update** of the policy (and critic) by :func:`~lit_align.engine.ppo_update`.

    The reference is the policy with its LoRA adapter off (``adapter``) or a frozen copy; responses are new every
    step, so nothing can be precomputed. Every generated token is an action, EOS included (TRL's and OpenRLHF's
    rule). Players (``model.optimization``): ``policy``, and ``critic`` with GAE.

    Data parallel (DDP, FSDP2; FSDP1 is refused): each rank samples and scores its own prompts (the reward is
    replicated on every rank); the whitening and the losses' token shares are global, so N ranks equal one
    process on the global batch.

    Logged: ``train/{reward,score,kl,response_length}``, ``train/policy/*``, ``train/critic/*``,
    ``train/contrastive/{baseline,reward}``, ``train/reward_var`` (variance over every rank's rows of the scores PPO
    was fed, after the contrastive baseline and any whitening),
    ``train/time/<phase>``; ``val/reward`` and ``val/<name>`` for each of ``eval_rewards``.
    """

    def __init__(
        self,
        model: ModelSpec,
        reward: Reward,
        estimator: AdvantageEstimator | None = None,
        critic: CriticSpec | None = None,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        sampling: SamplingConfig = _SAMPLING,
        kl_coef: float = 0.05,
        reward_clip: float | None = None,
        whiten_scores: bool = False,
        ppo: PPOConfig = _PPO,
        contrastive: ContrastiveRewards | None = None,
        optimization: dict[str, Optimization] | None = None,
        eval_rewards: dict[str, Reward] | None = None,
        sample_seed: int = 0,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy (LoRA or full).
            reward: what scores a response (``class_path: lit_align.rewards.ModelReward``, ``JudgeReward``,
                ``CallableReward`` or ``Mix``).
            estimator: ``lit_align.engine.GAE`` (default; builds a critic), ``RLOO`` or ``GRPO`` (k samples per
                prompt, no critic).
            critic: the critic of GAE (:class:`~lit_align.models.value.CriticSpec`); unset: the policy's
                architecture and weights with a zero value head.
            reference: ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto`` (adapter with LoRA).
            sampling: how responses are sampled (``do_sample`` must be true).
            kl_coef: per-token KL penalty to the reference in the rewards (``beta``; GRPO as published: 0, with
                ``ppo.kl_loss_coef``).
            reward_clip: clip the score to +-this before it enters the rewards; ``None``: no clip.
            whiten_scores: whiten the scores over every rank's rows before the KL shaping (after subtracting the
                contrastive baseline).
            ppo: epochs, minibatch size, clip ranges, KL-in-loss and loss aggregation (:class:`~lit_align.engine.PPOConfig`).
            contrastive: subtract an offline per-prompt baseline from the starting policy (Shen et al. 2024).
            optimization: one block per player (``policy``, and ``critic`` with GAE); unset: :data:`PLAYERS`.
            eval_rewards: further rewards logged at validation only (e.g. a gold reward next to a proxy).
            sample_seed: seed of every draw (:func:`lit_align.engine.derive_seed`).
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__(model, reference=online_reference(model, reference, "online RL"), chunk_tokens=chunk_tokens)
        if not sampling.do_sample:
            raise ConfigError("model.sampling.do_sample must be true: PPO needs sampled responses")
        if not kl_coef >= 0:
            raise ConfigError(f"model.kl_coef must be >= 0, got {kl_coef}")
        if reward_clip is not None and not reward_clip > 0:
            raise ConfigError(f"model.reward_clip must be positive or null, got {reward_clip}")
        self.automatic_optimization = False
        self.reward = reward
        self.estimator = estimator if estimator is not None else GAE()
        self.critic_spec = critic if self.estimator.needs_critic else None
        if critic is not None and not self.estimator.needs_critic:
            raise ConfigError(f"model.critic: {type(self.estimator).__name__} needs no critic (its baseline is the "
                              "group of samples); remove model.critic or use lit_align.engine.GAE")
        self.sampling, self.ppo = dataclasses.replace(sampling), dataclasses.replace(ppo)
        self.kl_coef, self.reward_clip, self.whiten_scores = kl_coef, reward_clip, whiten_scores
        self.contrastive = contrastive
        self.eval_rewards = torch.nn.ModuleDict(eval_rewards or {})
        defaults = {k: v for k, v in PLAYERS.items() if k == "policy" or self.estimator.needs_critic}
        self.players = {name: Player(name, block, _adam)
                        for name, block in resolve_optimization(optimization, defaults).items()}
        self.sample_seed = sample_seed
        self.timer = PhaseTimer()
        self.critic = None  # built in configure_model
        self.baseline: BaselineTable | None = None  # contrastive: made before training, kept in checkpoints
        self.step_count = 0  # in checkpoints

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        self.reward.build(self.tokenizer, "model.reward")
        for name, reward in self.eval_rewards.items():
            reward.build(self.tokenizer, f"model.eval_rewards.{name}")
        if self.estimator.needs_critic:
            sharded = {}
            if self.device_mesh is not None:  # FSDP2: the critic sharded like the policy
                sharded = {"mesh": self.device_mesh["data_parallel"], "precision": self.trainer.precision,
                           "device": self.trainer.strategy.root_device, "rank": self.global_rank}
            self.critic = build_critic(self.critic_spec or CriticSpec(), self.spec, self.tokenizer, reward=self.reward,
                                       **sharded)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "PPOModule")

    def configure_optimizers(self):
        params = {"policy": list(self.policy.parameters())}
        if self.critic is not None:
            params["critic"] = list(self.critic.parameters())
        return configure_players(list(self.players.values()), params)

    # -- rollouts --------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.estimator.group_size

    def _rollout(self, batch: PromptBatch, k: int, purpose: str, step: int | None = None) -> Rollout:
        """k samples of each prompt, contiguous; sample ``j`` of the prompt with global index ``i`` draws from
        ``(sample_seed, step, purpose, i k + j)``."""
        ids, mask = batch.input_ids.repeat_interleave(k, 0), batch.attention_mask.repeat_interleave(k, 0)
        rows = [int(i) * k + j for i in batch.index.tolist() for j in range(k)]
        rngs = row_generators(self.sample_seed, self.step_count if step is None else step, purpose, rows,
                              device=self.device)
        with eval_mode(self.policy):
            return sample(self.policy, ids, mask, self.sampling, eos_token_id=self.tokenizer.eos_token_id,
                          pad_token_id=self.tokenizer.pad_token_id, generator=rngs)

    def _reward_input(self, batch: PromptBatch, rollout: Rollout, k: int) -> RewardInput:
        responses = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                     for r, m in zip(rollout.response_ids, rollout.response_mask)]
        prompts = [p for p in batch.prompts for _ in range(k)]
        return RewardInput(prompts, responses, rollout.sequences, rollout.attention_mask, self.tokenizer)

    @torch.no_grad()
    def _score(self, batch: PromptBatch, rollout: Rollout, k: int, reward: Reward | None = None) -> Tensor:
        """(B k,) the reward of each sample: one code path for the online rewards and the contrastive baseline."""
        return (reward or self.reward)(self._reward_input(batch, rollout, k))

    # -- contrastive baseline ----------------------------------------------------------------------
    def _baseline_key(self, uids: list[str]) -> dict:
        sampling = repr(sorted(dataclasses.asdict(self.sampling).items()))
        return cr.baseline_key(uids, self.reward.fingerprint(), model_fingerprint(self.policy), sampling,
                               self.contrastive)

    def _make_baseline(self) -> None:
        """The offline stage: every training prompt's ``b(x)`` from k samples of the starting policy (this rank
        scores its share; the table is gathered), from the cache when it was made under the same key."""
        dm = self.trainer.datamodule
        dataset = dm.train_dataset
        uids = [dataset[i].uid for i in range(len(dataset))]
        key = self._baseline_key(uids)
        path = cr.cache_path(self.contrastive, key, Path(default_cache_dir()))
        table = cr.load_cached(path, key)
        if table is None:
            collate, k = dm._collator(self.tokenizer.pad_token_id), self.contrastive.samples
            chunks = cr.rank_chunks(len(dataset), self.global_rank, self.trainer.world_size, self.contrastive.batch_size)
            batches = (collate([dataset[i] for i in chunk]).to(self.device) for chunk in chunks)
            with self.timer("baseline"):
                table = cr.compute_baseline(
                    batches, lambda b: self._score(b, self._rollout(b, k, "baseline", step=0), k),
                    lambda b: list(b.uids), self.contrastive, key)
            if self.trainer.is_global_zero:
                cr.save_cached(table, path)
        self.baseline = table

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.contrastive is not None and self.baseline is None:  # a resumed run has it from the checkpoint
            self._make_baseline()

    # -- the step --------------------------------------------------------------------------------
    def _rewards(self, batch: PromptBatch, rollout: Rollout, metrics: dict[str, Tensor], k: int | None = None) -> Tensor:
        """(B k,) what PPO is fed (k: samples per prompt, the estimator's by default): the reward, minus the
        contrastive baseline, whitened if asked."""
        k = k or self.group_size
        scores = self._score(batch, rollout, k)
        metrics["score"] = scores.mean()
        if self.baseline is not None:
            base = self.baseline.lookup([u for u in batch.uids for _ in range(k)]).to(scores)
            scores = scores - base
            metrics.update({"contrastive/baseline": base.mean(), "contrastive/reward": scores.mean()})
        if self.whiten_scores:
            scores = whiten(scores[:, None], torch.ones_like(scores[:, None]), reduce=sum_over_ranks)[:, 0]
        metrics["reward_var"] = _global_var(scores)
        return scores

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.timer.reset()
        metrics: dict[str, Tensor] = {}
        with self.timer("generate"):
            rollout = self._rollout(batch, self.group_size, "sample")
        with self.timer("score"):
            scores = self._rewards(batch, rollout, metrics)
        uses_kl, on_policy = self._needed_forwards(len(scores))
        with self.timer("experience"):
            reference, context = self._reference_args() if uses_kl else (None, None)
            exp = make_experience(self.policy, reference, self.critic, rollout, scores, kl_coef=self.kl_coef,
                                  reward_clip=self.reward_clip, reference_context=context, min_response_tokens=1,
                                  keep_shape=True, reduce=sum_over_ranks, estimator=self.estimator,
                                  score_old=not on_policy)
        logged = ("reward", "response_length") + (("kl",) if uses_kl and not on_policy else ())  # kl: old vs reference
        metrics.update({k: exp.metrics[k] for k in logged})
        with self.timer("update"), overlapped_steps():  # DDP: the policy's collective during the critic's backward
            update = ppo_update(self.policy, self.critic, exp, self.ppo,
                                step_policy=lambda loss: self.players["policy"].step(self, loss),
                                step_critic=(lambda loss: self.players["critic"].step(self, loss)) if self.critic else None,
                                generator=self._rng("shuffle"), chunk_tokens=self.chunk_tokens,
                                max_tokens=self.sampling.max_new_tokens, old_from_current=on_policy)
        metrics.update({(k if k.startswith("critic/") else f"policy/{k}"): v for k, v in update.items()})
        self.step_count += 1
        for key, value in {**metrics, **self.timer.metrics()}.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=len(batch),
                     prog_bar=key in ("score", "kl"))

    def _needed_forwards(self, rows: int) -> tuple[bool, bool]:
        """Forwards nothing would read are skipped: the reference's when no KL term is on (``uses_kl`` False);
        the old log-probs when the rewards have no KL and the update is one pass over one minibatch, where they
        equal the current ones (``on_policy``)."""
        uses_kl = self.kl_coef > 0 or self.ppo.kl_loss_coef > 0
        one_pass = self.ppo.epochs == 1 and (self.ppo.minibatch_size or rows) >= rows
        return uses_kl, one_pass and self.kl_coef == 0

    def _rng(self, purpose: str) -> torch.Generator:
        return generator(self.sample_seed, self.step_count, purpose, device=self.device)

    # -- validation ------------------------------------------------------------------------------
    def _eval_step(self, batch: PromptBatch, stage: str) -> None:
        """One sample per prompt (seeded from the prompt, the same every epoch) scored by the reward and by each
        of ``eval_rewards``."""
        rollout = self._rollout(batch, 1, f"{stage}/sample", step=0)
        scores = {"reward": self._score(batch, rollout, 1)}
        scores.update({name: self._score(batch, rollout, 1, reward) for name, reward in self.eval_rewards.items()})
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value.mean(), on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=len(batch), prog_bar=name == "reward")

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, str]]:
        """Greedy responses to the batch's prompts (``lit-align predict``): ``[{prompt, completion}]``."""
        return prompt_predictions(self, batch, self.sampling)

    # -- checkpoints -----------------------------------------------------------------------------
    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen reward models too: rebuilt from their specs, never trained."""
        return super()._rebuilt_keys(keys) | {k for k in keys if k.startswith(("reward.", "eval_rewards."))}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {"step_count": self.step_count,
                             "baseline": self.baseline.state() if self.baseline is not None else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo", {})
        self.step_count = state.get("step_count", 0)
        if state.get("baseline") is not None:
            self.baseline = BaselineTable.from_state(state["baseline"])


def _global_var(x: Tensor) -> Tensor:
    """Variance of ``x`` over every rank's rows (the biased, population form), in one collective."""
    n, total, squares = sums_over_ranks(torch.tensor(float(x.numel()), device=x.device), x.sum(), (x**2).sum())
    return (squares / n - (total / n) ** 2).clamp(min=0.0)
