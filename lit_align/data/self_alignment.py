"""ISARA's data: the seed pairs, the growing pool D_t with provenance, the evaluation prompts.

ISARA (Guo et al. 2024, arXiv:2401.06785; others.md §6) starts from a small seed set D_0 of (question, answer) pairs
and grows a pool D_t round by round with pairs the model writes itself. :class:`SelfAlignmentDataModule` keeps that
pool (one :class:`PoolRow` per pair, with its provenance), serves round ``trainer.current_epoch``'s SFT rows over the
whole current pool (one round = one epoch, a stage of :class:`~lit_align.methods.StagedPolicyModule`) and the
evaluation prompts (validation, test and predict). The pool and the rounds already generated are part of the
DataModule's ``state_dict``, so checkpoints keep them and a resumed run continues with the same pool.

One :class:`~lit_align.data.fewshot.FewShotTemplate` (``data.template``) drives everything (§6(h)4): the module's
generation prompts, the SFT rows (the template's ``query`` around the question, then the rest of its ``example``:
the answer) and the zero-shot evaluation prompts.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.fewshot import FewShotTemplate
from lit_align.data.records import DataSource, Record, load_records, read_rows
from lit_align.data.sampling import ResumableDataLoader
from lit_align.data.tokenize import (
    SequenceCollator,
    SequenceExample,
    TokenizedDataset,
    check_response_room,
    encode_prompt,
    encode_response,
)
from lit_align.errors import ConfigError, DataError, check_int

__all__ = ["PoolRow", "QuestionBatch", "SelfAlignmentDataModule", "normalise_text", "sft_texts"]

Kind = Literal["seed", "generated"]


def normalise_text(text: str) -> str:
    """The form two texts are compared in for exact duplicates: stripped, lower case, runs of white space as one."""
    return re.sub(r"\s+", " ", text.strip().lower())


def sft_texts(template: FewShotTemplate, question: str, answer: str) -> tuple[str, str]:
    """``(prompt, response)`` of one SFT row: the template's ``query`` around the question, and what the rendered
    ``example`` adds after it (the answer), trailing white space dropped (the EOS token ends the response)."""
    prompt = template.query.format(question=question)
    example = template.example.format(question=question, answer=answer)
    if not example.startswith(prompt):
        raise ConfigError(f"data.template: the rendered example must begin with the rendered query so that SFT rows, "
                          f"generation and evaluation share one format (§6(h)4); example {template.example!r} and "
                          f"query {template.query!r} do not (e.g. example 'Human: {{question}}\\nAI: {{answer}}\\n\\n' "
                          "with query 'Human: {question}\\nAI:')")
    return prompt, example[len(prompt):].rstrip()


@dataclass
class PoolRow:
    """One (question, answer) pair of the pool, with its provenance."""

    id: int
    """Position in the pool (rows are only ever appended: ids are stable)."""
    question: str
    """The question text."""
    answer: str
    """The answer text."""
    round: int
    """The first pool D_r the pair belongs to: 0 for the seeds, ``t + 1`` for a pair generated in round ``t``."""
    kind: Kind
    """``seed`` (from ``data.seeds``) or ``generated``."""
    parents: list[int] = field(default_factory=list)
    """Ids of the pool pairs retrieved as the answer's in-context demonstrations (empty for a seed)."""
    question_parents: list[int] = field(default_factory=list)
    """Ids of the pool pairs shown as demonstrations when the question was written (empty for a seed)."""


@dataclass
class QuestionExample:
    """One evaluation question."""

    question: str
    index: int
    benign: bool = False


@dataclass
class QuestionBatch:
    """A batch of evaluation questions (plain text: the module renders and generates)."""

    questions: list[str]
    """The questions, as the source gives them."""
    index: torch.Tensor
    """(B,) long: each question's position in the evaluation set (``eval_prompts`` then ``benign_prompts``)."""
    benign: torch.Tensor | None = None
    """(B,) bool: whether each question is a benign one (``benign_prompts``: the over-refusal check); ``None``:
    none is."""

    def __len__(self) -> int:
        return len(self.questions)


