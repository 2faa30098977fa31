"""ACC-Collab deliberation protocol: prompts, answer extraction, batched actor/critic debate, transcripts.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab: An Actor-Critic Approach to Multi-Agent LLM Collaboration"
(arXiv 2411.00053). The protocol and the guided prompts follow the released code
(github.com/LlenRotse/ACC-Collab: ``debaters.py``, ``questions.py``).

Round 0: the actor answers a *basic* prompt (question, context, options) and the critic adds brief
details given the question and that round-0 actor response. Round t >= 1: the actor sees **only**
round t-1's two responses ("Person 0" = actor, "Person 1" = critic) and the question again; the
critic sees the question and the **current** round's actor response. The team's answer is the
actor's final-round answer.

Agents. ``actor`` / ``critic`` arguments are an :data:`Agent`: either an ``nn.Module`` (used as
is; both may be the same object) or a zero-argument callable returning a context manager that
yields the module, e.g. ``lambda: peft_model.adapter("critic")`` where the context switches LoRA
adapters on entry and back on exit. The context is entered once per sampler call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.data.qa import LETTERS, QAExample, answer_display
from lit_align.data.tokenize import encode_prompt
from lit_align.debate.draws import RowSeeds
from lit_align.engine.distributed import any_rank
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = [
    "CRITIC_STYLES",
    "HINT_PREFIX",
    "Agent",
    "Draw",
    "AnswerChanges",
    "DebateTranscript",
    "Turn",
    "accuracy_by_round",
    "actor_basic_prompt",
    "actor_debate_prompt",
    "agent_module",
    "answer_changes",
    "answer_display",
    "answer_instruction",
    "critic_detail_prompt",
    "extract_answer",
    "format_prompt",
    "generate",
    "is_correct",
    "question_block",
    "run_debate",
    "sample_answers",
    "target_hint",
    "targeted_actor_prompt",
    "targeted_critic_prompt",
    "transcript_row",
]

Agent = nn.Module | Callable[[], AbstractContextManager[nn.Module]]
"""A model, or a zero-argument factory of a context manager yielding the model (e.g. an adapter switch)."""


# --------------------------------------------------------------------------------------------- prompts


def question_block(example: QAExample) -> str:
    """The task as the agents see it: optional context passage, the question, lettered options."""
    parts = []
    if example.context:
        parts.append(f"Passage: {example.context.strip()}")
    parts.append(f"Question: {example.question.strip()}")
    if example.kind == "multiple_choice":
        parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(example.options)))
    return "\n".join(parts)


def answer_instruction(example: QAExample) -> str:
    """The fixed final-answer format requested from the actor (what :func:`extract_answer` looks for first)."""
    if example.kind == "yes_no":
        return 'End with a last line of the form "Answer: yes" or "Answer: no".'
    if example.kind == "multiple_choice":
        letters = ", ".join(LETTERS[: len(example.options)])
        return f'End with a last line of the form "Answer: X" where X is one letter among {letters}.'
    return 'End with a last line of the form "Answer: N" where N is a single number.'


def actor_basic_prompt(example: QAExample) -> str:
    """Round-0 actor prompt: the task, then a request for a very short justification and a final answer."""
    return (
        f"{question_block(example)}\n\n"
        "Reason about this in one or two short sentences, then commit to a final answer. "
        f"{answer_instruction(example)}"
    )


def _previous_round(actor_prev: str, critic_prev: str) -> str:
    return (
        "Two people discussed this question in the previous round.\n"
        f"Person 0 said: {actor_prev.strip()}\n"
        f"Person 1 said: {critic_prev.strip()}"
    )


def actor_debate_prompt(example: QAExample, actor_prev: str, critic_prev: str) -> str:
    """Round t >= 1 actor prompt: round t-1's actor (Person 0) and critic (Person 1) responses, then the task."""
    return (
        f"{_previous_round(actor_prev, critic_prev)}\n\n"
        f"Taking their remarks into account, answer the question yourself.\n{question_block(example)}\n\n"
        "Keep the justification to one or two short sentences, then commit to a final answer. "
        f"{answer_instruction(example)}"
    )


def critic_detail_prompt(example: QAExample, actor_response: str) -> str:
    """Critic prompt ("detail" persona): the task and the current round's actor response."""
    return (
        f"{question_block(example)}\n\n"
        f"Someone answered: {actor_response.strip()}\n\n"
        "Point out, very tersely, any relevant details or considerations this answer may have missed."
    )


