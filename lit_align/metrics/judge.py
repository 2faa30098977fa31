"""LLM-as-a-judge for summaries (others.md §10(b), §10(d).6): a rubric, a strict reply parser, judge backends.

The judge scores each (article, summary) pair on the :class:`Rubric`'s criteria, 1 to 5 each, and must reply with
one JSON object. :func:`parse_judge_reply` enforces this schema (written for ``criteria`` = the defaults)::

    {
      "type": "object",
      "properties": {
        "relevance":   {"type": "integer", "minimum": 1, "maximum": 5},
        "coherence":   {"type": "integer", "minimum": 1, "maximum": 5},
        "consistency": {"type": "integer", "minimum": 1, "maximum": 5},
        "fluency":     {"type": "integer", "minimum": 1, "maximum": 5}
      },
      "required": ["relevance", "coherence", "consistency", "fluency"],
      "additionalProperties": true
    }

Extra keys (e.g. an ``"explanation"``) are ignored by default (``Rubric.extra_keys="ignore"``); with
``"reject"`` a reply that has any is a parse failure. A score must be a JSON integer (``4``, or ``4.0``);
``"4"``, ``4.5``, ``true`` and values outside 1-5 fail. The object may stand alone, inside a ```` ```json ````
fence, or anywhere in surrounding prose: the first JSON object in the reply that satisfies the schema is taken.

:class:`RubricJudge` sends every prompt, re-sends those whose reply did not parse (at most ``retries`` more
times, with :attr:`Rubric.retry_note` appended) and counts the failures; a pair that never parses gets ``None``
and is counted, never raised. :class:`PairwiseJudge` compares two systems per article, shown in a seeded random
order. Backends (:class:`JudgeBackend`) turn prompts into replies: :class:`HFJudge` (a local HF causal LM, greedy)
and :class:`OpenAICompatibleJudge` (a ``/chat/completions`` endpoint, optional).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import random
import re
import time
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from lit_align.errors import ConfigError
from lit_align.models.spec import ModelSpec

__all__ = [
    "DEFAULT_CRITERIA",
    "HFJudge",
    "JudgeBackend",
    "JudgeScores",
    "OpenAICompatibleJudge",
    "PairwiseJudge",
    "PairwiseScores",
    "Rubric",
    "RubricJudge",
    "parse_judge_reply",
    "parse_pairwise_reply",
]

DEFAULT_CRITERIA = ("relevance", "coherence", "consistency", "fluency")
"""The usual summarisation criteria (others.md §10(b))."""

_DESCRIPTIONS = {
    "relevance": "the summary keeps the article's most important information and leaves out what is minor",
    "coherence": "the summary is well organised: its sentences follow on from each other and form a whole",
    "consistency": "every statement in the summary is supported by the article (no invented or wrong facts)",
    "fluency": "each sentence is grammatical, readable and free of repetition or formatting noise",
}

_TEMPLATE = """You are grading a summary of a news article.

Article:
{article}

Summary:
{summary}

Rate the summary on each criterion with an integer from {low} (worst) to {high} (best):
{criteria_block}

