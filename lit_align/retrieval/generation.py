"""Cached text generation: plain-text prompts in, decoded continuations out, nothing generated twice.

:class:`GenerationCache` maps a sha256 key of (model fingerprint, tokenizer fingerprint, prompt, sampling
settings, seed) to the generated text, in memory or in a JSONL file that a rerun or a resumed run reads back (FEWL's
IW/CO and reference answers, ISARA's generated questions and answers). Each file record also keeps the prompt, the
seed, the sampling settings and the model and tokenizer fingerprints, so every generation can be audited with what
produced it (§5(h)1: results are sensitive to the IW/CO prompt). :func:`generate_texts` runs :func:`lit_align.rollout.sampler.sample` on the prompts that are not
cached yet, one ``torch.Generator`` per row from that row's seed, so a row's text depends on its prompt and
seed, not on which other prompts shared its batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lit_align.data.stop_strings import cut_at_stop  # re-exported: one definition, also used by data post-processing
from lit_align.engine.seeds import generator
from lit_align.errors import ConfigError, DataError, check_int
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = ["GenerationCache", "GenerationReport", "StopView", "cut_at_stop", "fingerprint_tokenizer", "generate_texts"]


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 hex of what decides a tokenizer's input ids: its class, its whole backend definition (a fast
    tokenizer's ``backend_tokenizer.to_str()``: vocabulary, normaliser, pre-tokenizer, post-processor) or else its
    vocabulary, its special-token ids and its BOS/EOS flags."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else None,
        "vocab": None if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {name: getattr(tokenizer, name, None)
                    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")},
        "flags": {name: getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class GenerationCache:
    """Generated texts by key (:meth:`key`): in memory (``path=None``) or backed by a JSONL file.

    With a path, existing lines (``{"key": ..., "text": ..., ...}``; only ``key`` and ``text`` are read back) are read
    on construction and every :meth:`put` appends its new entries, then flushes and fsyncs, so a killed run loses at
    most the batch it was writing. A torn last line (a kill mid-write) is skipped with a warning and cut from the
    file, so the next append starts on a fresh line; a broken line elsewhere is a ``DataError`` naming the file and
    line.

    One writer per file: two processes appending to one path interleave their lines (a later load then fails).
    Under DDP let one rank (rank 0) generate and write, or give each rank its own path."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self._entries: dict[str, str] = {}
        self._finish: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self._entries, self._finish = _read_jsonl(self.path)

    @staticmethod
    def key(model_fingerprint: str, prompt: str, sampling: SamplingConfig, seed: int | None, *,
            tokenizer: str, stop: Sequence[str] = (), view: str | None = None) -> str:
        """sha256 hex of the model fingerprint, the tokenizer fingerprint (:func:`fingerprint_tokenizer`), the
        prompt, every sampling setting, the seed and the stop strings generation stopped at (left out when there
        are none, so those keys are unchanged) and the :class:`StopView` name (when one was used)."""
        payload = {"model": model_fingerprint, "tokenizer": tokenizer, "prompt": prompt,
                   "sampling": dataclasses.asdict(sampling), "seed": seed}
        if stop:
            payload["stop"] = list((stop,) if isinstance(stop, str) else stop)
        if view:
            payload["stop_view"] = view
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        """The cached text for ``key``, or None."""
        return self._entries.get(key)

    def finish(self, key: str) -> str | None:
        """Why the cached text for ``key`` ended (``"eos"``, ``"stop"``, ``"length"``; see
        :class:`GenerationReport`), or None when it was not recorded (an entry written before it was)."""
        return self._finish.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entries: Mapping[str, str], records: Mapping[str, Mapping] | None = None) -> None:
        """Store ``entries`` (key -> text); with a path, append the new or changed ones to the file, each line with
        the fields of ``records[key]`` (what produced it: prompt, seed, sampling, model, tokenizer) when given."""
        new = {k: v for k, v in entries.items() if self._entries.get(k) != v}
        for k, v in new.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"GenerationCache.put: keys and texts must be strings, got {k!r}: {type(v).__name__}")
        self._entries.update(new)
        self._finish.update({k: r["finish"] for k, r in (records or {}).items() if k in entries and r.get("finish")})
        if self.path is not None and new:
            _append_jsonl(self.path, [{**(records or {}).get(k, {}), "key": k, "text": v} for k, v in new.items()])

    def state_dict(self) -> dict:
        """``{"entries": {key: text}}`` plus ``"finish": {key: finish reason}`` where any is recorded (for a
        Lightning checkpoint)."""
        return {"entries": dict(self._entries), **({"finish": dict(self._finish)} if self._finish else {})}

    def load_state_dict(self, state: dict) -> None:
        """Add a :meth:`state_dict`'s entries (a checkpoint's generations win over the file's on a clash)."""
        if not isinstance(state, dict) or not isinstance(state.get("entries"), dict):
            raise DataError("GenerationCache.load_state_dict: expected {'entries': {key: text}} from state_dict()")
        finish = state.get("finish") or {}
        self.put(state["entries"], {k: {"finish": f} for k, f in finish.items()})