#: Start of every target hint sentence of guided prompts (checked absent from DPO prompts).
HINT_PREFIX = "The answer you must support is:"


def target_hint(example: QAExample, target: str) -> str:
    """The sentence that steers a guided prompt toward ``target``; it must never reach a DPO prompt."""
    return f"{HINT_PREFIX} {answer_display(example, target)}."


def targeted_actor_prompt(example: QAExample, target: str, previous: tuple[str, str] | None = None) -> str:
    """Guided actor prompt: the natural prompt's content, told to give ``target`` as its final answer.

    Args:
        example: The question.
        target: The answer to steer toward (``"yes"``, a letter, or a number string).
        previous: ``(actor, critic)`` responses of the previous round for rounds t >= 1 (debate
            variant); ``None`` at round 0 (basic variant).
    """
    head = f"{_previous_round(*previous)}\n\n" if previous is not None else ""
    return (
        f"{head}{question_block(example)}\n\n"
        f"{target_hint(example, target)} Give one or two short sentences justifying it and state it as "
        f"your final answer. {answer_instruction(example)}"
    )


#: Instruction styles of guided critic prompts, picked by trial index (trial 0 uses no extra style).
CRITIC_STYLES: tuple[str, ...] = (
    "Challenge the response where it disagrees with that answer.",
    "Back the response up where it agrees with that answer.",
    "Make your points as persuasive as you can.",
    "Refer explicitly to the question and to the passage.",
    "Draw on specialist knowledge of the subject.",
    "Rely only on what the passage or question states.",
    "Clear up any misunderstanding the response shows.",
    "Keep a mild, measured tone.",
    "Be as convincing as you possibly can.",
    "Draw on broad general knowledge.",
)


def targeted_critic_prompt(example: QAExample, actor_response: str, target: str, trial: int = 0) -> str:
    """Guided critic prompt: a debate assistant giving two brief details arguing ``target`` is correct.

    The style sentence varies with ``trial`` (``CRITIC_STYLES[(trial - 1) % 10]`` for trial >= 1) to
    diversify critic data; trial 0 adds none.
    """
    style = "" if trial <= 0 else " " + CRITIC_STYLES[(trial - 1) % len(CRITIC_STYLES)]
    return (
        f"{question_block(example)}\n\n"
        f"Someone answered: {actor_response.strip()}\n\n"
        f"You are a debate assistant. {target_hint(example, target)} Give two very brief details arguing "
        f"that this is the correct answer, in reply to the response above.{style}"
    )


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool | None = None) -> list[int]:
    """Token ids of a prompt text: a user turn of the tokenizer's chat template (``chat_template``
    None = use it when the tokenizer has one), else plain text with the tokenizer's special tokens."""
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None) is not None
    return encode_prompt(tokenizer, text, chat_template)


# ------------------------------------------------------------------------------------------ extraction

_MARKER = re.compile(r"\banswer\s*(?:is)?\s*[:=]", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+−]?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?![\w])|(?<![\w.])[-+−]?\.\d+(?![\w])")
_BARE_LETTER = re.compile(r"^\W*\(?([A-Za-z])(?:\)|\.|\b)")


def _norm_number(token: str) -> str | None:
    token = token.replace("−", "-").replace("$", "").replace(",", "").rstrip(".")
    try:
        value = float(token)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _letter_pattern(n: int) -> re.Pattern:
    allowed = LETTERS[:n]
    # "(B)" in any case, "B)" or "B." in upper case; never a letter inside a word.
    return re.compile(
        rf"\(([{allowed}{allowed.lower()}])\)|(?<![\w(])([{allowed}])\)|(?<![\w(])([{allowed}])\.(?=\s|$)"
    )


def _option_spans(text: str, options: Sequence[str]) -> list[tuple[int, int, str]]:
    """(start, end, letter) of option texts in ``text`` (case-insensitive), longer matches winning overlaps."""
    hits = []
    for i, opt in enumerate(options):
        opt = opt.strip()
        if not opt:
            continue
        for m in re.finditer(rf"(?<!\w){re.escape(opt)}(?!\w)", text, re.IGNORECASE):
            hits.append((m.start(), m.end(), LETTERS[i]))
    hits.sort(key=lambda h: (-(h[1] - h[0]), h[0]))
    kept: list[tuple[int, int, str]] = []
    for h in hits:
        if all(h[1] <= k[0] or h[0] >= k[1] for k in kept):
            kept.append(h)
    return sorted(kept)