Reply with a single JSON object and nothing else, for example:
{example}"""


@dataclass
class Rubric:
    """The judge's rubric: criteria, score range, prompt template and parsing policy."""

    criteria: list[str] = field(default_factory=lambda: list(DEFAULT_CRITERIA))
    """Criterion names; each becomes a required integer key of the reply."""
    descriptions: dict[str, str] = field(default_factory=lambda: dict(_DESCRIPTIONS))
    """One line per criterion shown to the judge; a criterion without one is shown by name only."""
    template: str = _TEMPLATE
    """Prompt with the fields ``{article}``, ``{summary}``, ``{criteria_block}``, ``{example}``, ``{low}``,
    ``{high}``."""
    low: int = 1
    """Lowest allowed score."""
    high: int = 5
    """Highest allowed score."""
    extra_keys: Literal["ignore", "reject"] = "ignore"
    """Keys of the reply besides the criteria: ignored, or the reply counts as a parse failure."""
    retry_note: str = "\n\nYour previous reply could not be read. Reply with only the JSON object."
    """Appended to the prompt when a pair is asked again after a reply that did not parse."""

    def __post_init__(self) -> None:
        if not self.criteria or len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"judge.rubric.criteria must be non-empty and distinct, got {self.criteria!r}")
        if self.low > self.high:
            raise ValueError(f"judge.rubric: low ({self.low}) must not exceed high ({self.high})")
        if self.extra_keys not in ("ignore", "reject"):
            raise ValueError(f"judge.rubric.extra_keys must be 'ignore' or 'reject', got {self.extra_keys!r}")
        missing = {"{article}", "{summary}"} - {f"{{{name}}}" for name in re.findall(r"{(\w+)}", self.template)}
        if missing:
            raise ValueError(f"judge.rubric.template lacks {sorted(missing)}; the judge must see both texts")
        try:  # formatted once now, so a stray brace or an unknown field fails at start-up, not mid-evaluation
            self.prompt("", "")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"judge.rubric.template does not format ({type(err).__name__}: {err}); its fields are "
                             "{article}, {summary}, {criteria_block}, {example}, {low} and {high}; write a literal "
                             "brace as {{ or }}") from err

    def prompt(self, article: str, summary: str) -> str:
        """The judge prompt for one (article, summary) pair."""
        block = "\n".join(f"- {c}: {self.descriptions[c]}" if c in self.descriptions else f"- {c}"
                          for c in self.criteria)
        example = json.dumps({c: self.high for c in self.criteria})
        return self.template.format(article=article, summary=summary, criteria_block=block, example=example,
                                    low=self.low, high=self.high)

    def json_schema(self) -> dict:
        """The JSON schema a reply must satisfy (see the module docstring)."""
        return {"type": "object",
                "properties": {c: {"type": "integer", "minimum": self.low, "maximum": self.high}
                               for c in self.criteria},
                "required": list(self.criteria), "additionalProperties": self.extra_keys == "ignore"}


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _valid(obj, criteria: Sequence[str], low: int, high: int, extra_keys: str) -> dict[str, int] | None:
    if not isinstance(obj, dict) or any(c not in obj for c in criteria):
        return None
    if extra_keys == "reject" and set(obj) - set(criteria):
        return None
    out = {}
    for c in criteria:
        v = obj[c]
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v)
                or not low <= v <= high):  # json reads NaN, Infinity and 1e999 as floats
            return None
        out[c] = int(v)
    return out


