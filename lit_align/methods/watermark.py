"""Model-level watermarking: co-train the LLM (PPO) and a detector of its text."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.data.batches import SequenceBatch
from lit_align.data.completion import CompletionBatch, retokenize
from lit_align.data.tokenize import _collate_sequences
from lit_align.engine import PhaseTimer, PPOConfig, generator, player_step, ppo_update, row_generators
from lit_align.engine.distributed import any_rank, global_share, refuse_fsdp1, sum_over_ranks
from lit_align.errors import ConfigError
from lit_align.losses.watermark import DetectorPair, detector_loss
from lit_align.methods.base import ReferencedPolicyModule
from lit_align.metrics.detection import DetectionMetrics, random_substitution
from lit_align.models import (
    ModelSpec,
    RewardModelSpec,
    ValueModel,
    build_causal_lm,
    build_reward_model,
    build_tokenizer,
    freeze,
)
from lit_align.modes import eval_mode
from lit_align.rollout.experience import make_experience, response_actions
from lit_align.rollout.sampler import Rollout, SamplingConfig, sample
from lit_align.watermark.objective import kept_objective
from lit_align.watermark.players import build_scorers, full_state

__all__ = ["WatermarkModule"]


def _adam(betas=(0.9, 0.95)):
    def factory(lr: float):
        return lambda params: torch.optim.Adam(params, lr=lr, betas=betas)
    return factory


class WatermarkModule(ReferencedPolicyModule):
    """Learning to watermark LLM text by RL (Xu, Yao, Liu 2024, arXiv 2403.10553).

    Players (manual optimisation, one optimiser each): the **actor** (the LLM, LoRA or full), its
    **critic** (a value head on a copy of the detector, initialised from it but with its own
    parameters) and the **detector** (a backbone + scalar head read at the last real token of
    prompt + continuation). The reference is the actor with LoRA switched off (``adapter``) or a
    frozen copy.

    Each step, in the order of the released code's training loop (github.com/xiaojunxu/learning-to-watermark-llm,
    ``main.py``):

    1. **generate** continuations of the batch's prompts with the actor (sampling);
    2. **score** them with the detector (optionally ``alignment_weight``-mixed with an alignment
       reward model), compute old / reference log-probs and values, KL-shaped rewards and GAE;
    3. **PPO update** of actor and critic (``ppo_epochs`` over minibatches);
    4. **detector update** on the same batch: the continuations generated in step 1 (before the
       PPO update) against the human continuations of the same prompts, pairwise loss + score
       penalty, + the robustness terms: random substitution (``substitution_ratio``), paraphrase
       (``paraphraser``), another LLM's text as negatives (``other_llm``).

    The first ``detector_pretrain_steps`` steps are stage 1 (detector pretraining on the original
    LLM's continuations; the actor and critic are not updated); when stage 2 starts, the critic is
    set to a copy of the pretrained detector (the reference code starts the value net from the
    pretrained detector checkpoint). Rows with fewer than two generated tokens (EOS not counted
    unless ``eos_action``) are dropped and counted (``train/dropped``).

    ``human_from_reference`` replaces the human continuations by samples of the frozen reference (a
    control for tiny models on CPU: the classes start indistinguishable, so any separation comes from
    the actor's update).

    Where the paper does not say, the defaults follow its released code (``main.py``, ``utils.py``,
    ``model_utils.py``), each with a switch to lit_align's earlier rule: ``eos_action`` (is EOS a PPO
    action and part of the detector's text), ``detector_reg_extra`` (the score penalty on the robustness
    terms too), ``other_llm_mode`` (another LLM's text as an extra pair or instead of the human text)
    and ``detector.head_bias`` (a bias in the detector's and critic's scalar head).

    Logged: ``train/reward``, ``train/kl`` (summed log-ratio per response), PPO metrics under
    ``train/actor/`` and ``train/critic/``, ``train/detector/{loss,accuracy,chosen,rejected}`` (and
    ``train/detector/<term>/{loss,accuracy}`` of each robustness term),
    ``train/time/{generate,score,update,detector}``, ``train/stage``; ``val/auroc``,
    ``val/tpr_at_fpr_1``, ``val/fpr_at_tpr_{90,99}`` on sampled continuations vs human ones.

    Data parallel (DDP, FSDP2 via ``ModelParallelStrategy``; ``callbacks/ddp_cpu.yaml``,
    ``callbacks/fsdp2_cpu.yaml``): each rank generates for its share of the prompts, each continuation
    sampled from a generator seeded by its prompt's global index (so N ranks sample what one process
    samples on the global batch); experience stays on its rank, advantage whitening uses global moments, and
    the PPO and detector losses are means over every rank's tokens / kept rows
    (:func:`~lit_align.engine.distributed.global_share`); a short row is masked, never dropped, and
    whether a step updates at all is decided on every rank's rows. The actor, critic and detector are
    replicated under DDP (gradients averaged per optimiser step) and sharded under FSDP2
    (:mod:`lit_align.watermark.players`; the frozen reference copy too); the frozen other LLM and
    alignment reward model are replicated on every rank. Validation scores are gathered from every rank
    (``val/auroc`` is over the whole validation set). FSDP1 (``FSDPStrategy``) is refused.
    """

    def __init__(
        self,
        model: ModelSpec,
        detector: RewardModelSpec,
        detector_checkpoint: str | None = None,
        reference: Literal["auto", "adapter", "copy"] = "auto",
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        kl_coef: float = 0.1,
        reward_clip: float = 5.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip: float = 0.2,
        value_clip: float = 0.2,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        whiten_advantages: bool = False,
        detector_reg: float = 1e-4,
        detector_reg_extra: bool = False,
        eos_action: bool = False,
        substitution_ratio: float = 0.0,
        substitution_weight: float = 1.0,
        detector_pretrain_steps: int = 0,
        human_from_reference: bool = False,
        alignment_reward: RewardModelSpec | None = None,
        alignment_weight: float = 0.5,
        paraphraser: Callable[[list[str]], list[str]] | None = None,
        paraphrase_weight: float = 1.0,
        other_llm: ModelSpec | None = None,
        other_llm_mode: Literal["add", "replace"] = "add",
        other_llm_weight: float = 1.0,
        retokenize_text: bool = True,
        export_detector: bool = True,
        gradient_clip: float | None = 1.0,
        sample_seed: int = 0,
        actor_lr: float = 1e-5,
        critic_lr: float = 5e-6,
        detector_lr: float = 1e-5,
        optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        detector_optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        critic_scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the LLM to watermark (the actor; LoRA recommended: the reference then costs no copy).
            detector: the detector's backbone and head: a causal LM with ``kind: scalar_head`` sharing the actor's
                tokenizer (anything else is refused). Its ``head_bias`` (unset: False, the reference code's
                bias-free head; True: lit_align's earlier head with a bias) applies to the critic too.
            detector_checkpoint: weights of a pretrained detector (a Lightning checkpoint or state dict with
                ``detector.*`` keys, as a ``torch.save`` file read with ``weights_only=True`` or a
                ``.safetensors`` file, or a ``save_detector`` directory); the critic starts from them too.
            reference: ``adapter`` (LoRA off), ``copy`` (frozen copy) or ``auto`` (adapter with LoRA).
            max_new_tokens, temperature, top_p: sampling of the continuations (the paper: 128 for C4).
            kl_coef: per-token KL penalty (the paper's ``kl_rl`` = 0.1).
            reward_clip: the detector score is clipped to +-this before it enters the reward (5).
            gamma, lam, clip, value_clip: GAE and PPO clipping (1, 0.95, 0.2, 0.2).
            ppo_epochs, minibatch_size: PPO passes over the batch and their minibatch size (1, the batch).
            whiten_advantages: normalise advantages over the batch's tokens (off in the reference).
            detector_reg: the detector's squared-score penalty (1e-4).
            detector_reg_extra: also put that penalty on the robustness terms (paraphrase, substitution,
                other LLM). False, the default, is the reference code's rule: ``main.py`` adds it to the
                main (LLM vs human) pair only; the paper does not say. True is lit_align's earlier rule.
            eos_action: False, the default, is the reference code's rule (the paper does not say): it pads
                with EOS, so a generated EOS is not a PPO action (no policy or value loss on it; it stays
                a step of the rewards and GAE, where the clipped score sits, see
                :mod:`lit_align.rollout.experience`), rows need >= 2 generated tokens besides the EOS, and
                the detector reads every continuation (the LLM's, the human's, the other LLM's) without
                EOS, i.e. its score and the critic's terminal value are read at the last token before
                the first EOS. True, lit_align's earlier rule: EOS is the last action, and the detector
                reads it (a human continuation gets an EOS where the LLM's continuation of the same
                prompt ended with one, so the presence of EOS tells nothing).
            substitution_ratio: robustness term: also train the detector on the generated text with
                this share of tokens replaced at random, still labelled watermarked (the paper: 0.2; 0 off).
            substitution_weight: weight of that term (1.0 in the reference).
            detector_pretrain_steps: stage 1 length in steps (detector only, on the original LLM's text); when
                co-training starts, the critic becomes a copy of the detector so trained (the reference code
                starts its value net from the stage-1 detector checkpoint).
            human_from_reference: take the "human" continuations from the frozen reference's samples.
            alignment_reward: a frozen alignment reward model (watermarking during RLHF): the PPO reward
                becomes ``alignment_weight * detector + (1 - alignment_weight) * alignment`` (the paper: 0.5).
                With another tokenizer the texts are decoded and re-encoded for it (cut to its
                ``model_max_length``), so an encoder classifier (BERT, DeBERTa; ``kind:
                sequence_classification``, no EOS token needed) serves as well as a decoder reward model.
            alignment_weight: the detector's share of that mix (lambda).
            paraphraser: robustness term: also train the detector on paraphrases of the generated
                continuations, still labelled watermarked (the paper: Pegasus at temperature 1.5; e.g.
                ``lit_align.metrics.HFParaphraser``); ``None``: off.
            paraphrase_weight: weight of that term (1.0 in the reference).
            other_llm: "H+L": continuations sampled from this other (frozen) LLM (same tokenizer as the
                actor) serve as further negatives of the detector, see ``other_llm_mode``.
            other_llm_mode: ``add`` (default, the reference code's rule: ``main.py`` keeps the human pair
                and adds the pair "LLM text vs the other LLM's text" at weight ``other_llm_weight``; the
                paper does not say) or ``replace`` (lit_align's earlier rule: the other LLM's text
                replaces the human text as the negatives of the main pair, validation included).
            other_llm_weight: weight of the added pair (1.0 in the reference code; ``add`` only).
            retokenize_text: the detector reads every continuation (the LLM's and the human's) as
                text decoded and encoded again the same way, not as the sampled token ids: a sampled
                id sequence can be one the tokenizer never produces from text, a shortcut that would
                separate the classes without a watermark. Off: raw ids.
            export_detector: at the end of training write the detector with :meth:`save_detector` to
                ``<default_root_dir>/detector_export`` (the watermarked LLM: the ``HFExport`` callback).
            gradient_clip: global-norm clip applied to each player's gradients (1.0; None: off).
            sample_seed: seed of the sampling (and substitution) randomness; step ``k`` draws from
                ``(sample_seed, k, purpose)`` (:func:`lit_align.engine.derive_seed`), so a resumed run samples
                what the uninterrupted run would have.
            actor_lr, critic_lr, detector_lr: Adam (betas 0.9, 0.95) learning rates when the
                corresponding optimiser is not given (the paper: LoRA 5e-4 / full 1e-5, 5e-6, 1e-5).
            optimizer, critic_optimizer, detector_optimizer: optimiser factories for the three players.
            scheduler, critic_scheduler: LR schedules of the actor and the critic, each stepped once per
                optimiser step of its player (the engine's rule; as DeepSpeed-Chat, the reference's base,
                steps them), which is once per co-training step with one PPO epoch over one minibatch (the
                paper: cosine with warm-up ``min(100, steps // 10)``, e.g. ``lit_align.schedulers.WarmupCosineLR``;
                the detector has none).
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        if reference == "auto":
            reference = "adapter" if model.lora is not None else "copy"
        if reference not in ("adapter", "copy"):
            raise ConfigError("model.reference must be 'adapter' or 'copy' for watermarking (new text is scored every "
                             f"step: nothing can be precomputed), got {reference!r}")
        super().__init__(model, reference=reference, optimizer=optimizer, scheduler=scheduler, chunk_tokens=chunk_tokens)
        self.critic_scheduler_factory = critic_scheduler
        if detector.kind != "scalar_head":
            raise ConfigError(f"model.detector.kind={detector.kind!r}: the detector must be a causal LM with a scalar "
                             "head (kind: scalar_head) sharing the actor's tokenizer: it is trained on the actor's "
                             "token ids and the critic starts as its copy. A sequence classifier (e.g. an encoder "
                             "reward model with its own tokenizer) can serve as model.alignment_reward instead")
        for name, value in (("max_new_tokens", max_new_tokens), ("ppo_epochs", ppo_epochs)):
            if value < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {value}")
        if not 0.0 <= substitution_ratio < 1.0:
            raise ConfigError(f"model.substitution_ratio must be in [0, 1), got {substitution_ratio}")
        if other_llm_mode not in ("add", "replace"):
            raise ConfigError(f"model.other_llm_mode must be 'add' (an extra pair, the reference code) or 'replace' "
                             f"(instead of the human text), got {other_llm_mode!r}")
        self.automatic_optimization = False
        if detector.head_bias is None:  # the reference code's bias-free head
            detector = dataclasses.replace(detector, head_bias=False)
        self.detector_spec, self.detector_checkpoint = detector, detector_checkpoint
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                       top_p=top_p)
        self.kl_coef, self.reward_clip, self.gamma, self.lam = kl_coef, reward_clip, gamma, lam
        self.ppo = PPOConfig.from_module_args(ppo_epochs=ppo_epochs, minibatch_size=minibatch_size, clip=clip,
                                              value_clip=value_clip)
        self.timer = PhaseTimer()
        self.whiten_advantages, self.detector_reg = whiten_advantages, detector_reg
        self.detector_reg_extra, self.eos_action = detector_reg_extra, eos_action
        self.substitution_ratio, self.substitution_weight = substitution_ratio, substitution_weight
        self.detector_pretrain_steps, self.human_from_reference = detector_pretrain_steps, human_from_reference
        if not 0.0 <= alignment_weight <= 1.0:
            raise ConfigError(f"model.alignment_weight (the detector's share of the reward) must be in [0, 1], "
                             f"got {alignment_weight}")
        self.alignment_spec, self.alignment_weight = alignment_reward, alignment_weight
        self.alignment: torch.nn.Module | None = None
        self._alignment_tokenizer = None
        self.paraphraser, self.paraphrase_weight, self.other_llm_spec = paraphraser, paraphrase_weight, other_llm
        self.other_llm_mode, self.other_llm_weight = other_llm_mode, other_llm_weight
        self.other_llm: torch.nn.Module | None = None
        self.retokenize_text, self.export_detector = retokenize_text, export_detector
        self.gradient_clip, self.sample_seed = gradient_clip, sample_seed
        self.critic_optimizer_factory = critic_optimizer or _adam()(critic_lr)
        self.detector_optimizer_factory = detector_optimizer or _adam()(detector_lr)
        if optimizer is None:
            self.optimizer_factory = _adam()(actor_lr)
        self.detector: torch.nn.Module | None = None
        self.critic: ValueModel | None = None
        self.step_count = 0  # co-training steps done (the stage is derived from it); in checkpoints
        self._val_metrics = DetectionMetrics()

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        detector_tok = self.detector_spec.model.tokenizer or self.detector_spec.model.name_or_path
        actor_tok = self.spec.tokenizer or self.spec.name_or_path
        if detector_tok != actor_tok:
            other = build_tokenizer(self.detector_spec.model, key="model.detector.model", needs_eos=False)
            if other.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"model.detector.model.tokenizer: the detector must be a causal LM sharing the actor's "
                                 f"tokenizer, and its tokenizer ({detector_tok or 'bundled'}) differs from the actor's "
                                 f"({actor_tok or 'bundled'}); give model.detector.model.tokenizer the actor's tokenizer "
                                 "(re-tokenising every text between two vocabularies is not implemented). A reward "
                                 "model with another tokenizer (e.g. a BERT classifier) fits model.alignment_reward")
        sharded = {}
        if self.device_mesh is not None:  # FSDP2: detector and critic sharded like the policy
            sharded = {"mesh": self.device_mesh["data_parallel"], "mp_policy": self._mixed_precision(),
                       "device": self.trainer.strategy.root_device, "rank": self.global_rank}
        self.detector, self.critic = build_scorers(self.detector_spec, self.tokenizer, self.detector_checkpoint,
                                                   **sharded)  # the critic: same start, separate parameters
        if self.other_llm_spec is not None:
            other = build_tokenizer(self.other_llm_spec, key="model.other_llm", needs_eos=False)
            if other.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError("model.other_llm must be a causal LM sharing the actor's tokenizer (its continuations "
                                 "are scored as token ids); give model.other_llm.tokenizer the actor's tokenizer")
            self.other_llm = freeze(build_causal_lm(self.other_llm_spec, self.tokenizer))
        if self.alignment_spec is not None:
            # any scorer of text: a decoder reward model or an encoder classifier (no EOS needed), any vocabulary
            tokenizer = build_tokenizer(self.alignment_spec.model, key="model.alignment_reward.model", needs_eos=False)
            same = tokenizer.get_vocab() == self.tokenizer.get_vocab()
            self._alignment_tokenizer = None if same else tokenizer
            self.alignment = freeze(build_reward_model(self.alignment_spec, tokenizer, key="model.alignment_reward"))

    def _mixed_precision(self):
        """FSDP2's bf16 policy under ``trainer.precision: bf16*`` (as the policy's), else None."""
        if not str(self.trainer.precision).startswith("bf16"):
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def setup(self, stage: str) -> None:
        refuse_fsdp1(self.trainer.strategy, "WatermarkModule")

    def on_fit_start(self) -> None:
        # shortcut hygiene: LLM and human continuations get the same length cap, or the
        # detector learns lengths instead of a watermark
        cap = getattr(self.trainer.datamodule, "continuation_tokens", None)
        human_text = not self.human_from_reference and (self.other_llm is None or self.other_llm_mode == "add")
        if cap is not None and human_text and cap != self.sampling.max_new_tokens:
            raise ConfigError(f"data.continuation_tokens ({cap}) and model.max_new_tokens ({self.sampling.max_new_tokens}) "
                             "must be equal: a length difference between human and LLM text is a shortcut for the detector")

    def configure_optimizers(self):
        actor = [p for p in self.policy.parameters() if p.requires_grad]
        if not actor:
            raise ConfigError("the actor has no trainable parameters (check model.model.lora.target_modules)")
        critic, detector = ([p for p in m.parameters() if p.requires_grad] for m in (self.critic, self.detector))
        optimizers = [self.optimizer_factory(actor), self.critic_optimizer_factory(critic),
                      self.detector_optimizer_factory(detector)]
        schedulers, self._scheduler_index = [], {}
        for player, factory, opt in (("actor", self.scheduler_factory, optimizers[0]),
                                     ("critic", self.critic_scheduler_factory, optimizers[1])):
            if factory is not None:
                self._scheduler_index[player] = len(schedulers)
                schedulers.append(factory(opt))
        return optimizers, schedulers

    def _step(self, player: str, loss: Tensor) -> None:
        """One optimiser step of ``actor``, ``critic`` or ``detector``, and its scheduler (actor and critic may
        have one; each advances once per optimiser step of its player: :func:`lit_align.engine.optimizer_step`)."""
        player_step(self, loss, optimizer=("actor", "critic", "detector").index(player),
                    scheduler=self._scheduler_index.get(player), clip=self.gradient_clip)

    # -- API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, prompt: str, text: str) -> float:
        """The detector's score of ``text`` as a continuation of ``prompt`` (higher: more likely the
        watermarked LLM's). The prompt is part of the input: the detector learnt to score prompt +
        continuation, so it cannot judge a text without the prompt it continues."""
        ids = self.tokenizer(prompt)["input_ids"] + retokenize([text], self.tokenizer)[0]
        ids_t = torch.tensor([ids], device=self.device)
        return float(self.detector.score(ids_t, torch.ones_like(ids_t)))

    def save_detector(self, path: str | Path) -> Path:
        """Write the detector (backbone with ``save_pretrained``, head in ``head.safetensors``) to ``path``
        (rank 0 writes; under FSDP2 every rank must call it, the weights are gathered).

        ``detector_checkpoint`` reloads such a directory for a full-weight detector; a LoRA detector is
        written as its adapter, so reload it from a Lightning checkpoint (``detector.*`` keys) instead."""
        from safetensors.torch import save_file

        path = Path(path)
        state = full_state(self.detector)  # a collective when sharded: every rank calls save_detector
        if self.global_rank != 0:
            return path
        path.mkdir(parents=True, exist_ok=True)
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.detector.backbone.save_pretrained(path, state_dict=backbone)
        self.tokenizer.save_pretrained(path)
        head = {k.removeprefix("head."): v.contiguous() for k, v in state.items() if k.startswith("head.")}
        save_file(head, str(path / "head.safetensors"))
        return path

    # -- one step ------------------------------------------------------------------------------
    def _reference_args(self) -> tuple[torch.nn.Module, Any]:
        if self.reference.copy is not None:
            return self.reference.copy, None
        return self.policy, lambda: self.policy.disable_adapter()

    def _rng(self, purpose: str) -> torch.Generator:
        """The step's generator for one draw, named by what it is for (:func:`lit_align.engine.seeds.derive_seed`:
        a function of the seed, the step and the purpose, so a resumed run draws the same)."""
        return generator(self.sample_seed, self.step_count, purpose, device=self.device)

    def _row_rngs(self, purpose: str, index: Tensor) -> list[torch.Generator]:
        """One generator per row from its example's global ``index`` (:func:`lit_align.engine.row_generators`):
        what a row draws is the same on one rank or several, in any batch, and after a resume."""
        return row_generators(self.sample_seed, self.step_count, purpose, index.tolist(), device=self.device)

    def _substituted(self, view: SequenceBatch) -> Tensor:
        """``view``'s ids with ``substitution_ratio`` of each continuation's tokens replaced at random, each row
        drawn from its own generator (:meth:`_row_rngs`)."""
        rows = zip(view.input_ids, view.loss_mask, self._row_rngs("substitution", view.index))
        return torch.cat([random_substitution(ids[None], mask[None], self.substitution_ratio, len(self.tokenizer),
                                              generator=g) for ids, mask, g in rows])

    @torch.no_grad()
    def _generate(self, batch: CompletionBatch, from_reference: bool = False) -> Rollout:
        model, context = self._reference_args() if from_reference else (self.policy, None)
        with eval_mode(self.policy), context() if context is not None else _null():
            return sample(model, batch.prompt_ids, batch.prompt_mask, self.sampling,
                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                          generator=self._row_rngs("reference/sample" if from_reference else "actor/sample",
                                                   batch.index))

    def _human(self, batch: CompletionBatch) -> SequenceBatch:
        """The negatives of the detector's main pair: the human continuations, or samples of the frozen
        reference (``human_from_reference``) or, with ``other_llm_mode: replace``, of the other LLM."""
        if self.other_llm is not None and self.other_llm_mode == "replace":
            return self._other_llm_text(batch)
        if not self.human_from_reference:
            return batch.human
        return self._as_batch(self._generate(batch, from_reference=True), batch.index)

    @torch.no_grad()
    def _other_llm_text(self, batch: CompletionBatch) -> SequenceBatch:
        """The other LLM's continuations of the batch's prompts (``other_llm``)."""
        rollout = sample(self.other_llm, batch.prompt_ids, batch.prompt_mask, self.sampling,
                         eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                         generator=self._row_rngs("other_llm/sample", batch.index))
        return self._as_batch(rollout, batch.index)

    @staticmethod
    def _as_batch(rollout: Rollout, index: Tensor | None = None) -> SequenceBatch:
        """A rollout as prompt + continuation rows, ``loss_mask`` on the continuation."""
        loss_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
        index = index if index is not None else torch.arange(len(loss_mask), device=loss_mask.device)
        return SequenceBatch(rollout.sequences, rollout.attention_mask, loss_mask, index)

    def _detector_view(self, batch: SequenceBatch, add_eos: Tensor | None = None) -> SequenceBatch:
        """What the detector reads: prompt + continuation with the continuation decoded and encoded again
        (:func:`~lit_align.data.completion.retokenize`), right-padded; the ids as they are with
        ``retokenize_text: false``. A final EOS is dropped (the reference code reads the score before the
        first EOS), or, with ``eos_action``, kept; then ``add_eos`` (B,) bool appends an EOS to rows that
        lack one: a human continuation gets one where the LLM's continuation of the same prompt ended
        with EOS, so the presence of EOS tells the detector nothing (no shortcut)."""
        eos = self.tokenizer.eos_token_id
        if not self.retokenize_text and add_eos is None and self.eos_action:
            return batch
        rows = []
        for i, (ids, attn, cont) in enumerate(zip(batch.input_ids, batch.attention_mask.bool(), batch.loss_mask.bool())):
            answer = ids[cont & attn].tolist()
            ended = bool(answer) and answer[-1] == eos
            if self.retokenize_text:
                text = self.tokenizer.decode(answer[:-1] if ended else answer, skip_special_tokens=True)
                body = retokenize([text], self.tokenizer, max_tokens=self.sampling.max_new_tokens)[0]
            else:
                body = answer[:-1] if ended else answer
            ended = self.eos_action and (ended or (add_eos is not None and bool(add_eos[i])))
            rows.append((ids[attn & ~cont].tolist(), body + ([eos] if ended else [])))
        view = _collate_sequences(rows, batch.index.tolist(), self.tokenizer.pad_token_id)
        return SequenceBatch(*(t.to(self.device) for t in (view.input_ids, view.attention_mask, view.loss_mask)),
                             batch.index)

    def _keep(self, rollout: Rollout) -> Tensor:
        """(B,) bool: the rows with at least two actions (the reference drops samples with <= 1
        generated token; the EOS counts only with ``eos_action``)."""
        return response_actions(rollout, self._eos_not_action()).sum(-1) >= 2

    def _eos_not_action(self) -> int | None:
        """The ``eos_token_id`` argument of :func:`~lit_align.rollout.experience.make_experience`."""
        return None if self.eos_action else self.tokenizer.eos_token_id

    def _ended_with_eos(self, rollout: Rollout) -> Tensor:
        """(B,) whether each generated continuation ended with EOS."""
        last = (rollout.response_mask.sum(-1) - 1).clamp(min=0)
        return rollout.response_ids.gather(1, last[:, None]).squeeze(1).eq(self.tokenizer.eos_token_id) \
            & rollout.response_mask.any(-1)

    def _detector_scores(self, batch: SequenceBatch, add_eos: Tensor | None = None) -> Tensor:
        view = self._detector_view(batch, add_eos)
        return self.detector.score(view.input_ids, view.attention_mask)

    @torch.no_grad()
    def _scores(self, rollout: Rollout) -> Tensor:
        """(B,) PPO reward of each continuation: the detector's score, mixed with the alignment reward."""
        detector = self._detector_scores(self._as_batch(rollout))
        if self.alignment is None:
            return detector
        ids, mask = rollout.sequences, rollout.attention_mask
        if self._alignment_tokenizer is not None:  # another vocabulary: through text
            texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask)]
            tok = self._alignment_tokenizer
            cap = tok.model_max_length if tok.model_max_length < 100_000 else None  # absolute positions: stay inside
            enc = tok(texts, return_tensors="pt", padding=True, truncation=cap is not None, max_length=cap)
            enc = enc.to(self.device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        aligned = self.alignment.score(ids, mask)
        return self.alignment_weight * detector + (1.0 - self.alignment_weight) * aligned

    def _paraphrased(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """(B, T) prompt + paraphrased continuation of every row, right-padded, re-encoded the same way as
        every other text (:func:`~lit_align.data.completion.retokenize`)."""
        rows = list(range(len(rollout.prompt_ids)))
        texts = [self.tokenizer.decode(rollout.response_ids[i][rollout.response_mask[i].bool()],
                                       skip_special_tokens=True) for i in rows]
        paraphrased = retokenize(self.paraphraser(texts), self.tokenizer, max_tokens=self.sampling.max_new_tokens)
        prompts = [rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist() for i in rows]
        batch = _collate_sequences(list(zip(prompts, paraphrased)), rows, self.tokenizer.pad_token_id)
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    def _detector_objective(self, rollout: Rollout, human: SequenceBatch, other: SequenceBatch | None, keep: Tensor,
                            index: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The detector's loss on the kept rows (:func:`~lit_align.watermark.objective.kept_objective`): the
        LLM's continuations vs ``human``, plus the robustness pairs (paraphrase and substitution of the LLM's
        text vs ``human``; the LLM's text vs the ``other`` LLM's, ``other_llm_mode: add``). Every row is scored
        (the same forwards on every rank); ``(loss to backward, loss, metrics)``."""
        llm = self._detector_view(self._as_batch(rollout, index))
        s_w = self.detector.score(llm.input_ids, llm.attention_mask)
        ended = self._ended_with_eos(rollout)
        s_h = self._detector_scores(human, add_eos=ended)
        extra: list[DetectorPair] = []
        if self.paraphraser is not None:
            para_ids, para_mask = self._paraphrased(rollout)
            extra.append(DetectorPair("paraphrase", self.detector.score(para_ids, para_mask), s_h,
                                      self.paraphrase_weight))
        if self.substitution_ratio > 0:
            attacked = self._substituted(llm)
            extra.append(DetectorPair("substitution", self.detector.score(attacked, llm.attention_mask), s_h,
                                      self.substitution_weight))
        if other is not None:
            s_o = self._detector_scores(other, add_eos=ended)
            extra.append(DetectorPair("other_llm", s_w, s_o, self.other_llm_weight))
        return kept_objective(s_w, s_h, extra, keep, global_share(keep.sum()), reg=self.detector_reg,
                              reg_extra=self.detector_reg_extra)

    def training_step(self, batch: CompletionBatch, batch_idx: int) -> None:
        self.timer.reset()
        cotrain = self.step_count >= self.detector_pretrain_steps
        if self.detector_pretrain_steps > 0 and self.step_count == self.detector_pretrain_steps:
            # stage 2 starts: the critic from the pretrained detector, as the reference's value net
            # starts from the stage-1 checkpoint (separate parameters; it took no step in stage 1)
            self.critic.load_state_dict(self.detector.state_dict())
        with self.timer("generate"):
            rollout = self._generate(batch)
            human = self._human(batch)
            other = self._other_llm_text(batch) if self.other_llm is not None and self.other_llm_mode == "add" else None
        keep = self._keep(rollout)  # mask samples with <= 1 generated token, as the released code drops them
        metrics: dict[str, Tensor] = {"dropped": sum_over_ranks((~keep).sum().float()),
                                      "stage": torch.tensor(float(cotrain) + 1.0)}
        if not any_rank(bool(keep.any())):  # decided on every rank's rows: all ranks skip, or none
            self.step_count += 1
            self._log_train(metrics, len(batch))
            return
        with self.timer("score"):
            scores = self._scores(rollout)  # (B,)
        if cotrain:
            with self.timer("experience"):
                reference, context = self._reference_args()
                exp = make_experience(self.policy, reference, self.critic, rollout, scores, kl_coef=self.kl_coef,
                                      reward_clip=self.reward_clip, gamma=self.gamma, lam=self.lam,
                                      whiten_advantages=self.whiten_advantages, reference_context=context,
                                      eos_token_id=self._eos_not_action(), keep_shape=True, reduce=sum_over_ranks)
            metrics.update({"reward": exp.metrics["score"], "kl": exp.metrics["kl"]})
            with self.timer("update"):
                ppo = ppo_update(self.policy, self.critic, exp, self.ppo,
                                 step_policy=lambda loss: self._step("actor", loss),
                                 step_critic=lambda loss: self._step("critic", loss),
                                 generator=self._rng("shuffle"), chunk_tokens=self.chunk_tokens)
            metrics.update({f"actor/{k}": v for k, v in ppo.items() if not k.startswith("critic/")})
            metrics.update({k: v for k, v in ppo.items() if k.startswith("critic/")})
        else:
            metrics["reward"] = scores.mean()
        with self.timer("detector"):
            scaled, loss, dm = self._detector_objective(rollout, human, other, keep, batch.index)
            self._step("detector", scaled)
        metrics.update({"detector/loss": loss, **{f"detector/{k}": v for k, v in dm.items()}})
        self.step_count += 1
        self._log_train(metrics, len(batch))

    def _log_train(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        for key, value in metrics.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=batch_size,
                     prog_bar=key in ("reward", "detector/accuracy"))
        for key, value in self.timer.metrics().items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=batch_size)

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
            s_w = self._detector_scores(self._as_batch(rollout))[keep]
            s_h = self._detector_scores(human, add_eos=self._ended_with_eos(rollout))[keep]
            if keep.any():
                loss, metrics = detector_loss(s_w, s_h, reg=self.detector_reg)
            else:
                loss = s_w.new_zeros(())
                metrics = dict.fromkeys(("accuracy", "chosen", "rejected", "margin"), loss)
        self._log_stage(stage, loss, {f"detector/{k}": v for k, v in metrics.items()}, int(keep.sum()))
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
        if not any_rank(_has_scores(self._val_metrics)):
            self._val_metrics.reset()
            return
        for key, value in self._val_metrics.compute().items():
            self.log(f"{stage}/{key}", value, sync_dist=True)  # the same on every rank (gathered scores)
        self._val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_detection("val")

    def on_test_epoch_end(self) -> None:
        self._log_detection("test")

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["watermark"] = {"step_count": self.step_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.step_count = checkpoint.get("watermark", {}).get("step_count", 0)


@contextmanager
def _null():
    yield


def _has_scores(metrics: DetectionMetrics) -> bool:
    """Whether this rank's detection metric holds at least one score."""
    return any(len(s) for s in metrics.scores)
