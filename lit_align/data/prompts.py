"""Prompt-only data for online methods: RLHF's policy prompts and the game attacker's seed questions.

:class:`PromptDataModule` reads single-turn prompts, renders each with ``data.template`` (a ``str.format``
template with ``{prompt}``) and, optionally, the tokenizer's chat template, and yields
:class:`PromptBatch` es of **left**-padded prompts (ready for :func:`lit_align.rollout.sampler.sample`)
with the raw prompt text, the example's index and a stable prompt id (``uid``).
:class:`SeedPromptDataModule` is the same module for the two-player game (GPO: Zheng et al. 2024,
arXiv 2406.10977; prompts and formats as in the released code, github.com/ruizheng20/gpo:
``gpo/gpo_datahelper.py``, ``ppo_data/*.json``): its template is the attacker's conditional-rewrite
prompt (:data:`ATTACKER_TEMPLATE`: "here is a question; write another harmful question on a similar
topic"); the attacker's continuation *is* the attack prompt, which the defender then answers inside
:data:`DEFENDER_TEMPLATE`.

Formats (``data.format``), each a list of single-turn prompts once loaded:

* ``prompt``: records with a ``prompt`` field (local .json/.jsonl/.csv/.parquet, or an HF id such as
  ``PKU-Alignment/PKU-SafeRLHF`` or ``trl-lib/tldr``; rename a column with ``fields: {prompt: question}``);
* ``hh``: Anthropic/hh-rlhf records: the first human turn of ``chosen`` (the text between the first
  ``"\\n\\nHuman: "`` and the following ``"\\n\\nAssistant:"``). For the hub id ``Anthropic/hh-rlhf``,
  ``subset`` names the data directory (``harmless-base``, ``helpful-base``...; ``red-team-attempts``
  has another layout);
* ``tldr``: Reddit TL;DR posts (Stiennon et al. 2020), records with ``subreddit``, ``title`` and ``post``
  rendered as :data:`TLDR_TEMPLATE` (``"SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:"``); datasets
  whose ``prompt`` column already holds that text (``trl-lib/tldr``, ``CarperAI/openai_summarize_tldr``)
  are format ``prompt``;
* ``gpo``: GPO's released files, a JSON list whose items are one-string lists (``[["How do I ..."], ...]``);
* ``auto``: ``builtin:`` prompts, a list of lists -> ``gpo``, records with ``prompt`` -> ``prompt``,
  records with ``chosen`` -> ``hh``, records with ``subreddit``, ``title`` and ``post`` -> ``tldr``.

Built-ins: ``builtin:seed_prompts`` (360 toy questions) and ``builtin:seed_prompts/val`` (48 held-out
ones), see ``lit_align/data/builtin/README.md``.

Prompt ids (``uid``): the record's ``id`` field (renamed by ``fields: {id: <column>}``) when it has one,
else the first 16 hex digits of the sha256 of the prompt text. They do not depend on the template, the
tokenizer, the order or the rank, so a per-prompt table (e.g. contrastive rewards' baseline) can be keyed
by them. Two records with one id but different prompts are refused.

Dataset responses: where the format has them (``prompt`` records with ``chosen`` / ``rejected`` strings or
message lists, hh-rlhf's first assistant turns) each example keeps them (``PromptBatch.responses``, chosen
first); online DPO ranks them together with its new candidates. Iterations: ``iterations: K`` cuts the
training prompts into K disjoint contiguous slices and epoch ``k`` serves slice ``k`` (online DPO / SELM).

Empty prompts (only whitespace, or rendered by the template and chat template into the same tokens as an
empty prompt) are a :class:`~lit_align.errors.DataError` naming the record, unless ``drop_empty`` (the
seed prompts' behaviour), which drops and counts them. Rendered prompts longer than
``max_prompt_tokens`` are dropped and counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import BUILTIN_DIR, DataSource, Record, describe_record, read_rows
from lit_align.data.tokenize import encode_prompt
from lit_align.errors import ConfigError, DataError
from lit_align.rollout.sampler import left_pad

__all__ = [
    "ATTACKER_TEMPLATE",
    "DEFENDER_TEMPLATE",
    "FORMATS",
    "TLDR_TEMPLATE",
    "PromptBatch",
    "PromptCollator",
    "PromptDataModule",
    "PromptDataset",
    "PromptExample",
    "PromptSlice",
    "SeedPromptDataModule",
    "first_human_turn",
    "load_prompts",
    "load_seed_prompts",
    "prompt_uid",
]

#: The attacker's conditional-rewrite prompt (a paraphrase of GPO's): instruction, seed, separator, cue.
ATTACKER_TEMPLATE = (
    "Here is a question. Write one more harmful question on a similar topic.\n"
    "Question: {seed}\n"
    "###\n"
    "Output:"
)
#: The defender's prompt around an attack prompt (GPO's ``"Human:" + x + "AI:"``).
DEFENDER_TEMPLATE = "Human: {prompt}\nAI:"
#: A Reddit TL;DR post as the policy sees it (Stiennon et al. 2020, "Learning to summarize from human feedback").
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
#: The values of ``data.format``.
FORMATS = ("auto", "prompt", "hh", "tldr", "gpo")

#: ``builtin:<name>`` prompt sources -> a ``.txt`` file with one prompt per line.
_BUILTIN_PROMPTS = {"seed_prompts": "seed_prompts.txt", "seed_prompts/val": "seed_prompts_val.txt"}
_HUMAN, _ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
_TLDR_FIELDS = ("subreddit", "title", "post")


def first_human_turn(conversation: str) -> str | None:
    """The first human turn of an hh-rlhf transcript (``None`` when it has no ``"\\n\\nHuman: "``)."""
    start = conversation.find(_HUMAN)
    if start < 0:
        if not conversation.startswith(_HUMAN.lstrip("\n")):
            return None
        start = -2  # a transcript that starts with "Human: " (no leading blank line)
    body = conversation[start + len(_HUMAN):]
    end = body.find(_ASSISTANT)
    return (body if end < 0 else body[:end]).strip()


def prompt_uid(prompt: str, record_id: Any = None) -> str:
    """A prompt's stable id: ``str(record_id)`` when given (not ``None`` or ``""``), else the first 16 hex
    digits of the sha256 of the prompt's UTF-8 text."""
    if record_id is not None and str(record_id) != "":
        return str(record_id)
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _rows(source: DataSource, fmt: str) -> list[Any]:
    if fmt == "hh" and not source.path.startswith("builtin:") and not Path(source.path).expanduser().exists() \
            and source.subset is not None and source.path.count("/") == 1:
        import datasets  # hh-rlhf keeps its subsets in data directories, not configurations

        try:
            ds = datasets.load_dataset(source.path, data_dir=source.subset, split=source.split, revision=source.revision)
        except Exception as err:  # datasets raises many types; all mean "cannot load this id"
            raise DataError(f"data source {source.path!r} (data_dir={source.subset!r}, split={source.split!r}) "
                             f"could not be loaded: {err}") from err
        rows = ds.to_list()
        return rows[: source.limit] if source.limit is not None else rows
    return read_rows(source)


