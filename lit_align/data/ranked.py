"""Ranked preference data: M rated responses per prompt -> curriculum-ordered preference pairs.

Curry-DPO (Pattnaik et al. 2024, arXiv 2403.07230) builds several (chosen, rejected) pairs per prompt from its
rated responses, orders them easy -> hard and trains a DPO stage per difficulty level.
:class:`RankedPreferenceDataModule` loads the rated responses, builds the pairs (:func:`build_pairs`), sorts them into
levels (:func:`assign_levels`) and serves stage ``trainer.current_epoch``'s pairs as the same
:class:`~lit_align.data.PreferenceBatch` es as :class:`~lit_align.data.PreferenceDataModule` (so ``DPOModule``'s step
works unchanged). Stages are epochs: a stage driver reloads the train loader every epoch.

Sources (``data.format``):

* ``ranked``: records ``{"prompt", "responses": [...], "ratings": [...]}`` (local .json/.jsonl/.parquet/.csv, an HF
  id or ``builtin:ranked_preferences``; ``fields`` renames columns);
* ``ultrafeedback``: ``openbmb/UltraFeedback`` rows (``instruction``, ``completions[*].response``), rated by
  ``data.rating_key``;
* ``oasst``: ``OpenAssistant/oasst1`` message rows (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``):
  each prompter message with two or more ranked assistant replies is a prompt; ``rank`` (0 = best) becomes the rating
  ``-rank``, so a gap is a rank difference, on OASST's own scale (others.md §9(h)3).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import DataSource, Record, describe_record, load_records, read_rows
from lit_align.data.sampling import ResumableDataLoader
from lit_align.data.tokenize import (
    PreferenceCollator,
    PreferenceExample,
    TokenizedDataset,
    encode_prompt,
    encode_response,
    warn_truncated,
)
from lit_align.errors import ConfigError, DataError, check_choice, check_int

__all__ = ["RankedPair", "RankedPreferenceDataModule", "assign_levels", "build_pairs", "curriculum_order"]

log = logging.getLogger(__name__)

PairScheme = Literal["best_vs_rest", "all_pairs", "best_vs_worst"]
Order = Literal["rating_gap", "ref_logprob_margin", "random"]
Curriculum = Literal["iterative", "non_iterative"]
Format = Literal["ranked", "ultrafeedback", "oasst"]
RatingKey = Literal["fine-grained_score", "overall_score"]

PAIR_SCHEMES = ("best_vs_rest", "all_pairs", "best_vs_worst")
ORDERS = ("rating_gap", "ref_logprob_margin", "random")


# -- pairs and levels (pure) ---------------------------------------------------------------------
def build_pairs(ratings: Sequence[float], scheme: PairScheme = "best_vs_rest") -> list[tuple[int, int, float]]:
    """The ``(chosen, rejected, gap)`` pairs of one prompt's responses (indices into ``ratings``), easiest first.

    ``best_vs_rest``: the best response against each other one (the paper's default; ratings [5, 4, 3, 2] give
    (0, 3) gap 3, (0, 2) gap 2, (0, 1) gap 1); ``all_pairs``: every two responses with different ratings;
    ``best_vs_worst``: the single pair of plain DPO. Tied ratings give no pair; among tied best responses the
    first is "the best". Pairs are sorted by gap, largest first (stable: ties keep rank order).
    """
    if scheme not in PAIR_SCHEMES:
        raise ConfigError(f"data.pairs must be one of {list(PAIR_SCHEMES)}, got {scheme!r}")
    ranked = sorted(range(len(ratings)), key=lambda i: -ratings[i])  # best first, ties in input order
    if scheme == "all_pairs":
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    elif scheme == "best_vs_rest":
        candidates = [(ranked[0], b) for b in ranked[1:]]
    else:
        candidates = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
    pairs = [(c, r, float(ratings[c] - ratings[r])) for c, r in candidates if ratings[c] > ratings[r]]
    return sorted(pairs, key=lambda p: -p[2])


def assign_levels(prompts: Sequence[int], easiness: Sequence[float], num_levels: int | None = None) -> list[int]:
    """The difficulty level (0 = easiest) of each pair, from its prompt and an easiness score (higher = easier).

    ``num_levels=None``: per prompt, the pair's position among its prompt's pairs by easiness (the paper's
    per-prompt easy / medium / hard: with best-vs-rest over four ratings, (R1, R4) is level 0, (R1, R3) level 1 and
    (R1, R2) level 2; there are as many levels as the most pairs of one prompt). An int: every pair sorted by
    easiness and cut into that many near-equal consecutive levels. Ties keep pair order.
    """
    n = len(prompts)
    order = sorted(range(n), key=lambda i: -easiness[i])  # stable
    levels = [0] * n
    if num_levels is None:
        seen: dict[int, int] = {}
        for i in order:
            levels[i] = seen.get(prompts[i], 0)
            seen[prompts[i]] = levels[i] + 1
        return levels
    for position, i in enumerate(order):
        levels[i] = position * num_levels // n
    return levels


def curriculum_order(levels: Sequence[int], easiness: Sequence[float], stage_levels: Sequence[int],
                     shuffle_seed: int | None) -> list[int]:
    """The pair indices of ``stage_levels`` in curriculum order: level by level (never mixed across levels), each
    level by easiness (largest first, ties in pair order) or, with ``shuffle_seed``, in a permutation seeded by it
    and the level."""
    rows: list[int] = []
    for level in stage_levels:
        members = sorted((i for i, lv in enumerate(levels) if lv == level), key=lambda i: -easiness[i])
        if shuffle_seed is not None:
            random.Random(shuffle_seed * 1_000_003 + level).shuffle(members)
        rows.extend(members)
    return rows


@dataclass(frozen=True)
class RankedPair:
    """One preference pair of the pair table."""

    prompt: int
    """Position of the prompt's record in its split."""
    chosen: int
    """Index of the chosen response among the record's responses."""
    rejected: int
    """Index of the rejected response."""
    gap: float
    """Rating of chosen minus rating of rejected (on the source's own scale), > 0."""