def _candidates(text: str, example: QAExample) -> list[str]:
    """Every answer mentioned in ``text``, in order of appearance (normalised)."""
    if example.kind == "yes_no":
        return [m.group(1).lower() for m in _YES_NO.finditer(text)]
    if example.kind == "numeric":
        return [n for n in (_norm_number(m.group(0)) for m in _NUMBER.finditer(text)) if n is not None]
    found = [(m.start(), next(g for g in m.groups() if g).upper()) for m in _letter_pattern(len(example.options)).finditer(text)]
    found += [(s, letter) for s, _, letter in _option_spans(text, example.options)]
    return [letter for _, letter in sorted(found)]


def _from_marker(segment: str, example: QAExample) -> str | None:
    """The answer right after an "Answer:" marker: the first one mentioned on that line."""
    segment = segment.strip().split("\n", 1)[0]
    if example.kind == "multiple_choice":
        m = _BARE_LETTER.match(segment)
        if m and m.group(1).upper() in LETTERS[: len(example.options)]:
            rest = segment[m.end(1):]
            # a bare letter followed by a word ("A cat") is the start of option text, not a letter
            if rest[:1] in ("", ")", ".", ",", ";", " ") and not re.match(r"^ [a-z]", rest):
                return m.group(1).upper()
    cands = _candidates(segment, example)
    if not cands and example.kind == "multiple_choice":  # "Answer: I think B": a lone capital letter
        allowed = LETTERS[: len(example.options)]
        cands = sorted(set(re.findall(rf"(?<!\w)([{allowed}])(?!\w)", segment)))
        cands = cands if len(cands) == 1 else []
    return cands[0] if cands else None


def extract_answer(text: str, example: QAExample) -> str | None:
    """The actor's answer in ``text``, normalised, or ``None`` when there is none or it is ambiguous.

    Order: the **last** ``Answer: ...`` marker (also ``answer is:``/``Answer =``, any case) whose
    line names an answer wins; otherwise every answer mentioned in the whole text is collected and
    returned only if they all agree (two different answers without a marker -> ``None``).

    Normalised forms: yes/no -> ``"yes"``/``"no"``; multiple choice -> the upper-case letter (found
    as ``(B)``, ``B)``, ``B.``, a bare letter after the marker, or the option's text); numeric ->
    the canonical number (``"1,200"`` -> ``"1200"``, ``"3.50"`` -> ``"3.5"``, ``"$7"`` -> ``"7"``).
    """
    for m in reversed(list(_MARKER.finditer(text))):
        ans = _from_marker(text[m.end():], example)
        if ans is not None:
            return ans
    distinct = set(_candidates(text, example))
    return distinct.pop() if len(distinct) == 1 else None


def is_correct(pred: str | None, example: QAExample) -> bool:
    """Whether an extracted answer matches the ground truth; ``None`` (unparseable) is wrong."""
    if pred is None:
        return False
    if example.kind == "numeric":
        a, b = _norm_number(pred), _norm_number(example.answer)
        if a is None or b is None:
            return False
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return pred.strip().lower() == example.answer.strip().lower()


# ------------------------------------------------------------------------------------------ transcripts


@dataclass
class Turn:
    """One round of one question. Prompts are the plain texts (before any chat template)."""

    round: int
    actor_prompt: str
    actor_response: str
    answer: str | None
    """Extracted actor answer; ``None`` if still unparseable after the retries (the dummy prediction)."""
    correct: bool
    """``is_correct(answer)``: an unparseable answer counts as wrong."""
    critic_prompt: str
    critic_response: str
    tries: int = 1
    """Actor samples drawn this round (1 + re-samples of unparseable answers)."""


@dataclass
class DebateTranscript:
    """One question's deliberation, ``turns[t]`` being round t."""

    example: QAExample
    turns: list[Turn] = field(default_factory=list)

    @property
    def correct_by_round(self) -> list[bool]:
        return [t.correct for t in self.turns]

    @property
    def final_correct(self) -> bool:
        """The team's outcome: the actor's final-round correctness."""
        return self.turns[-1].correct

    def changes(self) -> tuple[int, int]:
        """``(right_to_wrong, wrong_to_right)`` transitions between consecutive rounds."""
        c = self.correct_by_round
        r2w = sum(a and not b for a, b in zip(c, c[1:]))
        w2r = sum(b and not a for a, b in zip(c, c[1:]))
        return r2w, w2r