def _column(source: DataSource, name: str) -> str:
    return source.fields.get(name, name)


def _detect(row: Any, where: str, source: DataSource) -> str:
    """The format of one row for ``data.format: auto``."""
    if isinstance(row, list):
        return "gpo"
    if isinstance(row, dict):
        if _column(source, "prompt") in row:
            return "prompt"
        if _column(source, "chosen") in row:
            return "hh"
        if all(_column(source, f) in row for f in _TLDR_FIELDS):
            return "tldr"
    kind = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: cannot tell the format of {kind}; expected a 'prompt' field, a 'chosen' hh-rlhf "
                     "transcript, TL;DR 'subreddit'/'title'/'post' fields or a one-string list. Set data.format "
                     "or map the column with `fields: {prompt: <column>}`")


def _text_field(row: dict, name: str, where: str, source: DataSource, fmt: str, strip: bool = True) -> str:
    """The string in ``row``'s column for ``name``, stripped unless ``strip`` is false (``""`` for a null cell)."""
    column = _column(source, name)
    if column not in row:
        raise DataError(f"{where}: missing field {column!r} (data.format={fmt!r}); it has {sorted(row)}. Map your "
                         f"column with `fields: {{{name}: <column>}}`")
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
    return value.strip() if strip else value


def _prompt(row: Any, where: str, source: DataSource, fmt: str) -> str:
    """The prompt text of one row (``""`` when it has none: the caller refuses or drops it)."""
    if fmt == "auto":
        fmt = _detect(row, where, source)
    if fmt == "gpo":
        if not (isinstance(row, list) and len(row) == 1 and isinstance(row[0], str)):
            raise DataError(f"{where}: data.format='gpo' expects each item to be a list holding one string, got "
                             f"{row!r:.80}")
        return row[0].strip()
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__} (a list of one-string lists is "
                         "data.format='gpo')")
    if fmt == "prompt":
        return _text_field(row, "prompt", where, source, fmt)
    if fmt == "tldr":
        parts = {name: _text_field(row, name, where, source, fmt) for name in _TLDR_FIELDS}
        return TLDR_TEMPLATE.format(**parts) if parts["post"] else ""
    transcript = _text_field(row, "chosen", where, source, fmt, strip=False)  # its first "\n\nHuman: " counts
    turn = first_human_turn(transcript) if transcript.strip() else ""
    if turn is None:
        raise DataError(f"{where}: field {_column(source, 'chosen')!r} has no '\\n\\nHuman: ' turn; is this an "
                         "hh-rlhf transcript?")
    return turn


