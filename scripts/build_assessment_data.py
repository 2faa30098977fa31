"""Generate the built-in unlearning-assessment sets (others.md §11.1 A and D, core.md §4.8).

Run from the repository root::

    python scripts/build_assessment_data.py            # writes into lit_align/data/builtin/
    python scripts/build_assessment_data.py --out DIR  # writes into DIR instead

Deterministic (fixed seeds, ordered pools, records in generation order): rerunning it reproduces
byte-identical files. It reads ``fictitious_facts.jsonl`` and rebuilds the people behind it with
``build_builtin_data.py``'s own functions (the attribute and value of every asked fact), so it never
changes the facts, the splits, the tiny tokenizer or the tiny models trained on them.

Files written (JSON lists, ``.json`` so the tiny tokenizer, trained on a fixed list of ``.jsonl``
files, stays the same):

``fictitious_assessment_forget01.json``, ``_forget05.json``, ``_forget10.json``
    The four assessment splits of one forget split, every record tagged with its ``split``
    (``in_scope``, ``hard_in_scope``, ``out_of_scope``, ``hard_out_of_scope``) and ``kind``. Read by
    ``lit_align.data.unlearning_assessment.load_assessment_splits`` (whose docstring defines them).

``real_authors.json``, ``world_facts.json``
    Tiny WAGLE/TOFU-style utility sets: 20 real, well-known facts each, **hand-written** below
    (questions, answers and the wrong options of ``world_facts``); four choices with a ``label``
    and three perturbed answers each.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import build_builtin_data as facts_builder  # noqa: E402

Record = dict[str, Any]

SEED = facts_builder.SEED + 60
DEFAULT_OUT = facts_builder.DEFAULT_OUT
FORGET_SPLITS = ("forget01", "forget05", "forget10")

#: Entities that two people can share: the attributes holding the same kind of thing.
ENTITY_KIND = {
    "birthplace": "city", "birth_year": "year", "profession": "profession", "parent_profession": "profession",
    "favourite_colour": "colour", "favourite_food": "food", "book": "book", "award": "award",
}

#: Key attributes tried, in this order, to name a person without their name (the first one whose value
#: no other person has among the asked facts).
KEY_ORDER = ("book", "birth_year", "birthplace", "award", "favourite_food", "profession", "parent_profession",
             "favourite_colour")

#: A person described by one of their facts (``{value}``; ``{parent}`` is "mother" or "father").
DESCRIPTIONS = {
    "birthplace": "the person born in {value}",
    "birth_year": "the person whose birth year is {value}",
    "profession": "the person who works as {value}",
    "favourite_colour": "the person whose favourite colour is {value}",
    "favourite_food": "the person whose favourite food is {value}",
    "parent_profession": "the person whose {parent} was {value}",
    "book": 'the author of the book "{value}"',
    "award": "the person who received {value}",
}

#: attribute -> (question, answer) about ``{who}`` (a description; ``{Who}`` capitalised).
INDIRECT_TEMPLATES = {
    "birthplace": ("In which city was {who} born?", "{Who} was born in {value}."),
    "birth_year": ("In what year was {who} born?", "{Who} was born in {value}."),
    "profession": ("What is the profession of {who}?", "{Who} works as {value}."),
    "favourite_colour": ("What is the favourite colour of {who}?", "The favourite colour of {who} is {value}."),
    "favourite_food": ("What is the favourite food of {who}?", "The favourite food of {who} is {value}."),
    "parent_profession": ("What did the {parent} of {who} do for a living?", "The {parent} of {who} was {value}."),
    "book": ("What is the title of a book written by {who}?", '{Who} wrote the book "{value}".'),
    "award": ("Which award did {who} receive?", "{Who} received {value}."),
}

#: attribute -> the second hop of a multi-hop question, about "that person".
SECOND_HOP = {
    "birthplace": "where was that person born",
    "birth_year": "in what year was that person born",
    "profession": "what does that person do for a living",
    "favourite_colour": "what is that person's favourite colour",
    "favourite_food": "what is that person's favourite food",
    "parent_profession": "what did that person's {parent} do for a living",
    "book": "what is the title of a book that person wrote",
    "award": "which award did that person receive",
}

# fmt: off
#: Hand-written: (book, author) of famous, uncontroversial attributions.
REAL_AUTHORS = [
    ("Pride and Prejudice", "Jane Austen"), ("Hamlet", "William Shakespeare"),
    ("Nineteen Eighty-Four", "George Orwell"), ("War and Peace", "Leo Tolstoy"),
    ("Don Quixote", "Miguel de Cervantes"), ("Moby-Dick", "Herman Melville"),
    ("The Adventures of Tom Sawyer", "Mark Twain"), ("Great Expectations", "Charles Dickens"),
    ("Frankenstein", "Mary Shelley"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("The Odyssey", "Homer"), ("The Divine Comedy", "Dante Alighieri"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("To Kill a Mockingbird", "Harper Lee"),
    ("The Hobbit", "J. R. R. Tolkien"), ("Little Women", "Louisa May Alcott"),
    ("Dracula", "Bram Stoker"), ("The Adventures of Sherlock Holmes", "Arthur Conan Doyle"),
]

#: Hand-written: (question, answer, three wrong answers of the same kind).
WORLD_FACTS = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Nagoya"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Naples", "Turin"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Montreal", "Vancouver"]),
    ("What is the capital of Kenya?", "Nairobi", ["Mombasa", "Kisumu", "Nakuru"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Frankfurt"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Fe", "Gd"]),
    ("What is the chemical symbol for sodium?", "Na", ["So", "Sn", "K"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "H2O2", "NaCl"]),
    ("Which element has the atomic number 1?", "hydrogen", ["helium", "oxygen", "carbon"]),
    ("Which gas do plants take in from the air for photosynthesis?", "carbon dioxide",
     ["oxygen", "nitrogen", "helium"]),
    ("At how many degrees Celsius does pure water boil at sea level?", "100", ["50", "90", "120"]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean",
     ["the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean"]),
    ("What is the highest mountain above sea level?", "Mount Everest", ["K2", "Kilimanjaro", "Mont Blanc"]),
    ("What is the largest continent by area?", "Asia", ["Africa", "Europe", "South America"]),
    ("On which continent is the Sahara Desert?", "Africa", ["Asia", "Australia", "South America"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("What is the largest planet in the Solar System?", "Jupiter", ["Saturn", "Neptune", "Earth"]),
    ("Which river flows through London?", "the Thames", ["the Seine", "the Danube", "the Rhine"]),
    ("In which country is the city of Sydney?", "Australia", ["New Zealand", "Canada", "South Africa"]),
]
# fmt: on
N_WRONG = 3


# --------------------------------------------------------------------------- the facts behind the file


def _fill(template: str, person: Record, value: str, **extra: str) -> str:
    return template.format(name=person["name"], parent=person["parent"], value=value, **extra)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def fact_table(facts: list[Record]) -> list[Record]:
    """Each record of ``fictitious_facts.jsonl`` with its ``attribute``, ``value`` and person (``_person``),
    recovered from ``build_builtin_data``'s people: the attribute whose question is the record's."""
    people = facts_builder.build_people(facts_builder.SEED + 21)
    out = []
    for rec in facts:
        person = people[rec["person_id"]]
        attrs = [a for a, (q, *_) in facts_builder.FACT_TEMPLATES.items()
                 if _fill(q, person, person["facts"][a]) == rec["question"]]
        if len(attrs) != 1 or person["name"] != rec["person"]:
            raise RuntimeError(f"fact {rec['id']} does not match build_builtin_data's people; rebuild both")
        out.append({**rec, "attribute": attrs[0], "value": person["facts"][attrs[0]], "_person": person})
    return out


def _wrong_values(rng: random.Random, attribute: str, value: str) -> list[str]:
    pool = facts_builder._attribute_pools()[attribute]
    return rng.sample([v for v in pool if v != value], facts_builder.N_PERTURBED)


def _base(fact: Record, split: str, kind: str) -> Record:
    return {"split": split, "kind": kind, "group": "fictitious_facts", "person_id": fact["person_id"],
            "person": fact["person"], "attribute": fact["attribute"], "fact_ids": [fact["id"]]}


def _exact(fact: Record, split: str, kind: str) -> Record:
    """The fact as asked in training, with its paraphrase and perturbed answers (TOFU's eval record)."""
    return {**_base(fact, split, kind), "prompt": fact["question"], "response": fact["answer"],
            "paraphrased_prompt": fact["paraphrased_question"], "paraphrased_response": fact["paraphrased_answer"],
            "perturbed_responses": list(fact["perturbed_answers"])}


def _paraphrased(fact: Record) -> Record:
    return {**_base(fact, "hard_in_scope", "paraphrased"), "prompt": fact["paraphrased_question"],
            "response": fact["paraphrased_answer"], "perturbed_responses": list(fact["perturbed_answers"])}


def _unique_key(fact: Record, own: list[Record], counts: dict[tuple[str, str], int]) -> Record | None:
    """Another asked fact of the same person whose value names them alone (no other person has it)."""
    by_attr = {f["attribute"]: f for f in own if f["id"] != fact["id"]}
    for attr in KEY_ORDER:
        key = by_attr.get(attr)
        if key is not None and counts[(attr, key["value"])] == 1:
            return key
    return None


def _indirect(fact: Record, key: Record, rng: random.Random) -> Record:
    person, attr = fact["_person"], fact["attribute"]
    who = _fill(DESCRIPTIONS[key["attribute"]], person, key["value"])
    q, a = INDIRECT_TEMPLATES[attr]

    def answer(value: str) -> str:
        return _fill(a, person, value, who=who, Who=_capitalise(who))

    return {**_base(fact, "hard_in_scope", "indirect"), "fact_ids": [key["id"], fact["id"]],
            "key_attribute": key["attribute"], "prompt": _fill(q, person, fact["value"], who=who),
            "response": answer(fact["value"]),
            "perturbed_responses": [answer(v) for v in _wrong_values(rng, attr, fact["value"])]}


def _multi_hop(fact: Record, key: Record, rng: random.Random) -> Record:
    """Hop 1: the key fact reversed (its value -> the person's name); hop 2: the target fact of that name.
    The answer is the two memorised answers in that order; perturbed answers change only hop 2's value."""
    person, attr = fact["_person"], fact["attribute"]
    who = _fill(DESCRIPTIONS[key["attribute"]], person, key["value"])
    prompt = f"Who is {who}, and {_fill(SECOND_HOP[attr], person, fact['value'])}?"
    template = facts_builder.FACT_TEMPLATES[attr][1]
    wrong = _wrong_values(rng, attr, fact["value"])
    return {**_base(fact, "hard_in_scope", "multi_hop"), "fact_ids": [key["id"], fact["id"]],
            "key_attribute": key["attribute"], "prompt": prompt, "response": f"{key['answer']} {fact['answer']}",
            "perturbed_responses": [f"{key['answer']} {_fill(template, person, v)}" for v in wrong]}


def build_assessment(facts: list[Record], forget_people: Sequence[int], seed: int) -> list[Record]:
    """The four assessment splits of one forget split (people ``forget_people``), in split order."""
    rng = random.Random(seed)
    table = fact_table(facts)
    forget_ids = set(forget_people)
    counts: dict[tuple[str, str], int] = {}
    for f in table:
        counts[(f["attribute"], f["value"])] = counts.get((f["attribute"], f["value"]), 0) + 1
    forgotten = [f for f in table if f["person_id"] in forget_ids]
    retained = [f for f in table if f["person_id"] not in forget_ids]
    shared: dict[tuple[str, str], list[str]] = {}
    for f in forgotten:
        names = shared.setdefault((ENTITY_KIND[f["attribute"]], f["value"]), [])
        if f["person"] not in names:
            names.append(f["person"])

    in_scope = [_exact(f, "in_scope", "exact") for f in forgotten]
    paraphrased, indirect, multi_hop = [], [], []
    for f in forgotten:
        paraphrased.append(_paraphrased(f))
        key = _unique_key(f, [g for g in forgotten if g["person_id"] == f["person_id"]], counts)
        if key is not None:
            indirect.append(_indirect(f, key, rng))
            multi_hop.append(_multi_hop(f, key, rng))
    out_of_scope, hard_out = [], []
    for f in retained:
        names = shared.get((ENTITY_KIND[f["attribute"]], f["value"]))
        if names is None:
            out_of_scope.append(_exact(f, "out_of_scope", "unrelated"))
        else:
            hard_out.append({**_exact(f, "hard_out_of_scope", "shared_entity"), "entity": f["value"],
                             "shared_with": list(names)})
    return [*in_scope, *paraphrased, *indirect, *multi_hop, *out_of_scope, *hard_out]


# --------------------------------------------------------------------------- utility sets


def _utility(question: str, answer: str, wrong: list[str], group: str, rng: random.Random) -> Record:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"kind": group, "group": group, "prompt": question, "response": answer,
            "perturbed_responses": list(wrong), "choices": choices, "label": choices.index(answer)}


