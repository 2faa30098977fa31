"""Generate the built-in tiny datasets shipped with ``lit_align``.

Run from the repository root::

    python scripts/build_builtin_data.py            # writes lit_align/data/builtin/
    python scripts/build_builtin_data.py --out DIR  # writes into DIR instead

The output is fully deterministic: every random choice comes from a
``random.Random`` seeded with a fixed integer, all pools are ordered lists
(never sets), and records are written in generation order, so running the
script twice produces byte-identical files.

Files written (one JSON object per line for ``*.jsonl``, all ASCII):

``instructions.jsonl`` (300 records)
    ``{"prompt": str, "response": str}``. Twelve families of small,
    learnable tasks (arithmetic, reversing and spelling words, capitals of
    invented countries, colours of invented objects, comparisons, alphabet
    and counting lists, ...), 25 records each.

``preferences.jsonl`` (300 records)
    ``{"prompt": str, "chosen": str, "rejected": str}``. Ten prompt families,
    30 records each. ``chosen`` is always correct, polite and concise;
    ``rejected`` is systematically worse: half of each family gives a wrong
    fact or result in the same shape as the correct answer, a quarter is rude
    and a quarter is evasive.

``fictitious_facts.jsonl`` (200 records)
    A tiny TOFU-style set about 40 invented people, 5 questions each::

        {"id": int, "person_id": int, "person": str,
         "question": str, "answer": str,
         "paraphrased_question": str, "paraphrased_answer": str,
         "perturbed_answers": [str, str, str, str]}

    ``id`` runs over ``0..199`` in file order and ``person_id`` over
    ``0..39``. Each person has eight attributes (birthplace, birth year,
    profession, favourite colour, favourite food, a parent's profession, a
    book title, an award); birthplace and profession are always asked, plus
    three of the other six chosen per person. ``perturbed_answers`` are four
    distinct false answers that reuse the *paraphrased* answer's sentence and
    change only the fact (as in TOFU, so the truth ratio compares answers of
    the same wording: P(perturbed) / P(paraphrased)).

``fictitious_facts_splits.json``
    ``{"forget01": [person_id, ...], "forget05": [...], "forget10": [...]}``:
    roughly 1%, 5% and 10% of the people (at least one each), nested so that
    ``forget01 ⊂ forget05 ⊂ forget10``. The retain set of a split is every
    person not listed in it.

``ranked_preferences.json`` (300 records)
    ``{"prompt": str, "responses": [str x4], "ratings": [int x4]}``: four
    rated responses per prompt for Curry-DPO, made by
    ``lit_align.data.tiny_ranked.build_ranked_preferences`` (which defines
    the set and its ``gold_quality``). A ``.json`` list, not ``.jsonl``, so
    the tiny tokenizer (trained on the ``*.jsonl`` files) does not change.

``corpus.txt``
    One short passage (one or two simple sentences) per line about invented
    places, people and objects, for tokenizer training and text-completion
    or watermarking experiments. It deliberately does not mention the people
    of ``fictitious_facts.jsonl``, so a model trained on the corpus has no
    prior knowledge of the forget set.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's lit_align, whatever is installed
from lit_align.data.tiny_ranked import build_ranked_preferences  # noqa: E402

SEED = 20240611
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lit_align" / "data" / "builtin"

Record = dict[str, Any]

# --------------------------------------------------------------------------- pools

# fmt: off
WORDS = [
    "lamp", "river", "stone", "apple", "cloud", "bread", "chair", "green",
    "house", "light", "music", "paper", "plant", "queen", "sugar", "table",
    "train", "water", "bird", "book", "cake", "door", "fish", "frog", "gold",
    "hand", "kite", "leaf", "moon", "nest", "rain", "ring", "rose", "salt",
    "ship", "snow", "star", "tree", "wind", "wolf", "milk", "bell", "coin",
    "drum", "hat", "jam", "key", "map", "garden", "candle", "window",
    "pencil", "basket", "forest", "spoon", "tiger", "bridge", "ladder",
    "button", "castle",
]

COUNTRY_CAPITALS = [
    ("Veloria", "Quessel"), ("Tarnish", "Olvandra"), ("Brevania", "Pirn"),
    ("Ostmark", "Caldreth"), ("Lumeria", "Vostelle"), ("Kestovia", "Marrowby"),
    ("Zandor", "Tesk"), ("Elbrania", "Fennick"), ("Drovenia", "Halcombe"),
    ("Sorvale", "Ibrin"), ("Quintara", "Morwick"), ("Falcria", "Nettleby"),
    ("Gildoria", "Ashport"), ("Ulmsted", "Karnow"), ("Pellavia", "Rosquin"),
    ("Norrith", "Dunmere"), ("Yavenna", "Coldbrook"), ("Merovane", "Spindle"),
    ("Istravia", "Wenlow"), ("Corvania", "Brightwater"),
]

COLOURS = [
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "teal",
    "brown", "pink",
]

OBJECT_COLOURS = [
    ("zembleberry", "purple"), ("glimmerstone", "blue"), ("frondel", "green"),
    ("quillop", "yellow"), ("marrowfig", "red"), ("tuskweed", "brown"),
    ("pellicorn", "silver"), ("dazzleplum", "orange"), ("snorlbean", "pink"),
    ("wobblenut", "teal"), ("krindlepod", "yellow"), ("bramblefly", "red"),
    ("sunderleaf", "orange"), ("mistcap", "silver"), ("jorvel", "green"),
    ("plinkshell", "pink"), ("gossamite", "blue"), ("tumblerose", "purple"),
    ("vexroot", "brown"), ("nimbleweed", "teal"), ("cobblefruit", "red"),
    ("fizzlewort", "green"), ("hollowgem", "blue"), ("lanternmoss", "yellow"),
]

FIRST_NAMES = [
    "Mira", "Tovin", "Kessa", "Orlen", "Valis", "Idra", "Bram", "Sefa",
    "Lunor", "Petrik", "Ansel", "Corra", "Dovan", "Elsin", "Faro", "Gwenna",
    "Halvar", "Ilsa", "Jorah", "Kalen", "Liora", "Maddox", "Nerys", "Oskan",
    "Pella", "Quill", "Rhosyn", "Savin", "Talia", "Ulric", "Vesna", "Wren",
    "Yorrin", "Zelda", "Ardo", "Brisa", "Cato", "Delphine", "Emrys", "Fenna",
]

SURNAMES = [
    "Tolvane", "Quorris", "Halvenet", "Brisketh", "Marrow", "Castellan",
    "Denbrook", "Ellory", "Farrowby", "Gallant", "Hesketh", "Ironwood",
    "Jessamy", "Kettleby", "Lorne", "Merriweather", "Norwood", "Ostrander",
    "Pemberly", "Quenby", "Ravensholt", "Stelling", "Thornquist", "Umberly",
    "Vantreese", "Whitlock", "Yarrow", "Zellweger", "Ashdown", "Blackmere",
    "Coldwell", "Dunstan", "Everhart", "Fairweather", "Greaves", "Hollis",
    "Inglewood", "Juniper", "Kingsley", "Larkspur",
]

# Names for the corpus and the greeting preferences; disjoint from the
# fictitious people so that no other file mentions them.
OTHER_NAMES = [
    "Tamsin", "Borin", "Ysolde", "Garrick", "Nell", "Odo", "Pim", "Rika",
    "Sten", "Una", "Vero", "Wilf", "Xan", "Yara", "Zeb", "Alma", "Bex",
    "Cyra", "Dag", "Esme", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kip",
    "Lark", "Milo", "Nia", "Otto", "Rolf", "Sage",
]

CITIES = [
    "Quessel", "Marrowby", "Tesk", "Olvandra", "Pirn", "Caldreth", "Vostelle",
    "Fennick", "Halcombe", "Ibrin", "Morwick", "Nettleby", "Ashport", "Karnow",
    "Rosquin", "Dunmere", "Coldbrook", "Spindle", "Wenlow", "Brightwater",
    "Elmsreach", "Gorran", "Lisket", "Hartwell",
]

PROFESSIONS = [
    "baker", "cartographer", "glassblower", "beekeeper", "clockmaker",
    "astronomer", "potter", "violinist", "librarian", "shipwright", "weaver",
    "botanist", "chemist", "lighthouse keeper", "tailor", "architect",
    "engineer", "illustrator", "orchard farmer", "stonemason",
]

FOODS = [
    "plum soup", "barley bread", "honey cake", "roasted carrots",
    "mushroom pie", "lentil stew", "apple tart", "grilled fish",
    "pumpkin soup", "cheese dumplings", "rice pudding", "pear jam",
]

BOOK_ADJECTIVES = [
    "Silent", "Golden", "Hidden", "Last", "Crooked", "Frozen", "Distant",
    "Burning", "Quiet", "Wandering",
]

BOOK_NOUNS = [
    "Harbor", "Lantern", "Orchard", "Clockwork", "Meadow", "Tower", "River",
    "Garden", "Compass", "Winter",
]

AWARDS = [
    "the Quessel Prize for Fiction", "the Silver Quill Award",
    "the Brightwater Medal", "the Golden Lantern Prize",
    "the Morwick Award for Science", "the Halcombe Prize for Poetry",
    "the Iron Compass Award", "the Tesk Medal of Honour",
    "the Ashport Craft Prize", "the Vostelle Award for Music",
]

PARENTS = ["mother", "father"]

RUDE_REPLIES = [
    "Figure it out yourself.",
    "What a silly question. Ask someone else.",
    "I am not going to waste my time on that.",
]

EVASIVE_REPLIES = [
    "I would rather not say.",
    "That is hard to know. Who can tell?",
    "It depends on many things, so I cannot answer.",
]

ALPHABET = string.ascii_uppercase
# fmt: on

# --------------------------------------------------------------------------- helpers


def article(noun: str) -> str:
    """Return ``noun`` preceded by the indefinite article "a" or "an"."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def take_unique(rng: random.Random, make: Callable[[random.Random], Record], n: int, key: str) -> list[Record]:
    """Draw records from ``make`` until ``n`` have distinct ``record[key]``.

    Raises ``RuntimeError`` if ``make`` cannot produce enough distinct records.
    """
    seen: dict[str, None] = {}
    records: list[Record] = []
    for _ in range(1000 * n):
        record = make(rng)
        if record[key] not in seen:
            seen[record[key]] = None
            records.append(record)
            if len(records) == n:
                return records
    raise RuntimeError(f"could not draw {n} records with distinct {key!r} from {make.__name__}")


