"""GPO: alignment as a two-player game between an attacker that writes prompts and a defender that answers.

Zheng et al. 2024, "Toward Optimal LLM Alignments Using Two-Player Games" (arXiv 2406.10977); released code:
github.com/ruizheng20/gpo (``gpo/gpo_trainer.py``, launch script ``train_gpo.sh``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lit_align.data.prompts import PromptBatch
from lit_align.engine.distributed import all_gather_objects, any_rank, means_over_ranks, refuse_fsdp1, sums_over_ranks
from lit_align.engine.player import Optimization, Player, configure_players, resolve_optimization
from lit_align.engine.ppo import PPOConfig, ppo_update
from lit_align.engine.seeds import generator, row_generators
from lit_align.engine.step import overlapped_steps
from lit_align.engine.timer import PhaseTimer
from lit_align.game import play
from lit_align.game.archive import PolicyArchive, swap_weights
from lit_align.game.config import (
    GPO_RATES,
    CriticConfig,
    DiversityConfig,
    GameSampling,
    PoolConfig,
    RewardConfig,
    check_reference,
    gpo_adamw,
)
from lit_align.game.critics import build_critics
from lit_align.game.diversity import DiversityHistory
from lit_align.game.evaluation import GameValidation
from lit_align.game.judge import JudgeFactory, SafetyJudge, build_judge
from lit_align.game.schedule import PLAYERS, GameSchedule
from lit_align.game.sharding import shard_game, unsharded_copy
from lit_align.methods.base import RebuiltWeights
from lit_align.models import ModelSpec, ValueModel, build_tokenizer
from lit_align.models.causal_lm import eval_mode
from lit_align.models.players import PlayerPolicies
from lit_align.retrieval import MeanPoolEncoder, build_mean_pool_encoder
from lit_align.rollout.experience import Experience
from lit_align.rollout.sampler import Rollout, SamplingConfig, sample

__all__ = ["AdversarialGameModule", "attacker_reward"]

attacker_reward = play.attacker_reward  # the attacker's sequence reward (re-exported)

class AdversarialGameModule(RebuiltWeights, L.LightningModule):
    """Game-theoretical preference optimisation (GPO, Zheng et al. 2024): an **attacker** LM rewrites seed
    questions into attack prompts, a **defender** LM answers them, a safety **judge** scores each answer, and
    both players are trained by PPO (:func:`lit_align.engine.ppo_update`; per-token KL to their own frozen
    starting policy, GAE, clipped surrogate and value losses). Defender reward: the judge's ``defender_reward``
    (P(safe), a reward model's score). Attacker reward: the judge's ``attacker_reward`` minus ``bleu_weight`` x
    SelfBLEU and ``embedding_weight`` x cosine similarity to its history (:class:`~lit_align.game.DiversityConfig`).

    Each training batch (the order of ``gpo/gpo_trainer.py``): the attacker samples attack prompts; the
    defender answers ``defender_template`` around each; the judge scores (empty attacks are masked out and
    counted); the diversity terms are computed and the prompts join the history; the players
    :class:`~lit_align.game.GameSchedule` names get a PPO update of policy and critic (the other still plays).

    Players: LoRA adapters ``defender`` and ``attacker`` on **one** frozen base when both specs name it
    (``share_base``; references: adapters off), else one model each (references: adapter off or a frozen
    copy). Critics (:class:`~lit_align.game.CriticConfig`): one per player, or shared. Optimisers: one per
    player and critic (``model.optimization.{defender,attacker,critic}``, default AdamW at GPO's rates), each
    stepped by its :class:`~lit_align.engine.Player`. Pool (:class:`~lit_align.game.PoolConfig`): defender-only
    steps may face a past attacker (the averaged policy of the theory is their mixture); each player's running
    mean of weights, a cheap surrogate, goes to ``<default_root_dir>/averaged/<player>.pt``.

    Data parallel (DDP, FSDP2; batch sizes per rank): every row samples from its global index; each rank
    encodes its own attack prompts, gathers every rank's (words and embeddings, global-index order) for the
    history and scores its own rows' diversity terms against them; whitening, token means and the "anything to
    update" decisions are global (a step's counts and logged means each in one collective), validation means
    are synced: N ranks equal one process on the global batch. FSDP2 shards players, references and critics;
    judges and encoder are replicated on every rank (:mod:`lit_align.game.sharding`). FSDP1 is refused.

    Logged: ``train/{asr,history,phase}``, ``train/defender/reward``, ``train/attacker/{reward,judge_reward,
    self_bleu,cos_sim,diversity_penalty,empty,from_pool}``, each player's ``kl`` and PPO metrics, ``train/time/...``;
    validation (:mod:`lit_align.game.evaluation`) feeds :class:`~lit_align.callbacks.GameReport`. Log-probs are
    the untempered model's (as the reference code); PPO runs in eval mode; no repetition penalty (GPO: 1.1).
    Configs: ``configs/game/tiny.yaml`` (CPU), ``configs/game/llama2_7b_*.yaml``.
    """

    def __init__(
        self,
        defender: ModelSpec,
        attacker: ModelSpec | None = None,
        judge: JudgeFactory | SafetyJudge | None = None,
        eval_judge: JudgeFactory | SafetyJudge | None = None,
        critic: CriticConfig | None = None,
        share_base: bool = True,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        schedule: GameSchedule | None = None,
        sampling: GameSampling | None = None,
        rewards: RewardConfig | None = None,
        ppo: PPOConfig | None = None,
        diversity: DiversityConfig | None = None,
        pool: PoolConfig | None = None,
        optimization: dict[str, Optimization] | None = None,
        log_inactive_kl: bool = True,
        num_val_samples: int = 16,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            defender: the defender policy (LoRA recommended; its tokenizer is the module's).
            attacker: the attacker policy (the defender's tokenizer); ``None``: the defender's spec.
            judge: the safety judge by ``class_path`` (:class:`~lit_align.game.RuleJudge`, the toy default;
                :class:`~lit_align.game.LlamaGuard`; :class:`~lit_align.game.Classifier`). Judges read text.
            eval_judge: an independent judge for validation and test; ``None``: ``judge``.
            critic, sampling, rewards, diversity, pool: the blocks of :mod:`lit_align.game.config`
                (``diversity: None``: SelfBLEU at weight 5, no cosine term).
            share_base: put both players' LoRA adapters on one base when their specs name the same base.
            reference: ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto`` (adapter where LoRA).
            schedule: who updates at each step (default: the paper preset, defender 200 then attacker 400).
            ppo: :class:`~lit_align.engine.PPOConfig` (GPO: 1 epoch, the whole batch).
            optimization: an :class:`~lit_align.engine.Optimization` block per ``defender``, ``attacker`` and
                ``critic``; ``None``: AdamW at GPO's rates (5e-7, 3e-6, 1.5e-6), clip 1.0.
            log_inactive_kl: also log the KL of the player that does not learn this step (as the released code).
            num_val_samples: attack / answer pairs kept from each validation for the sample table.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__()
        self.save_hyperparameters(ignore=[n for n, v in (("judge", judge), ("eval_judge", eval_judge))
                                          if isinstance(v, nn.Module)] or None)  # judge modules: not pickled
        self.specs = {"defender": defender, "attacker": attacker or defender}
        self.critic_config = critic or CriticConfig()
        check_reference(reference, self.specs)
        self.automatic_optimization = False
        self.tokenizer = build_tokenizer(defender)
        self.judge_spec, self.eval_judge_spec = judge, eval_judge
        self.share_base, self.reference_mode = share_base, reference
        self.schedule = schedule or GameSchedule(preset="paper")
        self.sampling, self.rewards = sampling or GameSampling(), rewards or RewardConfig()
        self.ppo, self.diversity = ppo or PPOConfig(), diversity or DiversityConfig(embedding_weight=0.0)
        self.sample_seed = self.sampling.seed
        blocks = resolve_optimization(optimization, {p: Optimization(lr=lr) for p, lr in GPO_RATES.items()})
        self.learners = {p: Player(p, blocks[p], default_optimizer=gpo_adamw(1e-6)) for p in PLAYERS}
        critics = ["shared"] if self.critic_config.shared else list(PLAYERS)
        self.learners.update({f"critic/{c}": Player(f"critic/{c}", blocks["critic"], default_optimizer=gpo_adamw(1e-8))
                              for c in critics})
        self.log_inactive_kl, self.num_val_samples, self.chunk_tokens = log_inactive_kl, num_val_samples, chunk_tokens
        self.timer = PhaseTimer()

        # built in configure_model
        self.players: PlayerPolicies | None = None  # both policies (and reference copies, left out of checkpoints)
        self.critics: nn.ModuleDict | None = None  # "shared" or one per player
        self.judge: SafetyJudge | None = None
        self.eval_judge: SafetyJudge | None = None  # None: validation uses ``judge``
        self.encoder: MeanPoolEncoder | None = None

        # game state (all in checkpoints)
        self.step_count = 0  # training batches played (the schedule's clock)
        self.updates = {p: 0 for p in PLAYERS}  # PPO updates per player
        self.dropped_empty = 0  # attack prompts empty after decoding, over the run (every rank's)
        self.history = DiversityHistory(window=self.diversity.history_window)  # the same on every rank
        self.archive = PolicyArchive(pool or PoolConfig())  # attacker snapshots and averaged weights
        self.validation = GameValidation()  # synced means; the report's history and samples
        self.last_step_times: dict[str, float] = {}  # phase -> seconds of the last training step (benchmarks)

    val_history = property(lambda self: self.validation.history, doc="One row per validation run (the report's plot).")
    val_samples = property(lambda self: self.validation.samples, doc="The last validation's attacks and answers.")
    pool = property(lambda self: self.archive.pool, doc="The attacker snapshots (trainable weights by name).")
    averages = property(lambda self: self.archive.averages, doc="Player -> running mean of its trainable weights.")

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.players is not None:
            return
        self.players = PlayerPolicies(self.specs, self.tokenizer, share_base=self.share_base,
                                      reference=self.reference_mode)
        self.critics = build_critics(self.critic_config, self.specs["defender"], self.tokenizer,
                                     [n.removeprefix("critic/") for n in self.learners if "/" in n])
        self.judge = build_judge(self.judge_spec)
        if self.eval_judge_spec is not None:
            self.eval_judge = build_judge(self.eval_judge_spec, key="model.eval_judge")
        if self.diversity.embedding_weight > 0:
            self.encoder = build_mean_pool_encoder(self.diversity.encoder)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (lit_align.game.sharding)
            shard_game(self.players, self.critics, self.device_mesh["data_parallel"], self.trainer.precision)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "AdversarialGameModule")
        if self.sample_seed is None:  # the run's global seed (seed_everything), then fixed and checkpointed
            self.sample_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; references, judges and encoder stay in eval."""
        super().train(mode)
        for module in (*self.players.references.values(), self.judge, self.eval_judge, self.encoder):
            if module is not None:
                module.eval()
        return self

    def _trainable(self, player: str) -> dict[str, nn.Parameter]:
        return self.players.trainable(player)

    def _critic(self, player: str) -> ValueModel:
        return self.critics["shared" if "shared" in self.critics else player]

    def configure_optimizers(self):
        params: dict[str, list[nn.Parameter]] = {p: list(self._trainable(p).values()) for p in PLAYERS}
        for param in (p for group in params.values() for p in group):
            # every adapter trainable until a player acts: loading an FSDP2 (DCP) checkpoint first creates the
            # optimiser states from a zero-gradient step, and peft leaves the inactive adapter frozen
            param.requires_grad_(True)
        params.update({f"critic/{n}": list(c.parameters()) for n, c in self.critics.items()})
        return configure_players(list(self.learners.values()), params)

    # -- acting --------------------------------------------------------------------------------
    def acting(self, player: str):
        """The player's policy, with its adapter active on a shared base (a context manager)."""
        return self.players.acting(player)

    def averaged(self, player: str):
        """Swap the player's averaged weights in for the block (e.g. to evaluate the averaged policy)."""
        if player not in self.averages:
            raise ValueError(f"no averaged weights of the {player} (model.pool.average_policies is off, or no update yet)")
        return swap_weights(self._trainable(player), self.averages[player])

    def _rng(self, purpose: str, *, device: torch.device | None = None) -> torch.Generator:
        """The generator of one draw of this step, named by what it is for (the same on every rank)."""
        return generator(self.sample_seed, self.step_count, purpose, device=device or self.device)

    def _row_rngs(self, purpose: str, index: Tensor, *, step: int | None = None) -> list[torch.Generator]:
        """One generator per row, from the example's global index: what a row samples does not depend on the
        world size or on the rest of its batch."""
        return row_generators(self.sample_seed, self.step_count if step is None else step, purpose,
                              index.tolist(), device=self.device)

    @torch.no_grad()
    def _sample(self, player: str, ids: Tensor, mask: Tensor, rngs: list[torch.Generator] | None,
                config: SamplingConfig | None = None) -> Rollout:
        with self.players.acting(player) as policy:
            return sample(policy, ids, mask, config or self.sampling.player(player), generator=rngs,
                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)

    def _inputs(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return play.defender_inputs(self.tokenizer, self.sampling.defender_template, prompts, self.device)

    def _kl(self, player: str, rollout: Rollout) -> Tensor:
        return play.response_kl(self.players, player, rollout, self.chunk_tokens)

    def _play(self, batch: PromptBatch, rng: Callable[[str], list[torch.Generator]],
              snapshot: Mapping[str, Tensor] | None = None, judge: SafetyJudge | None = None) -> play.Round:
        """One round on a batch: attack (with a pool ``snapshot`` swapped in, if any), answer, judge. The
        defender answers every row, empty attacks included, so every rank runs the same forwards."""
        swap = swap_weights(self._trainable("attacker"), snapshot) if snapshot is not None else nullcontext()
        with self.timer("attacker/generate"), swap:
            attack = self._sample("attacker", batch.attacker_ids, batch.attacker_mask, rng("attacker/sample"))
        texts = play.decode(self.tokenizer, attack)
        keep = torch.tensor([bool(t) for t in texts], device=self.device)  # (B,)
        with self.timer("defender/generate"):
            answer = self._sample("defender", *self._inputs(texts), rng("defender/sample"))
        responses = play.decode(self.tokenizer, answer)
        with self.timer("judge"):
            scores = play.judge_kept(judge or self.judge, texts, responses, keep)
        return play.Round(play.masked(attack, keep), play.masked(answer, keep), texts, responses, keep, scores)

    # -- one step ------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        active = self.schedule.active(self.step_count)
        self.timer.reset()
        snapshot = self.archive.draw(self._rng("pool", device=torch.device("cpu"))) if active == ("defender",) else None
        game = self._play(batch, lambda purpose: self._row_rngs(purpose, batch.index), snapshot)
        keep = game.keep
        rollouts = {"defender": game.answer, "attacker": game.attack}
        # the KL of an inactive player, logged when some row of some rank has >= 2 response tokens
        watched = {p: (rollouts[p].response_lengths >= 2).float() for p in PLAYERS
                   if p not in active and self.log_inactive_kl}
        empty, kept, *scored = sums_over_ranks((~keep).sum(), keep.sum(), *(w.sum() for w in watched.values()))
        self.dropped_empty += int(empty)
        metrics: dict[str, Tensor | float] = {"phase": {("defender",): 0.0, ("attacker",): 1.0}.get(active, 2.0),
                                              "attacker/empty": float(empty),
                                              "attacker/from_pool": float(snapshot is not None)}
        if kept > 0:  # decided alike on every rank: the same forwards and steps everywhere
            with self.timer("diversity"):  # means: (values, weight) pairs, reduced together at the end
                rewards, means = play.score_round(game, self.history, self.encoder, batch.index, self.diversity,
                                                  all_gather_objects)
            metrics["history"] = float(len(self.history))
            experiences = {}
            for player in active:  # experience for every active player first: simultaneous moves see the same game
                with self.timer(f"{player}/experience"):
                    experiences[player] = play.experience(self.players, player, self._critic(player), rollouts[player],
                                                          rewards[player], self.rewards)
            for (player, weight), count in zip(watched.items(), scored):
                if count > 0:
                    with self.timer(f"{player}/kl"):
                        means[f"{player}/kl"] = (self._kl(player, rollouts[player]), weight)
            for player, exp in experiences.items():
                metrics.update({f"{player}/kl": exp.metrics["kl"],
                                f"{player}/dropped": exp.metrics["dropped"] - float((~keep).sum())})
                if any_rank(bool(exp.action_mask.any())):  # some row of some rank has an action
                    with self.timer(f"{player}/update"):
                        metrics.update({f"{player}/{k}": v for k, v in self._update(player, exp).items()})
            metrics.update(means_over_ranks(means))
        self.step_count += 1
        self.last_step_times = dict(self.timer.totals)
        for key, value in {**metrics, **self.timer.metrics()}.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=len(batch),
                     prog_bar=key in ("asr", "defender/reward"))

    def _update(self, player: str, exp: Experience) -> dict[str, Tensor]:
        """PPO over the player's experience: its policy, then its critic, each stepped by its Player (under DDP the
        policy's gradient collective runs during the critic's backward: :func:`~lit_align.engine.overlapped_steps`)."""
        critic = self._critic(player)
        critic_player = self.learners[f"critic/{'shared' if 'shared' in self.critics else player}"]
        # eval mode, as when the experience was made: with dropout the first ratio would not be 1, and the
        # dropout draws (from the global RNG) would make a resumed run differ
        with self.players.acting(player) as policy, eval_mode(policy, critic), overlapped_steps():
            metrics = ppo_update(policy, critic, exp, self.ppo,
                                 step_policy=lambda loss: self.learners[player].step(self, loss),
                                 step_critic=lambda loss: critic_player.step(self, loss),
                                 generator=self._rng(f"{player}/shuffle", device=torch.device("cpu")),
                                 chunk_tokens=self.chunk_tokens)
        self.updates[player] += 1
        self.archive.record(player, self._trainable(player), self.updates[player])
        return metrics

    # -- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """The defender on the raw seeds and on the attacker's prompts; per-player KL; diversity at epoch end.
        Each row samples from its global index at a fixed step: the same draws every epoch, on any world size."""
        rng = lambda purpose: self._row_rngs(f"val/{purpose}", batch.index, step=0)  # noqa: E731
        seed_answer = self._sample("defender", *self._inputs(list(batch.seeds)), rng("seed_answer"))
        judge = self.eval_judge or self.judge
        seed_scores = judge.score(list(batch.seeds), play.decode(self.tokenizer, seed_answer)).to(self.device)
        game = self._play(batch, rng, judge=judge)
        self.validation.add(batch.index.tolist(), list(batch.seeds), seed_scores, game,
                            {p: self._kl(p, game.attack if p == "attacker" else game.answer) for p in PLAYERS})

    def on_validation_epoch_start(self) -> None:
        self.validation.start()

    def on_validation_epoch_end(self) -> None:
        stage = "test" if self.trainer.testing else "val"
        row = self.validation.finish(self.step_count, all_gather_objects, self.encoder, self.num_val_samples,
                                     record=stage == "val")
        for key, value in row.items():
            self.log(f"{stage}/{key}", value, sync_dist=True)  # the same on every rank: averaging keeps it

    # test: as validation, on the test seeds (``test/...``)
    test_step, on_test_epoch_start, on_test_epoch_end = validation_step, on_validation_epoch_start, on_validation_epoch_end

    @torch.no_grad()
    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, str]]:
        """The defender's greedy answers to the raw seeds (``lit-align predict``): ``[{prompt, completion}]``."""
        greedy = SamplingConfig(max_new_tokens=self.sampling.defender_max_new_tokens, do_sample=False)
        out = self._sample("defender", *self._inputs(list(batch.seeds)), None, greedy)
        return [{"prompt": seed, "completion": answer} for seed, answer in zip(batch.seeds, play.decode(self.tokenizer, out))]

    def export_policy(self) -> nn.Module:
        """The model :class:`~lit_align.callbacks.HFExport` writes: the defender (on a shared base, a copy with
        the attacker's adapter removed and the defender's merged in). Sharded, every rank gathers the players'
        weights (a collective) into an unsharded copy built from the specs."""
        if self.device_mesh is None:
            return self.players.export("defender")
        return unsharded_copy(self.players, lambda: PlayerPolicies(
            self.specs, self.tokenizer, share_base=self.share_base, reference=self.reference_mode)).export("defender")

    # -- checkpoints ---------------------------------------------------------------------------
    _FROZEN_PREFIXES = ("players.references.", "judge.", "eval_judge.", "encoder.")

    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen weights (references, the base under the LoRA adapters, judge and encoder): rebuilt
        from their specs."""
        frozen = self.players.frozen_keys("players.") if self.players is not None else set()
        return {k for k in keys if k.startswith(self._FROZEN_PREFIXES) or k in frozen}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank calls this; under FSDP2 Lightning writes rank 0's copy of this entry (the same everywhere)
        checkpoint["game"] = {"step_count": self.step_count, "sample_seed": self.sample_seed,
                              "updates": dict(self.updates), "dropped_empty": self.dropped_empty,
                              "history": self.history.state_dict(), **self.archive.state_dict(),
                              "val_history": self.val_history, "val_samples": self.val_samples}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        game = checkpoint.get("game")
        if game is None:
            return
        self.step_count, self.updates = game["step_count"], dict(game["updates"])
        self.sample_seed, self.dropped_empty = game["sample_seed"], game["dropped_empty"]
        self.history.load_state_dict(game["history"])
        self.archive.load_state_dict(game, self._trainable if self.players is not None else None)
        self.validation.history, self.validation.samples = game["val_history"], game["val_samples"]

    def on_train_end(self) -> None:
        self.archive.save_averages(Path(self.trainer.default_root_dir) / "averaged", self.trainer.is_global_zero)
