"""ACC-Debate / ACC-Collab: an actor-critic debate team trained by DPO on partial-trajectory rewards.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab: An Actor-Critic Approach to Multi-Agent LLM Collaboration"
(arXiv 2411.00053, ICLR 2025); released code: github.com/LlenRotse/ACC-Collab.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_align.data.qa import QABatch, QAExample
from lit_align.debate.config import DebateSettings, DPOSettings, GenerateSettings, acc_adamw, coerce
from lit_align.debate.dpo import PairScorer, dpo_order
from lit_align.debate.draws import RowSeeds
from lit_align.debate.generate import Stage, gather_pairs, phase_questions, step_questions
from lit_align.debate.phase import PhaseState
from lit_align.debate.protocol import DebateTranscript, Draw, run_debate, transcript_row
from lit_align.debate.rules import PairRule, PaperRule, strategy
from lit_align.debate.sharding import assign_full, full_tensor, global_means, rank_share
from lit_align.debate.team import build_team, configure_team, export_player, initial_agent
from lit_align.engine import Optimization, PhaseTimer, Player, derive_seed, resolve_optimization
from lit_align.engine.distributed import all_gather_objects, global_share, rank_and_world, refuse_fsdp1
from lit_align.errors import ConfigError
from lit_align.losses.preference import dpo_loss
from lit_align.methods.base import RebuiltWeights
from lit_align.metrics.debate import DebateAccuracy
from lit_align.models import ModelSpec, build_tokenizer
from lit_align.models.causal_lm import eval_mode
from lit_align.models.players import PlayerPolicies

__all__ = ["DebateModule"]

PLAYERS = ("actor", "critic")
_SAVED = ("step_count", "phase", "sample_seed", "pair_counts", "val_history", "val_transcripts")  # with the PhaseState


class DebateModule(RebuiltWeights, L.LightningModule):
    """ACC-Collab (Estornell et al. 2024): an **actor** that answers with a brief justification and a **critic**
    that gives feedback, trained by iterative best response with DPO on pairs of guided (off-policy) and natural
    responses valued by one-step rollouts.

    The run is ``iterations`` x ``order`` **phases** (1 iteration: ACC-Collab; 2: ACC-Collab+), each one
    player's, in two stages paced by the training batches: **generate** (debates, guided responses, rewards
    and the pairs of ``pair_rule`` on a batch of the phase's questions per rank and step:
    :class:`~lit_align.debate.generate.Stage`; the DPO prompt is always the natural one), then **train**
    (``dpo.epochs`` passes of DPO on that player only, against itself as the run starts; with
    ``generate.dpo_val_questions``, the validation loss every ``dpo.eval_every`` steps stops the phase after
    ``dpo.patience`` evaluations without a new best and restores the best weights, as the released runs did).
    The module stops the trainer after the last phase (``trainer.max_epochs: -1``); generate stages step no
    optimiser, so checkpoint them with :class:`~lit_align.callbacks.BatchCheckpoint`. Every text is drawn
    from its question's own seed (:class:`~lit_align.debate.draws.RowSeeds`): a resumed run is the
    uninterrupted one.

    **Data parallel** (DDP or FSDP2; batch sizes per rank): each rank debates its share of a step's questions
    and the pairs are gathered, so the :class:`PhaseState` is the same on every rank; a DPO step splits its
    ``W x dpo.batch_size`` pairs by rank, and reference and validation log-probs are scored in shares and
    gathered, so the early stop is decided on the same numbers everywhere (:mod:`~lit_align.debate.sharding`).
    Under FSDP2 every model is sharded from rank 0's weights (:func:`~lit_align.debate.team.build_team`);
    FSDP1 is refused.

    Validation logs ``val/accuracy/round_<t>``, ``val/accuracy`` (the last round), ``val/improvement``,
    ``val/gain``, ``val/right_to_wrong`` and ``val/wrong_to_right``; :attr:`val_history` and
    :attr:`val_transcripts` feed :class:`~lit_align.callbacks.DebateReport`.
    """

    def __init__(
        self,
        actor: ModelSpec,
        critic: ModelSpec | None = None,
        share_base: bool = True,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        debate: DebateSettings | None = None,
        generate: GenerateSettings | None = None,
        pair_rule: PairRule | None = None,
        dpo: DPOSettings | None = None,
        optimization: dict[str, Optimization] | None = None,
        iterations: int = 1,
        order: tuple[str, str] = ("actor", "critic"),
        sample_seed: int | None = None,
        num_val_transcripts: int = 8,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            actor: the actor's model (LoRA recommended; its tokenizer is the module's).
            critic: the critic's model; ``None``: the actor's spec (a second adapter on the same base).
            share_base: put both players' adapters on one base when their specs name the same base.
            reference: the starting checkpoint (the untrained team): ``adapter`` (LoRA off), ``copy`` or ``auto``.
            debate, generate, dpo: the settings (:mod:`lit_align.debate.config`: documented field by field).
            pair_rule: a :class:`~lit_align.debate.rules.PairRule` by ``class_path`` (``None``: ``PaperRule()``).
            optimization: an :class:`~lit_align.engine.Optimization` block per player (``actor``, ``critic``);
                ``None``: AdamW (weight decay 0.1) at 1.41e-5, clip 1.0, for each (the released code).
            iterations: outer iterations (1: ACC-Collab, 2: ACC-Collab+).
            order: which player trains first in an iteration (actor first: the paper's Fig. 5).
            sample_seed: seed of all sampling (``None``: the run's global seed, kept in checkpoints).
            num_val_transcripts: debates kept from each validation for the transcript table.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__()
        self.save_hyperparameters()
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"model.iterations must be an int >= 1, got {iterations!r}")
        if sorted(order) != sorted(PLAYERS):
            raise ConfigError(f"model.order must name 'actor' and 'critic' once each, got {order!r}")
        self.specs = {"actor": actor, "critic": critic or actor}
        self.share_base, self.reference_mode = share_base, reference
        self.debate_cfg = coerce(debate, DebateSettings, "model.debate")
        self.generate_cfg = coerce(generate, GenerateSettings, "model.generate")
        self.dpo_cfg = coerce(dpo, DPOSettings, "model.dpo")
        self.pair_rule = PaperRule() if pair_rule is None else strategy(pair_rule, PairRule, "model.pair_rule")
        defaults = {p: Optimization(lr=1.41e-5) for p in PLAYERS}
        self.players_opt = {p: Player(p, o, acc_adamw) for p, o in resolve_optimization(optimization, defaults).items()}
        self.automatic_optimization = False  # one optimiser per player, stepped by the phase's player only
        self.tokenizer = build_tokenizer(actor)
        self.scorer = PairScorer(self.tokenizer, self.dpo_cfg, self.debate_cfg, chunk_tokens)
        self.phases = [(i, p) for i in range(iterations) for p in order]
        self.sample_seed, self.num_val_transcripts = sample_seed, num_val_transcripts
        self.players: PlayerPolicies | None = None
        self._questions: tuple[list[QAExample], int] | None = None  # the phases' questions, how many train
        # pipeline state (all in checkpoints)
        self.step_count = 0  # training steps taken (seeds the DPO order)
        self.timer = PhaseTimer()  # time/<phase> of the current step
        self.phase = 0  # index into self.phases
        self.phase_state = PhaseState()  # the current phase's stage, pairs, reference log-probs, DPO order and best
        self.pair_counts: list[int] = []  # pairs made by each finished generate stage
        self.val_history: list[dict[str, float]] = []
        self.val_transcripts: list[dict[str, Any]] = []
        self._val_accuracy = DebateAccuracy(self.debate_cfg.rounds)
        self._val_buffer: list[DebateTranscript] = []
        self.last_step_metrics: dict[str, float] = {}  # what the last training step logged (benchmarks)

    @property
    def rounds(self) -> int:
        return self.debate_cfg.rounds

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.players is None:
            mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
            self.players = build_team(self.specs, self.tokenizer, share_base=self.share_base,
                                      reference=self.reference_mode, mesh=mesh, rank=self.global_rank,
                                      device=self.trainer.strategy.root_device if mesh is not None else None,
                                      bf16=mesh is not None and str(self.trainer.precision).startswith("bf16"))

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "DebateModule")
        if self.sample_seed is None:  # rank 0's: every rank draws the same
            self.sample_seed = all_gather_objects(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31)))[0]

    def configure_optimizers(self):
        return configure_team(self.players, [self.players_opt[p] for p in PLAYERS])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.players is not None:
            for module in self.players.references.values():
                module.eval()
        return self

    # -- agents --------------------------------------------------------------------------------
    def agent(self, player: str):
        """The protocol's agent for ``player``: a context factory activating its adapter."""
        return lambda: self.players.acting(player)

    def initial_agent(self, player: str):
        """The protocol's agent for ``player`` as it started the run (:func:`~lit_align.debate.team.initial_agent`)."""
        return initial_agent(self.players, player)

    def debate(self, examples: list[QAExample], generator: Draw, actor=None, critic=None) -> list[DebateTranscript]:
        """A debate of ``debate.rounds`` rounds on ``examples`` with the module's settings; the current players
        unless ``actor`` / ``critic`` agents are given."""
        cfg = self.debate_cfg
        return run_debate(actor or self.agent("actor"), critic or self.agent("critic"), self.tokenizer, examples,
                          cfg.rounds, cfg.sampling("actor"), critic_sampling=cfg.sampling("critic"),
                          generator=generator, max_tries=cfg.max_tries, chat_template=cfg.chat_template)

    def _seeds(self, purpose: str, step: int = 0) -> RowSeeds:
        """Per-question draws (``generate`` per phase, ``val``, ``predict``): independent of batch and ranks."""
        return RowSeeds(self.sample_seed, step, purpose)

    def _rng(self, purpose: str, step: int | None = None) -> random.Random:
        """A run-wide draw (``order``, ``questions``), the same on every rank."""
        return random.Random(derive_seed(self.sample_seed, self.step_count if step is None else step, purpose))

    @property
    def current(self) -> tuple[int, str] | None:
        """(iteration, player) of the current phase; ``None`` when every phase is done."""
        return self.phases[self.phase] if self.phase < len(self.phases) else None

    # -- generate ------------------------------------------------------------------------------
    def _phase_questions(self) -> tuple[list[QAExample], int]:
        if self._questions is None:  # derived from the data and the seed: built once, never checkpointed
            seed = derive_seed(self.sample_seed, 0, "questions")
            self._questions = phase_questions(self.trainer.datamodule.examples("train"), seed, self.generate_cfg)
        return self._questions

    def _generate_step(self, player: str, batch_size: int) -> dict[str, float]:
        """One generate step: this rank's share of the step's ``W x batch_size`` questions (training ones
        first, then DPO-validation ones), pairs gathered from every rank."""
        (questions, n_train), state = self._phase_questions(), self.phase_state
        chunk, validating = step_questions(questions, n_train, state.questions_done, batch_size * rank_and_world()[1])
        positions, real = rank_share(len(chunk))
        actor = self.agent("actor")
        if player == "critic" and self.generate_cfg.critic_rollout_actor == "initial":
            actor = self.initial_agent("actor")  # the released scripts: the critic's data comes from the starting actor
        stage = Stage(self.tokenizer, self.debate_cfg, self.generate_cfg, self.pair_rule, actor, self.agent("critic"),
                      player, self.agent(player), self.timer)
        with self.timer("generate"):
            pairs, stats = stage.run([chunk[i] for i in positions], real, self._seeds("generate", step=self.phase))
        pairs, stats = gather_pairs(pairs, stats, chunk)
        (state.val_pairs if validating else state.pairs).extend(pairs)
        state.questions_done += len(chunk)
        if state.questions_done >= len(questions):
            with self.timer("reference"):
                self._start_training(player)
        return {f"{player}/new_pairs": float(len(pairs)), f"{player}/pairs": float(len(state.pairs)),
                f"{player}/val_pairs": float(len(state.val_pairs)),
                f"{player}/natural_accuracy": stats["natural_correct"] / len(chunk) / self.generate_cfg.trials,
                "rollouts": stats["rollouts"]}

    # -- DPO -----------------------------------------------------------------------------------
    def _scored(self, player: str, pairs) -> Tensor:
        with self.players.acting(player) as policy:
            return self.scorer.scored(policy, pairs)

    def _start_training(self, player: str) -> None:
        """End of a generate stage: cap the pairs, score the reference once (the player as this DPO run starts:
        in iteration 2, the iteration-1 player), fix the DPO order."""
        rng, state, cfg = self._rng("order"), self.phase_state, self.generate_cfg
        state.cap(cfg.max_pairs, cfg.max_val_pairs, rng)
        self.pair_counts.append(len(state.pairs))
        if not state.pairs:
            rank_zero_warn(f"phase {self.phase} ({player}): no preference pair passed the rule; the phase trains "
                           "nothing (loosen model.pair_rule, or raise generate.trials, generate.k or the questions)")
            self._next_phase()
            return
        if cfg.dpo_val_questions and not state.val_pairs:
            rank_zero_warn(f"phase {self.phase} ({player}): no DPO validation pair passed the rule; the phase "
                           "trains all its epochs without early stopping (raise model.generate.dpo_val_questions)")
        state.ref_logps = self._scored(player, state.pairs)
        state.val_ref_logps = self._scored(player, state.val_pairs) if state.val_pairs else None
        state.best_val_loss, state.best_weights, state.bad_evals = None, None, 0
        state.order = dpo_order(len(state.pairs), self.dpo_cfg.epochs, self.dpo_cfg.batch_size * rank_and_world()[1], rng)
        state.position, state.stage = 0, "train"

    def _next_phase(self) -> None:
        self.phase += 1
        self.phase_state = PhaseState(stage="generate" if self.phase < len(self.phases) else "done")

    def _fresh_optimizer(self, player: str) -> None:
        """A fresh optimiser state for a DPO run (each with ``dpo.reset_optimizer``, else the player's first), cleared
        at its first step: a DCP checkpoint saved before initialises Adam with a zero-gradient step."""
        if self.phase_state.position == 0 and (self.dpo_cfg.reset_optimizer or self.current[0] == 0):
            optimizer = self.optimizers()[self.players_opt[player].optimizer_index]
            getattr(optimizer, "optimizer", optimizer).state.clear()

    def _dpo_loss(self, logps: Tensor, ref: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=self.dpo_cfg.beta,
                        label_smoothing=self.dpo_cfg.label_smoothing)

    def _dpo_step(self, player: str) -> dict[str, Tensor]:
        """One optimiser step on this rank's share of the global minibatch, its mean loss scaled by its share of
        the pairs (:func:`~lit_align.engine.distributed.global_share`: a rank with none runs a padding row at
        weight 0); the logged numbers are the minibatch's means, the same on every rank."""
        self._fresh_optimizer(player)
        state = self.phase_state
        rows = state.order[state.position]
        state.position += 1
        positions, real = rank_share(len(rows))
        mine = [rows[i] for i in positions]
        ref = state.ref_logps[mine].to(self.device)
        with self.players.acting(player) as policy, eval_mode(policy):  # no dropout: the first loss is log 2
            logps = self.scorer.logps(policy, [state.pairs[i] for i in mine])
            n = max(real, 1)
            loss, metrics = self._dpo_loss(logps[:n], ref[:n])
            self.players_opt[player].step(self, loss * global_share(real).to(loss.device))
        out = global_means({"loss": loss.detach(), **metrics}, real, len(rows), self.device)
        last = state.position >= len(state.order)
        if state.val_pairs and (state.position % self.dpo_cfg.eval_every == 0 or last):
            out.update(self._dpo_validation(player))
            last = last or (self.dpo_cfg.patience is not None and state.bad_evals >= self.dpo_cfg.patience)
        if last:
            if self.dpo_cfg.restore_best and state.best_weights is not None:
                for name, param in self.players.trainable(player).items():
                    assign_full(param, state.best_weights[name])
            out["dpo_steps"] = torch.tensor(float(state.position))
            self._next_phase()
        return out

    @torch.no_grad()
    def _dpo_validation(self, player: str) -> dict[str, Tensor]:
        """DPO loss on the validation pairs (log-probs gathered from every rank, so the loss, the best and the
        early stop are the same everywhere); keeps the best weights whole (gathered shards under FSDP2: rank 0
        writes them into checkpoints) and counts the evaluations since."""
        state = self.phase_state
        loss, metrics = self._dpo_loss(self._scored(player, state.val_pairs), state.val_ref_logps)
        if state.best_val_loss is None or float(loss) < state.best_val_loss:
            state.best_val_loss, state.bad_evals = float(loss), 0
            state.best_weights = {n: full_tensor(p).cpu() for n, p in self.players.trainable(player).items()}
        else:
            state.bad_evals += 1
        return {"val_loss": loss, "val_reward_accuracy": metrics["rewards/accuracies"],
                "best_val_loss": torch.tensor(state.best_val_loss)}

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, batch: QABatch, batch_idx: int) -> None:
        if self.phase_state.stage == "done":
            self.trainer.should_stop = True
            return
        iteration, player = self.current
        self.timer.reset()
        metrics: dict[str, Tensor | float] = {"phase": float(self.phase), "iteration": float(iteration)}
        if self.phase_state.stage == "generate":  # the batch only paces the stage (the phase's questions are fixed)
            metrics.update(self._generate_step(player, len(batch)))
        else:
            with self.timer("dpo"):
                metrics.update({f"{player}/{k}": v for k, v in self._dpo_step(player).items()})
        metrics.update(self.timer.metrics())
        self.step_count += 1
        self.last_step_metrics = {k: float(v) for k, v in metrics.items()}
        if self.phase_state.stage == "done":
            self.trainer.should_stop = True
        for key, value in metrics.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=len(batch),
                     prog_bar=key.endswith("/loss"))

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: QABatch, batch_idx: int) -> None:
        """A seeded debate on the validation questions: accuracy after each round."""
        transcripts = self.debate(list(batch.examples), self._seeds("val"))
        correct = torch.tensor([tr.correct_by_round for tr in transcripts], dtype=torch.bool, device=self.device)
        self._val_accuracy.update(correct)
        self._val_buffer.extend(transcripts[: max(0, self.num_val_transcripts - len(self._val_buffer))])

    def test_step(self, batch: QABatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        with torch.inference_mode(False):  # states made outside inference mode stay usable by fit's validation
            self._val_accuracy = DebateAccuracy(self.rounds).to(self.device)
        self._val_buffer = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _end_eval(self, stage: str) -> None:
        if self._val_accuracy.update_count == 0:
            return
        values = {k: float(v) for k, v in self._val_accuracy.compute().items()}  # synced over the ranks
        row = {f"accuracy/{k}" if k.startswith("round_") else k: v for k, v in values.items()}
        row["accuracy"] = values[f"round_{self.rounds - 1}"]
        for key, value in row.items():  # already global: sync_dist averages equal numbers (and tells Lightning)
            self.log(f"{stage}/{key}", value, sync_dist=True, prog_bar=key == "accuracy")
        if stage == "val":
            label = "done" if self.current is None else f"{self.current[1]} {self.phase_state.stage}"
            if self.val_history and self.val_history[-1]["step"] == self.step_count:
                self.val_history.pop()
            self.val_history.append({"step": float(self.step_count), "phase": float(self.phase), **row, "label": label})
            rows = all_gather_objects([transcript_row(tr) for tr in self._val_buffer])  # the same on every rank
            self.val_transcripts = [row for rank in rows for row in rank][: self.num_val_transcripts]

    def predict_step(self, batch: QABatch, batch_idx: int) -> list[dict[str, Any]]:
        """One debate per question (``lit-align predict``): ``{prompt: question, completion: the actor's
        final response}``, as every method's predictions."""
        transcripts = self.debate(list(batch.examples), self._seeds("predict"))
        return [{"prompt": tr.example.question, "completion": tr.turns[-1].actor_response} for tr in transcripts]

    def export_policy(self) -> nn.Module:
        """What :class:`~lit_align.callbacks.HFExport` writes: the actor (the team's answerer)."""
        return export_player(self.players, "actor", self.specs, self.tokenizer, self.global_rank)

    # -- checkpoints ---------------------------------------------------------------------------
    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen weights (reference copies, the base under the LoRA adapters): rebuilt from the specs."""
        return self.players.frozen_keys("players.") & set(keys) if self.players is not None else set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["debate"] = {**{k: getattr(self, k) for k in _SAVED}, "state": self.phase_state.state_dict()}

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        if (state := checkpoint.get("debate")) is not None:
            for key in _SAVED:
                setattr(self, key, state[key])
            self.phase_state = PhaseState.from_state_dict(state.get("state", state))  # older checkpoints: flat keys