# -- records ---------------------------------------------------------------------------------------
def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _record_problem(record: Record) -> str | None:
    """What is wrong with a ranked record (and how to fix it), or None."""
    responses, ratings = record.get("responses"), record.get("ratings")
    for name, value in (("responses", responses), ("ratings", ratings)):
        if value is None:
            return f"missing field {name!r} (map another column name with `fields: {{{name}: <column>}}`)"
    if not isinstance(responses, list):
        return f"field 'responses' must be a list of response texts, got {type(responses).__name__}"
    if not isinstance(ratings, list):
        return f"field 'ratings' must be a list of numbers, got {type(ratings).__name__}"
    if len(responses) < 2:
        return (f"has {len(responses)} response(s); ranked pairs need at least 2 rated responses per prompt "
                "(drop the record, or add responses)")
    if len(ratings) != len(responses):
        return (f"has {len(responses)} responses but {len(ratings)} ratings; give one rating per response, in the "
                "same order")
    for i, r in enumerate(ratings):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            return f"rating {i} is {r!r}, not a finite number; ratings must be numbers (e.g. 4 or 7.5, not '4')"
    for i, text in enumerate(responses):
        if not _is_text(text):
            return f"response {i} is empty or not a string / chat-message list"
    return None


def _ultrafeedback_rating(completion: dict, key: RatingKey) -> Any:
    """A completion's rating: ``overall_score``, or ``fine-grained_score`` (the stored mean of the four aspect
    ratings; computed from ``annotations[*].Rating`` when the field is absent or null, skipping ``"N/A"``)."""
    if completion.get(key) is not None:
        return completion[key]
    if key == "fine-grained_score" and isinstance(completion.get("annotations"), dict):
        values = []
        for aspect in completion["annotations"].values():
            rating = aspect.get("Rating") if isinstance(aspect, dict) else None
            try:
                values.append(float(rating))
            except (TypeError, ValueError):
                continue
        return sum(values) / len(values) if values else None
    return None


