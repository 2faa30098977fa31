"""Model-level watermarking: co-train the LLM (PPO) and a detector of its text."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_align.data.batches import SequenceBatch
from lit_align.data.completion import CompletionBatch, retokenize
from lit_align.engine import (
    Optimization,
    PhaseTimer,
    Player,
    PPOConfig,
    configure_players,
    overlapped_steps,
    ppo_update,
    settle_steps,
)
from lit_align.engine.distributed import any_rank, global_share, refuse_fsdp1, sum_over_ranks, sums_over_ranks
from lit_align.engine.player import resolve_optimization
from lit_align.engine.seeds import generator, row_generators
from lit_align.errors import ConfigError
from lit_align.losses.watermark import DetectorPair, detector_loss
from lit_align.methods.base import ReferencedPolicyModule, online_reference
from lit_align.metrics.detection import DetectionMetrics, random_substitution
from lit_align.models import ModelSpec, RewardModelSpec, build_causal_lm, freeze
from lit_align.modes import eval_mode
from lit_align.rollout.experience import make_experience, response_actions
from lit_align.rollout.sampler import Rollout, SamplingConfig, sample
from lit_align.watermark import text
from lit_align.watermark.config import AlignmentMix, DetectorTraining, OtherLLM, RewardShaping
from lit_align.watermark.objective import kept_objective
from lit_align.watermark.players import (
    bf16_policy,
    build_alignment,
    build_scorers,
    check_vocabulary,
    detector_spec,
    save_detector,
)

__all__ = ["WatermarkModule"]

#: Each player's optimisation unless ``model.optimization`` says otherwise: Adam (betas 0.9, 0.95) at the
#: reference's rates (the paper: LoRA actor 5e-4 / full 1e-5, critic 5e-6, detector 1e-5), clip 1.0.
PLAYERS = {"actor": Optimization(lr=1e-5), "critic": Optimization(lr=5e-6), "detector": Optimization(lr=1e-5)}
_SAMPLING = SamplingConfig(max_new_tokens=128)
_PPO, _REWARDS, _DETECTOR_TRAINING = PPOConfig(), RewardShaping(), DetectorTraining()


def _adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))


class WatermarkModule(ReferencedPolicyModule):
    """Learning to watermark LLM text by RL (Xu, Yao, Liu 2024, arXiv 2403.10553).

    Players (manual optimisation, one :class:`~lit_align.engine.Player` each, ``model.optimization.<player>``):
    the **actor** (the LLM, LoRA or full), its **critic** (a value head on a copy of the detector, with its
    own parameters) and the **detector** (a backbone + scalar head read at the last real token of prompt +
    continuation). The reference is the actor with LoRA switched off (``adapter``) or a frozen copy.

    Each step, in the order of the released code's training loop (github.com/xiaojunxu/learning-to-watermark-llm,
    ``main.py``):

    1. **generate** continuations of the batch's prompts with the actor (sampling);
    2. **score** them with the detector (optionally mixed with an alignment reward model, ``alignment``),
       compute old / reference log-probs and values, KL-shaped rewards and GAE (``rewards``);
    3. **PPO update** of actor and critic (``ppo``: epochs over minibatches);
    4. **detector update** on the same batch: the continuations of step 1 against the human continuations of
       the same prompts, pairwise loss + score penalty, + the robustness terms (``detector_training``:
       substitution, paraphrase; ``other_llm``: another LLM's text as negatives).

    The first ``detector_training.pretrain_steps`` steps are stage 1 (the detector alone on the original LLM's
    continuations); when stage 2 starts the critic is set to a copy of the pretrained detector (the reference
    starts its value net from the stage-1 checkpoint). Rows with fewer than two generated tokens (EOS not
    counted unless ``eos_action``) are masked out and counted (``train/dropped``).

    Data parallel (DDP, FSDP2; FSDP1 is refused): each rank samples its prompts, each from its global index;
    whitening is global, the PPO and detector losses average over every rank's tokens / kept rows, short rows
    are masked, and a step is skipped only when no rank kept a row. Actor, critic and detector are replicated
    under DDP and sharded under FSDP2 (:mod:`lit_align.watermark.players`), the other LLM and the alignment
    reward model replicated; validation gathers every rank's scores.

    Logged: ``train/{reward,kl,stage,dropped}``, ``train/actor/*``, ``train/critic/*``, ``train/detector/*`` (per
    robustness term too), ``train/time/<phase>``; ``val/auroc``, ``val/tpr_at_fpr_1``, ``val/fpr_at_tpr_{90,99}``.
    """

    def __init__(
        self,
        model: ModelSpec,
        detector: RewardModelSpec,
        detector_checkpoint: str | None = None,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        sampling: SamplingConfig = _SAMPLING,
        rewards: RewardShaping = _REWARDS,
        ppo: PPOConfig = _PPO,
        detector_training: DetectorTraining = _DETECTOR_TRAINING,
        optimization: dict[str, Optimization] | None = None,
        alignment: AlignmentMix | None = None,
        other_llm: OtherLLM | None = None,
        eos_action: bool = False,
        sample_seed: int = 0,
        export_detector: bool = True,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the LLM to watermark (the actor; LoRA recommended: the reference then costs no copy).
            detector: a causal LM with ``kind: scalar_head`` sharing the actor's tokenizer; its ``head_bias``
                (unset: False, the reference code's bias-free head) applies to the critic too.
            detector_checkpoint: a pretrained detector (:func:`~lit_align.watermark.players.detector_state`).
            reference: ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto`` (adapter with LoRA).
            sampling: how continuations are sampled (``do_sample`` must be true; the paper: 128 new tokens on C4).
            rewards: KL penalty, reward clip, GAE and whitening (:class:`~lit_align.watermark.config.RewardShaping`).
            ppo: epochs, minibatch size (rows per rank) and clip ranges of the PPO update.
            detector_training: stage 1, the detector's loss and robustness terms (:mod:`lit_align.watermark.config`).
            optimization: one block per player (``actor``, ``critic``, ``detector``: optimizer, scheduler, lr,
                gradient_clip); each scheduler advances once per optimiser step of its player (the paper: cosine
                with warm-up for actor and critic, ``lit_align.schedulers.WarmupCosineLR``). Unset: :data:`PLAYERS`.
            alignment: watermarking during alignment (:class:`~lit_align.watermark.config.AlignmentMix`).
            other_llm: another LLM's text as negatives (:class:`~lit_align.watermark.config.OtherLLM`).
            eos_action: False, the reference code's rule (the paper does not say): a generated EOS is no PPO
                action (it stays a step of the rewards and GAE) and the detector and the critic read the text
                before it. True, lit_align's earlier rule: EOS is the last action and the detector reads it.
            sample_seed: seed of every draw; step ``k`` draws for example ``i`` from ``(sample_seed, k, purpose,
                i)`` (:func:`lit_align.engine.derive_seed`): the same on any number of ranks and after a resume.
            export_detector: at the end of fit write the detector to ``<default_root_dir>/detector_export``.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        super().__init__(model, reference=online_reference(model, reference, "watermarking"), chunk_tokens=chunk_tokens)
        if not sampling.do_sample:
            raise ConfigError("model.sampling.do_sample must be true: PPO needs sampled continuations")
        self.automatic_optimization = False
        self.detector_spec, self.detector_checkpoint = detector_spec(detector), detector_checkpoint
        self.sampling, self.rewards, self.ppo, self.detector_training = (  # copies: a default is never shared
            dataclasses.replace(b) for b in (sampling, rewards, ppo, detector_training))
        self.alignment_config, self.other_llm_config = alignment, other_llm
        self.eos_action, self.sample_seed, self.export_detector = eos_action, sample_seed, export_detector
        self.players = {name: Player(name, block, _adam)
                        for name, block in resolve_optimization(optimization, PLAYERS).items()}
        self.timer = PhaseTimer()
        self.detector = self.critic = self.alignment = self.other_llm = None  # built in configure_model
        self._alignment_tokenizer = None  # the alignment reward model's, when its vocabulary differs
        self.step_count = 0  # steps done (the stage is derived from it); in checkpoints
        self._val_metrics = DetectionMetrics()

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        check_vocabulary(self.detector_spec.model, self.spec, self.tokenizer, "model.detector.model.tokenizer")
        sharded = {}
        if self.device_mesh is not None:  # FSDP2: detector and critic sharded like the policy
            sharded = {"mesh": self.device_mesh["data_parallel"], "mp_policy": bf16_policy(self.trainer.precision),
                       "device": self.trainer.strategy.root_device, "rank": self.global_rank}
        self.detector, self.critic = build_scorers(self.detector_spec, self.tokenizer, self.detector_checkpoint,
                                                   **sharded)  # the critic: same start, separate parameters
        if self.other_llm_config is not None:
            check_vocabulary(self.other_llm_config.model, self.spec, self.tokenizer, "model.other_llm.model.tokenizer")
            self.other_llm = freeze(build_causal_lm(self.other_llm_config.model, self.tokenizer))
        if self.alignment_config is not None:
            self.alignment, self._alignment_tokenizer = build_alignment(self.alignment_config.reward, self.tokenizer)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "WatermarkModule")

    def on_fit_start(self) -> None:
        # shortcut hygiene: LLM and human continuations get the same length cap, or the
        # detector learns lengths instead of a watermark
        cap = getattr(self.trainer.datamodule, "continuation_tokens", None)
        replaced = self.other_llm_config is not None and self.other_llm_config.mode == "replace"
        human_text = not self.detector_training.human_from_reference and not replaced
        if cap is not None and human_text and cap != self.sampling.max_new_tokens:
            raise ConfigError(f"data.continuation_tokens ({cap}) and model.sampling.max_new_tokens "
                              f"({self.sampling.max_new_tokens}) must be equal: a length difference between human "
                              "and LLM text is a shortcut for the detector")

    def configure_optimizers(self):
        params = {"actor": self.policy.parameters(), "critic": self.critic.parameters(),
                  "detector": self.detector.parameters()}
        return configure_players(list(self.players.values()), {k: list(v) for k, v in params.items()})

    # -- API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, prompt: str, text: str) -> float:
        """The detector's score of ``text`` continuing ``prompt`` (higher: more likely the watermarked LLM's)."""
        ids = self.tokenizer(prompt)["input_ids"] + retokenize([text], self.tokenizer)[0]
        ids_t = torch.tensor([ids], device=self.device)
        return float(self.detector.score(ids_t, torch.ones_like(ids_t)))

    def save_detector(self, path: str | Path) -> Path:
        """Write the detector (:func:`lit_align.watermark.players.save_detector`; under FSDP2 every rank calls it);
        ``detector_checkpoint`` reloads it (a LoRA detector: from a Lightning checkpoint's ``detector.*`` keys)."""
        return save_detector(self.detector, self.tokenizer, path, self.global_rank)

    # -- one step's parts ----------------------------------------------------------------------
    def _rng(self, purpose: str) -> torch.Generator:
        """The step's generator for one draw, named by what it is for (:func:`lit_align.engine.derive_seed`)."""
        return generator(self.sample_seed, self.step_count, purpose, device=self.device)

    def _row_rngs(self, purpose: str, index: Tensor) -> list[torch.Generator]:
        """One generator per row from its example's global ``index`` (:func:`lit_align.engine.row_generators`):
        what a row draws is the same on one rank or several, in any batch, and after a resume."""
        return row_generators(self.sample_seed, self.step_count, purpose, index.tolist(), device=self.device)

    @torch.no_grad()
    def _generate(self, batch: CompletionBatch, from_reference: bool = False, model=None) -> Rollout:
        """Continuations of the batch's prompts by the actor, the reference or ``model`` (the other LLM)."""
        name = "other_llm" if model is not None else "reference" if from_reference else "actor"
        model, context = self._reference_args() if from_reference else (model if model is not None else self.policy, None)
        with eval_mode(self.policy), context() if context is not None else nullcontext():
            return sample(model, batch.prompt_ids, batch.prompt_mask, self.sampling,
                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                          generator=self._row_rngs(f"{name}/sample", batch.index))

    def _human(self, batch: CompletionBatch) -> SequenceBatch:
        """The negatives of the detector's main pair: the human continuations, or samples of the frozen
        reference (``human_from_reference``) or, with ``other_llm.mode: replace``, of the other LLM."""
        if self.other_llm_config is not None and self.other_llm_config.mode == "replace":
            return self._other_llm_text(batch)
        if not self.detector_training.human_from_reference:
            return batch.human
        return text.as_batch(self._generate(batch, from_reference=True), batch.index)

    def _other_llm_text(self, batch: CompletionBatch) -> SequenceBatch:
        """The other LLM's continuations of the batch's prompts (``other_llm``)."""
        return text.as_batch(self._generate(batch, model=self.other_llm), batch.index)

    def _detector_view(self, batch: SequenceBatch, add_eos: Tensor | None = None) -> SequenceBatch:
        """What the detector reads (:func:`lit_align.watermark.text.detector_view`)."""
        return text.detector_view(batch, self.tokenizer, max_tokens=self.sampling.max_new_tokens, add_eos=add_eos,
                                  retokenize_text=self.detector_training.retokenize_text, eos_action=self.eos_action)

    def _detector_scores(self, batch: SequenceBatch, add_eos: Tensor | None = None) -> Tensor:
        view = self._detector_view(batch, add_eos)
        return self.detector.score(view.input_ids, view.attention_mask)

    def _keep(self, rollout: Rollout) -> Tensor:
        """(B,) the rows with >= 2 actions (the reference drops samples with <= 1 generated token)."""
        return response_actions(rollout, self._eos_not_action()).sum(-1) >= 2

    def _eos_not_action(self) -> int | None:  # make_experience's eos_token_id
        return None if self.eos_action else self.tokenizer.eos_token_id

    def _ended_with_eos(self, rollout: Rollout) -> Tensor:  # (B,)
        return text.ended_with_eos(rollout, self.tokenizer.eos_token_id)

    @torch.no_grad()
    def _scores(self, rollout: Rollout) -> Tensor:
        """(B,) PPO reward of each continuation: the detector's score, mixed with the alignment reward."""
        detector = self._detector_scores(text.as_batch(rollout))
        if self.alignment is None:
            return detector
        ids, mask = rollout.sequences, rollout.attention_mask
        if self._alignment_tokenizer is not None:  # another vocabulary: through text
            ids, mask = text.encode_for(self._alignment_tokenizer, self.tokenizer, ids, mask)
        weight = self.alignment_config.weight
        return weight * detector + (1.0 - weight) * self.alignment.score(ids, mask)

    def _substituted(self, view: SequenceBatch) -> Tensor:
        """``view``'s ids with ``substitution_ratio`` of each continuation's tokens replaced at random, each row
        drawn from its own generator (:meth:`_row_rngs`)."""
        ratio, rows = self.detector_training.substitution_ratio, len(self.tokenizer)
        return torch.cat([random_substitution(ids[None], mask[None], ratio, rows, generator=g) for ids, mask, g
                          in zip(view.input_ids, view.loss_mask, self._row_rngs("substitution", view.index))])

    def _detector_objective(self, rollout: Rollout, human: SequenceBatch, other: SequenceBatch | None, keep: Tensor,
                            index: Tensor | None = None, kept: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """The detector's loss on the kept rows (:func:`~lit_align.watermark.objective.kept_objective`; ``kept``:
        all ranks' count, if reduced): the LLM's continuations vs ``human``, plus the robustness pairs (paraphrase
        and substitution of the LLM's text vs ``human``; the LLM's text vs the ``other`` LLM's, ``other_llm.mode:
        add``). Every row is scored (the same forwards on every rank); ``(loss to backward, loss, metrics)``."""
        cfg = self.detector_training
        llm = self._detector_view(text.as_batch(rollout, index))
        s_w = self.detector.score(llm.input_ids, llm.attention_mask)
        ended = self._ended_with_eos(rollout)
        s_h = self._detector_scores(human, add_eos=ended)
        extra: list[DetectorPair] = []
        if cfg.paraphraser is not None:
            ids, mask = text.paraphrased(rollout, cfg.paraphraser, self.tokenizer, max_tokens=self.sampling.max_new_tokens)
            extra.append(DetectorPair("paraphrase", self.detector.score(ids, mask), s_h, cfg.paraphrase_weight))
        if cfg.substitution_ratio > 0:
            attacked = self.detector.score(self._substituted(llm), llm.attention_mask)
            extra.append(DetectorPair("substitution", attacked, s_h, cfg.substitution_weight))
        if other is not None:
            s_o = self._detector_scores(other, add_eos=ended)
            extra.append(DetectorPair("other_llm", s_w, s_o, self.other_llm_config.weight))
        return kept_objective(s_w, s_h, extra, keep, global_share(keep.sum(), kept), reg=cfg.reg, reg_extra=cfg.reg_extra)

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, batch: CompletionBatch, batch_idx: int) -> None:
        self.timer.reset()
        stage_one = self.detector_training.pretrain_steps
        cotrain = self.step_count >= stage_one
        if stage_one > 0 and self.step_count == stage_one:
            # stage 2: the critic from the pretrained detector, as the reference's value net (separate parameters)
            self.critic.load_state_dict(self.detector.state_dict())
        with self.timer("generate"):
            rollout = self._generate(batch)
            human = self._human(batch)
            add = self.other_llm_config is not None and self.other_llm_config.mode == "add"
            other = self._other_llm_text(batch) if add else None
        keep = self._keep(rollout)  # mask samples with <= 1 generated token, as the released code drops them
        dropped, kept = sums_over_ranks((~keep).sum(), keep.sum())  # every rank's, in one collective
        metrics: dict[str, Tensor] = {"dropped": dropped.float(), "stage": torch.tensor(float(cotrain) + 1.0)}
        if kept == 0:  # decided on every rank's rows: all ranks skip, or none
            self.step_count += 1
            self._log_train(metrics, len(batch))
            return
        with self.timer("score"):
            scores = self._scores(rollout)  # (B,)
        with overlapped_steps():  # under DDP each player's gradient collective runs while the next computes
            if cotrain:
                with self.timer("experience"):
                    reference, context = self._reference_args()
                    r = self.rewards
                    exp = make_experience(self.policy, reference, self.critic, rollout, scores, kl_coef=r.kl_coef,
                                          reward_clip=r.reward_clip, gamma=r.gamma, lam=r.lam,
                                          whiten_advantages=r.whiten_advantages, reference_context=context,
                                          eos_token_id=self._eos_not_action(), keep_shape=True, reduce=sum_over_ranks)
                metrics.update({"reward": exp.metrics["score"], "kl": exp.metrics["kl"]})
                with self.timer("update"):
                    ppo = ppo_update(self.policy, self.critic, exp, self.ppo,
                                     step_policy=lambda loss: self.players["actor"].step(self, loss),
                                     step_critic=lambda loss: self.players["critic"].step(self, loss),
                                     generator=self._rng("shuffle"), chunk_tokens=self.chunk_tokens)
                metrics.update({(k if k.startswith("critic/") else f"actor/{k}"): v for k, v in ppo.items()})
            else:
                metrics["reward"] = scores.mean()
            with self.timer("detector"):  # reads the detector alone: the critic's step may still be in flight
                scaled, loss, dm = self._detector_objective(rollout, human, other, keep, batch.index, kept)
                self.players["detector"].step(self, scaled)
                settle_steps()  # here, not at the block's end: the detector's wait counts as time/detector
        metrics.update({"detector/loss": loss, **{f"detector/{k}": v for k, v in dm.items()}})
        self.step_count += 1
        self._log_train(metrics, len(batch))

    def _log_train(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        for key, value in {**metrics, **self.timer.metrics()}.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=batch_size,
                     prog_bar=key in ("reward", "detector/accuracy"))

    def on_train_end(self) -> None:
        if self.export_detector:  # every rank: the sharded detector is gathered
            path = self.save_detector(Path(self.trainer.default_root_dir) / "detector_export")
            if self.trainer.is_global_zero:
                print(f"exported the detector to {path} (load with WatermarkModule(detector_checkpoint=...))")

    # -- validation ----------------------------------------------------------------------------
    def _eval_step(self, batch: CompletionBatch, stage: str) -> None:
        """Score every row (the same forwards on every rank), then log and accumulate the kept ones; a batch
        without kept rows logs zeros of weight 0, so every rank logs the same keys."""
        rollout = self._generate(batch)
        human = self._human(batch)
        keep = self._keep(rollout)
        with torch.no_grad():
            s_w = self._detector_scores(text.as_batch(rollout))[keep]
            s_h = self._detector_scores(human, add_eos=self._ended_with_eos(rollout))[keep]
            loss, metrics = detector_loss(s_w, s_h, reg=self.detector_training.reg) if keep.any() else \
                (s_w.new_zeros(()), dict.fromkeys(("accuracy", "chosen", "rejected", "margin"), s_w.new_zeros(())))
        self.log_stage(stage, loss, {f"detector/{k}": v for k, v in metrics.items()}, int(keep.sum()))
        self._val_metrics.update(torch.cat([s_w, s_h]), torch.cat([torch.ones_like(s_w), torch.zeros_like(s_h)]))

    def validation_step(self, batch: CompletionBatch, batch_idx: int) -> None:
        """``val/loss`` (the detector's pairwise loss) and, per epoch, ``val/auroc`` etc. on fresh samples."""
        self._eval_step(batch, "val")

    def test_step(self, batch: CompletionBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: CompletionBatch, batch_idx: int) -> list[dict[str, str]]:
        """Greedy continuations of the batch's prompts by the (watermarked) LLM."""
        return super().predict_step(batch.human, batch_idx)

    def _log_detection(self, stage: str) -> None:
        """Detection metrics over every rank's scores (the metric's states are gathered by ``compute``)."""
        if any_rank(any(len(s) for s in self._val_metrics.scores)):
            for key, value in self._val_metrics.compute().items():
                self.log(f"{stage}/{key}", value, sync_dist=True)  # the same on every rank (gathered scores)
        self._val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_detection("val")

    def on_test_epoch_end(self) -> None:
        self._log_detection("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["watermark"] = {"step_count": self.step_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.step_count = checkpoint.get("watermark", {}).get("step_count", 0)