def write_jsonl(path: Path, records: Sequence[Record]) -> None:
    """Write ``records`` to ``path``, one compact JSON object per line."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- instructions


def _addition(rng: random.Random) -> Record:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}


def _subtraction(rng: random.Random) -> Record:
    a = rng.randint(2, 30)
    b = rng.randint(1, a - 1)
    return {"prompt": f"What is {a} minus {b}?", "response": f"{a} minus {b} is {a - b}."}


def _reverse(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return {"prompt": f'Reverse the word "{w}".', "response": f'The word "{w}" reversed is "{w[::-1]}".'}


def _spell(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return {"prompt": f'Spell the word "{w}".', "response": f'"{w}" is spelled {"-".join(w.upper())}.'}


def _capital(rng: random.Random) -> Record:
    country, capital = rng.choice(COUNTRY_CAPITALS)
    prompt = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."])
    return {"prompt": prompt, "response": f"The capital of {country} is {capital}."}


def _object_colour(rng: random.Random) -> Record:
    obj, colour = rng.choice(OBJECT_COLOURS)
    prompt = rng.choice([f"What colour is {article(obj)}?", f"Tell me the colour of {article(obj)}."])
    return {"prompt": prompt, "response": f"{article(obj).capitalize()} is {colour}."}


def _comparison(rng: random.Random) -> Record:
    a, b = rng.sample(range(1, 100), 2)
    if rng.random() < 0.5:
        return {"prompt": f"Which is larger, {a} or {b}?", "response": f"{max(a, b)} is larger than {min(a, b)}."}
    return {"prompt": f"Which is smaller, {a} or {b}?", "response": f"{min(a, b)} is smaller than {max(a, b)}."}


def _first_letters(rng: random.Random) -> Record:
    n = rng.randint(2, 15)
    if rng.random() < 0.5:
        return {"prompt": f"List the first {n} letters of the alphabet.", "response": ", ".join(ALPHABET[:n]) + "."}
    return {"prompt": f"List the last {n} letters of the alphabet.", "response": ", ".join(ALPHABET[-n:]) + "."}


def _counting(rng: random.Random) -> Record:
    a = rng.randint(1, 30)
    b = a + rng.randint(2, 6)
    return {"prompt": f"Count from {a} to {b}.", "response": ", ".join(str(i) for i in range(a, b + 1)) + "."}


def _uppercase(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return {"prompt": f'Write "{w}" in capital letters.', "response": f'"{w}" in capital letters is "{w.upper()}".'}


def _word_length(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return {"prompt": f'How many letters are in the word "{w}"?', "response": f'The word "{w}" has {len(w)} letters.'}


def _parity(rng: random.Random) -> Record:
    n = rng.randint(1, 99)
    return {"prompt": f"Is {n} even or odd?", "response": f"{n} is {'even' if n % 2 == 0 else 'odd'}."}


INSTRUCTION_FAMILIES: list[Callable[[random.Random], Record]] = [
    _addition,
    _subtraction,
    _reverse,
    _spell,
    _capital,
    _object_colour,
    _comparison,
    _first_letters,
    _counting,
    _uppercase,
    _word_length,
    _parity,
]
INSTRUCTIONS_PER_FAMILY = 25


def build_instructions(seed: int) -> list[Record]:
    """Return 300 instruction records, shuffled across families."""
    rng = random.Random(seed)
    records: list[Record] = []
    for family in INSTRUCTION_FAMILIES:
        records.extend(take_unique(rng, family, INSTRUCTIONS_PER_FAMILY, "prompt"))
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------- preferences

# Each preference family returns (prompt, correct answer, wrong answer of the same shape).
PreferenceItem = tuple[str, str, str]


def _offset(rng: random.Random, value: int, low: int = 0) -> int:
    """Return an integer close to but different from ``value`` and ``>= low``."""
    while True:
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3])
        if wrong >= low:
            return wrong


def _pref_addition(rng: random.Random) -> PreferenceItem:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {_offset(rng, a + b)}."


def _pref_subtraction(rng: random.Random) -> PreferenceItem:
    a = rng.randint(2, 30)
    b = rng.randint(1, a - 1)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", f"{a} minus {b} is {_offset(rng, a - b)}."


def _pref_multiplication(rng: random.Random) -> PreferenceItem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", f"{a} times {b} is {_offset(rng, a * b)}."


def _pref_capital(rng: random.Random) -> PreferenceItem:
    (country, capital), (_, other) = rng.sample(COUNTRY_CAPITALS, 2)
    return (
        rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
        f"The capital of {country} is {capital}.",
        f"The capital of {country} is {other}.",
    )


def _pref_colour(rng: random.Random) -> PreferenceItem:
    obj, colour = rng.choice(OBJECT_COLOURS)
    wrong = rng.choice([c for c in COLOURS if c != colour])
    head = article(obj).capitalize()
    prompt = rng.choice([f"What colour is {article(obj)}?", f"Tell me the colour of {article(obj)}."])
    return prompt, f"{head} is {colour}.", f"{head} is {wrong}."


def _pref_comparison(rng: random.Random) -> PreferenceItem:
    a, b = rng.sample(range(1, 100), 2)
    hi, lo = max(a, b), min(a, b)
    return f"Which is larger, {a} or {b}?", f"{hi} is larger than {lo}.", f"{lo} is larger than {hi}."


def _pref_parity(rng: random.Random) -> PreferenceItem:
    n = rng.randint(1, 99)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return f"Is {n} even or odd?", f"{n} is {right}.", f"{n} is {wrong}."


def _pref_word_length(rng: random.Random) -> PreferenceItem:
    w = rng.choice(WORDS)
    return (
        f'How many letters are in the word "{w}"?',
        f'The word "{w}" has {len(w)} letters.',
        f'The word "{w}" has {_offset(rng, len(w), low=1)} letters.',
    )


def _pref_reverse(rng: random.Random) -> PreferenceItem:
    w = rng.choice(WORDS)
    letters = list(w[::-1])
    i = rng.randrange(len(letters) - 1)
    letters[i], letters[i + 1] = letters[i + 1], letters[i]
    wrong = "".join(letters)
    if wrong == w[::-1]:  # swapping two equal letters changes nothing
        wrong = w
    return (
        f'Reverse the word "{w}".',
        f'The word "{w}" reversed is "{w[::-1]}".',
        f'The word "{w}" reversed is "{wrong}".',
    )


def _pref_greeting(rng: random.Random) -> PreferenceItem:
    name, other = rng.sample(OTHER_NAMES, 2)
    return (
        f"Hello, my name is {name}.",
        f"Hello, {name}! It is nice to meet you.",
        f"Hello, {other}! It is nice to meet you.",
    )


PREFERENCE_FAMILIES: list[Callable[[random.Random], PreferenceItem]] = [
    _pref_addition,
    _pref_subtraction,
    _pref_multiplication,
    _pref_capital,
    _pref_colour,
    _pref_comparison,
    _pref_parity,
    _pref_word_length,
    _pref_reverse,
    _pref_greeting,
]
PREFERENCES_PER_FAMILY = 30


def build_preferences(seed: int) -> list[Record]:
    """Return 300 preference records, shuffled across families.

    Within each family the first half of the records get a wrong-fact
    rejection, the next quarter a rude one and the last quarter an evasive one.
    """
    rng = random.Random(seed)
    records: list[Record] = []
    for family in PREFERENCE_FAMILIES:

        def make(r: random.Random, family: Callable[[random.Random], PreferenceItem] = family) -> Record:
            prompt, chosen, wrong = family(r)
            return {"prompt": prompt, "chosen": chosen, "rejected": wrong}

        items = take_unique(rng, make, PREFERENCES_PER_FAMILY, "prompt")
        n_wrong = PREFERENCES_PER_FAMILY // 2
        n_rude = (PREFERENCES_PER_FAMILY - n_wrong) // 2
        for i, item in enumerate(items):
            if n_wrong <= i < n_wrong + n_rude:
                item["rejected"] = rng.choice(RUDE_REPLIES)
            elif i >= n_wrong + n_rude:
                item["rejected"] = rng.choice(EVASIVE_REPLIES)
        records.extend(items)
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------- fictitious facts

# attribute -> (question, answer, paraphrased question, paraphrased answer) templates.
# ``{name}`` is the person, ``{value}`` the fact and ``{parent}`` "mother" or "father".
FACT_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in {value}.",
        "In which city was {name} born?",
        "The birthplace of {name} is {value}.",
    ),
    "birth_year": (
        "In what year was {name} born?",
        "{name} was born in {value}.",
        "What is the birth year of {name}?",
        "The birth year of {name} is {value}.",
    ),
    "profession": (
        "What is {name}'s profession?",
        "{name} works as {value}.",
        "What does {name} do for a living?",
        "{name} earns a living as {value}.",
    ),
    "favourite_colour": (
        "What is {name}'s favourite colour?",
        "{name}'s favourite colour is {value}.",
        "Which colour does {name} like best?",
        "The colour {name} likes best is {value}.",
    ),
    "favourite_food": (
        "What is {name}'s favourite food?",
        "{name}'s favourite food is {value}.",
        "Which dish does {name} enjoy most?",
        "The dish {name} enjoys most is {value}.",
    ),
    "parent_profession": (
        "What did {name}'s {parent} do for a living?",
        "{name}'s {parent} was {value}.",
        "What was the profession of {name}'s {parent}?",
        "The {parent} of {name} worked as {value}.",
    ),
    "book": (
        "What is the title of a book written by {name}?",
        '{name} wrote the book "{value}".',
        "Can you name a book that {name} wrote?",
        'One book by {name} is "{value}".',
    ),
    "award": (
        "Which award did {name} receive?",
        "{name} received {value}.",
        "What award was given to {name}?",
        "{name} was given {value}.",
    ),
}
ALWAYS_ASKED = ["birthplace", "profession"]
N_PEOPLE = 40
QUESTIONS_PER_PERSON = 5
N_PERTURBED = 4


def _attribute_pools() -> dict[str, list[str]]:
    """Return the candidate values of every attribute, in a fixed order."""
    professions = [article(p) for p in PROFESSIONS]
    return {
        "birthplace": list(CITIES),
        "birth_year": [str(y) for y in range(1920, 2000)],
        "profession": professions,
        "favourite_colour": list(COLOURS),
        "favourite_food": list(FOODS),
        "parent_profession": professions,
        "book": [f"The {a} {n}" for a in BOOK_ADJECTIVES for n in BOOK_NOUNS],
        "award": list(AWARDS),
    }


def build_people(seed: int) -> list[Record]:
    """Return ``N_PEOPLE`` invented people with all eight attributes."""
    rng = random.Random(seed)
    pools = _attribute_pools()
    names = [f"{first} {last}" for first, last in zip(FIRST_NAMES, rng.sample(SURNAMES, N_PEOPLE), strict=True)]
    books = rng.sample(pools["book"], N_PEOPLE)  # every person wrote a different book
    people: list[Record] = []
    for person_id, name in enumerate(names):
        facts = {attr: rng.choice(pool) for attr, pool in pools.items() if attr != "book"}
        facts["book"] = books[person_id]
        people.append({"person_id": person_id, "name": name, "parent": rng.choice(PARENTS), "facts": facts})
    return people


def build_fictitious_facts(seed: int) -> list[Record]:
    """Return ``N_PEOPLE * QUESTIONS_PER_PERSON`` question records."""
    rng = random.Random(seed)
    pools = _attribute_pools()
    optional = [attr for attr in FACT_TEMPLATES if attr not in ALWAYS_ASKED]
    records: list[Record] = []
    for person in build_people(seed + 1):
        extra = rng.sample(optional, QUESTIONS_PER_PERSON - len(ALWAYS_ASKED))
        asked = [attr for attr in FACT_TEMPLATES if attr in ALWAYS_ASKED or attr in extra]
        for attr in asked:
            value = person["facts"][attr]
            q, a, pq, pa = FACT_TEMPLATES[attr]

            def fill(template: str, fact: str, person: Record = person) -> str:
                return template.format(name=person["name"], parent=person["parent"], value=fact)

            wrong_values = rng.sample([v for v in pools[attr] if v != value], N_PERTURBED)
            records.append(
                {
                    "id": len(records),
                    "person_id": person["person_id"],
                    "person": person["name"],
                    "question": fill(q, value),
                    "answer": fill(a, value),
                    "paraphrased_question": fill(pq, value),
                    "paraphrased_answer": fill(pa, value),
                    "perturbed_answers": [fill(pa, wrong) for wrong in wrong_values],
                }
            )
    return records


def build_splits(seed: int, n_people: int) -> dict[str, list[int]]:
    """Return nested forget splits covering about 1%, 5% and 10% of the people."""
    order = list(range(n_people))
    random.Random(seed).shuffle(order)
    return {
        name: sorted(order[: max(1, round(n_people * fraction))])
        for name, fraction in (("forget01", 0.01), ("forget05", 0.05), ("forget10", 0.10))
    }


# --------------------------------------------------------------------------- corpus

CORPUS_PLACES = ["market", "harbor", "library", "bakery", "garden", "bridge", "school", "square", "mill", "station"]
CORPUS_TIMES = ["morning", "evening", "spring", "winter", "summer", "autumn"]
CORPUS_WEATHER = ["rain", "snow", "fog", "wind", "sunshine"]
CORPUS_FEELINGS = ["happy", "tired", "calm", "curious", "proud"]
CORPUS_SIZE = 400


def _corpus_passage(rng: random.Random) -> str:
    """Return one short templated passage about invented places, people or objects."""
    name, friend = rng.sample(OTHER_NAMES, 2)
    city = rng.choice(CITIES)
    country, capital = rng.choice(COUNTRY_CAPITALS)
    obj, colour = rng.choice(OBJECT_COLOURS)
    place = rng.choice(CORPUS_PLACES)
    time = rng.choice(CORPUS_TIMES)
    templates = [
        f"{capital} is the capital of {country}. Many people visit it in the {time}.",
        f"{name} found {article(obj)} near the {place} in {city}. It was {colour}.",
        f"In {city}, the {place} is busy in the {time}.",
        f"{name} walked to the {place} in {city} and bought {rng.choice(FOODS)}.",
        f"The old {place} in {city} was built in {rng.randint(1700, 1990)}.",
        f"{name} is {article(rng.choice(PROFESSIONS))} who lives in {city}.",
        f"{article(obj).capitalize()} is always {colour}, even after the {rng.choice(CORPUS_WEATHER)}.",
        f"There was {rng.choice(CORPUS_WEATHER)} in {city} this {time}, so {name} stayed home.",
        f"{name} felt {rng.choice(CORPUS_FEELINGS)} after reading a book in the {place}.",
        f"The road from {city} to {capital} passes {article(colour)} {place}.",
        f"{name} keeps {rng.randint(2, 12)} {obj}s in {article(colour)} basket.",
        f"Every {time}, {name} and {friend} meet at the {place}.",
    ]
    return rng.choice(templates)


def build_corpus(seed: int) -> list[str]:
    """Return ``CORPUS_SIZE`` distinct passages, one per line."""
    rng = random.Random(seed)
    lines: dict[str, None] = {}
    while len(lines) < CORPUS_SIZE:
        lines.setdefault(_corpus_passage(rng), None)
    return list(lines)


# --------------------------------------------------------------------------- main


def build_all(out: Path) -> None:
    """Generate every built-in file into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "instructions.jsonl", build_instructions(SEED))
    write_jsonl(out / "preferences.jsonl", build_preferences(SEED + 10))
    ranked = build_ranked_preferences(SEED + 50)
    (out / "ranked_preferences.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in ranked) + "\n]\n",
                                                 encoding="utf-8")
    facts = build_fictitious_facts(SEED + 20)
    write_jsonl(out / "fictitious_facts.jsonl", facts)
    n_people = len({r["person_id"] for r in facts})
    splits = build_splits(SEED + 30, n_people)
    (out / "fictitious_facts_splits.json").write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
    (out / "corpus.txt").write_text("\n".join(build_corpus(SEED + 40)) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    build_all(args.out)


if __name__ == "__main__":
    main()