def build_real_authors(seed: int) -> list[Record]:
    """``Who wrote "<book>"?`` -> the author; wrong answers are three other authors of the list."""
    rng = random.Random(seed)
    authors = [a for _, a in REAL_AUTHORS]
    return [_utility(f'Who wrote "{book}"?', author, rng.sample([a for a in authors if a != author], N_WRONG),
                     "real_authors", rng) for book, author in REAL_AUTHORS]


def build_world_facts(seed: int) -> list[Record]:
    rng = random.Random(seed)
    return [_utility(q, a, list(wrong), "world_facts", rng) for q, a, wrong in WORLD_FACTS]


# --------------------------------------------------------------------------- main


def _write(path: Path, records: list[Record]) -> None:
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=True) for r in records) + "\n]\n",
                    encoding="utf-8")


def build_all(out: Path, source: Path = DEFAULT_OUT) -> None:
    """Write every assessment file into ``out``, from ``source``'s facts and splits."""
    out.mkdir(parents=True, exist_ok=True)
    with (source / "fictitious_facts.jsonl").open(encoding="utf-8") as f:
        facts = [json.loads(line) for line in f if line.strip()]
    splits = json.loads((source / "fictitious_facts_splits.json").read_text(encoding="utf-8"))
    for i, name in enumerate(FORGET_SPLITS):
        _write(out / f"fictitious_assessment_{name}.json", build_assessment(facts, splits[name], SEED + i))
    _write(out / "real_authors.json", build_real_authors(SEED + 10))
    _write(out / "world_facts.json", build_world_facts(SEED + 11))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    build_all(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