def _json_objects(text: str):
    """Every JSON object in ``text``: first inside ```` ``` ```` fences, then starting at each ``{``."""
    if not isinstance(text, str):
        return
    decoder = json.JSONDecoder()
    for source in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        for start in (i for i, ch in enumerate(source) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(source, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


def parse_judge_reply(text: str, criteria: Sequence[str] = DEFAULT_CRITERIA, *, low: int = 1, high: int = 5,
                      extra_keys: Literal["ignore", "reject"] = "ignore") -> dict[str, int] | None:
    """Scores ``{criterion: int}`` from a judge reply, or ``None`` if it holds no object that fits the schema.

    Candidates are tried in order: the contents of each ```` ``` ```` / ```` ```json ```` fence, then every JSON
    object starting at a ``{`` of the reply (``json.JSONDecoder.raw_decode``); the first one with every
    criterion an integer in ``[low, high]`` (and, with ``extra_keys="reject"``, no other key) is returned.
    """
    for obj in _json_objects(text):
        scores = _valid(obj, criteria, low, high, extra_keys)
        if scores is not None:
            return scores
    return None


@runtime_checkable
class JudgeBackend(Protocol):
    """Turns prompts into replies, one string per prompt, in order."""

    model_id: str
    """The judge model's name and version, recorded with the scores."""

    def complete(self, prompts: list[str]) -> list[str]: ...


@dataclass
class JudgeScores:
    """Judge results for a list of (article, summary) pairs, in input order."""

    scores: list[dict[str, int] | None]
    """Per pair: the parsed scores, or ``None`` when no reply parsed."""
    attempts: list[int]
    """Per pair: how many prompts were sent (1 + retries used)."""
    failures: int
    """Pairs with no parsed reply after all attempts."""
    model_id: str
    """``backend.model_id`` of the judge."""
    parse_failures: int = 0
    """Replies that did not parse, over all attempts (a pair that parsed on its second try counts 1 here)."""
    replies: list[str] = field(default_factory=list)
    """Per pair: the last raw reply (for auditing failures)."""
    criteria: list[str] = field(default_factory=list)
    """The rubric's criteria (the keys of each parsed score)."""

    def mean(self) -> dict[str, float]:
        """Mean score per criterion over the pairs that parsed (NaN for every criterion when none did)."""
        parsed = [s for s in self.scores if s is not None]
        return {k: sum(s[k] for s in parsed) / len(parsed) if parsed else float("nan") for k in self.criteria}


class RubricJudge:
    """Score summaries with a judge backend and a :class:`Rubric`, retrying replies that do not parse.

    Example::

        judge = RubricJudge(HFJudge("Qwen/Qwen2.5-7B-Instruct", chat_template=True), Rubric(), retries=2)
        result = judge.score(articles, summaries)   # JudgeScores; result.failures counts unparsed pairs
    """

    def __init__(self, backend: JudgeBackend, rubric: Rubric | None = None, retries: int = 2) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"judge.retries must be an int >= 0, got {retries!r}")
        self.backend, self.rubric, self.retries = backend, rubric or Rubric(), retries

    def _parse(self, reply: str) -> dict[str, int] | None:
        r = self.rubric
        return parse_judge_reply(reply, r.criteria, low=r.low, high=r.high, extra_keys=r.extra_keys)

    def score(self, articles: Sequence[str], summaries: Sequence[str]) -> JudgeScores:
        """Judge each ``(articles[i], summaries[i])``; never raises for a reply that does not parse."""
        if len(articles) != len(summaries):
            raise ValueError(f"judge: {len(articles)} articles but {len(summaries)} summaries; give one per article")
        prompts = [self.rubric.prompt(a, s) for a, s in zip(articles, summaries)]
        asked = _ask(self.backend, prompts, self._parse, self.retries, self.rubric.retry_note)
        return JudgeScores(scores=asked.parsed, attempts=asked.attempts, failures=asked.failures,
                           model_id=self.backend.model_id, parse_failures=asked.parse_failures,
                           replies=asked.replies, criteria=list(self.rubric.criteria))


@dataclass
class _Asked:
    parsed: list
    attempts: list[int]
    replies: list[str]
    parse_failures: int
    failures: int


def _ask(backend: JudgeBackend, prompts: list[str], parse, retries: int, retry_note: str) -> _Asked:
    """Send ``prompts``; re-send those whose reply ``parse`` maps to ``None``, at most ``retries`` more times
    with ``retry_note`` appended."""
    n = len(prompts)
    parsed, attempts, replies, parse_failures = [None] * n, [0] * n, [""] * n, 0
    pending = list(range(n))
    for attempt in range(retries + 1):
        if not pending:
            break
        suffix = retry_note if attempt else ""
        out = backend.complete([prompts[i] + suffix for i in pending])
        if len(out) != len(pending):
            raise RuntimeError(f"judge backend {backend.model_id!r} returned {len(out)} replies for "
                               f"{len(pending)} prompts")
        still = []
        for i, reply in zip(pending, out):
            attempts[i] += 1
            replies[i] = reply
            parsed[i] = parse(reply)
            if parsed[i] is None:
                parse_failures += 1
                still.append(i)
        pending = still
    return _Asked(parsed, attempts, replies, parse_failures, len(pending))


# -- pairwise ----------------------------------------------------------------------------------
_PAIRWISE_TEMPLATE = """You are comparing two summaries of the same news article.

Article:
{article}

Summary A:
{summary_a}

Summary B:
{summary_b}

Which summary is better overall (relevant, coherent, consistent with the article, fluent)?
Reply with a single JSON object and nothing else: {{"winner": "A"}}, {{"winner": "B"}} or {{"winner": "tie"}}."""


def parse_pairwise_reply(text: str) -> Literal["A", "B", "tie"] | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the first JSON object with a ``"winner"`` key holding one of them
    (case-insensitive; fences and surrounding text as in :func:`parse_judge_reply`), else ``None``."""
    for obj in _json_objects(text):
        winner = obj.get("winner")
        if isinstance(winner, str) and winner.strip().lower() in ("a", "b", "tie"):
            return "tie" if winner.strip().lower() == "tie" else winner.strip().upper()
    return None


@dataclass
class PairwiseScores:
    """Pairwise judge results, in input order, already mapped back from the shown order."""

    winners: list[Literal["first", "second", "tie"] | None]
    """Per article: which of the two systems won (``None`` when no reply parsed)."""
    swapped: list[bool]
    """Per article: whether the second system was shown as summary A."""
    attempts: list[int]
    """Per article: prompts sent."""
    failures: int
    """Articles with no parsed reply."""
    model_id: str
    """``backend.model_id`` of the judge."""
    parse_failures: int = 0
    """Replies that did not parse, over all attempts."""

    def win_rate(self) -> float:
        """Wins of the first system over the parsed comparisons, a tie counting one half (NaN if none parsed)."""
        done = [w for w in self.winners if w is not None]
        return (sum(w == "first" for w in done) + 0.5 * sum(w == "tie" for w in done)) / len(done) if done \
            else float("nan")


class PairwiseJudge:
    """Compare two systems' summaries of each article; which one is shown first is drawn per article from
    ``random.Random(seed)``, so a judge's preference for a position does not favour either system.

    ``template`` has the fields ``{article}``, ``{summary_a}``, ``{summary_b}``; the reply is read by
    :func:`parse_pairwise_reply`, with the same retries and failure counts as :class:`RubricJudge`.
    """

    def __init__(self, backend: JudgeBackend, *, template: str = _PAIRWISE_TEMPLATE, retries: int = 2,
                 seed: int = 0, retry_note: str = Rubric.retry_note) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"judge.retries must be an int >= 0, got {retries!r}")
        self.backend, self.template, self.retries, self.seed = backend, template, retries, seed
        self.retry_note = retry_note

    def compare(self, articles: Sequence[str], first: Sequence[str], second: Sequence[str]) -> PairwiseScores:
        """Judge ``first[i]`` against ``second[i]`` as summaries of ``articles[i]``."""
        if not len(articles) == len(first) == len(second):
            raise ValueError(f"pairwise judge: {len(articles)} articles, {len(first)} and {len(second)} summaries; "
                             "give one summary per article from each system")
        rng = random.Random(self.seed)
        swapped = [rng.random() < 0.5 for _ in articles]
        prompts = [self.template.format(article=a, summary_a=s if swap else f, summary_b=f if swap else s)
                   for a, f, s, swap in zip(articles, first, second, swapped)]
        asked = _ask(self.backend, prompts, parse_pairwise_reply, self.retries, self.retry_note)
        shown = {"A": ("first", "second"), "B": ("second", "first")}
        winners = [None if w is None else "tie" if w == "tie" else shown[w][int(swap)]
                   for w, swap in zip(asked.parsed, swapped)]
        return PairwiseScores(winners=winners, swapped=swapped, attempts=asked.attempts, failures=asked.failures,
                              model_id=self.backend.model_id, parse_failures=asked.parse_failures)


class HFJudge:
    """A local HF causal LM as judge (greedy decoding), loaded and rendered by
    :func:`lit_align.retrieval.loaded.loaded_model` like the evaluated models (the same chat rendering, doubled-BOS
    strip, fingerprints and generation path).

    Args:
        model: a :class:`~lit_align.models.spec.ModelSpec` (in YAML a mapping: ``{name_or_path: ..., dtype:
            bfloat16, revision: ...}``), or a hub id / local directory / ``builtin:`` name.
        max_new_tokens: reply length limit (a JSON object of four scores needs ~40 tokens).
        chat_template: wrap each prompt as one user message with the tokenizer's chat template (instruct
            judges); otherwise the prompt is sent as raw text.
        batch_size: prompts per generation batch.
        device: where the judge runs (default: the evaluation module's device when it sets one, else CUDA when
            available, else CPU).
        cache_path: a JSONL :class:`~lit_align.retrieval.GenerationCache` of replies (keyed by the judge's weight
            fingerprint, prompt and settings), so a rerun does not judge again; ``None``: no cache.

    ``model_id`` is the spec's source, then ``@`` and the pinned ``revision`` or, once loaded, the hub commit the
    weights were read from, and the judge's weight fingerprint (so the report names the judge's version).
    The model is built on first use and kept until :meth:`close`.
    """

    def __init__(self, model: ModelSpec | str, *, max_new_tokens: int = 64, chat_template: bool = False,
                 batch_size: int = 8, device: str | None = None, cache_path: str | None = None) -> None:
        self.spec = ModelSpec(name_or_path=model) if isinstance(model, str) else model
        if not isinstance(self.spec, ModelSpec):
            raise ConfigError(f"judge.model must be a model spec or a name, got {type(model).__name__}")
        self.max_new_tokens, self.chat_template, self.batch_size = max_new_tokens, chat_template, batch_size
        self.device = device
        self.model_id = self.spec.source + (f"@{self.spec.revision}" if self.spec.revision else "")
        self._lm = None
        self._stack = contextlib.ExitStack()
        self._cache_path = cache_path

    def _load(self):
        if self._lm is None:
            import torch

            from lit_align.retrieval import GenerationCache
            from lit_align.retrieval.loaded import loaded_model

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._lm = self._stack.enter_context(loaded_model(
                self.spec, key="judge.model", device=device, chat_template=self.chat_template,
                chat_key="judge.chat_template"))
            self._cache = GenerationCache(self._cache_path) if self._cache_path is not None else None
            commit = getattr(self._lm.model.config, "_commit_hash", None)
            version = self.spec.revision or commit
            self.model_id = (self.spec.source + (f"@{version}" if version else "")
                             + f" (weights {self._lm.fingerprint[:12]})")
        return self._lm

    def complete(self, prompts: list[str]) -> list[str]:
        from lit_align.rollout.sampler import SamplingConfig

        lm = self._load()
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, do_sample=False)
        return lm.generate([lm.render(p) for p in prompts], sampling, seeds=None, cache=self._cache,
                           batch_size=self.batch_size)

    def close(self) -> None:
        """Free the judge model (it is loaded again on the next :meth:`complete`)."""
        self._stack.close()
        self._lm = None


class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (optional; tests only
    build the request, they never send it).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or a local vLLM server's ``http://host:8000/v1``.
        model: the model name sent in each request (recorded as ``model_id``; the ``model`` the server reports
            back is added when it differs, e.g. a dated version).
        api_key_env: name of the environment variable that holds the API key (never a key in a config); it must
            be set when the judge is built (else a ConfigError naming ``judge.api_key_env``), not mid-run.
        max_tokens / temperature: reply length and sampling (0 = as deterministic as the server allows).
        timeout_s: per-request timeout.
        retries: further tries of a request that fails (a network error, an HTTP error such as 429 or 5xx, a body
            that is not JSON), waiting ``backoff_s * 2**i`` seconds before try ``i + 1``. A request that still
            fails gives the reply ``""``: a reply that does not parse, counted by :class:`RubricJudge`, not fatal.
        backoff_s: the first wait between tries.
        cache_path: a JSONL file of replies (a :class:`~lit_align.retrieval.GenerationCache`) keyed by the
            endpoint, model, prompt, ``max_tokens`` and ``temperature``: a rerun sends only the prompts it has no
            reply for. ``None``: no cache. Failed requests are not cached.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 128,
                 temperature: float = 0.0, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 2.0,
                 cache_path: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url must start with http:// or https://, got {base_url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"judge.retries must be an int >= 0, got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"judge.backoff_s must be >= 0, got {backoff_s!r}")
        if not os.environ.get(api_key_env):
            raise ConfigError(f"judge.api_key_env: environment variable {api_key_env!r} is not set; export the "
                              "endpoint's API key under that name (or name the variable that holds it)")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.model_id = model
        self.failed_requests = 0
        """Requests that failed after every retry (their replies are ``""``)."""
        from lit_align.retrieval import GenerationCache

        self.cache = GenerationCache(cache_path) if cache_path is not None else None

    def cache_key(self, prompt: str) -> str:
        """sha256 hex of the endpoint, model, prompt and reply settings (the reply cache's key)."""
        payload = {"base_url": self.base_url, "model": self.model, "prompt": prompt, "max_tokens": self.max_tokens,
                   "temperature": self.temperature}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def build_request(self, prompt: str) -> urllib.request.Request:
        """The HTTP request for one prompt (a single user message); reads the key from ``api_key_env``."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"judge.api_key_env: environment variable {self.api_key_env!r} is not set; export the "
                              "endpoint's API key under that name")
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        return urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                      method="POST", headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {key}"})

    def _post(self, prompt: str) -> dict | None:
        """The JSON payload of one request, retried with exponential backoff; ``None`` when every try failed."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self.build_request(prompt), timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode())
                if isinstance(payload, dict):
                    return payload
                error = f"a JSON {type(payload).__name__}, not an object"
            except (OSError, ValueError, http.client.HTTPException) as err:
                # URLError/HTTPError/timeouts, a malformed or cut HTTP response, a body that is not JSON
                error = str(err)
        self.failed_requests += 1
        warnings.warn(f"judge.base_url={self.base_url!r}: request failed after {self.retries + 1} tries ({error}); "
                      "counted as a reply that does not parse", stacklevel=2)
        return None

    def complete(self, prompts: list[str]) -> list[str]:
        replies = []
        for prompt in prompts:
            key = self.cache_key(prompt)
            if self.cache is not None and key in self.cache:
                replies.append(self.cache.get(key))
                continue
            payload = self._post(prompt)
            if payload is None:
                replies.append("")
                continue
            served = payload.get("model")
            if served and served != self.model:
                self.model_id = f"{self.model} (served: {served})"
            try:
                reply = payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                reply = ""  # an odd payload is a reply that does not parse, counted by RubricJudge
            if self.cache is not None and isinstance(reply, str):
                self.cache.put({key: reply}, {key: {"judge": self.model_id, "prompt": prompt}})
            replies.append(reply if isinstance(reply, str) else "")
        return replies
