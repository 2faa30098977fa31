"""GPO: alignment as a two-player game between an attacker that writes prompts and a defender that answers.

Zheng et al. 2024, "Toward Optimal LLM Alignments Using Two-Player Games" (arXiv 2406.10977); released code:
github.com/ruizheng20/gpo (``gpo/gpo_trainer.py``, launch script ``train_gpo.sh``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_align.checkpoint import atomic_save
from lit_align.data.prompts import DEFENDER_TEMPLATE, PromptBatch
from lit_align.engine import PhaseTimer, PPOConfig, generator, player_step, ppo_update, row_generators
from lit_align.engine.distributed import all_gather_objects, any_rank, refuse_fsdp1, sum_over_ranks
from lit_align.errors import ConfigError
from lit_align.game.diversity import (
    DiversityHistory,
    SentenceEncoder,
    bleu_diversity,
    build_sentence_encoder,
    embedding_diversity,
    word_tokens,
)
from lit_align.game.judge import JudgeSpec, SafetyJudge, SafetyScores, build_judge
from lit_align.game.schedule import PLAYERS, GameSchedule
from lit_align.game.sharding import full_tensors, shard_critic, shard_like, shard_players
from lit_align.methods.base import RebuiltWeights
from lit_align.models import ModelSpec, RewardModelSpec, ValueModel, build_tokenizer, build_value_model
from lit_align.models.causal_lm import eval_mode
from lit_align.models.players import PlayerPolicies
from lit_align.rollout.experience import Experience, make_experience
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import Rollout, SamplingConfig, left_pad, sample

__all__ = ["AdversarialGameModule", "attacker_reward"]


def _masked(rollout: Rollout, keep: Tensor) -> Rollout:
    """The rollout with the responses of the rows not kept ((B,) bool ``keep``) masked out: no actions."""
    return replace(rollout, response_mask=rollout.response_mask * keep[:, None].to(rollout.response_mask))


def _judge_kept(judge: SafetyJudge, prompts: list[str], responses: list[str], keep: Tensor) -> SafetyScores:
    """The judge's scores of the kept rows, zeros (and safe) on the others; (B,) each."""
    rows = keep.nonzero().flatten().tolist()
    out = SafetyScores(defender_reward=torch.zeros(len(prompts)), attacker_reward=torch.zeros(len(prompts)),
                       unsafe=torch.zeros(len(prompts), dtype=torch.bool)).to(keep.device)
    if rows:
        scores = judge.score([prompts[r] for r in rows], [responses[r] for r in rows]).to(keep.device)
        for name in ("defender_reward", "attacker_reward", "unsafe"):
            getattr(out, name)[rows] = getattr(scores, name).to(getattr(out, name).dtype)
    return out


_VAL_MEANS = ("seed/asr", "seed/reward", "attack/asr", "attack/reward", "attacker/judge_reward", "attacker/kl",
              "defender/kl")


class _MetricDict(nn.ModuleDict):
    """A ``ModuleDict`` of metrics whose keys may hold ``/`` (stored with ``__`` for ``/``, read back as given)."""

    def __init__(self, metrics: dict[str, nn.Module]) -> None:
        super().__init__({k.replace("/", "__"): v for k, v in metrics.items()})

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(key.replace("/", "__"))

    def items(self):
        return [(k.replace("__", "/"), v) for k, v in super().items()]


def _detached(param: Tensor) -> Tensor:
    """A parameter's value to keep aside: on the CPU, or where it is when sharded (a DTensor keeps its mesh)."""
    from torch.distributed.tensor import DTensor

    return param.detach() if isinstance(param, DTensor) else param.detach().cpu()


def _global_mean(values: Tensor, weight: Tensor) -> Tensor:
    """The ``weight``-weighted mean of ``values`` ((B,) each) over every rank's rows (0 without weight)."""
    pair = sum_over_ranks(torch.stack([(values.float() * weight).sum(), weight.float().sum()]))
    return pair[0] / pair[1].clamp(min=1e-12)


def attacker_reward(judge_reward: Tensor, self_bleu: Tensor, cos_sim: Tensor, *, bleu_weight: float,
                    embedding_weight: float) -> Tensor:
    """The attacker's sequence reward (as ``gpo/gpo_trainer.py``): ``judge_reward - bleu_weight * SelfBLEU - embedding_weight * CosSim``,
    all (B,). With a judge, ``judge_reward`` is P(unsafe): ``p_unsafe - 5 SB - 1 CS`` at the script's weights."""
    return judge_reward - bleu_weight * self_bleu - embedding_weight * cos_sim


def _adamw(lr: float, eps: float, weight_decay: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """GPO's optimiser: AdamW with betas (0.9, 0.95)."""
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=weight_decay)


