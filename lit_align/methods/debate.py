"""ACC-Debate / ACC-Collab: an actor-critic debate team trained by DPO on partial-trajectory rewards.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab: An Actor-Critic Approach to Multi-Agent LLM Collaboration"
(arXiv 2411.00053, ICLR 2025); released code: github.com/LlenRotse/ACC-Collab.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_align.data.qa import QABatch, QAExample
from lit_align.data.tokenize import _collate_sequences
from lit_align.debate.draws import RowSeeds
from lit_align.debate.pairs import PreferencePair, build_pairs, code_round_ranges, make_candidates
from lit_align.debate.phase import PhaseState
from lit_align.debate.protocol import DebateTranscript, Draw, format_prompt, run_debate
from lit_align.debate.rewards import RewardState, guided_responses, rollout_reward
from lit_align.debate.sharding import assign_full, full_tensor, gather_share, rank_share
from lit_align.engine import PhaseTimer, derive_seed, player_step
from lit_align.engine.distributed import all_gather_objects, global_share, rank_and_world, refuse_fsdp1, sum_over_ranks
from lit_align.errors import ConfigError, DataError
from lit_align.losses.preference import dpo_loss
from lit_align.methods.base import RebuiltWeights
from lit_align.metrics.debate import DebateAccuracy
from lit_align.models import ModelSpec, build_tokenizer
from lit_align.models.causal_lm import eval_mode
from lit_align.models.fsdp import fsdp2_parallelize, load_from_rank0
from lit_align.models.players import PlayerPolicies
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["DebateModule"]

PLAYERS = ("actor", "critic")


class DebateModule(RebuiltWeights, L.LightningModule):
    """ACC-Collab (Estornell et al. 2024): a two-agent debate team, an **actor** that answers with a brief
    justification and a **critic** that gives feedback, trained by iterative best response with DPO on
    preference pairs built from guided (off-policy) responses and one-step-rollout rewards.

    The run is a sequence of **phases**, ``iterations`` x ``order`` (1 iteration: ACC-Collab; 2:
    ACC-Collab+; actor first by default). Each phase belongs to one player and has two stages, driven
    by the training batches of a :class:`~lit_align.data.qa.QADataModule`:

    1. **generate** (one batch of questions per step, until ``questions_per_phase`` questions): for
       every question and each of ``trials`` trials a natural debate of ``rounds`` rounds with the
       current players (:func:`~lit_align.debate.protocol.run_debate`, batched over the questions);
       for every round used, two guided responses of the phase's player, toward the gold answer and
       toward a wrong one (a uniformly random wrong option, re-drawn per sample), from the natural
       context of that round; their rewards, the probability that the debate ends correct when
       continued from them, by ``k`` one-step rollouts (:func:`~lit_align.debate.rewards.rollout_reward`);
       and the pairs, under ``pair_rule``:

       * ``paper`` (default): Δy = r(z_y) - r(z) >= ``epsilon`` gives (z_y ≻ z), else Δ!y = r(z) - r(z_!y)
         >= ``epsilon`` gives (z ≻ z_!y) (the paper's ε value was not found: a config field);
       * ``code``: (z_y ≻ z_!y) iff q(z_y) - q(z_!y) >= ``code_threshold`` (0.6), with q the rollout
         reward, or for the actor its immediate correctness (``actor_quality: correctness``, as released).

       The DPO prompt is always the **natural** prompt of the round (never the guided one; checked).
    2. **train**: ``dpo_epochs`` passes of DPO (sigmoid loss, ``beta``) over the phase's pairs in
       minibatches of ``dpo_batch_size``, one optimiser step per training step, on that player only; the
       reference is the player as it starts this DPO run (the frozen starting checkpoint of the paper's
       DPO loss; in iteration 2, the iteration-1 player), its log-probs computed once when the stage
       starts, so no frozen copy is kept. The question batches are not used by this stage; in the generate stage they only pace it: every phase
       generates on the same questions (the first ``questions_per_phase`` of a seeded permutation of the
       training split).

    **DPO validation and early stopping** (the released DPO runs: 6000 training and 1000 validation
    questions, evaluation every 50 steps, patience 5, best checkpoint restored). With
    ``dpo_val_questions`` > 0 the phase also generates on the next ``dpo_val_questions`` questions of the
    permutation (disjoint from the training ones); their pairs, capped at ``max_val_pairs``, are never
    trained on. Every ``dpo_eval_every`` optimiser steps and after the last one, the DPO loss on them is
    logged (``train/<player>/val_loss``); after ``dpo_patience`` evaluations without a new best the phase
    stops early, and with ``restore_best`` the player ends the phase with its weights at the best
    evaluation: a guard against DPO over-optimisation (chosen and rejected log-probs both collapsing,
    degenerate text).

    The critic's data comes from the **current** actor (``critic_rollout_actor: current``, the paper's
    best response: after an actor-first phase, the updated actor) or from the starting checkpoint
    (``initial``, the released scripts: the base with adapters off, for the critic phase's natural
    debates and rollouts). When the last phase has trained, the module stops the trainer, so set
    ``trainer.max_epochs`` high enough (or -1) and leave ``max_steps`` at -1.

    Rewards of a last-round critic response are the correctness of one more actor answer (a round past
    the debate), as in the released code. Lightning counts optimiser steps only, so ``global_step`` and
    ``ModelCheckpoint(every_n_train_steps=...)`` do not advance in generate stages: add
    :class:`~lit_align.callbacks.BatchCheckpoint`, which counts batches, to checkpoint those too.

    Players are LoRA adapters on one base when both specs name it (:class:`~lit_align.models.PlayerPolicies`).
    Checkpoints hold both players, both optimisers, the phase, the stage and its position, the pair
    buffer and its reference log-probs, and the sampling seed; every sampled text is drawn per question
    (:class:`~lit_align.debate.draws.RowSeeds`: ``(sample_seed, phase, generate/trial<k>/<call>, question
    index)``) and the DPO order by ``(sample_seed, step, order)``, so a resumed run is the uninterrupted one.

    **Data parallel** (DDP, or FSDP2 via ``ModelParallelStrategy``; ``callbacks/ddp_cpu.yaml``,
    ``callbacks/fsdp2_cpu.yaml``): batch sizes are per rank. A generate step takes ``W x batch_size``
    questions; each rank debates its share (:mod:`lit_align.debate.sharding`, padded with a dropped row so
    every rank runs the same forwards) and the pairs are gathered in one order, so the pair buffers, the
    DPO order and the whole phase state are the same on every rank. A DPO step takes ``W x
    dpo_batch_size`` pairs, each rank its share, its loss scaled by its share of the pairs; reference and
    validation log-probs are scored in shares and gathered, so the DPO validation loss, the best weights
    and the early stop are decided on the same numbers everywhere. Under FSDP2 every model (the shared
    base with both adapters, or each player's model, and the frozen copies) is sharded layer by layer,
    the adapters with their layers, and filled from rank 0's copy; FSDP1 is refused.

    Validation runs a debate of ``rounds`` rounds on the validation questions (seeded draws, the same
    each time) and logs ``val/accuracy/round_<t>``, ``val/accuracy`` (the last round: the team's
    answer), ``val/improvement`` ((acc_last - acc_0) / acc_0), ``val/gain``, ``val/right_to_wrong``
    and ``val/wrong_to_right``; :attr:`val_history` and :attr:`val_transcripts` feed
    :class:`~lit_align.callbacks.DebateReport` (accuracy by round per validation, sample transcripts).
    """

    def __init__(
        self,
        actor: ModelSpec,
        critic: ModelSpec | None = None,
        share_base: bool = True,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        rounds: int = 5,
        trials: int = 5,
        k: int = 10,
        pair_rule: Literal["paper", "code"] = "paper",
        epsilon: float = 0.5,
        code_threshold: float = 0.6,
        actor_quality: Literal["rollout", "correctness"] = "rollout",
        pair_rounds: Literal["all", "code"] = "all",
        iterations: int = 1,
        order: tuple[str, str] = ("actor", "critic"),
        critic_rollout_actor: Literal["current", "initial"] = "current",
        questions_per_phase: int | None = None,
        max_pairs: int | None = 20000,
        dpo_val_questions: int = 0,
        max_val_pairs: int | None = 4000,
        dpo_eval_every: int = 50,
        dpo_patience: int | None = 5,
        restore_best: bool = True,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
        critic_max_new_tokens: int | None = None,
        max_tries: int = 2,
        chat_template: bool | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        dpo_epochs: int = 3,
        dpo_batch_size: int = 4,
        max_prompt_tokens: int = 512,
        max_response_tokens: int = 512,
        lr: float = 1.41e-5,
        weight_decay: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        reset_optimizer: bool = True,
        gradient_clip: float | None = 1.0,
        sample_seed: int | None = None,
        num_val_transcripts: int = 8,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            actor: the actor's model (LoRA recommended; its tokenizer is the module's).
            critic: the critic's model; ``None``: the actor's spec (a second adapter on the same base).
            share_base: put both players' adapters on one base when their specs name the same base.
            reference: how the starting checkpoint is kept for ``critic_rollout_actor: initial``:
                ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto``. The DPO reference is scored once
                from the player at the start of each DPO run.
            rounds: debate rounds R (the paper: 5, rounds 0..4).
            trials: natural debates per question per phase (the code: 5).
            k: one-step rollouts per reward estimate (the paper's K was not found; the critic-data code: 10).
            pair_rule: ``paper`` (guided vs natural, threshold ``epsilon``) or ``code`` (guided vs guided).
            epsilon: the paper rule's threshold (its value was not found in the paper: a config field).
            code_threshold: the code rule's threshold (0.6 in the released code).
            actor_quality: the code rule's actor quality: ``rollout`` (one-step rollouts) or
                ``correctness`` (the guided answer's own correctness, as released). The paper rule
                always uses rollouts.
            pair_rounds: ``all`` rounds, or the released code's ranges (actor 1..R-1, critic 0..R-1).
            iterations: outer iterations (1: ACC-Collab, 2: ACC-Collab+).
            order: which player trains first in an iteration (actor first: the order of the paper's
                Fig. 5; the paper's stated order was not found).
            critic_rollout_actor: the actor of the critic phase's debates and rollouts: ``current`` (the
                paper's best response) or ``initial`` (the released scripts: the starting checkpoint).
            questions_per_phase: training questions a phase generates on (``None``: the whole training
                split; the code: 6000).
            max_pairs: cap on a phase's pairs, a seeded random subset (the code: 20000; ``None``: all).
            dpo_val_questions: questions a phase generates DPO validation pairs on, after the training ones
                (the code: 1000; 0: no DPO validation, no early stopping).
            max_val_pairs: cap on a phase's validation pairs (the code: 4000; ``None``: all).
            dpo_eval_every: optimiser steps between DPO validations (the code: 50); the last step is
                always evaluated.
            dpo_patience: evaluations without a new best validation loss before a phase stops early (the
                code: 5; ``None``: never early).
            restore_best: end each phase with the player's weights at its best validation loss (the code's
                ``load_best_model_at_end``).
            temperature, top_p: sampling of debates, guided responses and rollouts (0.7, 0.9).
            max_new_tokens: the actor's response cap; ``critic_max_new_tokens`` the critic's (default the same).
            max_tries: re-samples of an unparseable actor answer (2); then it counts as wrong.
            chat_template: format prompts with the tokenizer's chat template (``None``: when it has one).
            beta, label_smoothing: DPO (0.1, 0: TRL's defaults in the code).
            dpo_epochs, dpo_batch_size: passes over a phase's pairs and pairs per optimiser step (the code:
                3 epochs; batch 2 x 2 accumulation).
            max_prompt_tokens, max_response_tokens: DPO truncation (512, 512): prompts lose their start.
            lr, weight_decay: AdamW when no ``optimizer`` is given (the code: 1.41e-5, 0.1).
            optimizer: optimiser factory (one per player).
            reset_optimizer: start each phase with a fresh optimiser state (each released DPO run did).
            gradient_clip: global-norm clip of each DPO step (None: off).
            sample_seed: seed of all sampling (``None``: the run's global seed, kept in checkpoints).
            num_val_transcripts: debates kept from each validation for the transcript table.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__()
        self.save_hyperparameters()
        critic = critic or actor
        self.specs = {"actor": actor, "critic": critic}
        for name, value, low in (("rounds", rounds, 1), ("trials", trials, 1), ("k", k, 1), ("iterations", iterations, 1),
                                 ("dpo_epochs", dpo_epochs, 1), ("dpo_batch_size", dpo_batch_size, 1),
                                 ("max_tries", max_tries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.{name} must be an int >= {low}, got {value!r}")
        if pair_rule not in ("paper", "code"):
            raise ConfigError(f"model.pair_rule must be 'paper' or 'code', got {pair_rule!r}")
        if actor_quality not in ("rollout", "correctness"):
            raise ConfigError(f"model.actor_quality must be 'rollout' or 'correctness', got {actor_quality!r}")
        if pair_rounds not in ("all", "code"):
            raise ConfigError(f"model.pair_rounds must be 'all' or 'code', got {pair_rounds!r}")
        if sorted(order) != sorted(PLAYERS):
            raise ConfigError(f"model.order must name 'actor' and 'critic' once each, got {order!r}")
        if critic_rollout_actor not in ("current", "initial"):
            raise ConfigError(f"model.critic_rollout_actor must be 'current' or 'initial', got {critic_rollout_actor!r}")
        if not 0.0 <= epsilon <= 1.0 or not 0.0 <= code_threshold <= 1.0:
            raise ConfigError("model.epsilon and model.code_threshold are reward differences in [0, 1]")
        if questions_per_phase is not None and questions_per_phase < 1:
            raise ConfigError(f"model.questions_per_phase must be >= 1 or null, got {questions_per_phase}")
        for name, value, low in (("dpo_val_questions", dpo_val_questions, 0), ("dpo_eval_every", dpo_eval_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.{name} must be an int >= {low}, got {value!r}")
        if dpo_patience is not None and (isinstance(dpo_patience, bool) or not isinstance(dpo_patience, int)
                                         or dpo_patience < 1):
            raise ConfigError(f"model.dpo_patience must be an int >= 1 or null, got {dpo_patience!r}")
        self.automatic_optimization = False  # one optimiser per player, stepped by the phase's player only
        self.tokenizer = build_tokenizer(actor)
        self.share_base, self.reference_mode = share_base, reference
        self.rounds, self.trials, self.k = rounds, trials, k
        self.pair_rule, self.epsilon, self.code_threshold = pair_rule, epsilon, code_threshold
        self.actor_quality, self.pair_rounds = actor_quality, pair_rounds
        self.phases = [(i, p) for i in range(iterations) for p in order]
        self.critic_rollout_actor, self.questions_per_phase, self.max_pairs = critic_rollout_actor, questions_per_phase, max_pairs
        self.dpo_val_questions, self.max_val_pairs = dpo_val_questions, max_val_pairs
        self.dpo_eval_every, self.dpo_patience, self.restore_best = dpo_eval_every, dpo_patience, restore_best
        self.sampling = {
            "actor": SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
            "critic": SamplingConfig(max_new_tokens=critic_max_new_tokens or max_new_tokens, temperature=temperature,
                                     top_p=top_p),
        }
        self.max_tries, self.chat_template = max_tries, chat_template
        self.beta, self.label_smoothing = beta, label_smoothing
        self.dpo_epochs, self.dpo_batch_size = dpo_epochs, dpo_batch_size
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        self.reset_optimizer, self.gradient_clip, self.sample_seed = reset_optimizer, gradient_clip, sample_seed
        self.num_val_transcripts, self.chunk_tokens = num_val_transcripts, chunk_tokens
        self.players: PlayerPolicies | None = None
        self._questions: list[QAExample] | None = None  # the phases' question set (_phase_questions)
        self._n_train = 0  # how many of them are training questions (the rest: DPO validation)

        # pipeline state (all in checkpoints)
        self.step_count = 0  # training steps taken (seeds every draw)
        self.timer = PhaseTimer()  # time/<phase> of the current step
        self.phase = 0  # index into self.phases
        self.phase_state = PhaseState()  # the current phase's stage, pairs, reference log-probs, DPO order and best
        self.pair_counts: list[int] = []  # pairs made by each finished generate stage
        self.val_history: list[dict[str, float]] = []
        self.val_transcripts: list[dict[str, Any]] = []
        self._val_accuracy = DebateAccuracy(rounds)
        self._val_buffer: list[DebateTranscript] = []
        self.last_step_metrics: dict[str, float] = {}  # what the last training step logged (benchmarks)

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.players is not None:
            return
        build = dict(share_base=self.share_base, reference=self.reference_mode)
        if self.device_mesh is None:
            self.players = PlayerPolicies(self.specs, self.tokenizer, **build)
            return
        # ModelParallelStrategy (FSDP2): every rank builds the players on the meta device; rank 0 alone loads
        # the weights (and initialises the adapters), then each model (the shared base with every player's
        # adapter, or a model per player, and the frozen copies) is sharded layer by layer and filled from it
        source = PlayerPolicies(self.specs, self.tokenizer, **build) if self.global_rank == 0 else None
        self.players = PlayerPolicies(self.specs, self.tokenizer, meta=True, **build)
        mp_policy = None
        if str(self.trainer.precision).startswith("bf16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for group in ("policies", "references"):
            for key, model in getattr(self.players, group).items():
                fsdp2_parallelize(model, self.device_mesh["data_parallel"], mp_policy=mp_policy,
                                  trainable=group == "policies")
                src = getattr(source, group)[key] if source is not None else None
                load_from_rank0(model, src, self.trainer.strategy.root_device)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "DebateModule")
        if self.sample_seed is None:  # rank 0's: every rank draws the same
            self.sample_seed = all_gather_objects(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31)))[0]

    def configure_optimizers(self):
        optimizers = []
        for player in PLAYERS:
            params = list(self.players.trainable(player).values())
            if not params:
                raise ValueError(f"the {player} has no trainable parameters (check model.{player}.lora.target_modules)")
            optimizers.append(self.optimizer_factory(params))
        return optimizers

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
        """The protocol's agent for ``player`` as it started the run (the base with its adapter off, or its
        frozen copy): the untrained team, and the released scripts' rollout actor."""
        @contextmanager
        def initial() -> Iterator[nn.Module]:
            with self.players.acting(player) as policy:
                model, context = self.players.reference(player, policy)
                with context() if context is not None else nullcontext():
                    yield model
        return initial

    def debate(self, examples: list[QAExample], generator: Draw, actor=None, critic=None
               ) -> list[DebateTranscript]:
        """A debate of ``rounds`` rounds on ``examples`` with the module's sampling, answer retries and prompt
        format; the current players unless ``actor`` / ``critic`` agents are given."""
        return run_debate(actor or self.agent("actor"), critic or self.agent("critic"), self.tokenizer, examples,
                          self.rounds, self.sampling["actor"], critic_sampling=self.sampling["critic"],
                          generator=generator, max_tries=self.max_tries, chat_template=self.chat_template)

    # the seeded draws are named by what they are for (``order``, ``questions``) and the step
    # (:func:`lit_align.engine.seeds.derive_seed`): no two draws share a seed; the sampled text is drawn per
    # question (``RowSeeds``: ``generate/trial<k>`` per phase, ``val``, ``predict``), so it does not depend on
    # the batch or the number of ranks
    def _seed(self, purpose: str, step: int | None = None) -> int:
        return derive_seed(self.sample_seed, self.step_count if step is None else step, purpose)

    def _row_seeds(self, purpose: str, step: int = 0) -> RowSeeds:
        return RowSeeds(self.sample_seed, step, purpose)

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(self._seed(purpose))

    @property
    def current(self) -> tuple[int, str] | None:
        """(iteration, player) of the current phase; ``None`` when every phase is done."""
        return self.phases[self.phase] if self.phase < len(self.phases) else None

    # -- generate ------------------------------------------------------------------------------
    def _pairs_for(self, player: str, examples: list[QAExample], real: int) -> tuple[list[PreferencePair], dict[str, float]]:
        """Natural debates, guided responses, rollout rewards and pairs for ``player`` on ``examples`` (the
        first ``real`` of them: the rest are padding rows, run for the same forwards on every rank and dropped).
        Stats are sums over the real questions."""
        actor, critic = self.agent("actor"), self.agent("critic")
        if player == "critic" and self.critic_rollout_actor == "initial":
            actor = self.initial_agent("actor")  # the released scripts: the critic's data comes from the starting actor
        rollout_actor = actor
        rounds = code_round_ranges(self.rounds)[player] if self.pair_rounds == "code" else range(self.rounds)
        pairs: list[PreferencePair] = []
        stats = {"natural_correct": 0.0, "candidates": 0.0, "rollouts": 0.0}
        for trial in range(self.trials):
            generator = self._row_seeds(f"generate/trial{trial}", step=self.phase)
            with self.timer("debate"):
                transcripts = self.debate(examples, generator, actor, critic)
            stats["natural_correct"] += sum(t.final_correct for t in transcripts[:real])
            for t in rounds:
                # the released code keeps the natural critic response as trial 0's "guided" ones (its pairs
                # are then filtered as identical); against the natural response (paper rule) that is no pair
                keep_natural = self.pair_rule == "code"
                with self.timer("guided"):
                    guided = {target: guided_responses(self.agent(player), self.tokenizer, transcripts, t, player, target,
                                                       trial, self.sampling[player], generator=generator,
                                                       natural_critic_at_trial0=keep_natural,
                                                       chat_template=self.chat_template)
                              for target in ("correct", "wrong")}
                with self.timer("rewards"):
                    rewards = self._rewards(player, transcripts, t, guided, rollout_actor, critic, generator, real)
                stats["rollouts"] += rewards.pop("rollouts", 0.0)
                candidates = make_candidates(transcripts, guided["correct"], guided["wrong"], rewards["toward"],
                                             rewards["away"], rewards.get("natural"))[:real]
                stats["candidates"] += len(candidates)
                pairs += build_pairs(candidates, self.pair_rule, epsilon=self.epsilon, threshold=self.code_threshold)
        return pairs, stats

    def _rewards(self, player: str, transcripts: list[DebateTranscript], t: int, guided: dict, rollout_actor, critic,
                 generator: RowSeeds, real: int) -> dict[str, list[float]]:
        """Rewards of the natural, toward and away responses at round ``t`` (one batched rollout call)."""
        if self.pair_rule == "code" and player == "actor" and self.actor_quality == "correctness":
            return {kind: [float(g.correct) for g in guided[target]] for kind, target in
                    (("toward", "correct"), ("away", "wrong"))}
        kinds = ["toward", "away"] + (["natural"] if self.pair_rule == "paper" else [])
        states, keys = [], []
        for j, kind in enumerate(kinds):
            for i, tr in enumerate(transcripts):
                turn = tr.turns[t]
                if kind == "natural":
                    response = turn.actor_response if player == "actor" else turn.critic_response
                else:
                    response = guided["correct" if kind == "toward" else "wrong"][i].response
                if player == "actor":
                    states.append(RewardState(tr.example, t, actor_response=response))
                else:
                    states.append(RewardState(tr.example, t, actor_response=turn.actor_response, critic_response=response))
                keys.append(tr.example.index * len(kinds) + j)  # the state's own rollout seeds
        values = rollout_reward(rollout_actor, critic, self.tokenizer, states, k=self.k, rounds=self.rounds,
                                sampling=self.sampling["actor"], critic_sampling=self.sampling["critic"],
                                generator=generator, max_tries=self.max_tries, chat_template=self.chat_template,
                                keys=keys)
        n = len(transcripts)
        out: dict[str, Any] = {kind: values[j * n:(j + 1) * n] for j, kind in enumerate(kinds)}
        real_states = [s for j in range(len(kinds)) for s in states[j * n:j * n + real]]
        out["rollouts"] = float(self.k * sum(s.critic_response is not None or s.round < self.rounds - 1
                                             for s in real_states))
        return out

    def _phase_questions(self) -> list[QAExample]:
        """The questions every phase generates on: the first ``questions_per_phase`` of a seeded permutation
        of the training split (the same set for both players and every iteration, as the released
        ``scripts/run_dpo.sh``'s 6000), then the next ``dpo_val_questions`` (DPO validation, its 1000)."""
        if self._questions is None:  # derived from the data and the seed: built once, never checkpointed
            examples = self.trainer.datamodule.examples("train")
            order = list(range(len(examples)))
            random.Random(self._seed("questions", step=0)).shuffle(order)
            n_train = len(order) - self.dpo_val_questions if self.questions_per_phase is None else self.questions_per_phase
            if n_train < 1 or n_train + self.dpo_val_questions > len(order):
                raise DataError(f"the training split has {len(order)} questions: too few for model.questions_per_phase "
                                 f"({self.questions_per_phase}) plus model.dpo_val_questions ({self.dpo_val_questions}); "
                                 "lower them or add questions")
            self._n_train = n_train
            self._questions = [examples[i] for i in order[: n_train + self.dpo_val_questions]]
        return self._questions

    # -- DPO -----------------------------------------------------------------------------------
    def _pair_batch(self, pairs: list[PreferencePair]):
        """Right-padded (prompt + chosen) and (prompt + rejected) rows, ``loss_mask`` on the responses."""
        eos = self.tokenizer.eos_token_id
        rows, index = [], []
        for i, pair in enumerate(pairs):
            prompt = format_prompt(self.tokenizer, pair.prompt, self.chat_template)[-self.max_prompt_tokens:]
            cap = self.sampling[pair.player].max_new_tokens
            for response in (pair.chosen, pair.rejected):
                ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
                # EOS only where the response ended: a text cut by max_new_tokens or here never emitted one
                ended = len(ids) < min(cap, self.max_response_tokens)
                rows.append((prompt, ids[: self.max_response_tokens] + ([eos] if ended else [])))
                index.append(i)
        batch = _collate_sequences(rows, index, self.tokenizer.pad_token_id)
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.loss_mask.to(self.device)

    def _sequence_logps(self, model: nn.Module, pairs: list[PreferencePair]) -> Tensor:
        """(N, 2) summed log-probs of (chosen, rejected) under ``model``."""
        ids, mask, loss_mask = self._pair_batch(pairs)
        logps = token_logps(model, ids, mask, loss_mask, chunk_tokens=self.chunk_tokens)
        return logps.logps.mul(logps.mask).sum(-1).view(-1, 2)

    @torch.no_grad()
    def _scored_logps(self, player: str, pairs: list[PreferencePair]) -> Tensor:
        """(N, 2) log-probs of ``pairs`` under the player as it is now, in eval mode, on the CPU, on every
        rank: each rank scores its share (:func:`~lit_align.debate.sharding.rank_share`) and they are gathered."""
        positions, _ = rank_share(len(pairs))
        mine = [pairs[i] for i in positions]
        out = []
        with self.players.acting(player) as policy, eval_mode(policy):
            for start in range(0, len(mine), self.dpo_batch_size):
                out.append(self._sequence_logps(policy, mine[start:start + self.dpo_batch_size]).float().cpu())
        return gather_share(torch.cat(out) if out else torch.zeros(0, 2), len(pairs))

    def _start_training(self, player: str) -> None:
        """End of a generate stage: cap the pairs, score the reference once, fix the DPO order.

        The reference log-probs are the player's **as it starts this DPO run** (the paper's DPO loss: the
        reference is the frozen starting checkpoint of the run; in iteration 2 that is the iteration-1 player, not the
        base). Scored once, so no frozen copy is needed."""
        rng = self._rng("order")
        if self.max_pairs is not None and len(self.phase_state.pairs) > self.max_pairs:
            self.phase_state.pairs = rng.sample(self.phase_state.pairs, self.max_pairs)
        if self.max_val_pairs is not None and len(self.phase_state.val_pairs) > self.max_val_pairs:
            self.phase_state.val_pairs = rng.sample(self.phase_state.val_pairs, self.max_val_pairs)
        self.pair_counts.append(len(self.phase_state.pairs))
        if not self.phase_state.pairs:
            rank_zero_warn(f"phase {self.phase} ({player}): no preference pair passed the threshold; the phase trains "
                           "nothing (lower model.epsilon / model.code_threshold, or raise trials, k, or questions)")
            self._next_phase()
            return
        if self.dpo_val_questions and not self.phase_state.val_pairs:
            rank_zero_warn(f"phase {self.phase} ({player}): no DPO validation pair passed the threshold; the phase "
                           "trains all its epochs without early stopping (raise model.dpo_val_questions)")
        self.phase_state.ref_logps = self._scored_logps(player, self.phase_state.pairs)
        self.phase_state.val_ref_logps = self._scored_logps(player, self.phase_state.val_pairs) if self.phase_state.val_pairs else None
        self.phase_state.best_val_loss, self.phase_state.best_weights, self.phase_state.bad_evals = None, None, 0
        self.phase_state.order = []  # minibatches never straddle two epochs (no pair twice in one step)
        size = self.dpo_batch_size * rank_and_world()[1]  # the global minibatch: dpo_batch_size per rank
        for _ in range(self.dpo_epochs):
            epoch = list(range(len(self.phase_state.pairs)))
            rng.shuffle(epoch)
            self.phase_state.order += [epoch[i:i + size] for i in range(0, len(epoch), size)]
        self.phase_state.position, self.phase_state.stage = 0, "train"

    def _next_phase(self) -> None:
        self.phase += 1
        self.phase_state = PhaseState(stage="generate" if self.phase < len(self.phases) else "done")

    def _fresh_optimizer(self, player: str) -> None:
        """Start a DPO run with a fresh optimiser state: each run (``reset_optimizer``) or the player's first.
        Cleared at the run's first step, not when the phase changes: a sharded (DCP) checkpoint saved in
        between initialises an empty optimiser state with a zero-gradient step (``torch.distributed.checkpoint``
        does), which would otherwise count as the run's first Adam step."""
        if self.phase_state.position == 0 and (self.reset_optimizer or self.current[0] == 0):
            optimizer = self.optimizers()[PLAYERS.index(player)]
            getattr(optimizer, "optimizer", optimizer).state.clear()

    def _dpo_step(self, player: str) -> dict[str, Tensor]:
        """One optimiser step on this rank's share of the global minibatch; its mean loss is scaled by its share
        of the minibatch's pairs (:func:`~lit_align.engine.distributed.global_share`), so the rank-averaged
        gradient is that of the mean over the whole minibatch (a rank with no pair of its own runs a padding
        row at weight 0). The logged numbers are the minibatch's means, the same on every rank."""
        self._fresh_optimizer(player)
        rows = self.phase_state.order[self.phase_state.position]
        self.phase_state.position += 1
        positions, real = rank_share(len(rows))
        mine = [rows[i] for i in positions]
        pairs = [self.phase_state.pairs[i] for i in mine]
        ref = self.phase_state.ref_logps[mine].to(self.device)
        with self.players.acting(player) as policy, eval_mode(policy):  # no dropout: the first loss is log 2
            logps = self._sequence_logps(policy, pairs)
            n = max(real, 1)  # no pair of its own: the padding row's loss at weight 0 reaches every weight
            loss, metrics = dpo_loss(logps[:n, 0], logps[:n, 1], ref[:n, 0], ref[:n, 1], beta=self.beta,
                                     label_smoothing=self.label_smoothing)
            player_step(self, loss * global_share(real).to(loss.device), optimizer=PLAYERS.index(player),
                        clip=self.gradient_clip)
        names = sorted(metrics)
        values = torch.tensor([float(loss.detach())] + [float(metrics[k]) for k in names], dtype=torch.float64,
                              device=self.device)
        totals = sum_over_ranks(values * real) / len(rows)  # means over the global minibatch
        out = {"loss": totals[0].float(), **{k: totals[i + 1].float() for i, k in enumerate(names)}}
        last = self.phase_state.position >= len(self.phase_state.order)
        if self.phase_state.val_pairs and (self.phase_state.position % self.dpo_eval_every == 0 or last):
            out.update(self._dpo_validation(player))
            last = last or (self.dpo_patience is not None and self.phase_state.bad_evals >= self.dpo_patience)
        if last:
            if self.restore_best and self.phase_state.best_weights is not None:
                for name, param in self.players.trainable(player).items():
                    assign_full(param, self.phase_state.best_weights[name])
            out["dpo_steps"] = torch.tensor(float(self.phase_state.position))
            self._next_phase()
        return out

    @torch.no_grad()
    def _dpo_validation(self, player: str) -> dict[str, Tensor]:
        """DPO loss on the phase's validation pairs; keeps the best weights and counts evaluations since. The
        log-probs are gathered from every rank first, so the loss, the best and the early stop are decided on
        the same numbers everywhere; the best weights are kept whole (gathered shards under FSDP2), the same
        on every rank, as rank 0 writes them into checkpoints."""
        logps = self._scored_logps(player, self.phase_state.val_pairs)
        ref = self.phase_state.val_ref_logps
        loss, metrics = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                                 label_smoothing=self.label_smoothing)
        if self.phase_state.best_val_loss is None or float(loss) < self.phase_state.best_val_loss:
            self.phase_state.best_val_loss, self.phase_state.bad_evals = float(loss), 0
            self.phase_state.best_weights = {n: full_tensor(p).cpu() for n, p in self.players.trainable(player).items()}
        else:
            self.phase_state.bad_evals += 1
        return {"val_loss": loss, "val_reward_accuracy": metrics["rewards/accuracies"],
                "best_val_loss": torch.tensor(self.phase_state.best_val_loss)}

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, batch: QABatch, batch_idx: int) -> None:
        if self.phase_state.stage == "done":
            self.trainer.should_stop = True
            return
        iteration, player = self.current
        self.timer.reset()
        metrics: dict[str, Tensor | float] = {"phase": float(self.phase), "iteration": float(iteration)}
        if self.phase_state.stage == "generate":
            # the batch only paces the stage: its questions come from the phase's fixed set, in chunks of a batch
            questions = self._phase_questions()
            validating = self.phase_state.questions_done >= self._n_train  # training questions first, then validation ones
            # the step's questions: a batch per rank; each rank debates its share, and the pairs are gathered
            end = min(self.phase_state.questions_done + len(batch) * rank_and_world()[1],
                      len(questions) if validating else self._n_train)
            chunk = questions[self.phase_state.questions_done:end]
            positions, real = rank_share(len(chunk))
            with self.timer("generate"):
                pairs, stats = self._pairs_for(player, [chunk[i] for i in positions], real)
            pairs, stats = _gather_pairs(pairs, stats, chunk)
            (self.phase_state.val_pairs if validating else self.phase_state.pairs).extend(pairs)
            self.phase_state.questions_done += len(chunk)
            metrics.update({f"{player}/new_pairs": float(len(pairs)), f"{player}/pairs": float(len(self.phase_state.pairs)),
                            f"{player}/val_pairs": float(len(self.phase_state.val_pairs)),
                            f"{player}/natural_accuracy": stats["natural_correct"] / len(chunk) / self.trials,
                            "rollouts": stats["rollouts"]})
            if self.phase_state.questions_done >= len(questions):
                with self.timer("reference"):
                    self._start_training(player)
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
        transcripts = self.debate(list(batch.examples), self._row_seeds("val"))
        correct = torch.tensor([tr.correct_by_round for tr in transcripts], dtype=torch.bool, device=self.device)
        self._val_accuracy.update(correct)
        self._val_buffer.extend(transcripts[: max(0, self.num_val_transcripts - len(self._val_buffer))])

    def test_step(self, batch: QABatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def on_test_epoch_start(self) -> None:
        self._reset_val()

    def _reset_val(self) -> None:
        with torch.inference_mode(False):  # states made outside inference mode stay usable by fit's validation
            self._val_accuracy = DebateAccuracy(self.rounds).to(self.device)
        self._val_buffer = []

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
        for key, value in row.items():
            # already global (synced metric states): sync_dist averages equal numbers, and says so to Lightning
            self.log(f"{stage}/{key}", value, sync_dist=True, prog_bar=key == "accuracy")
        if stage == "val":
            label = "done" if self.current is None else f"{self.current[1]} {self.phase_state.stage}"
            if self.val_history and self.val_history[-1]["step"] == self.step_count:
                self.val_history.pop()
            self.val_history.append({"step": float(self.step_count), "phase": float(self.phase), **row,
                                     "label": label})
            rows = all_gather_objects([_transcript_row(tr) for tr in self._val_buffer])  # the same on every rank
            self.val_transcripts = [row for rank in rows for row in rank][: self.num_val_transcripts]

    def predict_step(self, batch: QABatch, batch_idx: int) -> list[dict[str, Any]]:
        """One debate per question (``lit-align predict``): ``{prompt: question, completion: the actor's
        final response}``, as every method's predictions."""
        transcripts = self.debate(list(batch.examples), self._row_seeds("predict"))
        return [{"prompt": tr.example.question, "completion": tr.turns[-1].actor_response} for tr in transcripts]

    def export_policy(self) -> nn.Module:
        """What :class:`~lit_align.callbacks.HFExport` writes: the actor (the team's answerer). With FSDP2 shards
        of a shared base, every rank gathers the full weights (a collective) and rank 0 exports them from an
        unsharded copy of the players (the other ranks write nothing)."""
        from torch.distributed.tensor import DTensor

        if not self.players.shared or not any(isinstance(p, DTensor) for p in self.players.parameters()):
            return self.players.export("actor")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        shared = self.players.policies["shared"]
        state = get_model_state_dict(shared, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return nn.Module()
        players = PlayerPolicies(self.specs, self.tokenizer, share_base=self.share_base, reference="adapter")
        players.policies["shared"].load_state_dict(state)
        return players.export("actor")

    # -- checkpoints ---------------------------------------------------------------------------
    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen weights (reference copies, the base under the LoRA adapters): rebuilt from the specs."""
        return self.players.frozen_keys("players.") & set(keys) if self.players is not None else set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["debate"] = {
            "step_count": self.step_count, "phase": self.phase, "sample_seed": self.sample_seed,
            "state": self.phase_state.state_dict(), "pair_counts": list(self.pair_counts),
            "val_history": self.val_history, "val_transcripts": self.val_transcripts,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("debate")
        if state is None:
            return
        self.step_count, self.phase, self.sample_seed = state["step_count"], state["phase"], state["sample_seed"]
        self.phase_state = PhaseState.from_state_dict(state.get("state", state))  # older checkpoints: flat keys
        self.pair_counts, self.val_history = list(state["pair_counts"]), state["val_history"]
        self.val_transcripts = state["val_transcripts"]


def _gather_pairs(pairs: list[PreferencePair], stats: dict[str, float], chunk: list[QAExample]
                  ) -> tuple[list[PreferencePair], dict[str, float]]:
    """Every rank's pairs of a generate step, in the order one process makes them (trial, round, then the
    question's place in the step's questions), and the stats summed over the ranks: the same on every rank."""
    parts = all_gather_objects((pairs, stats))
    place = {ex.index: i for i, ex in enumerate(chunk)}
    merged = sorted((p for rank_pairs, _ in parts for p in rank_pairs),
                    key=lambda p: (p.trial, p.round, place[p.question_index]))
    return merged, {k: sum(rank_stats[k] for _, rank_stats in parts) for k in stats}


def _transcript_row(tr: DebateTranscript) -> dict[str, Any]:
    """A flat row of a transcript for tables."""
    row: dict[str, Any] = {"question": tr.example.question, "gold": tr.example.answer}
    for turn in tr.turns:
        row[f"actor_{turn.round}"] = turn.actor_response
        row[f"answer_{turn.round}"] = turn.answer
        row[f"critic_{turn.round}"] = turn.critic_response
    row["final_correct"] = tr.final_correct
    return row
