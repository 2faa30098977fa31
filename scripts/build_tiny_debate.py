"""Build the tiny ACC-Debate base model ``builtin:tiny-debate-base`` (core.md §1).

Run from the repository root::

    python scripts/build_tiny_debate.py                           # builtin:tiny-debate-base (about 3 min)
    python scripts/build_tiny_debate.py --calibrate               # also report its debate statistics
    python scripts/build_tiny_debate.py --calibrate --skip-build  # calibrate the shipped model only

A tiny Qwen2 trained with the repo's SFT (``configs/sft/tiny_debate.yaml``) to play **both** the actor
and the critic of :mod:`lit_align.debate.protocol` on the ``builtin:tiny_qa`` **training** questions
(never the held-out ``builtin:tiny_qa/val`` ones). Every prompt is the protocol's exact plain text
(``chat_template=False``), the response is short (at most about 20 tokens) and ends with EOS. Each tiny
question's passage ends with its answer (see ``lit_align/data/builtin/README.md``), so "right with
probability p" below teaches the model to heed the passage with probability p; it generalises to the
held-out questions, and DPO has something to sharpen:

- actor basic (:func:`actor_basic_prompt`) -> a one-sentence justification naming an answer, then
  ``Answer: <X>``; X is right with probability :data:`P_RIGHT` (so accuracy has room to improve);
- actor debate (:func:`actor_debate_prompt`, previous actor and critic responses each right with
  probability :data:`P_RIGHT`) -> the answer the critic (Person 1) points to with probability
  :data:`P_FOLLOW`, else the previous actor answer (so critic quality matters);
- critic detail (:func:`critic_detail_prompt`) -> one brief detail naming an answer, right with
  probability :data:`P_RIGHT`;
- guided actor / critic (:func:`targeted_actor_prompt`, basic and debate variants, and
  :func:`targeted_critic_prompt`, all styles) -> a response supporting the given target (half of the
  targets right, half wrong).

Answers are written the way :func:`answer_display` writes them (``yes``/``no``, ``B) <option>``), so
the critic's pointer is easy to copy. ``--calibrate`` runs :func:`run_debate` with the base as both
players on the held-out questions (temperature 0.7, top-p 0.9) and reports parse rate, accuracy by
round, how often the actor follows the critic, and the guided prompts' hit rates.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sft" / "tiny_debate.yaml"
NAME = "tiny-debate-base"

#: Probability that a base actor answer / critic pointer in the SFT data is right.
P_RIGHT = 0.6
#: Probability that a base actor at round t >= 1 takes up the critic's pointer (else keeps its answer).
P_FOLLOW = 0.75

_YES_NO_JUST = {
    "yes": ["I think so.", "It seems true.", "That is right."],
    "no": ["I think not.", "It seems false.", "That is wrong."],
}
_MC_JUST = ["{d} fits.", "It is {d}.", "I think {d}."]
_FOLLOW = ["Person 1: {d}.", "Now {d}.", "I switch to {d}."]
_KEEP = ["I keep {d}.", "Still {d}."]
_AGREE = ["Both say {d}.", "We agree: {d}."]
_CRITIC = ["Detail: {d} fits better.", "Consider {d}.", "Missed: {d} fits."]
_CRITIC_AGREE = ["{d} looks right.", "Yes, {d} fits."]
_GUIDED_CRITIC = ["{d} fits; {d} is best.", "{d} matches. {d} is right."]


def _pick(rng: random.Random, ex, p_right: float) -> str:
    """The right answer with probability ``p_right``, else a random wrong one."""
    return ex.answer if rng.random() < p_right else rng.choice(ex.wrong_answers)


def _answer_line(ex, answer: str) -> str:
    return f"\nAnswer: {answer}"


def actor_response(rng: random.Random, ex, answer: str) -> str:
    """A basic actor response: a short justification naming ``answer``, then ``Answer: <answer>``."""
    from lit_align.debate.protocol import answer_display

    if ex.kind == "yes_no":
        just = rng.choice(_YES_NO_JUST[answer])
    else:
        just = rng.choice(_MC_JUST).format(d=answer_display(ex, answer))
    return just + _answer_line(ex, answer)


def debate_response(rng: random.Random, ex, prev: str, pointer: str, follow: bool) -> str:
    """A round t >= 1 actor response: take up the critic's ``pointer`` or keep ``prev``."""
    from lit_align.debate.protocol import answer_display

    answer = pointer if follow else prev
    d = answer_display(ex, answer)
    frames = _AGREE if prev == pointer else (_FOLLOW if follow else _KEEP)
    return rng.choice(frames).format(d=d) + _answer_line(ex, answer)