class AdversarialGameModule(RebuiltWeights, L.LightningModule):
    """Game-theoretical preference optimisation (GPO, Zheng et al. 2024): an **attacker** LM rewrites seed
    questions into attack prompts, a **defender** LM answers them, a safety **judge** scores each
    answer in its conversation, and both players are trained by PPO (per-token KL to their own
    frozen starting policy, GAE, clipped surrogate and value losses, :mod:`lit_align.losses.ppo`):

    * defender reward: the judge's ``defender_reward`` (Llama Guard's P(safe), a reward model's score);
    * attacker reward: the judge's ``attacker_reward`` (P(unsafe), or minus the score) minus
      ``bleu_weight`` x SelfBLEU and ``embedding_weight`` x the mean cosine similarity of the attack
      prompt to the attacker's history (and, with ``diversity_scope: batch_and_history``, to the other
      prompts of the same batch); every prompt joins the history after it is scored.

    Each training batch (one step, in the order of the released ``gpo/gpo_trainer.py``): the attacker samples attack prompts from the seed
    meta-prompts; attack prompts empty after decoding are dropped and counted; the defender answers
    ``defender_template`` around each attack prompt; the judge scores; the diversity terms are
    computed and the history grows; then the players that :class:`~lit_align.game.schedule.GameSchedule`
    names for this step (one shared stage function: the reference code decides the stage twice and
    one of the two is always false) get a PPO update of their policy and critic, from experience built
    for them alone. The other player still generates.

    Players are LoRA adapters named ``defender`` and ``attacker`` on **one** frozen base when both specs
    name the same base with LoRA (``share_base``); the references are then that base with adapters
    off (no copy of the weights at all). Otherwise each player has its own model and its reference is
    its adapter-off model (LoRA) or a frozen copy. Critics: one per player (``critics: separate``) or
    one for both (``shared``, the reference code's choice, whose value loss spikes at stage switches).

    Past attackers: every ``snapshot_every`` attacker updates the attacker's trainable weights join a
    pool (``pool_size`` most recent); in defender-only steps the attack prompts come from a random
    pool snapshot with probability ``pool_prob`` (the defender then trains against the attacker's
    past mixture). Averaged policies: the convergence guarantee (Nash gap O(T^-1/2)) is about averaged
    policies, not the last iterate PPO returns. The averaged policy of the theory is the uniform
    **mixture** of the iterates: the snapshot pool samples it (exactly, at snapshot granularity, when
    ``pool_size`` covers the run). With ``average_policies`` the uniform running mean of each player's
    trainable weights over its updates is kept as well (in checkpoints, written to
    ``<default_root_dir>/averaged/<player>.pt`` at the end of training with the module's parameter
    names, usable through :meth:`averaged`): a cheap *surrogate* only; for LoRA it averages the A and B
    factors separately, and mean(B) mean(A) is not the mean of the updates B A.

    Logged per step: ``train/asr`` (share of answers judged unsafe), ``train/defender/reward``,
    ``train/attacker/reward`` (with diversity), ``train/attacker/judge_reward``,
    ``train/attacker/{self_bleu,cos_sim,diversity_penalty,empty,from_pool}``, ``train/history``,
    ``train/phase`` (0 defender, 1 attacker, 2 both), the active player's ``train/<player>/kl`` and
    PPO metrics, ``train/<player>/critic/...`` and ``train/time/...``. Validation on held-out seeds:
    ``val/seed/{asr,reward}`` (the defender on the raw seeds), ``val/attack/{asr,reward}`` (on the
    attacker's prompts), ``val/attacker/{bleu_diversity,embedding_diversity}`` and
    ``val/<player>/kl``; :attr:`val_history` and :attr:`val_samples` feed
    :class:`~lit_align.callbacks.GameReport` (plot and sample table).

    Data parallel (DDP, ``callbacks/ddp_cpu.yaml``; FSDP2, ``callbacks/fsdp2_cpu.yaml``; batch sizes per rank):
    each rank plays its share of the seeds, every row sampled from its global index, so N ranks equal one
    process on the global batch. Attack prompts are gathered for the diversity terms and the history (the
    same on every rank, in global-index order); whitening, token means and the "anything to update"
    decisions are global; validation means are synced torchmetrics. Under FSDP2 the players (one sharding
    of a shared base, adapters with their layers), reference copies and critics are sharded; the judges and
    the encoder are replicated on every rank (:mod:`lit_align.game.sharding`). FSDP1 is refused.

    Notes: ASRs are over the attack prompts that survive decoding (empty ones are masked out and counted,
    not scored). Log-probs for PPO and KL are those of the untempered model (temperature 1), as in the
    reference code (MOSS-style), although sampling uses ``temperature`` / ``top_p``; the samples are then
    slightly off-policy and a sampled-KL estimate can be negative. PPO updates run in eval mode (no
    dropout), as experience making does. Repetition penalty (1.1 in the GPO
    script) is not applied: the sampler has none.
    """

    def __init__(
        self,
        defender: ModelSpec,
        attacker: ModelSpec | None = None,
        judge: JudgeSpec | SafetyJudge | Callable | None = None,
        eval_judge: JudgeSpec | SafetyJudge | Callable | None = None,
        critic: RewardModelSpec | None = None,
        critic_init: str | None = None,
        critics: Literal["separate", "shared"] = "separate",
        share_base: bool = True,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        schedule: GameSchedule | None = None,
        defender_template: str = DEFENDER_TEMPLATE,
        attacker_max_new_tokens: int = 64,
        defender_max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_p: float = 0.9,
        kl_coef: float = 0.01,
        attacker_kl_coef: float | None = None,
        reward_clip: float | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip: float | None = 0.2,
        value_clip: float | None = 0.2,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        whiten_advantages: bool = False,
        bleu_weight: float = 5.0,
        embedding_weight: float = 1.0,
        diversity_scope: Literal["history", "batch_and_history"] = "batch_and_history",
        history_window: int | None = None,
        encoder: ModelSpec | None = None,
        snapshot_every: int = 0,
        pool_size: int = 8,
        pool_prob: float = 0.0,
        average_policies: bool = True,
        log_inactive_kl: bool = True,
        gradient_clip: float | None = 1.0,
        sample_seed: int | None = None,
        defender_lr: float = 5e-7,
        attacker_lr: float = 3e-6,
        critic_lr: float = 1.5e-6,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        attacker_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        attacker_scheduler: LRSchedulerCallable | None = None,
        critic_scheduler: LRSchedulerCallable | None = None,
        num_val_samples: int = 16,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            defender: the defender policy (LoRA recommended; its tokenizer is the module's).
            attacker: the attacker policy; ``None``: the defender's spec (LoRA adapters on one base).
                Must use the defender's tokenizer.
            judge: the safety scorer (:class:`~lit_align.game.judge.JudgeSpec`: ``rule`` (the built-in
                toy), ``llama_guard`` or ``classifier``; or a :class:`SafetyJudge`, or a callable
                ``(prompts, responses) -> P(unsafe)``); ``None``: the built-in rule judge.
            eval_judge: an independent judge for validation and test (training and evaluating
                with one judge family rewards exploiting that judge); ``None``: ``judge``.
            critic: the critics' architecture (a ``scalar_head`` reward-model spec, same tokenizer);
                ``None``: the defender's spec (its LoRA included: a frozen copy of the base with trainable
                adapters and a zero head). A critic holds its own base: on a 7B model prefer
                ``critics: shared`` or a smaller critic.
            critic_init: a reward-model checkpoint both critics start from (GPO: its Llama-2 RM).
            critics: ``separate`` (one per player, default) or ``shared`` (one for both, as the code).
            share_base: put both players' LoRA adapters on one base when their specs name the same base.
            reference: ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto`` (adapter where LoRA).
            schedule: who updates at each step (default: the paper preset, defender 200 then attacker
                400, alternating; ``preset: code`` is the launch script's 400 / 200).
            defender_template: the defender's prompt around an attack prompt (``{prompt}``; GPO:
                ``"Human: {prompt} AI:"``-style).
            attacker_max_new_tokens, defender_max_new_tokens: generation caps (the GPO script: 512 for
                responses; its attack-prompt cap is not documented).
            temperature, top_p: sampling of both players (GPO: 0.8, 0.9).
            kl_coef: per-token KL penalty of the defender (GPO ``kl_penalty_weight`` 0.01).
            attacker_kl_coef: the attacker's (default: ``kl_coef``).
            reward_clip: clip of the sequence reward before it enters the rewards (None: off, as launched).
            gamma, lam: GAE (1, 0.95).
            clip, value_clip: PPO ratio and value clipping (0.2; None: unclipped, which is what the GPO
                launch script ran: its clipping flags are never passed).
            ppo_epochs, minibatch_size: PPO passes over each batch and their minibatch (GPO: 1, the batch).
            whiten_advantages: normalise advantages over the batch's tokens (off as launched).
            bleu_weight, embedding_weight: the attacker's diversity weights (GPO script: 5, 1).
            diversity_scope: ``history`` (the reference code: SelfBLEU and cosine against every earlier
                attack prompt) or ``batch_and_history`` (also against the other prompts of the batch).
            history_window: keep only the last prompts of the history (None: all, as the code).
            encoder: the sentence encoder of the cosine term (e.g. ``sentence-transformers/all-MiniLM-L6-v2``);
                required when ``embedding_weight > 0``.
            snapshot_every: attacker updates between pool snapshots (0: no pool).
            pool_size: snapshots kept (the most recent).
            pool_prob: probability that a defender-only step attacks with a pool snapshot.
            average_policies: keep the running mean of each player's trainable weights.
            log_inactive_kl: also log the KL of the player that does not learn this step (the released code logs
                both players' KL, ``ref_kl`` and ``adv_ref_kl``, every step; costs a policy and a reference
                forward over its samples).
            gradient_clip: global-norm clip of each optimiser's gradients (1.0; None: off).
            sample_seed: seed of all sampling; step ``k`` draws from ``(sample_seed, k, purpose)``
                (:func:`lit_align.engine.derive_seed`), so a resumed
                run samples what the uninterrupted run would have. ``None``: the run's global seed
                (``seed_everything``), fixed at the start and kept in checkpoints.
            defender_lr, attacker_lr, critic_lr: AdamW (betas 0.9/0.95, eps 1e-6, critic 1e-8) rates
                when no optimiser is given (GPO: 5e-7, 3e-6, 1.5e-6).
            weight_decay: of those AdamW optimisers (the released code's ``get_parms``: 0).
            optimizer, attacker_optimizer, critic_optimizer: optimiser factories (defender, attacker,
                critics).
            scheduler, attacker_scheduler, critic_scheduler: LR schedules, each stepped when its optimiser
                steps (GPO: warm-up 100 with floor 0.1, then inverse sqrt:
                :class:`~lit_align.schedulers.WarmupInverseSqrtLR`).
            num_val_samples: attack / answer pairs kept from each validation for the sample table.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__()
        modules = [name for name, value in (("judge", judge), ("eval_judge", eval_judge))
                   if value is not None and not isinstance(value, JudgeSpec)]
        self.save_hyperparameters(ignore=modules or None)  # judge objects are rebuilt by the caller, not pickled
        attacker = attacker or defender
        self.specs = {"defender": defender, "attacker": attacker}
        for name in ("attacker_max_new_tokens", "defender_max_new_tokens", "ppo_epochs"):
            if locals()[name] < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {locals()[name]}")
        if critics not in ("separate", "shared"):
            raise ConfigError(f"model.critics must be 'separate' or 'shared', got {critics!r}")
        if reference not in ("auto", "adapter", "copy"):
            raise ConfigError(f"model.reference must be 'auto', 'adapter' or 'copy' (new text is scored every "
                             f"step: nothing can be precomputed), got {reference!r}")
        if reference == "adapter" and (defender.lora is None or attacker.lora is None):
            raise ConfigError("model.reference: 'adapter' needs LoRA on both players (model.defender.lora and "
                             "model.attacker.lora); use 'copy' or 'auto'")
        if "{prompt}" not in defender_template:
            raise ConfigError(f"model.defender_template must contain '{{prompt}}', got {defender_template!r}")
        try:
            defender_template.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"model.defender_template is not a str.format template with only {{prompt}} ({err!r}); "
                             "double literal braces as '{{' and '}}'") from err
        if diversity_scope not in ("history", "batch_and_history"):
            raise ConfigError(f"model.diversity_scope must be 'history' or 'batch_and_history', got {diversity_scope!r}")
        if embedding_weight > 0 and encoder is None:
            raise ConfigError("model.embedding_weight > 0 needs model.encoder (a sentence encoder, e.g. "
                             "{name_or_path: sentence-transformers/all-MiniLM-L6-v2}); or set model.embedding_weight: 0")
        if not 0.0 <= pool_prob <= 1.0:
            raise ConfigError(f"model.pool_prob must be in [0, 1], got {pool_prob}")
        if pool_prob > 0 and snapshot_every < 1:
            raise ConfigError("model.pool_prob > 0 needs model.snapshot_every >= 1 (no snapshots are taken otherwise)")
        if snapshot_every < 0 or pool_size < 1:
            raise ConfigError(f"model.snapshot_every must be >= 0 and model.pool_size >= 1, got {snapshot_every}, "
                             f"{pool_size}")
        self.automatic_optimization = False
        self.tokenizer = build_tokenizer(defender)
        self.judge_spec = judge if judge is not None else JudgeSpec()
        self.eval_judge_spec = eval_judge
        self.critic_spec, self.critic_init, self.critic_mode = critic, critic_init, critics
        self.share_base, self.reference_mode = share_base, reference
        self.schedule = schedule or GameSchedule(preset="paper")
        self.defender_template = defender_template
        self.sampling = {
            "attacker": SamplingConfig(max_new_tokens=attacker_max_new_tokens, temperature=temperature, top_p=top_p),
            "defender": SamplingConfig(max_new_tokens=defender_max_new_tokens, temperature=temperature, top_p=top_p),
        }
        self.kl_coefs = {"defender": kl_coef, "attacker": kl_coef if attacker_kl_coef is None else attacker_kl_coef}
        self.reward_clip, self.gamma, self.lam, self.whiten_advantages = reward_clip, gamma, lam, whiten_advantages
        self.ppo = PPOConfig.from_module_args(ppo_epochs=ppo_epochs, minibatch_size=minibatch_size, clip=clip,
                                              value_clip=value_clip)
        self.timer = PhaseTimer()
        self.bleu_weight, self.embedding_weight, self.diversity_scope = bleu_weight, embedding_weight, diversity_scope
        self.encoder_spec = encoder
        self.snapshot_every, self.pool_size, self.pool_prob = snapshot_every, pool_size, pool_prob
        self.average_policies, self.gradient_clip, self.sample_seed = average_policies, gradient_clip, sample_seed
        self.optimizer_factories = {
            "defender": optimizer or _adamw(defender_lr, 1e-6, weight_decay),
            "attacker": attacker_optimizer or _adamw(attacker_lr, 1e-6, weight_decay),
            "critic": critic_optimizer or _adamw(critic_lr, 1e-8, weight_decay),
        }
        self.log_inactive_kl = log_inactive_kl
        self.scheduler_factories = {"defender": scheduler, "attacker": attacker_scheduler, "critic": critic_scheduler}
        self.num_val_samples, self.chunk_tokens = num_val_samples, chunk_tokens

        # built in configure_model
        self.players: PlayerPolicies | None = None  # both policies (and reference copies, left out of checkpoints)
        self.critics: nn.ModuleDict | None = None  # "shared" or one per player
        self.judge: SafetyJudge | None = None
        self.eval_judge: SafetyJudge | None = None  # None: validation uses ``judge``
        self.encoder: SentenceEncoder | None = None

        # game state (all in checkpoints)
        self.step_count = 0  # training batches played (the schedule's clock)
        self.updates = {p: 0 for p in PLAYERS}  # PPO updates per player
        self.dropped_empty = 0  # attack prompts empty after decoding, over the run
        self.history = DiversityHistory(window=history_window)
        self.pool: list[dict[str, Tensor]] = []  # attacker snapshots (trainable weights, CPU)
        self.averages: dict[str, dict[str, Tensor]] = {}  # player -> running mean of its trainable weights
        self.val_history: list[dict[str, float]] = []  # one row per validation run (for the report plot)
        self.val_samples: list[dict[str, Any]] = []  # the last validation's sample attacks and answers
        # validation means, synced over ranks when computed (rows whose attack decoded to nothing weigh 0)
        self._val_means = _MetricDict({key: MeanMetric() for key in _VAL_MEANS})
        self._val_rows: list[tuple] = []  # (global index, seed, attack, response, unsafe, reward) of kept rows
        self.last_step_times: dict[str, float] = {}  # phase -> seconds of the last training step (benchmarks)

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.players is not None:
            return
        self.players = PlayerPolicies(self.specs, self.tokenizer, share_base=self.share_base,
                                      reference=self.reference_mode)
        defender_tok = self.specs["defender"].tokenizer or self.specs["defender"].name_or_path
        critic_spec = self.critic_spec or RewardModelSpec(model=self.specs["defender"])
        if critic_spec.kind != "scalar_head":
            raise ConfigError(f"model.critic.kind={critic_spec.kind!r}: a critic must be a causal LM with a value head "
                             "read at every token (kind: scalar_head) sharing the players' tokenizer. A sequence "
                             "classifier (e.g. an encoder reward model) can serve as model.judge (kind: classifier)")
        critic_tok = critic_spec.model.tokenizer or critic_spec.model.name_or_path
        if critic_tok != defender_tok and build_tokenizer(critic_spec.model, key="model.critic.model", needs_eos=False
                                                          ).get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"model.critic.model: a critic must be a causal LM sharing the players' tokenizer (it "
                             f"reads their token ids), and its tokenizer ({critic_tok or 'bundled'}) differs from "
                             "theirs; give model.critic.model.tokenizer the defender's tokenizer. A reward model with "
                             "another tokenizer (e.g. a BERT classifier) can serve as model.judge (kind: classifier)")
        names = ["shared"] if self.critic_mode == "shared" else list(PLAYERS)
        self.critics = nn.ModuleDict({n: build_value_model(critic_spec, self.tokenizer, init_from=self.critic_init)
                                      for n in names})
        self.judge = build_judge(self.judge_spec)
        if self.eval_judge_spec is not None:
            self.eval_judge = build_judge(self.eval_judge_spec, key="model.eval_judge")
        if self.embedding_weight > 0:
            self.encoder = build_sentence_encoder(self.encoder_spec)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (lit_align.game.sharding)
            mesh, mp_policy = self.device_mesh["data_parallel"], None
            if str(self.trainer.precision).startswith("bf16"):
                from torch.distributed.fsdp import MixedPrecisionPolicy

                mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            shard_players(self.players, mesh, mp_policy=mp_policy)
            for critic in self.critics.values():
                shard_critic(critic, mesh, mp_policy=mp_policy)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "AdversarialGameModule")
        if self.sample_seed is None:  # the run's global seed (seed_everything), then fixed and checkpointed
            self.sample_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))

    def _frozen(self) -> list[nn.Module]:
        return [m for m in (*self.players.references.values(), self.judge, self.eval_judge, self.encoder)
                if m is not None]

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; references, judge and encoder stay in eval."""
        super().train(mode)
        for module in self._frozen():
            module.eval()
        return self

    def _trainable(self, player: str) -> dict[str, nn.Parameter]:
        return self.players.trainable(player)

    def _critic(self, player: str) -> ValueModel:
        return self.critics["shared" if "shared" in self.critics else player]

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        self._opt_index: dict[str, int] = {}
        groups = [(p, list(self._trainable(p).values())) for p in PLAYERS]
        for _, params in groups:
            # every adapter trainable until a player acts: loading an FSDP2 (DCP) checkpoint first creates the
            # optimiser states from a zero-gradient step, and peft leaves the inactive adapter frozen
            for param in params:
                param.requires_grad_(True)
        groups += [(f"critic/{n}", list(c.parameters())) for n, c in self.critics.items()]
        for name, params in groups:
            if not params:
                raise ValueError(f"the {name} has no trainable parameters (check model.{name}.lora.target_modules)")
            kind = "critic" if name.startswith("critic/") else name
            self._opt_index[name] = len(optimizers)
            optimizers.append(self.optimizer_factories[kind](params))
        self._sched_index: dict[str, int] = {}
        for name, index in self._opt_index.items():
            factory = self.scheduler_factories["critic" if name.startswith("critic/") else name]
            if factory is not None:
                self._sched_index[name] = len(schedulers)
                schedulers.append(factory(optimizers[index]))
        return optimizers, schedulers

    # -- acting --------------------------------------------------------------------------------
    def acting(self, player: str):
        """The player's policy, with its adapter active on a shared base (a context manager)."""
        return self.players.acting(player)

    def _reference(self, player: str, policy: nn.Module) -> tuple[nn.Module, Callable | None]:
        return self.players.reference(player, policy)

    def _rng(self, purpose: str, *, step: int | None = None, device: torch.device | None = None) -> torch.Generator:
        """The generator of one draw, named by what it is for (:func:`lit_align.engine.seeds.derive_seed`)."""
        return generator(self.sample_seed, self.step_count if step is None else step, purpose,
                         device=device or self.device)

    @torch.no_grad()
    def _sample(self, player: str, ids: Tensor, mask: Tensor, generator: torch.Generator) -> Rollout:
        with self.acting(player) as policy:
            return sample(policy, ids, mask, self.sampling[player], eos_token_id=self.tokenizer.eos_token_id,
                          pad_token_id=self.tokenizer.pad_token_id, generator=generator)

    def _decode(self, rollout: Rollout) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
                for r, m in zip(rollout.response_ids, rollout.response_mask)]

    def _defender_inputs(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [self.tokenizer(self.defender_template.format(prompt=p))["input_ids"] for p in prompts]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @contextmanager
    def _attacker_from_pool(self, snapshot: dict[str, Tensor] | None):
        """Swap a pool snapshot into the attacker's trainable weights for the duration."""
        with self._swap("attacker", snapshot) if snapshot is not None else nullcontext():
            yield

    @contextmanager
    def averaged(self, player: str):
        """Swap the player's averaged weights in for the duration (e.g. to evaluate the averaged policy)."""
        if player not in self.averages:
            raise ValueError(f"no averaged weights of the {player} (model.average_policies is off, or no update yet)")
        with self._swap(player, self.averages[player]):
            yield

    @contextmanager
    def _swap(self, player: str, weights: dict[str, Tensor]):
        """Copy ``weights`` into the player's trainable parameters for the block, then restore them."""
        params = self._trainable(player)
        current = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(current[n])

    # -- one step ------------------------------------------------------------------------------
    def _row_rngs(self, purpose: str, index: Tensor, *, step: int | None = None) -> list[torch.Generator]:
        """One generator per row, from the example's global index (:func:`lit_align.engine.row_generators`):
        what a row samples does not depend on the world size or on the rest of its batch."""
        return row_generators(self.sample_seed, self.step_count if step is None else step, purpose,
                              index.tolist(), device=self.device)

    def _play(self, batch: PromptBatch, rng: Callable[[str], list[torch.Generator]], snapshot=None,
              judge: SafetyJudge | None = None) -> dict[str, Any]:
        """One round of the game on a batch: attack, answer, judge (no learning); phases timed by ``self.timer``.

        A row whose attack prompt decodes to nothing stays in place, masked out (``keep`` False): the defender
        still answers it (the template around an empty prompt) so that every rank runs the same forwards,
        but the judge does not score it and it enters no reward, loss or metric."""
        with self.timer("attacker/generate"), self._attacker_from_pool(snapshot):
            attack = self._sample("attacker", batch.attacker_ids, batch.attacker_mask, rng("attacker/sample"))
        texts = self._decode(attack)
        keep = torch.tensor([bool(t) for t in texts], device=self.device)  # (B,)
        ids, mask = self._defender_inputs(texts)
        with self.timer("defender/generate"):
            answer = self._sample("defender", ids, mask, rng("defender/sample"))
        responses = self._decode(answer)
        with self.timer("judge"):
            scores = _judge_kept(judge or self.judge, texts, responses, keep)
        return {"attack": _masked(attack, keep), "answer": _masked(answer, keep), "texts": texts, "keep": keep,
                "responses": responses, "scores": scores}

    def _diversity(self, texts: list[str], keep: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) SelfBLEU and cosine similarity of each kept attack prompt (0 on the others).

        The prompts of every rank are gathered and taken in global-index order, so the scores and the history
        they then join are computed identically on every rank (and equal one process on the global batch)."""
        with self.timer("diversity"):
            mine = [(int(i), t) for i, t, k in zip(index.tolist(), texts, keep.tolist()) if k]
            rows = sorted(row for part in all_gather_objects(mine) for row in part)  # (N,) global batch
            tokens = [word_tokens(t) for _, t in rows]
            include_batch = self.diversity_scope == "batch_and_history"
            bleu = self.history.self_bleu(tokens, include_batch=include_batch).float().cpu()  # (N,)
            embeddings = self.encoder.encode([t for _, t in rows]) if self.encoder is not None else None
            cos = (self.history.cosine(embeddings, include_batch=include_batch).float().cpu()
                   if embeddings is not None else torch.zeros_like(bleu))
            self.history.append(tokens, embeddings.cpu() if embeddings is not None else None)
            where = {i: n for n, (i, _) in enumerate(rows)}
            pick = torch.tensor([where.get(int(i), 0) for i in index.tolist()], dtype=torch.long)  # (B,)
            weight = keep.float().cpu()
        return (bleu[pick] * weight).to(self.device), (cos[pick] * weight).to(self.device)

    def _experience(self, player: str, rollout: Rollout, scores: Tensor) -> Experience:
        with self.acting(player) as policy:
            reference, context = self._reference(player, policy)
            return make_experience(policy, reference, self._critic(player), rollout, scores,
                                   kl_coef=self.kl_coefs[player], reward_clip=self.reward_clip, gamma=self.gamma,
                                   lam=self.lam, whiten_advantages=self.whiten_advantages, reference_context=context,
                                   keep_shape=True, reduce=sum_over_ranks)

    def _step(self, name: str, loss: Tensor) -> None:
        """One optimiser step of ``name`` (a player or ``critic/<name>``) and its scheduler."""
        player_step(self, loss, optimizer=self._opt_index[name], scheduler=self._sched_index.get(name),
                    clip=self.gradient_clip)

    def _update(self, player: str, exp: Experience) -> dict[str, Tensor]:
        """PPO over the player's experience (:func:`~lit_align.engine.ppo_update`): its policy, then its critic."""
        critic_name = f"critic/{'shared' if 'shared' in self.critics else player}"
        critic = self._critic(player)
        # eval mode, as when the experience was made: with dropout the first ratio would not be 1, and the
        # dropout draws (from the global RNG) would make a resumed run differ
        with self.acting(player) as policy, eval_mode(policy, critic):
            metrics = ppo_update(policy, critic, exp, self.ppo, step_policy=lambda loss: self._step(player, loss),
                                 step_critic=lambda loss: self._step(critic_name, loss),
                                 generator=self._rng(f"{player}/shuffle", device=torch.device("cpu")),
                                 chunk_tokens=self.chunk_tokens)
        self.updates[player] += 1
        self._after_update(player)
        return metrics

    def _after_update(self, player: str) -> None:
        """Running mean of the player's weights; attacker snapshots for the pool. Both are clones of the
        parameters: under FSDP2, this rank's shards (gathered whole in checkpoints)."""
        params = self._trainable(player)
        if self.average_policies:
            n = self.updates[player]
            avg = self.averages.setdefault(player, {k: _detached(p).float().clone() for k, p in params.items()})
            if n > 1:
                for k, p in params.items():
                    avg[k] += (_detached(p).float() - avg[k]) / n
        if player == "attacker" and self.snapshot_every and self.updates[player] % self.snapshot_every == 0:
            self.pool.append({k: _detached(p).clone() for k, p in params.items()})
            del self.pool[: max(0, len(self.pool) - self.pool_size)]

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        active = self.schedule.active(self.step_count)
        self.timer.reset()
        snapshot, from_pool = None, 0.0
        if active == ("defender",) and self.pool and self.pool_prob > 0:  # the same draw on every rank
            pick = self._rng("pool", device=torch.device("cpu"))
            if torch.rand((), generator=pick) < self.pool_prob:
                snapshot = self.pool[int(torch.randint(len(self.pool), (), generator=pick))]
                from_pool = 1.0
        game = self._play(batch, lambda purpose: self._row_rngs(purpose, batch.index), snapshot)
        keep, scores = game["keep"], game["scores"]
        empty = int(sum_over_ranks(torch.tensor(float((~keep).sum()), device=self.device)).item())
        self.dropped_empty += empty
        metrics: dict[str, Tensor | float] = {
            "phase": {("defender",): 0.0, ("attacker",): 1.0}.get(active, 2.0),
            "attacker/empty": float(empty), "attacker/from_pool": from_pool,
        }
        if any_rank(bool(keep.any())):  # decided on every rank alike: the same forwards and steps everywhere
            bleu, cos = self._diversity(game["texts"], keep, batch.index)
            judge_reward, defender_reward = scores.attacker_reward, scores.defender_reward
            att_reward = attacker_reward(judge_reward, bleu, cos, bleu_weight=self.bleu_weight,
                                         embedding_weight=self.embedding_weight)
            weight = keep.float()
            metrics.update({
                "asr": _global_mean(scores.unsafe, weight), "defender/reward": _global_mean(defender_reward, weight),
                "attacker/reward": _global_mean(att_reward, weight),
                "attacker/judge_reward": _global_mean(judge_reward, weight),
                "attacker/self_bleu": _global_mean(bleu, weight), "attacker/cos_sim": _global_mean(cos, weight),
                "attacker/diversity_penalty": _global_mean(judge_reward - att_reward, weight),
                "history": float(len(self.history)),
            })
            rollouts = {"defender": (game["answer"], defender_reward), "attacker": (game["attack"], att_reward)}
            experiences = {}
            for player in active:  # experience for every active player first: simultaneous moves see the same game
                with self.timer(f"{player}/experience"):
                    experiences[player] = self._experience(player, *rollouts[player])
            if self.log_inactive_kl:
                for player in (p for p in PLAYERS if p not in active):
                    rollout = rollouts[player][0]
                    scored = (rollout.response_lengths >= 2).float()
                    if any_rank(bool(scored.any())):
                        with self.timer(f"{player}/kl"):
                            metrics[f"{player}/kl"] = _global_mean(self._kl(player, rollout), scored)
            for player, exp in experiences.items():
                metrics.update({f"{player}/kl": exp.metrics["kl"],
                                f"{player}/dropped": exp.metrics["dropped"] - float((~keep).sum())})
                if not any_rank(bool(exp.action_mask.any())):  # no row of any rank has an action
                    continue
                with self.timer(f"{player}/update"):
                    metrics.update({f"{player}/{k}": v for k, v in self._update(player, exp).items()})
        self.step_count += 1
        self.last_step_times = dict(self.timer.totals)
        size = len(batch.seeds)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=size,
                     prog_bar=key in ("asr", "defender/reward"))
        for key, value in self.timer.metrics().items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=size)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _kl(self, player: str, rollout: Rollout) -> Tensor:
        """(B,) summed log-ratio of each sampled response, player vs its reference."""
        mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
        with self.acting(player) as policy:
            logps = token_logps(policy, rollout.sequences, rollout.attention_mask, mask,
                                chunk_tokens=self.chunk_tokens)
            reference, context = self._reference(player, policy)
            with context() if context is not None else nullcontext():
                ref = token_logps(reference, rollout.sequences, rollout.attention_mask, mask,
                                  chunk_tokens=self.chunk_tokens)
        return ((logps.logps - ref.logps) * logps.mask).sum(-1)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """The defender on the raw seeds and on the attacker's prompts; per-player KL; diversity at epoch end."""
        self._evaluate(batch, batch_idx)

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """As validation, on the test seeds (``test/...``)."""
        self._evaluate(batch, batch_idx)

    @torch.no_grad()
    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, str]]:
        """The defender's greedy answers to the raw seeds (``lit-align predict``): ``[{prompt, completion}]``."""
        ids, mask = self._defender_inputs(list(batch.seeds))
        greedy = SamplingConfig(max_new_tokens=self.sampling["defender"].max_new_tokens, do_sample=False)
        with self.acting("defender") as policy:
            out = sample(policy, ids, mask, greedy, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id)
        return [{"prompt": seed, "completion": answer} for seed, answer in zip(batch.seeds, self._decode(out))]

    def export_policy(self) -> nn.Module:
        """The model :class:`~lit_align.callbacks.HFExport` writes: the defender (the aligned model). On a
        shared base it is a copy with the attacker's adapter removed and the defender's merged in."""
        if self.device_mesh is None:
            return self.players.export("defender")
        # sharded: every rank gathers the players' weights (a collective) into an unsharded copy built from the specs
        whole = PlayerPolicies(self.specs, self.tokenizer, share_base=self.share_base, reference=self.reference_mode)
        state = full_tensors(self.players.state_dict())
        whole.load_state_dict({k: v for k, v in state.items() if not k.startswith("references.")}, strict=False)
        return whole.export("defender")

    def _evaluate(self, batch: PromptBatch, batch_idx: int) -> None:
        # each row from its global index at a fixed step: the same draws every epoch, on any number of ranks
        rng = lambda purpose: self._row_rngs(f"val/{purpose}", batch.index, step=0)  # noqa: E731
        ids, mask = self._defender_inputs(list(batch.seeds))
        seed_answer = self._sample("defender", ids, mask, rng("seed_answer"))
        judge = self.eval_judge or self.judge
        seed_scores = judge.score(list(batch.seeds), self._decode(seed_answer)).to(self.device)
        self._val_means["seed/asr"].update(seed_scores.unsafe.float())
        self._val_means["seed/reward"].update(seed_scores.defender_reward.float())
        game = self._play(batch, rng, judge=judge)
        scores, keep = game["scores"], game["keep"]
        weight = keep.float()
        for key, values in (("attack/asr", scores.unsafe), ("attack/reward", scores.defender_reward),
                            ("attacker/judge_reward", scores.attacker_reward),
                            ("attacker/kl", self._kl("attacker", game["attack"])),
                            ("defender/kl", self._kl("defender", game["answer"]))):
            self._val_means[key].update(values.float(), weight)
        self._val_rows.extend(
            (int(i), seed, attack, response, bool(unsafe), float(reward))
            for i, seed, attack, response, unsafe, reward, k in zip(
                batch.index.tolist(), batch.seeds, game["texts"], game["responses"], scores.unsafe.tolist(),
                scores.defender_reward.tolist(), keep.tolist()) if k)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []
        for metric in self._val_means.values():
            metric.reset()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def on_validation_epoch_end(self) -> None:
        """The synced means, and the attacks' diversity over every rank's attacks in global-index order: the
        same row on every rank."""
        row = {}
        for key, metric in self._val_means.items():  # every rank computes every metric: compute() syncs
            value = metric.compute()
            metric.reset()
            if not torch.isnan(value):  # no row with weight (no attack prompt survived decoding anywhere)
                row[key] = float(value)
        rows = sorted(r for part in all_gather_objects(self._val_rows) for r in part)
        attacks = [r[2] for r in rows]
        if len(attacks) >= 2:
            row["attacker/bleu_diversity"] = bleu_diversity([word_tokens(t) for t in attacks])
            if self.encoder is not None:
                row["attacker/embedding_diversity"] = embedding_diversity(self.encoder.encode(attacks).cpu())
        stage = "test" if self.trainer.testing else "val"
        for key, value in row.items():
            self.log(f"{stage}/{key}", value, sync_dist=True)  # the same on every rank: averaging keeps it
        if stage == "test":
            return
        # every validation is a row of the report, the sanity check included (the policies before any step
        # when it runs at the start: num_sanity_val_steps -1 evaluates the whole validation set); a second
        # evaluation at the same step (a resume's sanity check) replaces the first
        if row:
            if self.val_history and self.val_history[-1]["step"] == self.step_count:
                self.val_history.pop()
            self.val_history.append({"step": float(self.step_count), **row})
            self.val_samples = [{"seed": seed, "attack": attack, "response": response, "unsafe": unsafe,
                                 "reward": reward}
                                for _, seed, attack, response, unsafe, reward in rows[: self.num_val_samples]]

    # -- checkpoints ---------------------------------------------------------------------------
    _FROZEN_PREFIXES = ("players.references.", "judge.", "eval_judge.", "encoder.")

    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen weights (references, the base under the LoRA adapters, judge and encoder): rebuilt
        from their specs."""
        frozen = self.players.frozen_keys("players.") if self.players is not None else set()
        return {k for k in keys if k.startswith(self._FROZEN_PREFIXES) or k in frozen}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # pool snapshots and averages are gathered whole (every rank calls this): under FSDP2 only rank 0's
        # copy of this dict is written (Lightning's metadata file), the same on every rank
        checkpoint["game"] = {
            "step_count": self.step_count, "sample_seed": self.sample_seed, "updates": dict(self.updates),
            "dropped_empty": self.dropped_empty, "history": self.history.state_dict(),
            "pool": [full_tensors(snapshot) for snapshot in self.pool],
            "averages": {player: full_tensors(weights) for player, weights in self.averages.items()},
            "val_history": self.val_history, "val_samples": self.val_samples,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        game = checkpoint.get("game")
        if game is None:
            return
        self.step_count, self.updates = game["step_count"], dict(game["updates"])
        self.sample_seed = game["sample_seed"]
        self.dropped_empty = game["dropped_empty"]
        self.history.load_state_dict(game["history"])
        def shard(weights: dict[str, Tensor], player: str) -> dict[str, Tensor]:  # whole when not yet built
            return shard_like(weights, self._trainable(player)) if self.players is not None else dict(weights)

        self.pool = [shard(snapshot, "attacker") for snapshot in game["pool"]]
        self.averages = {player: {k: v.float() for k, v in shard(weights, player).items()}
                         for player, weights in game["averages"].items()}
        self.val_history, self.val_samples = game["val_history"], game["val_samples"]

    def on_train_end(self) -> None:
        if not (self.average_policies and self.averages):
            return
        averages = {player: full_tensors(weights) for player, weights in self.averages.items()}  # every rank
        if self.trainer.is_global_zero:
            directory = Path(self.trainer.default_root_dir) / "averaged"
            directory.mkdir(parents=True, exist_ok=True)
            for player, weights in averages.items():
                atomic_save(weights, directory / f"{player}.pt")