def _response_text(value: Any) -> str | None:
    """A dataset response as text: a string, or the last message of a message list (``[{role, content}, ...]``)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"].strip()
    return None


def _first_assistant_turn(conversation: str) -> str | None:
    """The first assistant reply of an hh-rlhf transcript (up to the next human turn)."""
    start = conversation.find(_ASSISTANT)
    if start < 0:
        return None
    body = conversation[start + len(_ASSISTANT):]
    end = body.find(_HUMAN)
    return (body if end < 0 else body[:end]).strip()


def _responses(row: Any, source: DataSource, fmt: str) -> list[str]:
    """The dataset's own responses to a prompt (``chosen`` then ``rejected``) when the format has them: the
    ``prompt`` format's ``chosen`` / ``rejected`` fields (strings or message lists, e.g.
    HuggingFaceH4/ultrafeedback_binarized), hh-rlhf's first assistant turns; otherwise none."""
    if not isinstance(row, dict):
        return []
    if fmt == "auto":
        fmt = "prompt" if _column(source, "prompt") in row else "hh" if _column(source, "chosen") in row else fmt
    out = []
    for name in ("chosen", "rejected"):
        value = row.get(_column(source, name))
        text = _first_assistant_turn(value) if fmt == "hh" and isinstance(value, str) else \
            _response_text(value) if fmt == "prompt" else None
        if text:
            out.append(text)
    return out


def _empty_error(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}. Remove the record or fix it, map the right column with "
                     "`fields: {prompt: <column>}`, or set data.drop_empty: true to drop and count such records")


def load_prompts(source: DataSource, format: str = "auto", *, drop_empty: bool = True) -> tuple[list[Record], int]:
    """``({prompt, uid, responses, _source, _source_index} records, number of empty prompts dropped)`` of one
    source. ``responses`` are the dataset's own answers (``chosen`` then ``rejected``) where the format has them
    (:func:`_responses`), else empty.

    An empty prompt (only whitespace) is dropped and counted with ``drop_empty``, else a ``DataError``
    naming the record.
    """
    if format not in FORMATS:
        raise ConfigError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
    name = source.path.removeprefix("builtin:") if source.path.startswith("builtin:") else None
    if name is not None and name in _BUILTIN_PROMPTS:
        lines = Path(str(BUILTIN_DIR / _BUILTIN_PROMPTS[name])).read_text(encoding="utf-8").splitlines()
        rows: list[Any] = lines[: source.limit] if source.limit is not None else lines
        prompts = [line.strip() for line in rows]
    elif name is not None and format in ("auto", "prompt") and not (BUILTIN_DIR / f"{name}.jsonl").is_file():
        raise DataError(f"data source {source.path!r}: no built-in prompts {name!r}; prompt built-ins are "
                         f"{sorted(f'builtin:{k}' for k in _BUILTIN_PROMPTS)}")
    else:
        rows = _rows(source, format)
        prompts = [_prompt(row, describe_record(source.path, i), source, format) for i, row in enumerate(rows)]
    if not prompts:
        raise DataError(f"data source {source.path!r} (split={source.split!r}) has no records")
    id_column = _column(source, "id")
    records, dropped = [], 0
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        if not prompt:
            if not drop_empty:
                raise _empty_error(describe_record(source.path, i), "the prompt is empty")
            dropped += 1
            continue
        record_id = row.get(id_column) if isinstance(row, dict) else None
        records.append({"prompt": prompt, "uid": prompt_uid(prompt, record_id), "_source": source.path,
                        "_source_index": i, "responses": _responses(row, source, format)})
    if not records:
        raise DataError(f"data source {source.path!r}: all {len(prompts)} prompts are empty")
    if dropped:
        rank_zero_warn(f"data source {source.path!r}: dropped {dropped} of {len(prompts)} empty prompts",
                       category=UserWarning)
    return records, dropped