def critic_response(rng: random.Random, ex, actor_answer: str | None, pointer: str) -> str:
    """A critic detail naming ``pointer`` (agreeing when the actor said the same)."""
    from lit_align.debate.protocol import answer_display

    frames = _CRITIC_AGREE if pointer == actor_answer else _CRITIC
    return rng.choice(frames).format(d=answer_display(ex, pointer))


def _previous_actor(rng: random.Random, ex) -> tuple[str, str]:
    """(answer, response) of a previous-round actor: a basic or a debate-style response."""
    a = _pick(rng, ex, P_RIGHT)
    if rng.random() < 0.5:
        return a, actor_response(rng, ex, a)
    other = _pick(rng, ex, P_RIGHT)
    follow = rng.random() < 0.5
    prev, pointer = (other, a) if follow else (a, other)
    return a, debate_response(rng, ex, prev, pointer, follow)


def sft_rows(examples, rng: random.Random) -> list[dict]:
    """Actor, critic and guided SFT rows over ``examples`` (the training questions)."""
    from lit_align.debate import protocol as P

    rows = []

    def add(prompt: str, response: str) -> None:
        rows.append({"prompt": prompt, "response": " " + response})

    for ex in examples:
        for _ in range(2):  # (a) actor basic
            add(P.actor_basic_prompt(ex), actor_response(rng, ex, _pick(rng, ex, P_RIGHT)))
        for _ in range(3):  # (b) actor debate
            prev, prev_text = _previous_actor(rng, ex)
            pointer = _pick(rng, ex, P_RIGHT)
            critic = critic_response(rng, ex, prev, pointer)
            follow = rng.random() < P_FOLLOW
            add(P.actor_debate_prompt(ex, prev_text, critic), debate_response(rng, ex, prev, pointer, follow))
        for _ in range(2):  # (c) critic detail
            prev, prev_text = _previous_actor(rng, ex)
            add(P.critic_detail_prompt(ex, prev_text), critic_response(rng, ex, prev, _pick(rng, ex, P_RIGHT)))
        for _ in range(3):  # (d) guided actor, basic and debate variants
            target = _pick(rng, ex, 0.5)
            previous = None
            if rng.random() < 0.5:
                prev, prev_text = _previous_actor(rng, ex)
                previous = (prev_text, critic_response(rng, ex, prev, _pick(rng, ex, P_RIGHT)))
            add(P.targeted_actor_prompt(ex, target, previous), actor_response(rng, ex, target))
        # (d) guided critic, any style
        target = _pick(rng, ex, 0.5)
        _, prev_text = _previous_actor(rng, ex)
        add(P.targeted_critic_prompt(ex, prev_text, target, trial=rng.randrange(11)),
            rng.choice(_GUIDED_CRITIC).format(d=P.answer_display(ex, target)))
    rng.shuffle(rows)
    return rows


def train_examples():
    from lit_align.data.qa import load_qa
    from lit_align.data.records import DataSource

    return load_qa(DataSource(path="builtin:tiny_qa"))


def build(out: Path) -> Path:
    from _tiny_sft import train_tiny_model

    target = out / NAME
    rows = sft_rows(train_examples(), random.Random(0))
    train_tiny_model(CONFIG, rows, target)
    print(f"wrote {target} ({len(rows)} SFT rows)")
    return target


