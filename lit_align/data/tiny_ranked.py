"""``builtin:ranked_preferences``: a tiny multi-rated preference set whose ratings follow a learnable quality.

Every prompt asks for one number (a sum, a difference, a product or the length of a word) and has four
responses in the same sentence shape, one correct and three wrong by growing amounts. A response's rating is
:func:`gold_quality`: 3 for the right number, 2 when it is off by one, 1 off by two, 0 off by three or more, so the
quality is a learnable rule (closeness to the right answer) and the best-vs-k-th pairs run from easy (right vs far
off, gap 3) to hard (right vs off by one, gap 1), the curriculum Curry-DPO (arXiv 2403.07230) is about.

:func:`gold_quality` scores any text, so a benchmark can rate the greedy outputs of a trained model: a response in
the dataset's sentence shape scores as above, any other text by the last number in it at half weight, and text
with no number 0. :func:`build_ranked_preferences` makes the records; ``scripts/build_builtin_data.py`` writes them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

__all__ = ["MAX_QUALITY", "build_ranked_preferences", "gold_quality"]

#: The best quality (the right number in the dataset's sentence shape).
MAX_QUALITY = 3.0

_WORDS = [
    "lamp", "river", "stone", "apple", "cloud", "bread", "chair", "green", "house", "light", "music", "paper",
    "plant", "queen", "sugar", "table", "train", "water", "bird", "book", "cake", "door", "fish", "frog", "gold",
    "hand", "kite", "leaf", "moon", "nest", "rain", "ring", "rose", "salt", "ship", "snow", "star", "tree", "wind",
    "wolf", "milk", "bell", "coin", "drum", "garden", "candle", "window", "pencil", "basket", "forest",
]


class _Family:
    """One prompt family: a prompt pattern, the right answer it implies and the response sentence shape."""

    def __init__(self, prompt: str, pattern: str, answer: Callable[[tuple[str, ...]], int], response: str) -> None:
        self.prompt, self.answer, self.response = prompt, answer, response
        self.pattern = re.compile(pattern)

    def match(self, prompt: str) -> tuple[str, ...] | None:
        found = self.pattern.fullmatch(prompt.strip())
        return found.groups() if found else None


_FAMILIES = {
    "plus": _Family("What is {0} plus {1}?", r"What is (\d+) plus (\d+)\?", lambda g: int(g[0]) + int(g[1]),
                    "{0} plus {1} is {n}."),
    "minus": _Family("What is {0} minus {1}?", r"What is (\d+) minus (\d+)\?", lambda g: int(g[0]) - int(g[1]),
                     "{0} minus {1} is {n}."),
    "times": _Family("What is {0} times {1}?", r"What is (\d+) times (\d+)\?", lambda g: int(g[0]) * int(g[1]),
                     "{0} times {1} is {n}."),
    "letters": _Family('How many letters are in the word "{0}"?', r'How many letters are in the word "([a-z]+)"\?',
                       lambda g: len(g[0]), 'The word "{0}" has {n} letters.'),
}


def _closeness(value: int, right: int) -> float:
    return MAX_QUALITY - min(abs(value - right), 3)


def gold_quality(prompt: str, response: str) -> float:
    """The quality of ``response`` to a ``builtin:ranked_preferences`` prompt, in [0, 3].

    ``3 - min(|n - right|, 3)`` where ``n`` is the response's number, when the response is the dataset's sentence
    for that number; half of that for other text, with ``n`` its last integer; 0 for text with no integer.
    Raises ``ValueError`` for a prompt of no family of the set.
    """
    for family in _FAMILIES.values():
        groups = family.match(prompt)
        if groups is None:
            continue
        right = family.answer(groups)
        numbers = re.findall(r"-?\d+", response)
        if not numbers:
            return 0.0
        value = int(numbers[-1])
        shaped = response.strip() == family.response.format(*groups, n=value)
        return _closeness(value, right) * (1.0 if shaped else 0.5)
    raise ValueError(f"not a builtin:ranked_preferences prompt: {prompt!r}")


def _draw(rng: random.Random, name: str) -> tuple[str, ...]:
    if name == "plus":
        return str(rng.randint(1, 20)), str(rng.randint(1, 20))
    if name == "minus":
        a = rng.randint(5, 30)
        return str(a), str(rng.randint(1, a - 1))
    if name == "times":
        return str(rng.randint(2, 12)), str(rng.randint(2, 12))
    return (rng.choice(_WORDS),)


def _wrong(rng: random.Random, right: int, distance: int, low: int) -> int:
    """A wrong number ``distance`` away from ``right`` (either side, not below ``low``)."""
    sides = [s for s in (-1, 1) if right + s * distance >= low]
    return right + rng.choice(sides) * distance


#: Records per family (300 in all).
_COUNTS = {"plus": 100, "minus": 100, "times": 60, "letters": 40}


def build_ranked_preferences(seed: int) -> list[dict]:
    """The records ``{"prompt", "responses": [4 str], "ratings": [4 int]}``, prompts distinct, families mixed.

    Each prompt's responses give the right number and numbers off by 1, 2 and 3-5, in a random order, rated by
    :func:`gold_quality` (3, 2, 1, 0)."""
    rng = random.Random(seed)
    records: list[dict] = []
    for name, count in _COUNTS.items():
        family, seen = _FAMILIES[name], set()
        while len(seen) < count:
            groups = _draw(rng, name)
            prompt = family.prompt.format(*groups)
            if prompt in seen:
                continue
            seen.add(prompt)
            right = family.answer(groups)
            low = 1 if name == "letters" else 0
            numbers = [right, *(_wrong(rng, right, d, low) for d in (1, 2, rng.randint(3, 5)))]
            rng.shuffle(numbers)
            responses = [family.response.format(*groups, n=n) for n in numbers]
            records.append({"prompt": prompt, "responses": responses,
                            "ratings": [int(gold_quality(prompt, r)) for r in responses]})
    rng.shuffle(records)
    return records