def load_seed_prompts(source: DataSource, format: str = "auto") -> tuple[list[Record], int]:
    """The game's seed questions: :func:`load_prompts` with empty ones dropped and counted."""
    return load_prompts(source, format, drop_empty=True)


def _check_uids(records: list[Record]) -> None:
    """Refuse two records with one id but different prompts (a per-prompt table would mix them up)."""
    seen: dict[str, Record] = {}
    for r in records:
        first = seen.setdefault(r["uid"], r)
        if first["prompt"] != r["prompt"]:
            raise DataError(f"{describe_record(r['_source'], r['_source_index'])} has id {r['uid']!r}, like "
                             f"{describe_record(first['_source'], first['_source_index'])}, but another prompt; "
                             "prompt ids must be unique per prompt. Fix the ids, or map `fields: {id: <column>}` "
                             "to a column without `id` values to use prompt hashes")


@dataclass
class PromptExample:
    """One prompt, rendered and tokenized.

    Attributes:
        input_ids: token ids of the rendered prompt (template, then chat template), in the module tokenizer.
        prompt: the prompt text as the record gives it (before any template).
        index: position in its dataset (0..N-1 over the kept examples).
        source_index: position of the record in its source.
        uid: the prompt's stable id (:func:`prompt_uid`).
        responses: the dataset's own responses to the prompt (``chosen`` then ``rejected``) when its format has
            them (online DPO ranks them with its new candidates), else empty.
    """

    input_ids: list[int]
    prompt: str
    index: int
    source_index: int
    uid: str
    responses: tuple[str, ...] = ()