def calibrate(model: str = f"builtin:{NAME}", rounds: int = 3, max_new_tokens: int = 24, seed: int = 0) -> dict:
    """The base as actor and critic on ``builtin:tiny_qa/val`` (temperature 0.7, top-p 0.9)."""
    import torch

    from lit_align.data.qa import load_qa
    from lit_align.data.records import DataSource
    from lit_align.debate import protocol as P
    from lit_align.models.causal_lm import build_causal_lm, build_tokenizer
    from lit_align.models.spec import ModelSpec
    from lit_align.rollout.sampler import SamplingConfig

    spec = ModelSpec(name_or_path=model)
    tok = build_tokenizer(spec)
    lm = build_causal_lm(spec, tok).eval()
    val = load_qa(DataSource(path="builtin:tiny_qa/val"))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        trs = P.run_debate(lm, lm, tok, val, rounds, sampling, generator=gen, chat_template=False)
    debate_s = time.perf_counter() - start
    turns = [t for tr in trs for t in tr.turns]
    first_try = [P.extract_answer(t.actor_response, tr.example) is not None for tr in trs for t in tr.turns]
    pointers = [[P.extract_answer(t.critic_response, tr.example) for t in tr.turns] for tr in trs]
    follows = [tr.turns[r].answer == pointers[i][r - 1] for i, tr in enumerate(trs) for r in range(1, rounds)
               if pointers[i][r - 1] is not None]
    changes = P.answer_changes(trs)

    # guided prompts: one target right, one wrong per question, basic and debate actor variants
    rng = random.Random(seed)
    items = [(ex, t) for ex in val for t in (ex.answer, rng.choice(ex.wrong_answers))]
    prev = {id(tr.example): (tr.turns[0].actor_response, tr.turns[0].critic_response) for tr in trs}
    with torch.no_grad():
        basic = P.generate(lm, tok, [P.targeted_actor_prompt(ex, t) for ex, t in items], sampling,
                           generator=gen, chat_template=False)
        debate = P.generate(lm, tok, [P.targeted_actor_prompt(ex, t, prev[id(ex)]) for ex, t in items], sampling,
                            generator=gen, chat_template=False)
        critic = P.generate(lm, tok, [P.targeted_critic_prompt(ex, prev[id(ex)][0], t, trial=i % 11)
                                      for i, (ex, t) in enumerate(items)], sampling, generator=gen,
                            chat_template=False)

    def hit(texts: list[str]) -> float:
        return sum(P.extract_answer(x, ex) == t for x, (ex, t) in zip(texts, items)) / len(items)

    return {
        "questions": len(val),
        "accuracy_by_round": [round(a, 3) for a in P.accuracy_by_round(trs)],
        "parse_rate_final": sum(t.answer is not None for t in turns) / len(turns),
        "parse_rate_first_try": sum(first_try) / len(first_try),
        "critic_pointer_rate": sum(p is not None for ps in pointers for p in ps) / (len(trs) * rounds),
        "critic_pointer_accuracy": sum(P.is_correct(p, tr.example) for tr, ps in zip(trs, pointers) for p in ps)
        / (len(trs) * rounds),
        "actor_follows_critic": sum(follows) / max(1, len(follows)),
        "right_to_wrong": changes.right_to_wrong,
        "wrong_to_right": changes.wrong_to_right,
        "guided_actor_hit_basic": hit(basic),
        "guided_actor_hit_debate": hit(debate),
        "guided_critic_hit": hit(critic),
        "debate_seconds": round(debate_s, 2),
        "example": [(t.actor_response, t.critic_response) for t in trs[0].turns],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "lit_align" / "models" / "assets")
    parser.add_argument("--calibrate", action="store_true", help="report the base model's debate statistics")
    parser.add_argument("--skip-build", action="store_true", help="with --calibrate: calibrate the existing model")
    args = parser.parse_args()
    if not args.skip_build:
        start = time.perf_counter()
        build(args.out)
        print(f"build took {time.perf_counter() - start:.1f} s")
    if args.calibrate:
        print(json.dumps(calibrate(str(args.out / NAME)), indent=1))


if __name__ == "__main__":
    main()