class _Collator:
    """SFT rows -> :class:`~lit_align.data.SequenceBatch`; evaluation questions -> :class:`QuestionBatch`."""

    def __init__(self, pad_token_id: int) -> None:
        self.sequences = SequenceCollator(pad_token_id)

    def __call__(self, examples: list[Any]) -> Any:
        if examples and isinstance(examples[0], QuestionExample):
            return QuestionBatch([e.question for e in examples], torch.tensor([e.index for e in examples]),
                                 torch.tensor([e.benign for e in examples]))
        return self.sequences(examples)


class _Questions(Dataset):
    def __init__(self, examples: list[QuestionExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> QuestionExample:
        return self.examples[i]


def _load_or_name(source: DataSource, key: str, required: tuple[str, ...]) -> list[Record]:
    """Records of ``source`` with ``required`` fields; an empty source or a bad record is an error naming ``key``."""
    if not read_rows(source):
        raise ConfigError(f"{key}: data source {source.path!r} has no records; ISARA needs at least one (question, "
                          "answer) seed pair" if key == "data.seeds" else
                          f"{key}: data source {source.path!r} has no records; give a file with evaluation questions "
                          "or leave it out")
    try:
        return load_records(source, required)
    except DataError as err:
        raise DataError(f"{key}: {err}") from err


class SelfAlignmentDataModule(TokenizedDataModule):
    """ISARA's seed set, growing pool and evaluation prompts (others.md §6(a)).

    * ``seeds``: the seed pairs D_0 (JSONL/JSON/CSV/parquet, an HF id or ``builtin:isara_seeds``) with fields
      ``question`` and ``answer`` (other column names through the source's ``fields``, e.g.
      ``{question: prompt, answer: response}``);
    * ``eval_prompts``: held-out questions (field ``question``; e.g. BeaverTails' ``prompt`` with
      ``fields: {question: prompt}``), read once each (repeats dropped): the evaluation set of validation, test and
      predict, and what generated questions are checked against for leakage (§6(h)1);
    * the pool: the seeds, then each round's kept pairs (:meth:`add_round`, called by
      :class:`~lit_align.methods.SelfAlignmentModule`), in ``state_dict`` (so in checkpoints);
    * ``benign_prompts``: benign questions for the over-refusal check (validation and test; leakage too);
    * ``train_dataloader()``: round ``trainer.current_epoch``'s SFT rows, ``epochs_per_round`` whole passes over the
      pool (each shuffled on its own with ``seed``, the round and the pass); a module may set :attr:`before_round` to a function that grows the pool
      for a round before its rows are read (ISARA's generation step).

    Example::

        data:
          class_path: lit_align.data.SelfAlignmentDataModule
          init_args:
            seeds: {path: "builtin:isara_seeds"}
            eval_prompts: {path: "builtin:isara_eval"}
            rounds: 3
            template: {example: "Human: {question}\\nAI: {answer}\\n\\n", query: "Human: {question}\\nAI:"}
    """

    def __init__(
        self,
        seeds: DataSource,
        eval_prompts: DataSource | None = None,
        benign_prompts: DataSource | None = None,
        template: FewShotTemplate | None = None,
        rounds: int = 3,
        epochs_per_round: int = 1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            seeds: the seed (question, answer) pairs D_0 (fewer than 100 in the paper, e.g. 64).
            eval_prompts: evaluation questions (validation, test, predict, leakage check); ``None``: no evaluation.
            benign_prompts: benign questions (field ``question``, e.g. ``builtin:isara_benign``) for an over-refusal
                check: validation and test also answer them, and the module logs the share refused
                (``over_refusal``); also checked for leakage. ``None``: no over-refusal check.
            template: the one prompt format of generation, SFT rows and evaluation; default
                ``Human: {question}\\nAI: {answer}\\n\\n`` with query ``Human: {question}\\nAI:``.
            rounds: ISARA iterations T (one epoch each).
            epochs_per_round: passes over the pool in each round's SFT, each a whole pass shuffled on its own (the
                paper's count is not known, others.md §6(d)).
            batch_size: SFT rows per step on each data-parallel rank.
            eval_batch_size: evaluation questions per step (default ``batch_size``).
            max_length: longest SFT row (prompt + answer) in tokens; longer prompts are cut from the left.
            shuffle: shuffle each pass of a round's rows (seeded by ``seed``, the round and the pass).
            seed: seed of the shuffling.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
        """
        super().__init__(seeds, val_fraction=0.0, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         max_length=max_length, chat_template=False, shuffle=shuffle, seed=seed,
                         num_workers=num_workers, tokenizer=tokenizer)
        check_int("data.rounds", rounds)
        check_int("data.epochs_per_round", epochs_per_round)
        self.eval_source = eval_prompts
        self.benign_source = benign_prompts
        self.template = template if template is not None else FewShotTemplate()
        sft_texts(self.template, "q", "a")  # the example must extend the query (one format for all)
        self.rounds, self.epochs_per_round = rounds, epochs_per_round
        self.pool: list[PoolRow] = []
        #: round t -> what its generation step did (counts, diversity...); a round is generated once
        self.round_stats: dict[int, dict[str, float]] = {}
        self.eval_questions: list[str] = []
        self.benign_questions: list[str] = []
        self.before_round: Callable[[int], None] | None = None
        self._ready = False

    # -- loading -------------------------------------------------------------------------------
    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase, chat: bool) -> SequenceExample:
        prompt, response = sft_texts(self.template, record["question"], record["answer"])
        return SequenceExample(encode_prompt(tokenizer, prompt, False), encode_response(tokenizer, response), index)

    def _collator(self, pad_token_id: int) -> _Collator:
        return _Collator(pad_token_id)

    def load_seeds(self) -> list[PoolRow]:
        """The seed pairs as pool rows (``data.seeds``; an empty set or a record without an answer is an error)."""
        records = _load_or_name(self.train_source, "data.seeds", ("question", "answer"))
        return [PoolRow(i, r["question"].strip(), r["answer"].strip(), 0, "seed") for i, r in enumerate(records)]

    def load_eval_questions(self, benign: bool = False) -> list[str]:
        """The evaluation questions (``benign``: the benign ones), each once, in source order (none without
        ``data.eval_prompts`` / ``data.benign_prompts``)."""
        source, key = (self.benign_source, "data.benign_prompts") if benign else (self.eval_source, "data.eval_prompts")
        if source is None:
            return []
        records = _load_or_name(source, key, ("question",))
        seen, questions = set(), []
        for r in records:
            key = normalise_text(r["question"])
            if key not in seen:
                seen.add(key)
                questions.append(r["question"].strip())
        return questions

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.tokenizer = self._resolve_tokenizer()
        check_response_room(self.tokenizer, False, self.max_length)
        seeds = self.load_seeds()
        if not self.pool:  # a checkpoint's pool (load_state_dict) is kept
            self.pool = seeds
        self.eval_questions = self.load_eval_questions()
        self.benign_questions = self.load_eval_questions(benign=True)
        self._ready = True

    # -- the pool --------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Stages (epochs) of the run: one per round."""
        return self.rounds

    @property
    def num_seeds(self) -> int:
        """|D_0|: the seed pairs in the pool."""
        return sum(r.kind == "seed" for r in self.pool)

    def has_round(self, round: int) -> bool:
        """Whether round ``round``'s generation step has run (its pairs, if any were kept, are in the pool)."""
        return round in self.round_stats

    def add_round(self, round: int, pairs: Sequence[dict[str, Any]], stats: dict[str, float]) -> list[PoolRow]:
        """Append round ``round``'s kept pairs (dicts with ``question``, ``answer``, ``parents``,
        ``question_parents``) to the pool as generated rows of D_{round + 1}; ``stats`` is what the round did."""
        if self.has_round(round):
            raise RuntimeError(f"round {round} was generated already; a round grows the pool once")
        start = len(self.pool)
        rows = [PoolRow(start + j, p["question"], p["answer"], round + 1, "generated", list(p.get("parents", [])),
                        list(p.get("question_parents", []))) for j, p in enumerate(pairs)]
        self.pool.extend(rows)
        self.round_stats[round] = dict(stats)
        return rows

    def pairs(self) -> list[tuple[str, str]]:
        """The pool's (question, answer) pairs, by id."""
        return [(r.question, r.answer) for r in self.pool]

    def current_round(self) -> int:
        """The round under way: ``trainer.current_epoch`` (0 without a trainer; the last one after a finished fit)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return min(epoch, self.rounds - 1)

    def round_order(self) -> list[int]:
        """The pool ids of the current round's SFT rows, in training order: ``epochs_per_round`` passes over the
        pool, each a whole pass (every row once) and, with ``shuffle``, shuffled on its own (seeded by ``seed``,
        the round and the pass), so no row repeats within a pass."""
        ids = [r.id for r in self.pool]
        order: list[int] = []
        for p in range(self.epochs_per_round):
            this = list(ids)
            if self.shuffle:
                random.Random(f"isara/{self.seed}/{self.current_round()}/{p}").shuffle(this)
            order += this
        return order

    def round_dataset(self) -> TokenizedDataset:
        """The current pool's SFT rows in :meth:`round_order` (``index`` = the row's pool id)."""
        rows = [dataclasses.asdict(self.pool[i]) for i in self.round_order()]
        return TokenizedDataset([self._encode(r, r["id"], self.tokenizer, False) for r in rows], self.max_length)

    # -- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader:
        """Round ``trainer.current_epoch``'s SFT rows: the pool once :attr:`before_round` has grown it."""
        if self.before_round is not None:
            self.before_round(self.current_round())
        self._train_loader = self._loader(self.round_dataset(), self.batch_size, shuffle=False, shard=True,
                                          train=True)  # round_order shuffles each pass
        return self._train_loader

    @property
    def held_out_questions(self) -> list[str]:
        """Every question the evaluation asks (``eval_prompts`` and ``benign_prompts``): what generated questions
        must not leak."""
        return self.eval_questions + self.benign_questions

    def _questions_loader(self, benign: bool = True):
        examples = [QuestionExample(q, i) for i, q in enumerate(self.eval_questions)]
        if benign:
            examples += [QuestionExample(q, len(examples) + i, True) for i, q in enumerate(self.benign_questions)]
        if not examples:
            return []
        return self._loader(_Questions(examples), self.eval_batch_size, shuffle=False, shard=True)

    def val_dataloader(self):
        """The evaluation questions then the benign ones (none without ``data.eval_prompts`` and
        ``data.benign_prompts``)."""
        return self._questions_loader()

    def test_dataloader(self):
        return self._questions_loader()

    def predict_dataloader(self):
        """The evaluation questions (not the benign ones)."""
        return self._questions_loader(benign=False)

    def split_of(self, stage: str) -> str:
        return stage

    def split_loaders(self, shard: bool = False) -> dict:
        return {}  # nothing to precompute: ISARA has no reference log-probs

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The pool (with provenance) and what each generated round did: a resumed run continues with them."""
        return {"pool": [dataclasses.asdict(r) for r in self.pool],
                "round_stats": {int(k): dict(v) for k, v in self.round_stats.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pool = [PoolRow(**r) for r in state_dict.get("pool", [])]
        self.round_stats = {int(k): dict(v) for k, v in state_dict.get("round_stats", {}).items()}