def _read_jsonl(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The file's ``key -> text`` entries and ``key -> finish reason`` (where recorded). A torn last line is cut from the file (warned), so that the next append
    does not glue its first record onto the fragment."""
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    entries: dict[str, str] = {}
    finish: dict[str, str] = {}
    offset = 0
    for number, line in enumerate(lines, start=1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            entries[record["key"]] = record["text"]
            if isinstance(record.get("finish"), str):
                finish[record["key"]] = record["finish"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            if number == len(lines):
                warnings.warn(f"generation cache {path}: cut a torn last line ({err})", stacklevel=3)
                os.truncate(path, start)
                continue
            raise DataError(f"generation cache {path}, line {number}: not a {{'key', 'text'}} JSON record ({err}); "
                            "delete the file (or the line) to regenerate") from err
    return entries, finish


def _append_jsonl(path: Path, records: Sequence[Mapping]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with path.open("a+b") as f:
        if f.tell() > 0:  # a last record written without its newline (a kill between the two) gets one first
            f.seek(f.tell() - 1)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise DataError(f"generate_texts: prompt {empty[0]} tokenizes to no tokens; give a non-empty prompt")
    return ids


@dataclass
class GenerationReport:
    """What one :func:`generate_texts` call did, per prompt (filled by the call; pass a fresh one)."""

    keys: list[str] = dataclasses.field(default_factory=list)
    """Each prompt's cache key (:meth:`GenerationCache.key`; its row number as a string without a cache)."""
    cached: list[bool] = dataclasses.field(default_factory=list)
    """Whether each prompt's text came from the cache (present before the call)."""
    generated: int = 0
    """How many texts were generated (a repeated key once)."""
    finish: list[str | None] = dataclasses.field(default_factory=list)
    """Why each prompt's text ended, from the sampler: ``"eos"`` (end of sequence), ``"stop"`` (a stop string,
    with ``stop_generation``), ``"length"`` (``max_new_tokens`` ran out); stored with the cached text, None for a
    cache entry written before it was recorded."""


@dataclass(frozen=True)
class StopView:
    """Which part of a partial generation the stop strings are looked for in, when that is not simply the text
    less its leading whitespace (e.g. a summary after an echoed prompt and a ``Summary:`` label)."""

    name: str
    """Names the rule in the cache key (a text generated under another rule may end elsewhere); change it when the
    rule changes."""
    content: Callable[[int, str], str | None]
    """``content(i, text)``: the part of prompt ``i``'s decoded text so far to look for stop strings in, or None
    while no stop string may end the row yet."""


def _stop_test(tokenizer, stop: tuple[str, ...], view: Callable[[int, str], str | None] | None = None,
               stopped: set[int] | None = None):
    """The sampler's ``stop_when`` for stop strings: a row stops once its decoded text, less leading whitespace,
    contains one of ``stop`` (a stop string in the leading whitespace does not stop it: post-processing strips
    that whitespace first, and :func:`cut_at_stop` of the text is the same either way). With ``view`` (row in
    the batch, text) -> the part to look in (None: not yet), that part instead, on the whole text. The rows it
    stops are added to ``stopped``.

    Without ``view`` only a tail window is decoded at each step (a stop string completed by the newest token lies
    inside it; the test runs every step), so the cost per step does not grow with the response: the window is 4
    tokens per character of the longest stop string (a byte-level token can carry a quarter of a character) plus
    4. The text from the start is decoded only until the window lies past the row's first non-whitespace token
    (a per-row "started" step), which keeps the leading-whitespace rule exact."""
    window = 4 * max((len(s) for s in stop), default=0) + 4
    started: dict[int, int] = {}  # row -> the response length at which its text first had non-whitespace

    def stop_when(response_ids, rows: list[int]) -> list[int]:
        n = response_ids.shape[1]
        ids = response_ids[rows].tolist()
        if view is not None:
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            parts = [view(i, t) for i, t in zip(rows, texts)]
        else:
            whole = [j for j, i in enumerate(rows) if i not in started or n - window < started[i]]
            texts = tokenizer.batch_decode([ids[j] for j in whole], skip_special_tokens=True) if whole else []
            parts = [""] * len(rows)
            for j, text in zip(whole, texts):
                parts[j] = text.lstrip()
                if parts[j]:
                    started.setdefault(rows[j], n)
            decoded = set(whole)
            tails = [j for j in range(len(rows)) if j not in decoded]
            if tails:
                for j, text in zip(tails, tokenizer.batch_decode([ids[j][n - window:] for j in tails],
                                                                 skip_special_tokens=True)):
                    parts[j] = text
        hit = [i for i, part in zip(rows, parts) if part is not None and any(s in part for s in stop)]
        if stopped is not None:
            stopped.update(hit)
        return hit

    return stop_when if stop else None


def _generate_batch(model: nn.Module, tokenizer, prompts: Sequence[str], sampling: SamplingConfig,
                    seeds: Sequence[int] | None, stop: tuple[str, ...] = (),
                    view: Callable[[int, str], str | None] | None = None) -> list[tuple[str, str]]:
    """Decoded continuations of one batch of prompts (special tokens skipped), each with why it ended (``"eos"``,
    ``"stop"``: a stop string, ``"length"``: ``max_new_tokens``); a row stops at a stop string."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(_token_ids(tokenizer, prompts), pad_id)  # (B, P)
    gens = [generator(s, 0, "generate_texts", device=device) for s in seeds] if seeds is not None else None
    stopped: set[int] = set()
    rollout = sample(model, ids.to(device), mask.to(device), sampling, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=pad_id, generator=gens, stop_when=_stop_test(tokenizer, stop, view, stopped))
    lengths = rollout.response_lengths.tolist()
    rows = rollout.response_ids.cpu().tolist()
    eos = tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    reasons = ["stop" if i in stopped else "eos" if n and row[n - 1] in eos_ids else "length"
               for i, (row, n) in enumerate(zip(rows, lengths))]
    return [(tokenizer.decode(row[:n], skip_special_tokens=True), why) for row, n, why in zip(rows, lengths, reasons)]


def _check_generate_args(tokenizer, prompts: Sequence[str], seeds: Sequence[int] | None, batch_size: int,
                         sampling: SamplingConfig, cached: bool) -> None:
    if isinstance(prompts, str):
        raise TypeError("generate_texts: prompts must be a sequence of strings, got one string; wrap it in a list")
    if seeds is not None and len(seeds) != len(prompts):
        raise ConfigError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt or None")
    bad = [s for s in seeds or () if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ConfigError(f"seeds must be ints >= 0, got {bad[0]!r}")
    check_int("batch_size", batch_size, 1)
    if seeds is None and sampling.do_sample and cached:
        raise ConfigError("seeds: sampled generation (do_sample) with a cache needs one seed per prompt; with "
                          "seeds=None every call and rerun would return the first cached text of a prompt, so "
                          "several samples of one prompt would silently be one text")
    if tokenizer.eos_token_id is None:
        raise ConfigError("generate_texts: the tokenizer has no eos_token; generation needs one to stop rows")


def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[str], sampling: SamplingConfig, *,
                   seeds: Sequence[int] | None, cache: GenerationCache | None = None,
                   model_fingerprint: str | None = None, tokenizer_fingerprint: str | None = None,
                   stop: Sequence[str] = (), stop_generation: bool = False, cut: bool = True,
                   stop_view: StopView | None = None, batch_size: int = 16,
                   report: GenerationReport | None = None) -> list[str]:
    """Decoded continuations of plain-text prompts, one string per prompt, in order.

    Each prompt is tokenized as is (the tokenizer's own special tokens, no chat template), left-padded and
    sampled with :func:`lit_align.rollout.sampler.sample`; row ``i`` draws from its own generator seeded from
    ``seeds[i]`` (through :func:`lit_align.engine.seeds.generator`), so its text does not depend on the batch.
    ``seeds=None`` samples from the global RNG (not reproducible; refused with a cache when sampling, as the cache
    would hand every repeat of a prompt its first text). The text is decoded without special tokens and cut before
    the first of ``stop`` (``cut=False``: returned as generated, for callers that post-process it themselves).
    With ``stop_generation`` a row also stops generating once it has written one of ``stop`` (after any leading
    whitespace; the cut text is the same, the tokens after it are never generated), and its cache key includes
    ``stop``; without it the cache keeps the text generated up to EOS or ``max_new_tokens``, so ``stop`` may change
    between calls. ``stop_view`` (with ``stop_generation``) looks for ``stop`` only in the part of the text it
    names (e.g. after an echo and a ``Summary:`` label); its name enters the cache key. ``report`` (a fresh
    :class:`GenerationReport`) gets each prompt's key, whether it came from the cache and why its text ended.

    With a ``cache``, prompts whose key (:meth:`GenerationCache.key`) is present are not regenerated, identical
    (prompt, seed) pairs are generated once, and new texts are stored after each batch with their prompt, seed,
    sampling settings and fingerprints. The model fingerprint defaults to
    :func:`lit_align.models.reference.model_fingerprint` of ``model``, which hashes every weight on every call (a
    full pass over ~14 GB for a 7B model): pass ``model_fingerprint`` (and ``tokenizer_fingerprint``, default
    :func:`fingerprint_tokenizer`) when calling repeatedly with one model."""
    _check_generate_args(tokenizer, prompts, seeds, batch_size, sampling, cache is not None)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    prompts = list(prompts)
    row_seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    records: dict[str, dict] = {}
    if cache is None:
        keys = [str(i) for i in range(len(prompts))]
        store: dict[str, str] = {}
    else:
        if model_fingerprint is None:
            from lit_align.models.reference import model_fingerprint as fingerprint_of

            model_fingerprint = fingerprint_of(model)
        if tokenizer_fingerprint is None:
            tokenizer_fingerprint = fingerprint_tokenizer(tokenizer)
        keys = [GenerationCache.key(model_fingerprint, p, sampling, s, tokenizer=tokenizer_fingerprint,
                                    stop=stop if stop_generation else (),
                                    view=stop_view.name if stop_view is not None and stop_generation else None)
                for p, s in zip(prompts, row_seeds)]
        store = {k: cache.get(k) for k in keys if k in cache}
        settings = dataclasses.asdict(sampling)
        records = {k: {"prompt": p, "seed": s, "sampling": settings, "model": model_fingerprint,
                       "tokenizer": tokenizer_fingerprint, **({"stop": list(stop)} if stop and stop_generation else {})}
                   for k, p, s in zip(keys, prompts, row_seeds)}
    first: dict[str, int] = {}  # missing key -> its first row (a repeated key is generated once)
    for i, k in enumerate(keys):
        if k not in store:
            first.setdefault(k, i)
    todo = list(first.values())
    finish: dict[str, str] = {}  # key -> why its fresh text ended
    if report is not None:
        report.keys, report.cached, report.generated = list(keys), [k in store for k in keys], len(todo)
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        view = None if stop_view is None else (lambda j, text, rows=rows: stop_view.content(rows[j], text))
        texts = _generate_batch(model, tokenizer, [prompts[i] for i in rows], sampling,
                                None if seeds is None else [row_seeds[i] for i in rows],
                                stop if stop_generation else (), view)
        fresh = {keys[i]: t for i, (t, _) in zip(rows, texts)}
        finish.update({keys[i]: why for i, (_, why) in zip(rows, texts)})
        store.update(fresh)
        if cache is not None:
            cache.put(fresh, {k: {**records[k], "finish": finish[k]} for k in fresh})
    if report is not None:
        report.finish = [finish.get(k) or (cache.finish(k) if cache is not None else None) for k in keys]
    return [cut_at_stop(store[k], stop) if cut else store[k] for k in keys]