@dataclass(frozen=True)
class AnswerChanges:
    """Consecutive-round transitions summed over transcripts."""

    right_to_wrong: int
    wrong_to_right: int


def accuracy_by_round(transcripts: Sequence[DebateTranscript]) -> list[float]:
    """Actor accuracy at each round over ``transcripts`` (unparseable answers count as wrong)."""
    if not transcripts:
        raise ValueError("accuracy_by_round needs at least one transcript")
    n_rounds = len(transcripts[0].turns)
    if any(len(t.turns) != n_rounds for t in transcripts):
        raise ValueError("all transcripts must have the same number of rounds")
    return [sum(t.turns[r].correct for t in transcripts) / len(transcripts) for r in range(n_rounds)]


def transcript_row(tr: DebateTranscript) -> dict[str, object]:
    """A flat row of a transcript for tables: the question, the gold answer, each round's actor response,
    answer and critic response, and the final correctness."""
    row: dict[str, object] = {"question": tr.example.question, "gold": tr.example.answer}
    for turn in tr.turns:
        row[f"actor_{turn.round}"] = turn.actor_response
        row[f"answer_{turn.round}"] = turn.answer
        row[f"critic_{turn.round}"] = turn.critic_response
    row["final_correct"] = tr.final_correct
    return row


def answer_changes(transcripts: Sequence[DebateTranscript]) -> AnswerChanges:
    """Right-to-wrong and wrong-to-right changes between consecutive rounds, over all transcripts."""
    pairs = [t.changes() for t in transcripts]
    return AnswerChanges(sum(p[0] for p in pairs), sum(p[1] for p in pairs))


# ------------------------------------------------------------------------------------------ generation


@contextmanager
def agent_module(agent: Agent) -> Iterator[nn.Module]:
    """Yield the module of an :data:`Agent` (entering its context when it is a factory)."""
    if isinstance(agent, nn.Module):
        yield agent
    elif callable(agent):
        with agent() as module:
            yield module
    else:
        raise TypeError(f"an agent must be an nn.Module or a zero-argument context-manager factory, got {type(agent)}")


Draw = torch.Generator | RowSeeds | None
"""How a call samples: one generator consumed row after row (tests, demos), or :class:`RowSeeds`: a generator
per row from the row's key, so a row's text does not depend on the rows beside it (training, evaluation)."""


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def generate(
    agent: Agent,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    generator: Draw = None,
    chat_template: bool | None = None,
    keys: Sequence[int] | None = None,
    call: str = "sample",
) -> list[str]:
    """Sample one response per prompt text in **one** :func:`~lit_align.rollout.sampler.sample` call.

    Prompts are formatted with :func:`format_prompt`, left-padded, moved to the model's device;
    responses are decoded without special tokens and stripped. With :class:`RowSeeds` as ``generator``,
    row ``i`` draws from ``generator.generators(call, keys)[i]`` (``keys``: one per prompt).
    """
    if not prompts:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; build it with lit_align.models.build_tokenizer")
    if isinstance(generator, RowSeeds) and (keys is None or len(keys) != len(prompts)):
        raise ValueError(f"generate: per-row seeds need one key per prompt ({len(prompts)} prompts, keys {keys!r})")
    rows = [format_prompt(tokenizer, p, chat_template) for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)  # (B, P)
    with agent_module(agent) as model:
        device = next(model.parameters()).device
        draws = generator.generators(call, keys, device) if isinstance(generator, RowSeeds) else generator
        out = sample(model, ids.to(device), mask.to(device), sampling, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=draws)
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(out.response_ids, out.response_mask)]


def _retry_round(agent: Agent, todo: list[int]) -> tuple[bool, bool]:
    """``(run, pad)``: whether a retry round runs (on every rank when any rank has an unparseable answer,
    decided identically everywhere), and whether this rank, with none of its own, runs one throw-away row
    so that every rank makes the same forwards (sharded FSDP2 weights gather in every forward)."""
    run = any_rank(bool(todo))
    if not run or todo:
        return run, False
    with agent_module(agent) as model:
        return True, _is_sharded(model)