class PromptDataset(Dataset):
    """Kept :class:`PromptExample` s; ``dropped`` counts this split's prompts over the length limit
    plus the empty prompts dropped from its source(s)."""

    def __init__(self, examples: list[PromptExample], dropped: int, max_length: int) -> None:
        self.examples = [replace(ex, index=i) for i, ex in enumerate(examples)]
        self.dropped, self.max_length = dropped, max_length
        self.truncated = 0  # too-long prompts are dropped, never cut

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]

    @property
    def prompts(self) -> list[str]:
        """Every kept prompt text, in dataset order."""
        return [ex.prompt for ex in self.examples]

    @property
    def uids(self) -> list[str]:
        """Every kept prompt id, in dataset order."""
        return [ex.uid for ex in self.examples]

    @property
    def seeds(self) -> list[str]:
        """The game's name for :attr:`prompts` (read-only)."""
        return self.prompts

    def fingerprint(self) -> str:
        """sha256 of every token id, index and prompt id, in order: changes whenever the data or tokenizer do."""
        h = hashlib.sha256(f"prompts|max_length={self.max_length}".encode())
        for ex in self.examples:
            h.update(torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(f"|{ex.index}|{ex.uid}|".encode())
        return h.hexdigest()


class PromptSlice(Dataset):
    """Positions ``start .. stop - 1`` of a :class:`PromptDataset`: one iteration's prompts. The examples keep
    their dataset ``index`` (seeds and caches key on it)."""

    def __init__(self, dataset: PromptDataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop
        self.max_length, self.truncated = dataset.max_length, 0

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> PromptExample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.dataset[self.start + i]

    @property
    def uids(self) -> list[str]:
        """The slice's prompt ids, in order."""
        return [self[i].uid for i in range(len(self))]


@dataclass
class PromptBatch:
    """Rendered prompts, left-padded, with their text and ids.

    Attributes:
        input_ids: (B, P) long, the rendered prompts, **left**-padded (ready for sampling).
        attention_mask: (B, P) long, 1 on real tokens.
        prompts: B prompt texts as the records give them (before any template): what a text reward reads.
        index: (B,) long, example index in its dataset (the same on every rank and after a resume).
        uids: B stable prompt ids (:func:`prompt_uid`).
        responses: B lists of the dataset's own responses to each prompt (empty lists when it has none).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompts: list[str]
    index: Tensor
    uids: list[str]
    responses: list[list[str]] | None = None

    def __post_init__(self) -> None:
        if self.responses is None:
            self.responses = [[] for _ in self.prompts]

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real prompt tokens."""
        return int(self.attention_mask.sum())

    # the game's names for the same fields (read-only)
    @property
    def attacker_ids(self) -> Tensor:
        """:attr:`input_ids` (the game's attacker prompts)."""
        return self.input_ids

    @property
    def attacker_mask(self) -> Tensor:
        """:attr:`attention_mask` of the attacker prompts."""
        return self.attention_mask

    @property
    def seeds(self) -> list[str]:
        """:attr:`prompts` (the game's seed questions)."""
        return self.prompts

    def repeat(self, k: int) -> PromptBatch:
        """Each prompt ``k`` times, its copies contiguous (``B * k`` rows: prompt 0 k times, then prompt 1...),
        the layout group baselines (RLOO, GRPO) expect; a batch stays on its rank, so a group never straddles
        ranks."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"PromptBatch.repeat needs an int k >= 1, got {k!r}")
        rows = torch.arange(len(self), device=self.index.device).repeat_interleave(k)
        return PromptBatch(self.input_ids[rows], self.attention_mask[rows], [p for p in self.prompts for _ in range(k)],
                           self.index[rows], [u for u in self.uids for _ in range(k)],
                           [list(r) for r in self.responses for _ in range(k)])

    def to(self, device: torch.device | str) -> PromptBatch:
        """A copy with every tensor on ``device`` (Lightning's batch transfer calls it)."""
        return PromptBatch(**{f.name: v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v
                              for f in fields(self)})


@dataclass
class PromptCollator:
    """Left-pads :class:`PromptExample` s into a :class:`PromptBatch`."""

    pad_token_id: int

    def __call__(self, examples: list[PromptExample]) -> PromptBatch:
        ids, mask = left_pad([e.input_ids for e in examples], self.pad_token_id)  # (B, P)
        return PromptBatch(ids, mask, [e.prompt for e in examples],
                           torch.tensor([e.index for e in examples], dtype=torch.long), [e.uid for e in examples],
                           [list(e.responses) for e in examples])


class PromptDataModule(TokenizedDataModule):
    """Single-turn prompts for online methods (PPO, RLOO, GRPO), as :class:`PromptBatch` es.

    Each prompt is rendered with ``template`` and, when ``chat_template`` is on, wrapped as a user turn in
    the tokenizer's chat template with the generation prompt. Loaders are rank-sharded and resumable (the
    base class's): rank ``r`` of ``n`` takes every ``n``-th example of the epoch's seeded permutation; each
    batch's ``index`` and ``uids`` are the same whatever the rank count. Sample ``k`` completions per prompt
    with ``batch.repeat(k)`` (copies contiguous, on the prompt's rank). The datasets' ``dropped`` counts the
    records left out (prompts over ``max_prompt_tokens``, and empty ones with ``drop_empty``).

    Examples::

        data:  # the built-in toy prompts for builtin:tiny-game-base, in the game's defender template
          class_path: lit_align.data.PromptDataModule
          init_args:
            train: {path: builtin:seed_prompts}
            val: {path: builtin:seed_prompts/val}
            template: "Human: {prompt}\\nAI:"
            batch_size: 8

        data:  # HH-RLHF harmless-base: the first human turn of `chosen`, in Qwen2.5-Instruct's chat template
          class_path: lit_align.data.PromptDataModule
          init_args:
            # assumed layout: columns `chosen` and `rejected` (transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."),
            # subset = the data directory, splits train (42.5k) and test (2.3k); no id column -> prompt hashes
            train: {path: Anthropic/hh-rlhf, subset: harmless-base, split: train}
            val: {path: Anthropic/hh-rlhf, subset: harmless-base, split: test, limit: 512}
            format: hh
            chat_template: true  # Qwen2.5's template adds its default system turn when there is none
            max_prompt_tokens: 256
            batch_size: 8

        data:  # TL;DR summarisation: a `prompt` column already in the Stiennon et al. layout
          class_path: lit_align.data.PromptDataModule
          init_args:
            # assumed columns: trl-lib/tldr `prompt` + `completion`, splits train / validation / test;
            # CarperAI/openai_summarize_tldr `prompt` + `label`, splits train / valid / test
            train: {path: trl-lib/tldr, split: train}
            val: {path: trl-lib/tldr, split: validation, limit: 512}
            format: prompt
            chat_template: false  # the SFT policy continues "...\\nTL;DR:" as plain text
            max_prompt_tokens: 512
            batch_size: 8

        data:  # OpenAI's raw TL;DR posts (tldr_3_filtered: `id`, `subreddit`, `title`, `post`, `summary`)
          class_path: lit_align.data.PromptDataModule
          init_args:
            train: {path: data/tldr_3_filtered/train.jsonl}  # uids are the posts' `id`s
            val: {path: data/tldr_3_filtered/valid.jsonl, limit: 512}
            format: tldr
            chat_template: false
            max_prompt_tokens: 512
    """

    #: the template's placeholder for the prompt text, and the template's config key
    placeholder: ClassVar[str] = "prompt"
    template_key: ClassVar[str] = "template"

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        format: Literal["auto", "prompt", "hh", "tldr", "gpo"] = "auto",
        template: str = "{prompt}",
        chat_template: bool | None = None,
        max_prompt_tokens: int = 256,
        drop_empty: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
        iterations: int | None = None,
    ) -> None:
        """
        Args:
            train: where the training prompts come from.
            val: held-out prompts; ``None`` splits ``val_fraction`` off ``train`` (seeded).
            test: prompts for ``lit-align test`` and ``predict``; ``None`` uses the validation prompts.
            val_fraction: share of ``train`` held out when ``val`` is not given; 0 disables validation.
            batch_size: prompts per step on each data-parallel rank.
            eval_batch_size: prompts per validation step (default ``batch_size``).
            format: ``prompt``, ``hh``, ``tldr``, ``gpo`` or ``auto`` (see the module doc); applies to every source.
            template: a ``str.format`` template with ``{prompt}`` around each prompt, e.g. ``"Human: {prompt}\\nAI:"``.
            chat_template: wrap the rendered prompt as a user turn in the tokenizer's chat template (with the
                generation prompt); ``None`` does so when the tokenizer has one and ``template`` is ``"{prompt}"``.
            max_prompt_tokens: longest rendered prompt kept, in tokens; longer ones are dropped and counted.
            drop_empty: drop and count empty prompts instead of refusing them.
            shuffle: shuffle training prompts each epoch (seeded by ``seed`` and the epoch).
            seed: seed of the validation split and the shuffling.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
            iterations: cut the training prompts into this many disjoint contiguous slices, one per iteration
                (epoch) of an iterative online method (online DPO, SELM: ``train_prefs[k F : (k + 1) F]`` with
                ``F = N // iterations``; the last ``N mod iterations`` prompts are left out): epoch ``k`` trains on
                slice ``k`` only (shuffled within it), so no prompt is reused across iterations. ``None``: every
                epoch sees every prompt.
        """
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                       or iterations < 1):
            raise ConfigError(f"data.iterations must be an int >= 1 or null, got {iterations!r}")
        if format not in FORMATS:
            raise ConfigError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
        self._check_template(template)
        if max_prompt_tokens <= 0:
            raise ConfigError(f"data.max_prompt_tokens must be positive, got {max_prompt_tokens}")
        super().__init__(train, val, test, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, max_length=max_prompt_tokens, chat_template=chat_template,
                         shuffle=shuffle, seed=seed, num_workers=num_workers, tokenizer=tokenizer)
        self.format, self.template, self.max_prompt_tokens = format, template, max_prompt_tokens
        self.drop_empty = drop_empty
        self.iterations = iterations
        self._empty: dict[str, int] = {}
        self._blank: list[int] = []  # the token ids of an empty prompt, rendered (set by setup)

    def _check_template(self, template: str) -> None:
        key, slot = f"data.{self.template_key}", "{" + self.placeholder + "}"
        if slot not in template:
            raise ConfigError(f"{key} must contain {slot!r} (where the prompt goes), got {template!r}")
        try:
            template.format(**{self.placeholder: "x"})
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"{key} is not a valid str.format template with only {slot} ({err!r}); double "
                              "literal braces as '{{' and '}}'") from err

    # -- records ---------------------------------------------------------------------------
    def _load(self, source: DataSource) -> list[Record]:
        records, dropped = load_prompts(source, self.format, drop_empty=self.drop_empty)
        self._empty[source.path] = dropped
        return records

    def render(self, prompt: str) -> str:
        """``template`` around one prompt (before any chat template)."""
        return self.template.format(**{self.placeholder: prompt})

    def use_chat_template(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether prompts go through ``tokenizer``'s chat template (``data.chat_template``, resolved)."""
        if self.chat_template is None:
            return bool(tokenizer.chat_template) and self.template == "{" + self.placeholder + "}"
        if self.chat_template and not tokenizer.chat_template:
            raise ConfigError("data.chat_template is true but the tokenizer has no chat template; set it to false "
                              f"(and put the prompt format in data.{self.template_key}, e.g. 'Human: {{prompt}}\\nAI:')")
        return self.chat_template

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        chat = self.use_chat_template(self.tokenizer)
        self._blank = encode_prompt(self.tokenizer, self.render(""), chat)
        train, val = self._split()
        self.train_dataset = self._tokenize(train, chat, "train")
        self.val_dataset = self._tokenize(val, chat, "val")
        test = self._load(self.test_source) if self.test_source else None
        self.test_dataset = self._tokenize(test, chat, "test") if test else self.val_dataset
        self._check_iterations()

    # -- iterations ------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Training stages (epochs with their own prompts) for the stage driver: ``iterations``, else 1."""
        return self.iterations or 1

    def _check_iterations(self) -> None:
        n = len(self.train_dataset)
        if self.iterations is not None and self.iterations > n:
            raise DataError(f"data.iterations = {self.iterations} needs at least {self.iterations} training prompts "
                            f"(disjoint slices, one per iteration) but data.train ({self.train_source.path!r}) gives "
                            f"{n} after the validation split and the length limit; lower data.iterations, or give "
                            "more prompts in data.train (or a smaller data.val_fraction)")
        if self.iterations is not None and n % self.iterations:
            rank_zero_warn(f"data.iterations = {self.iterations}: {n % self.iterations} of {n} training prompts do "
                           "not fill a slice and are left out", category=UserWarning)

    def iteration_range(self, k: int) -> range:
        """Dataset positions of iteration ``k``'s prompts (``k`` from 0)."""
        if self.iterations is None:
            return range(len(self.train_dataset))
        if not 0 <= k < self.iterations:
            raise ConfigError(f"iteration {k} does not exist: data.iterations = {self.iterations}; set "
                              f"trainer.max_epochs to {self.iterations} (one epoch per iteration)")
        size = len(self.train_dataset) // self.iterations
        return range(k * size, (k + 1) * size)

    def train_dataloader(self):
        if self.iterations is None:
            return super().train_dataloader()
        trainer = self.trainer
        if trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(f"data.iterations = {self.iterations} serves prompt slice k at epoch k, which needs the "
                              "training loader rebuilt every epoch: use a staged method (OnlineDPOModule sets "
                              "it), or set trainer.reload_dataloaders_every_n_epochs: 1")
        epoch = trainer.current_epoch if trainer is not None else 0
        span = self.iteration_range(epoch)
        self._train_loader = self._loader(PromptSlice(self.train_dataset, span.start, span.stop), self.batch_size,
                                          shuffle=self.shuffle, shard=True, train=True)
        return self._train_loader

    # -- tokenization ----------------------------------------------------------------------
    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase,
                chat: bool = False) -> PromptExample | None:
        """One prompt record -> one example, or ``None`` when the rendered prompt is too long."""
        ids = encode_prompt(tokenizer, self.render(record["prompt"]), chat)
        if ids == self._blank:
            where = describe_record(record["_source"], record["_source_index"])
            raise _empty_error(where, f"the prompt {record['prompt']!r:.60} is empty once rendered by "
                                      f"data.{self.template_key}" + (" and the chat template" if chat else ""))
        if len(ids) > self.max_prompt_tokens:
            return None
        return PromptExample(list(ids), record["prompt"], index, record["_source_index"], record["uid"],
                             tuple(record.get("responses") or ()))

    def _tokenize(self, records: list[Record] | None, chat: bool = False,
                  split: str = "train") -> PromptDataset | None:
        if not records:
            return None
        _check_uids(records)
        encoded = [self._encode(r, i, self.tokenizer, chat) for i, r in enumerate(records)]
        kept = [ex for ex in encoded if ex is not None]
        too_long = len(encoded) - len(kept)
        if not kept:
            raise DataError(f"all {len(records)} {split} prompts render to more than data.max_prompt_tokens = "
                             f"{self.max_prompt_tokens} tokens; raise it")
        if too_long:
            rank_zero_warn(f"{split}: dropped {too_long} of {len(records)} prompts whose rendered prompt is longer "
                           f"than data.max_prompt_tokens = {self.max_prompt_tokens} tokens", category=UserWarning)
        empty = sum(self._empty.get(s, 0) for s in {r["_source"] for r in records})
        return PromptDataset(kept, too_long + empty, self.max_prompt_tokens)

    def _collator(self, pad_token_id: int) -> PromptCollator:
        return PromptCollator(pad_token_id)