def _ultrafeedback_records(source: DataSource, key: RatingKey) -> list[Record]:
    prompt_column = source.fields.get("prompt", "instruction")
    records = []
    for i, row in enumerate(read_rows(source)):
        where = describe_record(source.path, i)
        if not isinstance(row, dict) or prompt_column not in row or "completions" not in row:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: data.format='ultrafeedback' needs '{prompt_column}' and 'completions' "
                            f"(openbmb/UltraFeedback's columns); it has {have}")
        completions = row["completions"] or []
        records.append({
            "prompt": row[prompt_column],
            "responses": [c.get("response") for c in completions],
            "ratings": [_ultrafeedback_rating(c, key) for c in completions],
            "_source": source.path, "_source_index": i,
        })
    return records


def _oasst_records(source: DataSource, all_turns: bool) -> list[Record]:
    rows = read_rows(source)
    for i, row in enumerate(rows):
        missing = [c for c in ("message_id", "parent_id", "role", "text") if not isinstance(row, dict) or c not in row]
        if missing:
            raise DataError(f"{describe_record(source.path, i)}: data.format='oasst' needs OpenAssistant/oasst1's "
                            f"message columns; missing {missing}")
    by_id = {row["message_id"]: row for row in rows}
    replies: dict[str, list[dict]] = {}
    for row in rows:
        if row["role"] == "assistant" and row.get("rank") is not None and not row.get("deleted"):
            replies.setdefault(row["parent_id"], []).append(row)
    records = []
    for i, row in enumerate(rows):
        ranked = replies.get(row["message_id"], [])
        if row["role"] != "prompter" or len(ranked) < 2 or (row["parent_id"] is not None and not all_turns):
            continue
        thread, node = [], row
        while node is not None:  # the conversation up to this prompt, root first
            thread.append({"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]})
            node = by_id.get(node["parent_id"]) if node["parent_id"] is not None else None
        records.append({
            "prompt": row["text"] if len(thread) == 1 else thread[::-1],
            "responses": [r["text"] for r in ranked],
            "ratings": [-float(r["rank"]) for r in ranked],  # rank 0 is best: a higher rating is better
            "_source": source.path, "_source_index": i,
        })
    return records


# -- datasets ----------------------------------------------------------------------------------------
class PairDataset(TokenizedDataset):
    """The pair table of a split: one :class:`PreferenceExample` per :class:`RankedPair`, ``index`` = pair index."""

    def __init__(self, examples: list[PreferenceExample], pairs: list[RankedPair], max_length: int) -> None:
        super().__init__(examples, max_length)
        self.raw_examples, self.pairs = examples, pairs


class StageDataset(Dataset):
    """One stage's pairs, in curriculum order, chosen lazily: the order (which may need reference log-prob margins
    that a module fills in ``on_train_start``) is computed when the dataset is first read. Its length is known at
    once (a stage's size does not depend on the order). An example's ``index`` is its position in the stage (what
    a stage's precomputed reference table is indexed by); :attr:`rows` maps positions to pair-table indices.
    Examples cut to ``max_length`` are counted in a warning when the stage's examples are made (Lightning creates
    the loader's iterator before ``on_train_start``, too early to order them: ``truncated`` stays 0 for the loader)."""

    truncated = 0

    def __init__(self, rows: Callable[[], list[int]], size: int, table: PairDataset, stage: int) -> None:
        self._rows, self._size, self._table, self.stage = rows, size, table, stage
        self.max_length = table.max_length
        self._data: TokenizedDataset | None = None
        self._order: list[int] | None = None

    def _dataset(self) -> TokenizedDataset:
        if self._data is None:
            rows = self._rows()
            if len(rows) != self._size:
                raise RuntimeError(f"stage {self.stage}: the curriculum order holds {len(rows)} pairs but the stage was "
                                   f"sized {self._size} before ordering (the loader's length); a stage's pairs must "
                                   "not depend on the easiness scores (assign_levels sizes levels by prompt counts "
                                   "only). Check a custom data.order or rows function; with the built-in orders this "
                                   "is a bug: report it with the data config")
            examples = [replace(self._table.raw_examples[i], index=k) for k, i in enumerate(rows)]
            self._data, self._order = TokenizedDataset(examples, self.max_length), rows
            warn_truncated(self._data, f"stage {self.stage} training")
        return self._data

    @property
    def rows(self) -> list[int]:
        """The pair-table index of each position of the stage."""
        self._dataset()
        return self._order

    def fingerprint(self) -> str:
        """The stage's tokens and order (the key of its precomputed reference table)."""
        return self._dataset().fingerprint()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> PreferenceExample:
        return self._dataset()[i]


# -- the DataModule ------------------------------------------------------------------------------------
class RankedPreferenceDataModule(TokenizedDataModule):
    """Curriculum-ordered preference pairs from M rated responses per prompt (Curry-DPO, arXiv 2403.07230).

    Each prompt's rated responses give pairs (``pairs``), each pair a difficulty level (``order``, ``num_stages``):
    iterative curriculum = one level per stage (epoch), easiest first; ``non_iterative`` = one stage holding every
    pair, level after level. Pairs are never shuffled across levels; ``shuffle_within_stage`` shuffles within each
    level (seeded by ``seed`` and the stage). The validation split holds out whole prompts (records), all their pairs.
    ``num_prompts`` and ``num_pairs`` count the training prompts (with at least one pair) and pairs;
    :meth:`stage_counts` counts each stage's. Example::

        data:
          class_path: lit_align.data.RankedPreferenceDataModule
          init_args:
            train: {path: "builtin:ranked_preferences"}
            pairs: best_vs_rest
            order: rating_gap
            batch_size: 8
    """

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        format: Format = "ranked",
        pairs: PairScheme = "best_vs_rest",
        order: Order = "rating_gap",
        curriculum: Curriculum = "iterative",
        num_stages: int | None = None,
        shuffle_within_stage: bool = True,
        rating_key: RatingKey = "fine-grained_score",
        oasst_all_turns: bool = False,
        skip_invalid: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        chat_template: bool | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            train: where the rated responses come from (see ``format``).
            val: held-out records; ``None`` holds out ``val_fraction`` of the training prompts (seeded).
            test: records for ``lit-align test``; ``None`` uses the validation records.
            format: ``ranked`` (``{prompt, responses, ratings}``), ``ultrafeedback`` (openbmb/UltraFeedback rows) or
                ``oasst`` (OpenAssistant/oasst1 message rows); applies to every source.
            pairs: ``best_vs_rest`` (best vs each k-th, the paper's default), ``all_pairs`` (every two responses with
                different ratings) or ``best_vs_worst`` (one pair per prompt: the single-pair DPO baseline).
            order: what makes a pair easy: ``rating_gap`` (a larger gap is easier), ``ref_logprob_margin`` (a larger
                reference margin log pi_ref(chosen) - log pi_ref(rejected) is easier; the module fills it with
                :meth:`set_reference_margins` before the first stage) or ``random`` (seeded by ``seed``).
            curriculum: ``iterative`` (one level per stage) or ``non_iterative`` (one stage, level after level).
            num_stages: ``None``: levels per prompt, one per pair rank (best-vs-rest over four ratings: 3 levels,
                easy (R1, R4), medium (R1, R3), hard (R1, R2)); an int: all pairs sorted by ``order`` and cut into
                that many equal levels.
            shuffle_within_stage: shuffle the pairs of each level (never across levels); off: each level runs
                easiest first.
            rating_key: UltraFeedback's rating of a completion: ``fine-grained_score`` (the mean of the four aspect
                ratings, as HuggingFaceH4/ultrafeedback_binarized uses) or ``overall_score`` (the critique score).
                Which one the Curry-DPO release used is not stated (others.md §9 [NOT FOUND]).
            oasst_all_turns: OASST: also later turns (prompt = the conversation so far, as chat messages); default
                only each tree's first prompt (plain text).
            skip_invalid: drop records that cannot give pairs (one response, ratings that are not numbers,
                mismatched lengths) with a warning, instead of stopping at the first with an error.
            val_fraction: share of the training prompts held out when ``val`` is not given; 0 disables validation.
            batch_size: pairs per step on each data-parallel rank.
            eval_batch_size: pairs per validation step (default ``batch_size``).
            max_length: longest prompt + response in tokens; longer prompts are cut from the left.
            chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when present.
            seed: seed of the validation split, the within-level shuffling and ``order: random``.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
        """
        super().__init__(train, val=val, test=test, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, max_length=max_length, chat_template=chat_template,
                         shuffle=False, seed=seed, num_workers=num_workers, tokenizer=tokenizer)
        check_choice("data.format", format, ("ranked", "ultrafeedback", "oasst"))
        check_choice("data.pairs", pairs, PAIR_SCHEMES)
        check_choice("data.order", order, ORDERS)
        check_choice("data.curriculum", curriculum, ("iterative", "non_iterative"))
        check_choice("data.rating_key", rating_key, ("fine-grained_score", "overall_score"))
        check_int("data.num_stages", num_stages, optional=True)
        self.format, self.pairs, self.order, self.curriculum = format, pairs, order, curriculum
        self.levels_wanted, self.shuffle_within_stage = num_stages, shuffle_within_stage
        self.rating_key, self.oasst_all_turns, self.skip_invalid = rating_key, oasst_all_turns, skip_invalid
        self._margins: torch.Tensor | None = None
        self._levels: list[int] | None = None
        self._stages: dict[int, StageDataset] = {}  # stage -> its dataset (one per stage: loaders and tables agree)

    # -- loading -----------------------------------------------------------------------------
    def _load(self, source: DataSource) -> list[Record]:
        if self.format == "ultrafeedback":
            records = _ultrafeedback_records(source, self.rating_key)
        elif self.format == "oasst":
            records = _oasst_records(source, self.oasst_all_turns)
        else:
            records = load_records(source, ("prompt",), extra=("responses", "ratings"))
        kept, dropped = [], []
        for record in records:
            problem = _record_problem(record)
            if problem is None and not _is_text(record.get("prompt")):
                problem = "field 'prompt' is empty or not a string / chat-message list"
            if problem is None:
                kept.append(record)
            elif self.skip_invalid:
                dropped.append(record)
            else:
                raise DataError(f"{describe_record(record['_source'], record['_source_index'])}: {problem}. "
                                "Or set data.skip_invalid: true to drop such records.")
        if dropped:
            log.warning("data source %r: dropped %d of %d records that cannot give pairs (data.skip_invalid), e.g. "
                        "record %d: %s", source.path, len(dropped), len(records), dropped[0]["_source_index"] + 1,
                        _record_problem(dropped[0]))
        if not kept:
            raise DataError(f"data source {source.path!r} has no usable ranked records (format {self.format!r})")
        return kept

    def _tokenize(self, records: list[Record], chat: bool) -> PairDataset | None:
        if not records:
            return None
        pairs = [RankedPair(p, c, r, gap) for p, rec in enumerate(records)
                 for c, r, gap in build_pairs(rec["ratings"], self.pairs)]
        if not pairs:
            source = records[0]["_source"]
            raise DataError(f"data source {source!r}: its {len(records)} records give no preference pairs: every "
                            f"record's ratings are tied (ties give no pair) under data.pairs={self.pairs!r}; give "
                            "records with different ratings")
        examples, prompts = [], {}
        for i, pair in enumerate(pairs):
            rec = records[pair.prompt]
            if pair.prompt not in prompts:
                prompts[pair.prompt] = encode_prompt(self.tokenizer, rec["prompt"], chat)
            chosen, rejected = (encode_response(self.tokenizer, rec["responses"][j])
                                for j in (pair.chosen, pair.rejected))
            examples.append(PreferenceExample(prompts[pair.prompt], chosen, rejected, i))
        return PairDataset(examples, pairs, self.max_length)

    def _collator(self, pad_token_id: int) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id)

    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase, chat: bool) -> Any:
        raise NotImplementedError("ranked records give several pairs each; see _tokenize")

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        super().setup(stage)
        table = self.train_dataset.pairs
        if self.levels_wanted is not None and self.levels_wanted > len(table):
            raise ConfigError(f"data.num_stages={self.levels_wanted} is more than the {len(table)} training pairs; "
                              "lower it (or null: one level per pair rank)")
        sizes = [self.stage_size(k) for k in range(self.num_stages)]
        log.info("ranked preferences: %d prompts, %d pairs (%s), %d stage(s) of %s pairs", self.num_prompts,
                 self.num_pairs, self.pairs, self.num_stages, sizes)

    # -- counts and levels -------------------------------------------------------------------------
    @property
    def pair_table(self) -> list[RankedPair]:
        """The training pairs; a batch's ``index`` is a position in it (as are :meth:`set_reference_margins`'s)."""
        if self.train_dataset is None:
            raise RuntimeError("RankedPreferenceDataModule.setup() has not run yet")
        return self.train_dataset.pairs

    @property
    def num_pairs(self) -> int:
        """Training pairs in all stages."""
        return len(self.pair_table)

    @property
    def num_prompts(self) -> int:
        """Training prompts with at least one pair (a prompt gives several pairs: the counts differ)."""
        return len({p.prompt for p in self.pair_table})

    @property
    def num_levels(self) -> int:
        """Difficulty levels: ``data.num_stages``, or the most pairs of one prompt."""
        if self.levels_wanted is not None:
            return self.levels_wanted
        counts: dict[int, int] = {}
        for p in self.pair_table:
            counts[p.prompt] = counts.get(p.prompt, 0) + 1
        return max(counts.values())

    @property
    def num_stages(self) -> int:
        """Stages (= epochs) of the curriculum: a level each (iterative), or 1 (non-iterative)."""
        return self.num_levels if self.curriculum == "iterative" else 1

    def _stage_levels(self, stage: int) -> list[int]:
        return [stage] if self.curriculum == "iterative" else list(range(self.num_levels))

    def stage_size(self, stage: int) -> int:
        """Pairs in ``stage`` (known before the order is: level sizes do not depend on the easiness scores)."""
        table = self.pair_table
        shape = assign_levels([p.prompt for p in table], [0.0] * len(table), self.levels_wanted)
        wanted = set(self._stage_levels(stage))
        return sum(level in wanted for level in shape)

    @property
    def needs_reference_margins(self) -> bool:
        """Whether ``order: ref_logprob_margin`` still waits for :meth:`set_reference_margins`."""
        return self.order == "ref_logprob_margin" and self._margins is None

    def set_reference_margins(self, margins: torch.Tensor) -> None:
        """The reference log-prob margin ``log pi_ref(chosen) - log pi_ref(rejected)`` of each training pair, in
        :attr:`pair_table` order (for ``order: ref_logprob_margin``; kept in checkpoints via :meth:`state_dict`)."""
        margins = torch.as_tensor(margins, dtype=torch.float32).detach().cpu().reshape(-1)
        if len(margins) != self.num_pairs:
            raise ValueError(f"set_reference_margins: got {len(margins)} margins for {self.num_pairs} training pairs")
        self._margins, self._levels, self._stages = margins, None, {}

    def easiness(self) -> list[float]:
        """Each training pair's easiness under ``order`` (higher = easier)."""
        table = self.pair_table
        if self.order == "rating_gap":
            return [p.gap for p in table]
        if self.order == "random":
            rng = random.Random(self.seed)
            return [rng.random() for _ in table]
        if self._margins is None:
            raise ConfigError("data.order is 'ref_logprob_margin' but no reference margins were set: train with a "
                              "module that fills them (lit_align.methods.CurryDPOModule), call "
                              "datamodule.set_reference_margins(...), or use order: rating_gap")
        return self._margins.tolist()

    def pair_levels(self) -> list[int]:
        """The level (0 = easiest) of each training pair (computed on first use)."""
        if self._levels is None:
            self._levels = assign_levels([p.prompt for p in self.pair_table], self.easiness(), self.levels_wanted)
        return self._levels

    def stage_rows(self, stage: int) -> list[int]:
        """The training pairs of ``stage`` in the order the loader serves them (one rank, before sharding)."""
        seed = self.seed * 1_000 + stage if self.shuffle_within_stage else None
        return curriculum_order(self.pair_levels(), self.easiness(), self._stage_levels(stage), seed)

    def stage_counts(self, stage: int) -> dict[str, int]:
        """``{"prompts", "pairs"}`` of ``stage`` (a prompt appears in several stages, once per pair it has there)."""
        rows = self.stage_rows(stage)
        return {"prompts": len({self.pair_table[i].prompt for i in rows}), "pairs": len(rows)}

    # -- loaders -------------------------------------------------------------------------------------
    def current_stage(self) -> int:
        """The stage the trainer is in: ``trainer.current_epoch`` (0 without a trainer); after a finished fit
        (validate / test in the same process, ``current_epoch`` = the stage count) the last stage."""
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if trainer is not None and not trainer.training and epoch == self.num_stages:
            return self.num_stages - 1
        if epoch >= self.num_stages:
            raise ConfigError(f"epoch {epoch} asks for stage {epoch} of a {self.num_stages}-stage curriculum; set "
                              f"trainer.max_epochs to {self.num_stages} (one epoch per stage)")
        return epoch

    def stage_dataset(self, stage: int) -> StageDataset:
        """Stage ``stage``'s pairs in curriculum order (ordered lazily, when first read)."""
        if stage not in self._stages:
            self._stages[stage] = StageDataset(lambda: self.stage_rows(stage), self.stage_size(stage),
                                               self.train_dataset, stage)
        return self._stages[stage]

    def train_dataloader(self) -> ResumableDataLoader:
        """Stage ``trainer.current_epoch``'s pairs, in curriculum order."""
        dataset = self.stage_dataset(self.current_stage())
        self._train_loader = self._loader(dataset, self.batch_size, shuffle=False, shard=True, train=True)
        return self._train_loader

    def split_loaders(self, shard: bool = False) -> dict[str, DataLoader]:
        """As the base's, with the current stage's pairs as ``train`` (a stage's reference table covers its rows)."""
        loaders = super().split_loaders(shard)
        if "train" in loaders:
            loaders["train"] = self._loader(self.stage_dataset(self.current_stage()), self.eval_batch_size,
                                            shuffle=False, shard=shard)
        return loaders

    def pair_loader(self, shard: bool = False) -> DataLoader:
        """Every training pair in pair-table order (``index`` = pair-table index), e.g. to score reference
        margins for :meth:`set_reference_margins`; with ``shard`` each rank gets its padded share."""
        return self._loader(self.train_dataset, self.eval_batch_size, shuffle=False, shard=shard)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reference margins (a resumed run orders pairs as the interrupted one did, whatever its reference)."""
        return {"reference_margins": self._margins}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        margins = state_dict.get("reference_margins")
        self._margins = None if margins is None else margins.float().cpu()
        self._levels, self._stages = None, {}