def sample_answers(
    actor: Agent,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    examples: Sequence[QAExample],
    sampling: SamplingConfig,
    *,
    max_tries: int,
    generator: Draw,
    chat_template: bool | None,
    keys: Sequence[int] | None = None,
    call: str = "answer",
) -> list[tuple[str, str | None, int]]:
    """``(response, answer, tries)`` per prompt; unparseable rows are re-sampled together, at most
    ``max_tries`` more times (one sampler call per retry, on every rank while any rank has one left),
    then keep the last response with answer None. ``keys``, ``call``: as in :func:`generate`."""
    if max_tries < 0:
        raise ValueError(f"max_tries must be >= 0, got {max_tries}")
    keys = list(keys) if keys is not None else [ex.index for ex in examples]
    responses = generate(actor, tokenizer, prompts, sampling, generator=generator, chat_template=chat_template,
                         keys=keys, call=call)
    answers = [extract_answer(r, ex) for r, ex in zip(responses, examples)]
    tries = [1] * len(prompts)
    for attempt in range(max_tries):
        todo = [i for i, a in enumerate(answers) if a is None]
        run, pad = _retry_round(actor, todo)
        if not run:
            break
        if pad:
            generate(actor, tokenizer, prompts[:1], sampling, generator=generator, chat_template=chat_template,
                     keys=keys[:1], call=f"{call}/retry{attempt}/pad")
            continue
        again = generate(actor, tokenizer, [prompts[i] for i in todo], sampling, generator=generator,
                         chat_template=chat_template, keys=[keys[i] for i in todo], call=f"{call}/retry{attempt}")
        for i, r in zip(todo, again):
            responses[i], answers[i] = r, extract_answer(r, examples[i])
            tries[i] += 1
    return list(zip(responses, answers, tries))


def run_debate(
    actor: Agent,
    critic: Agent,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[QAExample],
    rounds: int,
    sampling: SamplingConfig,
    *,
    critic_sampling: SamplingConfig | None = None,
    generator: Draw = None,
    max_tries: int = 2,
    chat_template: bool | None = None,
) -> list[DebateTranscript]:
    """Run ``rounds`` actor/critic rounds on every question, batched across questions.

    Each round makes one sampler call for all actor turns (plus one per retry of the still
    unparseable answers, at most ``max_tries``) and one for all critic turns. Round t >= 1 actor
    prompts contain only round t-1's (actor, critic) responses; critic prompts contain only the
    current round's actor response. The critic also speaks in the last round (its response is what
    critic training data at that round starts from).

    Args:
        actor: The actor :data:`Agent`.
        critic: The critic :data:`Agent` (may be the same module as ``actor``).
        tokenizer: Tokenizer with a pad token.
        examples: The questions (chunk large sets: one batch = all of them).
        rounds: Number of rounds T + 1 (>= 1); the paper uses 5.
        sampling: Actor sampling settings (paper: temperature 0.7, top-p 0.9).
        critic_sampling: Critic settings; default ``sampling``.
        generator: RNG for reproducible sampling, consumed call after call, or :class:`RowSeeds` (each
            question's draws from its ``example.index``: independent of the batch).
        max_tries: Re-samples of an unparseable actor answer (the released code: 2); then the answer is ``None``
            and counts as wrong.
        chat_template: Force (True) or disable (False) the chat template; None = when available.

    Returns:
        One :class:`DebateTranscript` per example, each with ``rounds`` turns.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not examples:
        raise ValueError("run_debate needs at least one example")
    critic_sampling = critic_sampling or sampling
    keys = [ex.index for ex in examples]
    transcripts = [DebateTranscript(ex) for ex in examples]
    for t in range(rounds):
        if t == 0:
            actor_prompts = [actor_basic_prompt(ex) for ex in examples]
        else:
            actor_prompts = [actor_debate_prompt(tr.example, tr.turns[t - 1].actor_response,
                                                 tr.turns[t - 1].critic_response) for tr in transcripts]
        answers = sample_answers(actor, tokenizer, actor_prompts, examples, sampling, max_tries=max_tries,
                                 generator=generator, chat_template=chat_template, keys=keys, call=f"round{t}/actor")
        critic_prompts = [critic_detail_prompt(ex, resp) for ex, (resp, _, _) in zip(examples, answers)]
        critiques = generate(critic, tokenizer, critic_prompts, critic_sampling, generator=generator,
                             chat_template=chat_template, keys=keys, call=f"round{t}/critic")
        for tr, ap, (resp, ans, tries), cp, cr in zip(transcripts, actor_prompts, answers, critic_prompts, critiques):
            tr.turns.append(Turn(round=t, actor_prompt=ap, actor_response=resp, answer=ans,
                                 correct=is_correct(ans, tr.example), critic_prompt=cp, critic_response=cr,
                                 tries=tries))
    return transcripts