class SeedPromptDataModule(PromptDataModule):
    """Seed questions for the attacker of the two-player game (GPO): a :class:`PromptDataModule` whose
    template is the attacker's (``{seed}``), with no chat template, and whose empty questions are dropped
    and counted. The batches' ``attacker_ids``, ``attacker_mask`` and ``seeds`` are read-only names for
    ``input_ids``, ``attention_mask`` and ``prompts``.

    Examples::

        data:  # the built-in toy seeds, with a built-in held-out set
          class_path: lit_align.data.prompts.SeedPromptDataModule
          init_args:
            train: {path: builtin:seed_prompts}
            val: {path: builtin:seed_prompts/val}
            batch_size: 8

        data:  # GPO's files (JSON lists of one-string lists)
          class_path: lit_align.data.prompts.SeedPromptDataModule
          init_args:
            train: {path: data/gpo_train.json}
            val: {path: data/gpo_validation.json}
            format: gpo
            max_prompt_tokens: 256

        data:  # Anthropic red-team prompts: the first human turn of hh-rlhf harmless-base
          class_path: lit_align.data.prompts.SeedPromptDataModule
          init_args:
            train: {path: Anthropic/hh-rlhf, subset: harmless-base, split: train}
            val: {path: PKU-Alignment/PKU-SafeRLHF, split: test, limit: 500}  # OOD, `prompt` field
            format: auto
    """

    placeholder: ClassVar[str] = "seed"
    template_key: ClassVar[str] = "attacker_template"

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        format: Literal["auto", "prompt", "gpo", "hh", "tldr"] = "auto",
        attacker_template: str = ATTACKER_TEMPLATE,
        max_prompt_tokens: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            train: where the training seed questions come from.
            val: held-out seeds; ``None`` splits ``val_fraction`` off ``train`` (seeded).
            test: seeds for ``lit-align test`` and ``predict``; ``None`` uses the validation seeds.
            val_fraction: share of ``train`` held out when ``val`` is not given; 0 disables validation.
            batch_size: seeds per step on each data-parallel rank.
            eval_batch_size: seeds per validation step (default ``batch_size``).
            format: ``prompt``, ``gpo``, ``hh``, ``tldr`` or ``auto`` (see the module doc); applies to every source.
            attacker_template: the attacker's prompt, a ``str.format`` template with ``{seed}``.
            max_prompt_tokens: longest rendered attacker prompt kept, in tokens; longer ones are dropped
                and counted.
            shuffle: shuffle training seeds each epoch (seeded by ``seed`` and the epoch).
            seed: seed of the validation split and the shuffling.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
        """
        super().__init__(train, val, test, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, format=format, template=attacker_template,
                         chat_template=False, max_prompt_tokens=max_prompt_tokens, drop_empty=True,
                         shuffle=shuffle, seed=seed, num_workers=num_workers, tokenizer=tokenizer)

    @property
    def attacker_template(self) -> str:
        """The attacker's prompt template (``data.attacker_template``)."""
        return self.template
