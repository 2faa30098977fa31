"""Iterative online DPO and SELM: generate with the start-of-iteration model, rank, train on the ranked pairs."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from lit_align.data.batches import SequenceBatch
from lit_align.data.online_pairs import OnlinePairs, pair_batch
from lit_align.data.prompts import PromptBatch
from lit_align.data.tokenize import encode_responses
from lit_align.engine.distributed import all_gather_objects, any_rank, global_share, sum_over_ranks
from lit_align.engine.seeds import row_generators
from lit_align.errors import ConfigError, DataError
from lit_align.losses import DPOLoss, PreferenceLoss, dpo_loss
from lit_align.methods.base import prompt_predictions
from lit_align.methods.staged import RefreshMode, StagedPolicyModule
from lit_align.models import ModelSpec
from lit_align.models.reference import model_fingerprint
from lit_align.modes import eval_mode
from lit_align.rewards.rankers import Ranker, select_pair
from lit_align.rollout.sampler import SamplingConfig, sample

__all__ = ["OnlineDPOModule"]


def _which(batch: PromptBatch, rows: list[int]) -> str:
    """Names the first of ``rows`` of ``batch`` for an error: its uid and dataset index (and how many more)."""
    b = rows[0]
    more = f" (and {len(rows) - 1} more prompts of the batch)" if len(rows) > 1 else ""
    return f"prompt {batch.uids[b]!r} (index {int(batch.index[b])}){more}"


class OnlineDPOModule(StagedPolicyModule):
    """Iterative online DPO (Xu et al. 2023; Xiong et al. 2024) and SELM (Zhang et al. 2024, arXiv 2405.19332).

    Iterations are stages of the stage driver (:class:`~lit_align.methods.staged.StagedPolicyModule`): one epoch
    each, over disjoint contiguous prompt slices (``data: PromptDataModule`` with ``iterations: K``). At the start
    of iteration ``i`` the frozen reference copy becomes the policy as it is then (``refresh: previous_stage``), so
    the reference **is** the start-of-iteration model ``pi_{i-1}``. Each training step, on this rank's prompts:

    1. **generate** ``num_candidates`` responses per prompt with the reference (greedy, or sampled from generators
       seeded by ``(sample_seed, iteration, prompt index, j)``: the same on any number of ranks and on resume),
       through a cache keyed by (reference fingerprint, prompt id, sampling settings) that checkpoints keep (every
       rank's entries, gathered);
    2. **rank** them together with the dataset's own responses (``use_dataset_responses``) with ``ranker``
       (prompt and candidate texts, no special tokens); chosen = best, rejected = worst
       (:func:`~lit_align.rewards.rankers.select_pair`: a new response may win; prompts whose candidates all tie
       give no pair and are left out);
    3. **train** on the pairs with the injected loss: ``DPOLoss`` is online DPO; ``SELMLoss`` is SELM, which also
       scores ``y_ref``, the reference's greedy response (candidate 0 when sampling is greedy, else generated
       greedily). The reference log-probs of chosen, rejected and ``y_ref`` all come from the frozen reference in
       one forward (§7(h)4); the policy scores the three in one forward.

    ``offline_first_iteration`` (the Zephyr recipe): iteration 0 is plain offline DPO on the dataset's chosen and
    rejected responses (``dpo_loss`` at the loss's beta), no generation. Per-iteration learning rates:
    ``stage_lrs`` (warm-up then cosine within each iteration; fresh AdamW state with ``reset_optimizer``).

    Data parallel (DDP, FSDP2): each rank generates and ranks its own prompts; the loss is weighted by the rank's
    share of the pairs kept over all ranks, so N ranks equal one process on the global batch. Every rank generates
    when any rank misses the cache (under FSDP2 a forward is a collective), and logs the same keys whether or not
    its batch kept a pair (validation metrics are synced across ranks).

    Logged (``train/`` and ``val/``): ``loss``, ``rewards/*``, ``logps/*`` (SELM: ``logps/pi_response``,
    ``logps/ref_response``, ``optimism``): means over the kept pairs (validation: weighted by pairs over batches
    and ranks, so a batch without a pair counts for nothing; training: this rank's step, left out of a step
    without a pair); ``pairs`` (share of prompts with a pair), ``chosen_new`` / ``rejected_new`` (share of kept
    pairs whose chosen / rejected is a generated response), ``response_length``; ``val/num_pairs`` (pairs kept
    over the validation run, all ranks); ``train/generated`` (prompts generated this step, 0 on a cache hit),
    ``train/iteration``.

    Run: ``lit-align fit --config configs/online_dpo/tiny.yaml`` (online DPO) or ``configs/selm/tiny.yaml`` (SELM).
    """

    def __init__(
        self,
        model: ModelSpec,
        ranker: Ranker,
        loss: PreferenceLoss | None = None,
        num_candidates: int = 1,
        sampling: SamplingConfig | None = None,
        use_dataset_responses: bool = True,
        offline_first_iteration: bool = False,
        max_length: int = 1024,
        max_prompt_length: int = 512,
        sample_seed: int = 0,
        refresh: RefreshMode = "previous_stage",
        reset_optimizer: bool = True,
        stage_lrs: list[float] | None = None,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy (full or LoRA); the reference is a frozen copy of it, refreshed each iteration.
            ranker: labels the candidates (``lit_align.rewards.RewardRanker``, ``PairRMRanker``, ``CallableRanker``).
            loss: ``lit_align.losses.DPOLoss`` (online DPO; default, beta 0.1) or ``SELMLoss`` (SELM: beta 0.01,
                alpha 1e-3); any sum-reduced pairwise loss.
            num_candidates: responses generated per prompt per step (SELM: 1).
            sampling: how they are generated (SELM: greedy, ``do_sample: false``); default greedy, 64 new tokens.
            use_dataset_responses: rank the dataset's own responses of each prompt with the new ones (SELM ranks
                the new response with UltraFeedback's chosen and rejected).
            offline_first_iteration: iteration 0 is plain offline DPO on the dataset's pairs (Zephyr recipe).
            max_length: longest prompt + response scored, in tokens.
            max_prompt_length: tokens a prompt keeps (its last ones) when prompt + response is too long.
            sample_seed: seed of every sampled candidate (:func:`lit_align.engine.derive_seed`).
            refresh: ``previous_stage`` (the iterative method) or ``never`` (the starting model is the reference
                and the generator throughout).
            reset_optimizer: fresh optimiser state at each iteration.
            stage_lrs: peak learning rate of each iteration (SELM: e.g. ``[5e-7, 3e-7, 1e-7]``).
            warmup_ratio: share of each iteration's steps spent warming up (with ``stage_lrs``).
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (without ``stage_lrs``); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        loss = loss if loss is not None else DPOLoss()
        if loss.reduction != "sum":
            raise ConfigError(f"model.loss: online DPO scores summed log-probs; {type(loss).__name__} expects "
                              f"{loss.reduction!r}-reduced ones (use lit_align.losses.DPOLoss or SELMLoss)")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ConfigError(f"model.num_candidates must be an int >= 1, got {num_candidates!r}")
        if num_candidates == 1 and not use_dataset_responses:
            raise ConfigError("model.num_candidates is 1 and model.use_dataset_responses is false: one candidate "
                              "per prompt cannot be ranked into a pair; generate 2 or more, or rank the dataset's "
                              "responses too")
        if not 0 < max_prompt_length < max_length:
            raise ConfigError(f"model.max_prompt_length ({max_prompt_length}) must be in (0, model.max_length = "
                              f"{max_length})")
        super().__init__(model, reference="copy", optimizer=optimizer, scheduler=scheduler, chunk_tokens=chunk_tokens,
                         refresh=refresh, reset_optimizer=reset_optimizer, stage_lrs=stage_lrs,
                         warmup_ratio=warmup_ratio)
        self.loss_fn, self.ranker = loss, ranker
        sampling = sampling if sampling is not None else SamplingConfig(max_new_tokens=64, do_sample=False)
        greedy = not sampling.do_sample
        if greedy and num_candidates > 1 and not use_dataset_responses:
            raise ConfigError(f"model.num_candidates is {num_candidates} with model.sampling.do_sample false and "
                              "model.use_dataset_responses false: greedy candidates of one prompt are all the same "
                              "text, so no prompt ever gives a pair; sample (do_sample: true) or rank the dataset's "
                              "responses too")
        self.num_candidates, self.sampling = num_candidates, dataclasses.replace(sampling)
        self.use_dataset_responses, self.offline_first_iteration = use_dataset_responses, offline_first_iteration
        self.max_length, self.max_prompt_length, self.sample_seed = max_length, max_prompt_length, sample_seed
        self.generations: dict[str, list[int]] = {}  # cache key -> response token ids; in checkpoints
        self.generator_fingerprint: str | None = None  # model_fingerprint of the reference generating now
        self.last_pairs = 0  # pairs kept in the last step on this rank

    # -- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        self.ranker.build(self.tokenizer, "model.ranker")

    def on_stage_start(self, stage: int) -> None:
        """Fingerprint the new generator (the refreshed reference); forget generations of earlier ones."""
        self.generator_fingerprint = model_fingerprint(self.reference.copy)
        self.generations = {k: v for k, v in self.generations.items() if k.startswith(self.generator_fingerprint)}

    # -- generation ----------------------------------------------------------------------------
    def _key(self, uid: str, config: SamplingConfig, j: int) -> str:
        settings = repr(sorted(dataclasses.asdict(config).items()))
        digest = hashlib.sha256(f"{uid}|{settings}|{self.sample_seed}|{j}".encode()).hexdigest()[:24]
        return f"{self.generator_fingerprint}:{digest}"

    @torch.no_grad()
    def _generate(self, batch: PromptBatch, config: SamplingConfig, k: int, purpose: str) -> tuple[list, int]:
        """``k`` responses (token ids, EOS included when generated) per prompt from the reference, cached; and the
        number of prompts actually generated (not found in the cache).

        Every rank generates when any rank misses (one all-reduce): under FSDP2 each forward of the sharded
        reference is a collective, so a rank whose prompts are all cached still runs the sampler (on its first
        prompt, the output discarded) while the others generate."""
        if self.generator_fingerprint is None:  # validation before training, or a module driven by hand
            self.generator_fingerprint = model_fingerprint(self.reference.copy)
        keys = [[self._key(uid, config, j) for j in range(k)] for uid in batch.uids]
        missing = [b for b, row in enumerate(keys) if any(key not in self.generations for key in row)]
        if any_rank(bool(missing)):
            todo = missing or [0]  # nothing missing here: run the sampler in step with the other ranks
            rows = torch.tensor(todo, device=batch.input_ids.device).repeat_interleave(k)
            ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
            rngs = None
            if config.do_sample:
                index = [int(batch.index[b]) * k + j for b in todo for j in range(k)]
                rngs = row_generators(self.sample_seed, max(self.stage, 0), purpose, index, device=self.device)
            with eval_mode(self.reference.copy):
                out = sample(self.reference.copy, ids, mask, config, eos_token_id=self.tokenizer.eos_token_id,
                             pad_token_id=self.tokenizer.pad_token_id, generator=rngs)
            flat = [r[m.bool()].tolist() for r, m in zip(out.response_ids, out.response_mask)]
            for n, (b, j) in enumerate((b, j) for b in missing for j in range(k)):  # none when nothing was missing
                self.generations[keys[b][j]] = flat[n]
        return [[self.generations[key] for key in row] for row in keys], len(missing)

    def _texts(self, new: list[list[list[int]]]) -> list[list[str]]:
        """The generated candidates' text (special tokens dropped), shaped like ``new``; one tokenizer call."""
        flat = iter(self.tokenizer.batch_decode([c for n in new for c in n], skip_special_tokens=True))
        return [[next(flat) for _ in n] for n in new]

    # -- pairs ---------------------------------------------------------------------------------
    def _offline(self, stage: str) -> bool:
        return self.offline_first_iteration and stage == "train" and max(self.stage, 0) == 0

    def _pairs(self, batch: PromptBatch, stage: str) -> tuple[OnlinePairs, dict[str, float]]:
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)]
        dataset = [encode_responses(self.tokenizer, list(rs)) for rs in batch.responses]
        stats: dict[str, float] = {}
        if self._offline(stage):
            short = [b for b, d in enumerate(dataset) if len(d) < 2]
            if short:
                raise DataError(f"model.offline_first_iteration needs each prompt's dataset chosen and rejected "
                                f"responses, but {_which(batch, short)} of data.train has {len(dataset[short[0]])}; "
                                "give every training record `chosen` and `rejected` (data.format: prompt), or set "
                                "model.offline_first_iteration: false")
            pairs = pair_batch(prompts, dataset, [(0, 1)] * len(batch), 0, batch.index, self.tokenizer.pad_token_id,
                               max_length=self.max_length, max_prompt_length=self.max_prompt_length)
            return pairs, stats
        new, generated = self._generate(batch, self.sampling, self.num_candidates, "online_dpo/candidates")
        stats["generated"] = float(generated)
        candidates = [n + (d if self.use_dataset_responses else []) for n, d in zip(new, dataset)]
        short = [b for b, c in enumerate(candidates) if len(c) < 2]
        if short:
            raise DataError(f"{_which(batch, short)} has {len(candidates[short[0]])} candidate to rank (no dataset "
                            f"responses, model.num_candidates = {self.num_candidates}); set model.num_candidates: 2 "
                            "or more, or give every record of that data split a `chosen` and `rejected` response")
        texts = [t + (list(d) if self.use_dataset_responses else [])
                 for t, d in zip(self._texts(new), batch.responses)]  # the dataset's responses as written
        ranks = self.ranker.rank(batch.prompts, texts)
        reference = None
        if self.loss_fn.needs_reference_response:
            if not self.sampling.do_sample:  # the greedy candidate is the reference's greedy response
                reference = [n[0] for n in new]
            else:
                greedy = dataclasses.replace(self.sampling, do_sample=False)
                reference = [g[0] for g in self._generate(batch, greedy, 1, "online_dpo/reference")[0]]
        pairs = pair_batch(prompts, candidates, [select_pair(r) for r in ranks], self.num_candidates, batch.index,
                           self.tokenizer.pad_token_id, reference=reference, max_length=self.max_length,
                           max_prompt_length=self.max_prompt_length)
        stats["response_length"] = sum(len(r) for n in new for r in n) / max(sum(len(n) for n in new), 1)
        return pairs, stats

    # -- loss ----------------------------------------------------------------------------------
    def _pair_loss(self, pairs: OnlinePairs, stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss to minimise, mean loss over the kept pairs, metrics)``. The first is the mean scaled by this
        rank's share of the pairs kept over all ranks (DDP). A rank without a kept pair scores its placeholder rows
        (the same forwards and metric keys as the others) and returns zeros: its loss still reaches every weight."""
        parts = [pairs.chosen, pairs.rejected] + ([pairs.reference] if pairs.reference is not None else [])
        both = move_data_to_device(SequenceBatch.cat(parts, self.tokenizer.pad_token_id), self.device)  # (2B|3B, T)
        policy = self.policy_logps(both).sum()  # (nB,)
        with torch.no_grad():
            ref = self.reference.token_logps(self.policy, both).sum().to(policy)  # the frozen copy
        b, kept = len(pairs), pairs.kept.to(self.device)
        count = kept.sum()
        total = sum_over_ranks(count.double())
        rows = kept if bool(count) else torch.ones_like(kept)  # no pair here: the placeholder rows
        pol = [policy[i * b:(i + 1) * b][rows] for i in range(len(parts))]
        refs = [ref[i * b:(i + 1) * b][rows] for i in range(len(parts))]
        if self._offline(stage) and self.loss_fn.needs_reference_response:  # SELM's offline iteration: plain DPO
            loss, metrics = dpo_loss(pol[0], pol[1], refs[0], refs[1], beta=self.loss_fn.beta)
        elif self.loss_fn.needs_reference_response:
            loss, metrics = self.loss_fn(pol[0], pol[1], refs[0], refs[1], pol[2], refs[2])
        else:
            loss, metrics = self.loss_fn(pol[0], pol[1], refs[0], refs[1])
        if not bool(count):
            zero = policy.sum() * 0.0  # reaches every weight the forward used (DDP expects their gradients)
            return zero, zero.detach(), {k: torch.zeros_like(v) for k, v in metrics.items()}
        return loss * global_share(count, total).to(loss), loss.detach(), metrics

    def _step(self, batch: PromptBatch, stage: str) -> Tensor:
        pairs, stats = self._pairs(batch, stage)
        self.last_pairs = count = int(pairs.kept.sum())
        loss, mean_loss, metrics = self._pair_loss(pairs, stage)
        kept = pairs.kept.float()
        shares = {"pairs": kept.mean(),
                  "chosen_new": pairs.chosen_new.float().sum() / kept.sum().clamp(min=1),
                  "rejected_new": pairs.rejected_new.float().sum() / kept.sum().clamp(min=1),
                  **{k: torch.tensor(v) for k, v in stats.items() if k != "generated"}}
        shares = {k: v.to(self.device) for k, v in shares.items()}  # synced where the loss is
        per_pair = {"loss": mean_loss, **metrics}
        if stage == "train":
            logged = {**(per_pair if count else {}), **shares}  # on_step, not synced: a step without a pair says so
            for key, value in logged.items():
                self.log(f"train/{key}", value, prog_bar=key in ("loss", "rewards/accuracies"), on_step=True,
                         on_epoch=False)
            self.log("train/generated", stats.get("generated", 0.0), on_step=True, on_epoch=False)
            self.log("train/iteration", float(max(self.stage, 0)), on_step=True, on_epoch=False)
            return loss
        # validation / test: epoch means synced over ranks, so every rank logs the same keys; the per-pair means are
        # weighted by the pairs kept (a batch or rank without a pair adds nothing), the shares by prompts
        for key, value in per_pair.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("loss", "rewards/accuracies"), on_step=False,
                     on_epoch=True, batch_size=count, sync_dist=True)
        for key, value in shares.items():
            self.log(f"{stage}/{key}", value, on_step=False, on_epoch=True, batch_size=len(batch), sync_dist=True)
        self.log(f"{stage}/num_pairs", float(count), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        return loss

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    @torch.no_grad()
    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, str]]:
        """The policy's greedy responses to the batch's prompts (``lit-align predict``): ``[{prompt, completion}]``."""
        return prompt_predictions(self, batch, self.sampling)

    # -- checkpoints ---------------------------------------------------------------------------
    def _rebuilt_keys(self, keys) -> set[str]:
        """The ranker's frozen weights too: rebuilt from its spec."""
        return super()._rebuilt_keys(keys) | {k for k in keys if k.startswith("ranker.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        generations: dict[str, list[int]] = {}
        for part in all_gather_objects(self.generations):  # every rank's prompts (rank 0 writes the file)
            generations.update(part)
        checkpoint["online_dpo"] = {"generator_fingerprint": self.generator_fingerprint, "generations": generations}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("online_dpo")
        if state is not None:
            self.generator_fingerprint = state["generator_fingerprint"]
            self.generations = dict(state["generations"])
