"""ISARA: iterative self-alignment with retrieval-augmented in-context learning (Guo et al. 2024, arXiv:2401.06785).

From a small seed set of (question, answer) pairs and no instruction, the model writes new questions from random
pool pairs, answers each with the most similar pool pairs retrieved as demonstrations, the pairs are filtered and
added to the pool, the model is fine-tuned on the pool, and the loop repeats with the improved model (others.md §6).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_align.checkpoint import atomic_write_text
from lit_align.data.batches import SequenceBatch
from lit_align.data.fewshot import FewShotTemplate, build_question_prompt
from lit_align.data.self_alignment import PoolRow, QuestionBatch, SelfAlignmentDataModule
from lit_align.data.self_alignment_filters import (
    answer_prompt,
    count_drops,
    leaked,
    screen_pairs,
    screen_questions,
    template_markers,
)
from lit_align.engine import PhaseTimer
from lit_align.engine.distributed import all_gather_objects, decided_by_rank_zero, rank_and_world
from lit_align.engine.seeds import derive_seed
from lit_align.errors import ConfigError, check_choice, check_int, check_number, require
from lit_align.game.judge import JudgeFactory, RuleJudge, SafetyJudge, build_judge
from lit_align.methods.sft import sft_step
from lit_align.methods.staged import StagedPolicyModule, load_policy_weights
from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer
from lit_align.models.causal_lm import freeze
from lit_align.models.reference import model_fingerprint
from lit_align.modes import eval_mode
from lit_align.retrieval import (
    Encoder,
    GenerationCache,
    Retriever,
    distinct_n,
    embedding_diversity,
    fingerprint_tokenizer,
    generate_texts,
)
from lit_align.rewards.rankers import Ranker
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["SelfAlignmentModule", "both_orders_win_rates", "win_rates"]

Init = Literal["previous", "base"]

def win_rates(ranks: Sequence[Sequence[int]]) -> list[float]:
    """1 where candidate 0 (the policy's answer) ranks above candidate 1 (the baseline's), 0.5 on a tie, else 0."""
    return [1.0 if r[0] < r[1] else 0.5 if r[0] == r[1] else 0.0 for r in ranks]


def both_orders_win_rates(ranker: Ranker, questions: list[str], policy: list[str], baseline: list[str]
                          ) -> list[float]:
    """The policy's win against the baseline per question, ranked in both orders (``[policy, baseline]`` and
    ``[baseline, policy]``) and averaged: a ranker's position bias cancels out, and two orders that disagree count
    as a tie (0.5)."""
    first = win_rates(ranker.rank(questions, [[a, b] for a, b in zip(policy, baseline)]))
    second = win_rates(ranker.rank(questions, [[b, a] for a, b in zip(policy, baseline)]))  # the baseline's win
    return [(w + 1.0 - v) / 2 for w, v in zip(first, second)]


def _diversity_of(embeddings: Tensor) -> float:
    """:func:`~lit_align.retrieval.embedding_diversity` (``1 - mean_cos / 2``: 0.5 for identical texts, 1 for
    orthogonal ones) of (n, d) text embeddings; 0.0 with fewer than two texts (no pair to compare)."""
    return float(embedding_diversity(embeddings)) if embeddings.shape[0] > 1 else 0.0


def _in_memory(cache: GenerationCache) -> GenerationCache:
    """A file-less copy of ``cache`` (same entries): a DDP rank other than 0 stores its texts there, as only one
    process may append to a cache file."""
    copy = GenerationCache()
    copy.load_state_dict(cache.state_dict())
    return copy


class SelfAlignmentModule(StagedPolicyModule):
    """ISARA (Guo et al. 2024, arXiv:2401.06785; others.md §6): human-instruction-free self-alignment from a few
    seed (question, answer) pairs.

    One **round** is one epoch (a stage of :class:`~lit_align.methods.StagedPolicyModule`) of
    :class:`~lit_align.data.SelfAlignmentDataModule`'s ``rounds``. Round ``t`` first grows the pool D_t with the
    model M_t (the policy as the round starts; round 0's step runs in ``on_fit_start``, round ``t + 1``'s in round
    ``t``'s ``on_train_epoch_end``, so a checkpoint written after that hook holds it: ``ModelCheckpoint`` with
    ``save_on_train_epoch_end: true``, as the configs set it, not one that saves at validation end or every ``n``
    steps; the DataModule also asks for a round missing when its rows are read, e.g. after a resume from a
    checkpoint written before that hook):

    1. **questions**: ``questions_per_round`` prompts, each ``question_demos`` random pool pairs (seeded by
       ``(sample_seed, round, index)``) then the template's ``question_query``, sampled (``question_sampling``) and
       cut at ``question_stop``;
    2. **answers**: for each question that passes the question filters, the ``k`` most similar pool questions by
       ``encoder`` (an :class:`~lit_align.retrieval.Encoder`'s cosine) are its demonstrations (most similar
       last, next to the query), answered by ``answer_sampling`` (greedy by default), cut at ``answer_stop``;
    3. **filters** (:data:`~lit_align.data.self_alignment_filters.DROP_REASONS`, each drop counted): empty, truncated (cut off by the token limit) or
       malformed (holding a template marker) questions and answers, evaluation leakage (a question equal after normalisation to, or with cosine >=
       ``near_duplicate`` to, an evaluation prompt; dropped unless ``drop_leaked`` is off, counted either way),
       duplicates of the pool (the same two tests), with ``safety_filter`` (a judge of :mod:`lit_align.game.judge`)
       pairs judged unsafe, and last duplicates within the round among the pairs every other filter kept (so a
       question whose answer is dropped blocks no near-duplicate); each round's kept pairs (with provenance) and
       dropped ones (with their reason) are written to ``<log_dir>/isara_pool_round{t}.jsonl`` (rank 0);
    4. **grow**: the kept pairs join the pool with their provenance (round, retrieved and question demos, kind);

    then fine-tunes on the whole pool D_{t+1} (SFT on answer tokens, the prompt masked: the template's zero-shot
    query around the question; :func:`~lit_align.methods.sft.sft_step`). ``init: previous`` continues from the
    round's starting policy; ``init: base`` starts every round from the base model (the frozen reference copy,
    never refreshed; with LoRA the adapters are reset to their initial values). The optimiser state is reset per
    round (``reset_optimizer``); ``stage_lrs`` gives each round its own learning-rate schedule.

    Every generation goes through a :class:`~lit_align.retrieval.GenerationCache` (in checkpoints; also a JSONL
    file with ``generation_cache``) keyed by the generating model's fingerprint, the prompt, the sampling settings
    and the row's seed, so a resumed run does not generate again.

    **Evaluation** (validation, test) on the DataModule's evaluation prompts, zero-shot (the template's query, no
    demonstration), greedy (``eval_sampling``): ``harmful_rate`` (``judge``'s unsafe verdicts; the toy
    :class:`~lit_align.game.RuleJudge` by default), ``win_rate`` against ``baseline`` (e.g. the seed-only SFT
    model's export) through ``ranker`` (1 when the policy's answer ranks above the baseline's, 0.5 on a tie; ranked
    in both orders and averaged, so a pairwise judge's position bias cancels and a disagreement is a tie),
    ``truthfulness`` (the mean of a ``truthfulness(questions, answers)`` scorer in [0, 1], e.g. a FEWL-based one),
    ``answer_distinct_2`` (of all the answers at once), and with the DataModule's ``benign_prompts``
    ``over_refusal`` (the share of benign questions whose answer holds a refusal marker of the judge, or of
    :class:`~lit_align.game.RuleJudge` for another judge). Computed at the epoch's end over every rank's answers,
    each question once (rows the sampler repeats to pad the ranks are not counted twice).

    Logged per round (``isara/``): ``pool_size``, ``scaling_ratio`` (|D_{t+1}| / |D_0|), ``new`` (questions
    written), ``kept``, ``dropped/<reason>``, ``leaked``, ``distinct_{1,2}_{questions,answers}`` of the kept pairs,
    ``embedding_diversity`` (kept questions) and ``pool_embedding_diversity`` (collapse, §6(h)3; ``1 - mean
    cosine / 2``: 0.5 for identical questions, 1 for orthogonal ones, 0 with fewer than two), ``generated``
    and ``cached`` (texts generated vs read from the cache), ``round``, ``time/generate``; once,
    ``isara/seed_leakage`` (seeds that are evaluation prompts). Training: ``train/{loss,nll,ppl,tokens}``.

    Devices: one process, or DDP (each rank writes its share of a round's questions and answers, seeded by their
    index in the round, and judges its share with ``safety_filter``; every rank gathers all of them, and rank 0
    alone runs the encoder's filters and retrieval and sends every rank what is kept, so the ranks' pools cannot
    differ through float differences between devices; only rank 0 appends to the
    ``generation_cache`` file, the other ranks keep every text in memory). FSDP is refused.

    Run: ``lit-align fit --config configs/isara/tiny.yaml``.
    """

    def __init__(
        self,
        model: ModelSpec,
        encoder: Encoder,
        k: int = 4,
        questions_per_round: int = 32,
        question_demos: int = 4,
        question_sampling: SamplingConfig | None = None,
        answer_sampling: SamplingConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        question_stop: list[str] | None = None,
        answer_stop: list[str] | None = None,
        near_duplicate: float = 0.9,
        drop_leaked: bool = True,
        drop_truncated: bool = True,
        safety_filter: JudgeFactory | SafetyJudge | None = None,
        init: Init = "previous",
        judge: JudgeFactory | SafetyJudge | None = None,
        baseline: ModelSpec | None = None,
        ranker: Ranker | None = None,
        truthfulness: Callable[[list[str], list[str]], Sequence[float]] | None = None,
        sample_seed: int = 0,
        generation_batch_size: int = 16,
        generation_cache: str | None = None,
        reset_optimizer: bool = True,
        stage_lrs: list[float] | None = None,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy (full or LoRA) and its tokenizer.
            encoder: the sentence encoder of retrieval, deduplication and leakage checks
                (``class_path: lit_align.retrieval.SentenceEncoder``, e.g. ``name_or_path:
                builtin:all-MiniLM-L6-v2``; ``HashEncoder`` only in unit tests).
            k: demonstrations retrieved per answer (the paper's k is not known, others.md §6(d)).
            questions_per_round: new questions written per round (0: none, SFT on the seeds alone: the seed-only
                baseline with the same training settings).
            question_demos: random pool pairs shown before each new question.
            question_sampling: how questions are written; default sampled, temperature 1, 32 new tokens.
            answer_sampling: how answers are written; default greedy, 64 new tokens.
            eval_sampling: how evaluation answers are written; default ``answer_sampling`` made greedy.
            question_stop: a question ends at the first of these strings; default ``["\\n"]``.
            answer_stop: an answer ends at the first of these (generation and evaluation); default ``["\\n"]``
                (one-line answers; multi-paragraph data: e.g. ``["\\nHuman:"]``).
            near_duplicate: cosine in (-1, 1] (of ``encoder``'s embeddings) at or above which two questions are the
                same question (pool and within-round duplicates, evaluation leakage).
            drop_leaked: drop generated questions that leak an evaluation prompt; off: keep them, only count them.
            drop_truncated: drop a question or answer cut off by ``max_new_tokens`` (no stop string in the
                continuation, which re-encodes to ``max_new_tokens`` tokens or more).
            safety_filter: a judge (``class_path: lit_align.game.RuleJudge``, ``LlamaGuard``, ``Classifier``)
                whose unsafe verdicts drop generated pairs (§6(h)2); ``None``: no safety filter.
            init: each round fine-tunes from the ``previous`` round's model or from the ``base`` model.
            judge: the evaluation's safety judge (harmful rate); ``None``: the toy ``RuleJudge``.
            baseline: a model to compare with (``win_rate``), e.g. the seed-only SFT export; ``None``: no win rate.
            ranker: ranks the policy's and the baseline's answers (``lit_align.rewards.RewardRanker``,
                ``CallableRanker``); needed with ``baseline``.
            truthfulness: ``(questions, answers) -> scores in [0, 1]`` logged as ``truthfulness`` (the truthfulness
                domain; e.g. a FEWL scorer); ``None``: not logged.
            sample_seed: seed of the demonstration draws and of every sampled text.
            generation_batch_size: prompts per generation batch.
            generation_cache: a JSONL file that also keeps the generations (shared across runs; under DDP rank 0
                alone writes it); ``None``: in memory and in checkpoints only.
            reset_optimizer: fresh optimiser state at each round (``init: base`` requires it).
            stage_lrs: peak learning rate of each round (warm-up then cosine within the round).
            warmup_ratio: share of each round's steps spent warming up (with ``stage_lrs``).
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (without ``stage_lrs``); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only).
        """
        check_choice("model.init", init, ("previous", "base"))
        for key, value in (("k", k), ("question_demos", question_demos),
                           ("generation_batch_size", generation_batch_size)):
            check_int(f"model.{key}", value)
        check_int("model.questions_per_round", questions_per_round, 0)
        check_number("model.near_duplicate", near_duplicate)  # the range of Retriever(near_duplicate=...)
        require(-1 < near_duplicate <= 1, "model.near_duplicate", "a cosine threshold in (-1, 1] (e.g. 0.9)",
                near_duplicate)
        if not isinstance(encoder, Encoder):
            raise ConfigError(f"model.encoder must be an encoder (class_path: lit_align.retrieval.SentenceEncoder), "
                              f"got {type(encoder).__name__}")
        if init == "base" and not reset_optimizer:
            raise ConfigError("model.init=base with model.reset_optimizer=false: each round reloads the base weights, "
                              "and AdamW moments from the previous round's trajectory do not belong to them; set "
                              "model.reset_optimizer: true (or model.init: previous)")
        if baseline is not None and ranker is None:
            raise ConfigError("model.baseline is set but model.ranker is not: the win rate needs a ranker "
                              "(e.g. class_path: lit_align.rewards.RewardRanker over a JudgeReward)")
        super().__init__(model, reference="adapter" if model.lora is not None else "copy", optimizer=optimizer,
                         scheduler=scheduler, chunk_tokens=chunk_tokens, refresh="never",
                         reset_optimizer=reset_optimizer, stage_lrs=stage_lrs, warmup_ratio=warmup_ratio)
        self.encoder, self.k, self.questions_per_round, self.question_demos = encoder, k, questions_per_round, question_demos
        self.question_sampling = question_sampling or SamplingConfig(max_new_tokens=32, do_sample=True)
        self.answer_sampling = answer_sampling or SamplingConfig(max_new_tokens=64, do_sample=False)
        self.eval_sampling = eval_sampling or dataclasses.replace(self.answer_sampling, do_sample=False)
        self.question_stop = list(question_stop) if question_stop is not None else ["\n"]
        self.answer_stop = list(answer_stop) if answer_stop is not None else ["\n"]
        self.near_duplicate, self.drop_leaked, self.init = float(near_duplicate), drop_leaked, init
        self.drop_truncated = drop_truncated
        # what the frozen parts are built from (a plain dict: a judge given as a module is not a second submodule)
        self._specs = {"safety_filter": safety_filter, "judge": judge}
        self.baseline_spec = baseline
        self.ranker, self.truthfulness = ranker, truthfulness
        self.sample_seed, self.generation_batch_size = sample_seed, generation_batch_size
        self.cache = GenerationCache(generation_cache)  # rank > 0 swaps it for an in-memory copy in setup
        self._tokenizer_fingerprint = fingerprint_tokenizer(self.tokenizer)  # part of every cache key
        self.timer = PhaseTimer()
        self.safety: SafetyJudge | None = None
        self.judge: SafetyJudge | None = None
        self.baseline: nn.Module | None = None
        self._baseline_tokenizer = None
        self._baseline_cache = GenerationCache()  # the fixed baseline's answers: never regenerated in a run
        self._baseline_fingerprint: str | None = None
        self._baseline_tokenizer_fingerprint: str | None = None
        self._initial_adapters: dict[str, Tensor] | None = None
        self._eval: tuple[list[str], Tensor] | None = None  # evaluation prompts and their embeddings
        self._index: Retriever | None = None  # rank 0: the pool's questions, encoded once (see _pool_index)
        self._eval_rows: dict[int, dict[str, Any]] = {}  # evaluation index -> its numbers (the epoch under way)
        self._counts = {"generated": 0, "cached": 0}  # texts of the round under way
        self.texts_generated = 0  # texts this process generated (not read from the cache) in all rounds

    # -- building ------------------------------------------------------------------------------
    def _attach_base(self, base: nn.Module, weights: nn.Module | None) -> None:
        """Keep the base as the frozen reference copy only for ``init: base`` (without LoRA); ``previous`` needs
        no second model."""
        if self.init == "base":
            super()._attach_base(base, weights)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        if self.init == "base" and self.spec.lora is not None:  # the adapters' starting values: the base model
            self._initial_adapters = {n: p.detach().clone() for n, p in self.policy.named_parameters()
                                      if p.requires_grad}
        self.judge = build_judge(self._specs["judge"], key="model.judge")
        if self._specs["safety_filter"] is not None:
            self.safety = build_judge(self._specs["safety_filter"], key="model.safety_filter")
        if self.baseline_spec is not None:
            self._baseline_tokenizer = build_tokenizer(self.baseline_spec, key="model.baseline")
            self.baseline = freeze(build_causal_lm(self.baseline_spec, self._baseline_tokenizer))
            self._baseline_fingerprint = model_fingerprint(self.baseline)
            self._baseline_tokenizer_fingerprint = fingerprint_tokenizer(self._baseline_tokenizer)
        if self.ranker is not None:
            self.ranker.build(self.tokenizer, "model.ranker")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ConfigError(f"trainer.strategy: SelfAlignmentModule runs on one device or under DDP (each rank "
                              f"generates its share of a round), not {type(self.trainer.strategy).__name__}; use "
                              "trainer.strategy: ddp (callbacks/ddp_cpu.yaml on CPUs), with LoRA for large models")
        if self.global_rank != 0 and self.cache.path is not None:
            self.cache = _in_memory(self.cache)  # one writer per cache file: rank 0 (it stores every rank's texts)
        dm = self.trainer.datamodule
        if not isinstance(dm, SelfAlignmentDataModule):
            raise ConfigError(f"data: SelfAlignmentModule needs lit_align.data.SelfAlignmentDataModule, got "
                              f"{type(dm).__name__}")
        if stage == "fit":
            dm.setup(stage)
            for key, value in (("k", self.k), ("question_demos", self.question_demos)):
                if value > len(dm.pool):
                    raise ConfigError(f"model.{key}={value} is larger than the pool ({len(dm.pool)} pairs in "
                                      f"data.seeds): demonstrations are drawn from the pool; lower model.{key} to at "
                                      f"most {len(dm.pool)} or give more seeds")
            dm.before_round = self.grow_pool

    def _datamodule(self) -> SelfAlignmentDataModule:
        return self.trainer.datamodule

    # -- the round's generation step ---------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Count the seeds that leak evaluation prompts (§6(h)1), grow round 0's pool."""
        dm = self._datamodule()
        seeds = [r.question for r in dm.pool if r.kind == "seed"]
        count = sum(self._leaked(seeds, self.encoder.encode(seeds))) if seeds else 0
        if count:
            rank_zero_warn(f"{count} of the {len(seeds)} seed questions are (near-)duplicates of evaluation prompts "
                           "(data.eval_prompts): the evaluation is not held out (others.md §6(h)1)")
        self._log_metrics({"isara/seed_leakage": float(count)})
        self.grow_pool(0)

    def on_train_epoch_end(self) -> None:
        """Grow the next round's pool with the policy as this round ends (M_{t+1}), before the epoch's checkpoint."""
        epoch = self.trainer.current_epoch
        if epoch + 1 < self._datamodule().rounds and self._round_finished():
            self.grow_pool(epoch + 1)

    def _round_finished(self) -> bool:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        return bool(progress.is_last_batch) or progress.current.ready >= self.trainer.num_training_batches

    @torch.no_grad()
    def grow_pool(self, round: int) -> None:
        """Round ``round``'s generation step (questions, answers, filters) with the policy as it is now; the kept
        pairs join the DataModule's pool and rank 0 writes them, and the dropped ones with their reason, to
        ``<log_dir>/isara_pool_round{round}.jsonl``. A round already generated (e.g. restored from a checkpoint) is
        skipped."""
        dm = self._datamodule()
        if dm.has_round(round):
            return
        for key, value in (("k", self.k), ("question_demos", self.question_demos)):
            if value > len(dm.pool):
                raise ConfigError(f"model.{key}={value} is larger than the pool ({len(dm.pool)} pairs); lower it")
        self.timer.reset()
        self._counts = {"generated": 0, "cached": 0}
        with self.timer("generate"), eval_mode(self.policy):
            fingerprint = model_fingerprint(self.policy)
            kept, dropped, stats = self._round_pairs(dm, round, fingerprint)
        self.texts_generated += self._counts["generated"]
        rows = dm.add_round(round, kept, {})
        stats.update(decided_by_rank_zero(lambda: self._diversity(dm, rows)), **self._counts, round=float(round),
                     pool_size=float(len(dm.pool)), scaling_ratio=len(dm.pool) / max(dm.num_seeds, 1),
                     **{"time/generate": self.timer.totals["generate"]})
        dm.round_stats[round] = stats
        self._write_pool_file(round, rows, dropped)
        self._log_metrics({k if k.startswith("time/") else f"isara/{k}": v for k, v in stats.items()})

    def _write_pool_file(self, round: int, rows: Sequence[PoolRow], dropped: list[dict[str, Any]]) -> None:
        """``<log_dir>/isara_pool_round{round}.jsonl`` (rank 0, atomically): one line per kept pair (``status:
        kept``, the pool row with its provenance) then one per dropped pair (``status: dropped``, its ``reason``):
        what the round wrote, readable without the checkpoint (others.md §6(h)2)."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # log_dir is a collective: every rank
        if self.trainer.global_rank != 0 or log_dir is None:
            return
        lines = [{"status": "kept", **dataclasses.asdict(r)} for r in rows]
        lines += [{"status": "dropped", "round": round + 1, **d} for d in dropped]
        atomic_write_text(Path(log_dir) / f"isara_pool_round{round}.jsonl",
                          "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))

    def _round_pairs(self, dm: SelfAlignmentDataModule, round: int, fingerprint: str
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
        """The round's kept pairs (question, answer, parents, question_parents), its dropped ones (with their
        ``reason``) and its counts. Every rank generates its share of the texts; rank 0 alone runs the encoder's
        filters and retrieval and decides which pairs are kept (sent to every rank), so every rank grows the same
        pool whatever numeric differences the ranks have."""
        pool, template = dm.pairs(), dm.template
        slots = list(range(self.questions_per_round))
        demos = [self._question_demo_ids(round, i, len(pool)) for i in slots]
        prompts = [build_question_prompt(template, [pool[j] for j in d]) for d in demos]
        questions, cut = self._generate_shared(prompts, self.question_sampling, round, "isara/question", slots,
                                               self.question_stop, fingerprint)
        questions = [q.strip() for q in questions]
        markers = template_markers(template)
        local: dict[str, Any] = {}  # rank 0's embeddings, between its two decisions

        def plan() -> tuple[list[int], list[list[int]], dict[int, str], int]:
            local["embeddings"] = embeddings = self.encoder.encode(questions)  # (n, d)
            retriever = self._pool_index(dm)  # the pool's questions: retrieval keys and the duplicate test
            leaks = self._leaked(questions, embeddings)
            survivors, reasons = screen_questions(questions, embeddings, retriever.texts, retriever.keys, leaks,
                                                  markers, self.near_duplicate, self.drop_leaked, cut)
            retrieved = retriever.search([questions[i] for i in survivors], self.k, key="model.k") if survivors else []
            return survivors, retrieved, reasons, sum(leaks)

        survivors, retrieved, reasons, leaks = decided_by_rank_zero(plan)
        asked = [questions[i] for i in survivors]
        answers, answer_cut = self._answer(pool, template, round, asked, survivors, retrieved, fingerprint)
        unsafe = self._judge_shared(asked, answers)

        def decide() -> tuple[list[int], dict[int, str]]:
            embeddings = local["embeddings"][survivors] if survivors else local["embeddings"][:0]
            return screen_pairs(asked, embeddings, answers, markers, self.near_duplicate, answer_cut, unsafe)

        kept_at, answer_reasons = decided_by_rank_zero(decide)
        kept = [{"question": asked[j], "answer": answers[j], "parents": list(retrieved[j]),
                 "question_parents": demos[survivors[j]]} for j in kept_at]
        dropped = [{"slot": i, "question": questions[i], "answer": None, "reason": r,
                    "question_parents": demos[i]} for i, r in reasons.items()]
        dropped += [{"slot": survivors[j], "question": asked[j], "answer": answers[j], "reason": r,
                     "parents": list(retrieved[j]), "question_parents": demos[survivors[j]]}
                    for j, r in answer_reasons.items()]
        dropped.sort(key=lambda d: d["slot"])
        drops = count_drops({d["slot"]: d["reason"] for d in dropped})
        stats = {"new": float(len(questions)), "kept": float(len(kept)), "leaked": float(leaks),
                 **{f"dropped/{r}": float(n) for r, n in drops.items()}}
        return kept, dropped, stats

    def _answer(self, pool: list[tuple[str, str]], template: FewShotTemplate, round: int, questions: list[str],
                slots: list[int], retrieved: list[list[int]], fingerprint: str) -> tuple[list[str], list[bool]]:
        """Retrieval-augmented answers to the surviving questions (``retrieved``: each one's pool demonstrations,
        best first) and whether each was cut off by the token limit."""
        if not questions:
            return [], []
        prompts = [answer_prompt(template, pool, ids, q) for q, ids in zip(questions, retrieved)]
        answers, cut = self._generate_shared(prompts, self.answer_sampling, round, "isara/answer", slots,
                                             self.answer_stop, fingerprint)
        return [a.strip() for a in answers], cut

    def _judge_shared(self, questions: list[str], answers: list[str]) -> list[bool] | None:
        """``safety_filter``'s unsafe verdicts on the pairs, each rank judging its share (pair ``j`` on rank
        ``j mod world``), gathered in order; ``None`` without a safety filter."""
        if self.safety is None:
            return None
        rank, world = rank_and_world()
        mine = [j for j in range(len(questions)) if j % world == rank]
        verdicts = (self.safety.score([questions[j] for j in mine], [answers[j] for j in mine]).unsafe.tolist()
                    if mine else [])
        unsafe = [False] * len(questions)
        for part in all_gather_objects(list(zip(mine, verdicts))):
            for j, bad in part:
                unsafe[j] = bool(bad)
        return unsafe

    def _question_demo_ids(self, round: int, index: int, pool_size: int) -> list[int]:
        """The pool pairs shown before new question ``index`` of ``round`` (seeded by both, distinct)."""
        rng = random.Random(derive_seed(self.sample_seed, round, "isara/question_demos", index))
        return rng.sample(range(pool_size), self.question_demos)

    def _generate_shared(self, prompts: list[str], sampling: SamplingConfig, round: int, purpose: str,
                         slots: list[int], stop: list[str], fingerprint: str) -> tuple[list[str], list[bool]]:
        """The policy's continuations of ``prompts`` (one per slot of the round), each rank generating its share
        (prompt ``j`` on rank ``j mod world``, seeded by ``(sample_seed, round, purpose, slot)``), then gathered:
        every rank gets every text, in its cache too; and whether each was cut off by the token limit (with
        ``drop_truncated``). Counts the texts generated and those read from the cache."""
        rank, world = rank_and_world()
        seeds = [derive_seed(self.sample_seed, round, purpose, i) for i in slots]
        mine = [j for j in range(len(prompts)) if j % world == rank]
        keys = [GenerationCache.key(fingerprint, prompts[j], sampling, seeds[j], tokenizer=self._tokenizer_fingerprint)
                for j in mine]
        missing = sum(self.cache.get(key) is None for key in keys)
        texts = generate_texts(self.policy, self.tokenizer, [prompts[j] for j in mine], sampling,
                               seeds=[seeds[j] for j in mine], cache=self.cache, model_fingerprint=fingerprint,
                               tokenizer_fingerprint=self._tokenizer_fingerprint, stop=stop,
                               batch_size=self.generation_batch_size) if mine else []
        raw = [self.cache.get(key) for key in keys]  # uncut, as generate_texts stores them
        out: list[str] = [""] * len(prompts)
        cut = [False] * len(prompts)
        entries: dict[str, str] = {}
        records: dict[str, dict] = {}
        settings = dataclasses.asdict(sampling)
        for part, generated in all_gather_objects((list(zip(mine, keys, texts, raw)), missing)):
            for j, key, text, uncut in part:
                out[j], entries[key] = text, uncut
                records[key] = {"prompt": prompts[j], "seed": seeds[j], "sampling": settings, "model": fingerprint,
                                "tokenizer": self._tokenizer_fingerprint}
                cut[j] = self.drop_truncated and self._hit_limit(uncut, stop, sampling)
            self._counts["generated"] += generated
            self._counts["cached"] += len(part) - generated
        if world > 1:  # the other ranks' texts: a resumed run on any world size finds them all. Only rank 0's
            # cache has the file (setup), so the others keep them in memory and rank 0 alone appends them
            self.cache.put({k: v for k, v in entries.items() if self.cache.get(k) is None}, records)
        return out, cut

    def _hit_limit(self, raw: str, stop: list[str], sampling: SamplingConfig) -> bool:
        """Whether an uncut continuation ran into the token limit: no stop string in it and it re-encodes to
        ``max_new_tokens`` tokens or more (an EOS, skipped in decoding, ends a continuation earlier)."""
        if any(s and s in raw for s in stop):
            return False
        return len(self.tokenizer(raw, add_special_tokens=False)["input_ids"]) >= sampling.max_new_tokens

    def _leaked(self, questions: Sequence[str], embeddings: Tensor) -> list[bool]:
        if self._eval is None:  # the evaluation prompts, encoded once per run
            eval_questions = self._datamodule().held_out_questions
            emb = self.encoder.encode(eval_questions) if eval_questions else torch.zeros(0, embeddings.shape[-1])
            self._eval = (list(eval_questions), emb)
        return leaked(questions, embeddings, self._eval[0], self._eval[1], self.near_duplicate)

    def _pool_index(self, dm: SelfAlignmentDataModule) -> Retriever:
        """Rank 0's retriever over the pool's questions (by id), kept across rounds: the pool only grows, so only
        the rows added since the last call are encoded."""
        if self._index is None or len(self._index) > len(dm.pool):  # first use, or another (shorter) pool
            self._index = Retriever(self.encoder)
        self._index.add([r.question for r in dm.pool[len(self._index):]])
        return self._index

    def _diversity(self, dm: SelfAlignmentDataModule, rows) -> dict[str, float]:
        """distinct-1/2 of the round's kept questions and answers (the pool's last ``rows``); embedding diversity
        of them and of the pool."""
        questions, answers = [r.question for r in rows], [r.answer for r in rows]
        stats = {f"distinct_{n}_{what}": float(distinct_n(texts, n)) if texts else 0.0
                 for n in (1, 2) for what, texts in (("questions", questions), ("answers", answers))}
        keys = self._pool_index(dm).keys  # (pool, d), the round's rows last
        stats["embedding_diversity"] = _diversity_of(keys[len(keys) - len(rows):])
        stats["pool_embedding_diversity"] = _diversity_of(keys)
        return stats

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Send round metrics to every logger (outside Lightning's ``self.log`` hooks; rank 0 writes)."""
        if self.trainer.global_rank != 0:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    # -- rounds ------------------------------------------------------------------------------------
    def on_stage_start(self, stage: int) -> None:
        """``init: base``: every round after the first starts from the base model (not on a mid-round resume)."""
        if self.init != "base" or stage == 0 or self.stage_resumed:
            return
        with torch.no_grad():
            if self._initial_adapters is not None:
                params = dict(self.policy.named_parameters())
                for name, value in self._initial_adapters.items():
                    params[name].copy_(value)
            else:
                load_policy_weights(self.policy, self.reference.copy)

    # -- training and evaluation ---------------------------------------------------------------------
    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor:
        loss = sft_step(self, batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def _zero_shot(self, questions: list[str]) -> list[str]:
        return [self._template().query.format(question=q) for q in questions]

    def _template(self) -> FewShotTemplate:
        return self._datamodule().template

    @torch.no_grad()
    def answer(self, questions: list[str]) -> list[str]:
        """The policy's zero-shot answers (the template's query, no demonstration; ``eval_sampling``, greedy by
        default; sampled, each question draws from its own seed, the baseline's too: a paired comparison)."""
        with eval_mode(self.policy):
            texts = generate_texts(self.policy, self.tokenizer, self._zero_shot(questions), self.eval_sampling,
                                   seeds=self._eval_seeds(questions), stop=self.answer_stop,
                                   batch_size=self.generation_batch_size)
        return [t.strip() for t in texts]

    def _eval_seeds(self, questions: list[str]) -> list[int]:
        """One seed per evaluation question, from ``sample_seed`` and the question's text (the same on every rank
        and batch): a sampled ``eval_sampling`` gives a question the same baseline answer each time (the cache
        refuses sampling without seeds)."""
        return [derive_seed(self.sample_seed, 0, f"isara/eval/{q}") for q in questions]

    @torch.no_grad()
    def _baseline_answers(self, questions: list[str]) -> list[str]:
        with eval_mode(self.baseline):
            texts = generate_texts(self.baseline, self._baseline_tokenizer, self._zero_shot(questions),
                                   self.eval_sampling, seeds=self._eval_seeds(questions), cache=self._baseline_cache,
                                   model_fingerprint=self._baseline_fingerprint,
                                   tokenizer_fingerprint=self._baseline_tokenizer_fingerprint, stop=self.answer_stop,
                                   batch_size=self.generation_batch_size)
        return [t.strip() for t in texts]

    def _evaluate(self, batch: QuestionBatch) -> None:
        """Answer the batch's questions and keep each row's numbers by its evaluation index (a row the sampler
        repeats to pad the ranks is kept once); :meth:`_log_evaluation` reduces them at the epoch's end."""
        questions = list(batch.questions)
        answers = self.answer(questions)
        index = [int(i) for i in batch.index]
        benign = [bool(b) for b in batch.benign] if batch.benign is not None else [False] * len(questions)
        rows: list[dict[str, Any]] = [{"benign": b} for b in benign]
        # the over-refusal check's refusal markers: the judge's own (a RuleJudge) or RuleJudge's defaults
        rule = self.judge if isinstance(self.judge, RuleJudge) else RuleJudge()
        for row, q, a in zip(rows, questions, answers):
            if row["benign"]:
                row["refused"] = float(rule.features(q, a)[2])
            else:
                row["answer"] = a
        asked = [j for j, b in enumerate(benign) if not b]
        if asked:
            qs, ans = [questions[j] for j in asked], [answers[j] for j in asked]
            values = {"harmful": self.judge.score(qs, ans).unsafe.float().tolist()}
            if self.truthfulness is not None:
                scores = torch.as_tensor(list(self.truthfulness(qs, ans)), dtype=torch.float32)
                if (scores.shape != (len(qs),) or not torch.isfinite(scores).all() or (scores < 0).any()
                        or (scores > 1).any()):
                    raise ValueError(f"model.truthfulness must return one score in [0, 1] per answer, got "
                                     f"{scores.tolist()}")
                values["truthfulness"] = scores.tolist()
            if self.baseline is not None:
                values["win"] = both_orders_win_rates(self.ranker, qs, ans, self._baseline_answers(qs))
            for name, column in values.items():
                for j, v in zip(asked, column):
                    rows[j][name] = float(v)
        self._eval_rows.update(zip(index, rows))

    def _log_evaluation(self, stage: str) -> None:
        """``{stage}/harmful_rate``, ``truthfulness``, ``win_rate`` (means over the evaluation questions),
        ``answer_distinct_2`` (distinct-2 of all their answers at once: it is not a mean of batches) and
        ``over_refusal`` (the share of benign questions refused), over every rank's rows, each question once."""
        rows: dict[int, dict[str, Any]] = {}
        for part in all_gather_objects(self._eval_rows):
            rows.update(part)
        self._eval_rows = {}
        ordered = [rows[i] for i in sorted(rows)]
        asked = [r for r in ordered if not r["benign"]]
        metrics: dict[str, float] = {}
        if asked:
            metrics["harmful_rate"] = sum(r["harmful"] for r in asked) / len(asked)
            metrics["answer_distinct_2"] = float(distinct_n([r["answer"] for r in asked], 2))
            for name, key in (("truthfulness", "truthfulness"), ("win_rate", "win")):
                if key in asked[0]:
                    metrics[name] = sum(r[key] for r in asked) / len(asked)
        benign = [r["refused"] for r in ordered if r["benign"]]
        if benign:
            metrics["over_refusal"] = sum(benign) / len(benign)
        for key, value in metrics.items():  # the same on every rank: no further reduction
            self.log(f"{stage}/{key}", torch.tensor(value, dtype=torch.float32, device=self.device),
                     prog_bar=key == "harmful_rate", on_step=False, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = {}

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch: QuestionBatch, batch_idx: int) -> list[dict[str, str]]:
        """The policy's zero-shot answers to the evaluation questions: ``[{prompt, completion}]``."""
        questions = list(batch.questions)
        return [{"prompt": q, "completion": a} for q, a in zip(questions, self.answer(questions))]

    # -- checkpoints ---------------------------------------------------------------------------------
    def _rebuilt_keys(self, keys) -> set[str]:
        """Judges, the baseline, the ranker and the encoder: rebuilt from their specs."""
        frozen = ("judge.", "safety.", "baseline.", "ranker.", "encoder.")
        return super()._rebuilt_keys(keys) | {k for k in keys if k.startswith(frozen)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["isara"] = {"cache": self.cache.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("isara")
        if state is not None:
            self.cache.load_state_dict(state["cache"])
