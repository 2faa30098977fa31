"""``builtin:ranked_preferences``: a tiny multi-rated preference set whose ratings follow a learnable quality.

Every prompt asks to repeat one word (five phrasings); its four responses are one sentence shape,
``The word is "<x>".``, with ``x`` the word itself or the word with one, two, or three or more letters changed. A
response's rating is :func:`gold_quality`: ``3 - min(edit distance(x, word), 3)`` (3, 2, 1, 0). Copying is a rule a
tiny model can learn from the prompt alone and apply to unseen prompts, and the best-vs-k-th pairs run from easy
(exact vs far off, gap 3) to hard (exact vs one letter off, gap 1): the curriculum Curry-DPO (arXiv 2403.07230) is
about.

:func:`gold_quality` scores any text, so a benchmark can rate the greedy outputs of a trained model: a response in the
set's sentence shape scores as above; other text scores half that for its last quoted string, and 0 without one.
:func:`build_ranked_preferences` makes the records; ``scripts/build_builtin_data.py`` writes them.
"""

from __future__ import annotations

import random
import re
import string

__all__ = ["MAX_QUALITY", "build_ranked_preferences", "edit_distance", "gold_quality"]

#: The best quality (the word copied exactly, in the set's sentence shape).
MAX_QUALITY = 3.0

_WORDS = [
    "lamp", "river", "stone", "apple", "cloud", "bread", "chair", "green", "house", "light", "music", "paper",
    "plant", "queen", "sugar", "table", "train", "water", "bird", "book", "cake", "door", "fish", "frog", "gold",
    "hand", "kite", "leaf", "moon", "nest", "rain", "ring", "rose", "salt", "ship", "snow", "star", "tree", "wind",
    "wolf", "milk", "bell", "coin", "drum", "garden", "candle", "window", "pencil", "basket", "forest", "spoon",
    "tiger", "bridge", "ladder", "button", "castle", "market", "harbor", "library", "bakery",
]
_PROMPTS = ['Repeat the word "{}".', 'Say "{}" back to me.', 'Echo the word "{}".', 'Please write the word "{}".',
            'Copy this word: "{}".']
_RESPONSE = 'The word is "{}".'
_PROMPT_PATTERNS = [re.compile(re.escape(p).replace(r"\{\}", r'([^"]+)')) for p in _PROMPTS]
_RESPONSE_PATTERN = re.compile(re.escape(_RESPONSE).replace(r"\{\}", r'([^"]*)'))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest one-letter insertions, deletions and substitutions turning ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _target(prompt: str) -> str:
    for pattern in _PROMPT_PATTERNS:
        found = pattern.fullmatch(prompt.strip())
        if found:
            return found.group(1)
    raise ValueError(f"not a builtin:ranked_preferences prompt: {prompt!r}")


def gold_quality(prompt: str, response: str) -> float:
    """The quality of ``response`` to a ``builtin:ranked_preferences`` prompt, in [0, 3].

    ``3 - min(edit_distance(x, word), 3)`` for a response ``The word is "x".``; half of that for other text, with
    ``x`` its last quoted string; 0 for text with no quoted string. ``ValueError`` for a prompt not of the set.
    """
    word = _target(prompt)
    shaped = _RESPONSE_PATTERN.fullmatch(response.strip())
    if shaped:
        return MAX_QUALITY - min(edit_distance(shaped.group(1), word), 3)
    quoted = re.findall(r'"([^"]*)"', response)
    return 0.5 * (MAX_QUALITY - min(edit_distance(quoted[-1], word), 3)) if quoted else 0.0


def _corrupt(rng: random.Random, word: str, distance: int) -> str:
    """``word`` with letters changed until it is exactly ``distance`` edits away (3: at least 3)."""
    while True:
        out = list(word)
        for _ in range(distance):
            i, op = rng.randrange(len(out)), rng.choice("sdi")
            if op == "s":
                out[i] = rng.choice(string.ascii_lowercase)
            elif op == "d" and len(out) > 2:
                del out[i]
            else:
                out.insert(i, rng.choice(string.ascii_lowercase))
        text = "".join(out)
        if edit_distance(text, word) == distance:
            return text


#: Records in the set.
SIZE = 300


def build_ranked_preferences(seed: int) -> list[dict]:
    """``SIZE`` records ``{"prompt", "responses": [4 str], "ratings": [4 int]}``, prompts distinct.

    Each prompt's responses copy its word exactly and with 1, 2 and 3 edits, in a random order, rated by
    :func:`gold_quality` (3, 2, 1, 0)."""
    rng = random.Random(seed)
    combos = [(p, w) for p in _PROMPTS for w in _WORDS]
    rng.shuffle(combos)
    records = []
    for template, word in combos[:SIZE]:
        prompt = template.format(word)
        responses = [_RESPONSE.format(_corrupt(rng, word, d) if d else word) for d in range(4)]
        rng.shuffle(responses)
        records.append({"prompt": prompt, "responses": responses,
                        "ratings": [int(gold_quality(prompt, r)) for r in responses]})
    return records
