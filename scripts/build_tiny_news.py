"""Write the built-in tiny news set ``builtin:tiny_news`` (``tiny_news_train.json``, ``tiny_news_test.json``).

Run from the repository root::

    python scripts/build_tiny_news.py              # writes lit_align/data/builtin
    python scripts/build_tiny_news.py --out DIR    # writes DIR instead

Toy local news about invented towns, for the summarisation harness (others.md §10) on CPU: each article has 3-6
sentences (what happened, where and when; who did it; a quote; optional details), and its reference summary has
one to three newline-separated sentences (the CNN/DailyMail highlights layout) that paraphrase the lead. Every
town, person and event is made up. Each (town, event) pair occurs once, so no test article repeats a training one.

Deterministic (one ``random.Random`` seeded with a fixed string, sorted choices): reruns write byte-identical files.
The ``.json`` files are not read by ``scripts/build_tokenizer.py`` (it reads a fixed list of ``.jsonl`` files).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "lit_align" / "data" / "builtin"
SEED = "tiny-news-v1"
TRAIN, TEST = 24, 24

TOWNS = ["Elderford", "Quillon Bay", "Marrowdale", "Tessby", "Wrenfield", "Dunmere", "Ashcombe", "Pellham Cross",
         "Brackenwick", "Lowmarsh", "Fennick", "Orrinton"]
FIRST = ["Ada", "Bram", "Cora", "Dev", "Esme", "Felix", "Gwen", "Hugo", "Iris", "Jonah", "Kit", "Lena", "Milo",
         "Nora", "Otto", "Priya"]
LAST = ["Hollis", "Marsh", "Quennell", "Thorne", "Abbott", "Larkin", "Pennock", "Vale", "Oakes", "Rudd"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

#: One event family: a lead and its paraphrase, the actor's role, the actor's sentence, quotes and extra details.
#: Slots: {town}, {day}, {n} (a count), {person} (full name), {role}.
EVENTS: dict[str, dict] = {
    "bridge": {
        "role": "the town engineer",
        "lead": "The old stone bridge in {town} reopened to traffic on {day} after eight months of repairs.",
        "summary": "{town}'s stone bridge is open again after eight months of repair work.",
        "actor": "{person}, {role}, cut a ribbon as the first cars crossed the river.",
        "quotes": ["We replaced every cracked stone by hand", "The bridge should last another hundred years"],
        "details": ["About {n} drivers used the bridge in the first hour.",
                    "The repairs were paid for by a regional grant.",
                    "A weight limit for lorries will stay in place until spring."],
        "extra_summary": "About {n} drivers crossed it in the first hour.",
    },
    "festival": {
        "role": "the festival organiser",
        "lead": "Thousands of visitors filled the streets of {town} on {day} for the annual lantern festival.",
        "summary": "{town}'s yearly lantern festival drew thousands of visitors.",
        "actor": "{person}, {role}, said volunteers had made {n} paper lanterns this year.",
        "quotes": ["The whole town comes together for one night", "The children's parade was the best we have had"],
        "details": ["Food stalls lined the harbour road until midnight.",
                    "A brass band played on the market square.",
                    "Organisers said the rain held off just in time."],
        "extra_summary": "Volunteers made {n} paper lanterns.",
    },
    "flood": {
        "role": "the fire chief",
        "lead": "Heavy rain flooded the lower streets of {town} on {day}, forcing families to leave their homes.",
        "summary": "Floods in {town} forced families out of their homes.",
        "actor": "{person}, {role}, said crews pumped water out of {n} houses overnight.",
        "quotes": ["The river rose faster than anyone expected", "Nobody was hurt, and that is what matters"],
        "details": ["The school hall was opened as a shelter.",
                    "Sandbags were handed out at the railway station.",
                    "Forecasters expect drier weather later in the week."],
        "extra_summary": "Crews pumped water from {n} houses.",
    },
    "library": {
        "role": "the head librarian",
        "lead": "{town} opened a new public library on {day}, the first in the town for fifty years.",
        "summary": "{town} has a new public library, its first in fifty years.",
        "actor": "{person}, {role}, welcomed {n} readers through the doors on the first morning.",
        "quotes": ["A library is a living room for the whole town", "We already have a waiting list for the reading club"],
        "details": ["The building was once a grain store.",
                    "It has a children's corner and a small cafe.",
                    "The library will stay open late on Thursdays."],
        "extra_summary": "{n} readers visited on the first morning.",
    },
    "school": {
        "role": "the science teacher",
        "lead": "Pupils from {town} Secondary School won the regional robotics contest on {day}.",
        "summary": "A {town} school team won the regional robotics contest.",
        "actor": "{person}, {role}, coached the team of {n} pupils for six months.",
        "quotes": ["They built the robot from spare parts", "I have never seen a team work so hard"],
        "details": ["Their robot sorted coloured blocks faster than any other entry.",
                    "The team will compete in the national final next month.",
                    "The prize includes new equipment for the school workshop."],
        "extra_summary": "The team of {n} pupils now goes to the national final.",
    },
    "storm": {
        "role": "the harbour master",
        "lead": "A storm knocked down trees and power lines across {town} on {day}.",
        "summary": "A storm brought down trees and power lines in {town}.",
        "actor": "{person}, {role}, said {n} boats were moved to safety before the wind arrived.",
        "quotes": ["We had a few hours of warning and used every minute", "The sea wall did its job"],
        "details": ["Some homes were without electricity until the evening.",
                    "The coast road was closed for most of the day.",
                    "Volunteers cleared branches from the park by nightfall."],
        "extra_summary": "{n} boats were moved to safety beforehand.",
    },
    "bakery": {
        "role": "the owner",
        "lead": "A small bakery in {town} was named the best bakery in the county on {day}.",
        "summary": "A {town} bakery won the county's best bakery prize.",
        "actor": "{person}, {role}, said the shop bakes {n} loaves before sunrise every day.",
        "quotes": ["My grandmother's recipe did most of the work", "Our customers deserve the credit"],
        "details": ["The judges praised its rye bread and honey buns.",
                    "A queue formed outside the shop within an hour of the news.",
                    "The bakery opened twelve years ago in a former post office."],
        "extra_summary": "It bakes {n} loaves every morning.",
    },
    "marathon": {
        "role": "the race director",
        "lead": "Runners raced through {town} on {day} in the town's first marathon.",
        "summary": "{town} held its first marathon.",
        "actor": "{person}, {role}, said {n} runners crossed the finish line.",
        "quotes": ["The hills were hard, but the crowds kept everyone going", "We want to make this a yearly event"],
        "details": ["The winner finished in just under three hours.",
                    "Money raised will go to the local hospice.",
                    "Several roads were closed until the afternoon."],
        "extra_summary": "{n} runners finished the race.",
    },
    "bus": {
        "role": "a council member",
        "lead": "A new bus route linking {town} to the county hospital started running on {day}.",
        "summary": "A new bus now connects {town} with the county hospital.",
        "actor": "{person}, {role}, said the buses will run {n} times a day.",
        "quotes": ["Patients no longer need a car to reach their appointments", "People asked for this route for years"],
        "details": ["Tickets cost the same as on other town routes.",
                    "The buses are electric and are charged at the depot overnight.",
                    "A trial period will last until the end of the year."],
        "extra_summary": "Buses will run {n} times a day.",
    },
    "fire": {
        "role": "the fire chief",
        "lead": "Firefighters put out a fire at an empty warehouse in {town} on {day}.",
        "summary": "Firefighters put out a warehouse fire in {town}.",
        "actor": "{person}, {role}, said {n} firefighters worked through the night.",
        "quotes": ["The building was empty, so no one was in danger", "We kept the flames away from the houses nearby"],
        "details": ["The cause of the fire is not yet known.",
                    "Smoke could be seen from the next valley.",
                    "The owner plans to rebuild the warehouse."],
        "extra_summary": "{n} firefighters worked overnight.",
    },
    "museum": {
        "role": "the museum curator",
        "lead": "The {town} museum opened an exhibition of old maps of the coast on {day}.",
        "summary": "{town}'s museum has opened an exhibition of old coastal maps.",
        "actor": "{person}, {role}, said the exhibition shows {n} maps, some three hundred years old.",
        "quotes": ["These maps show how much the coastline has changed", "Families keep finding their own street"],
        "details": ["Entry is free for children.",
                    "Several maps were lent by local families.",
                    "The exhibition runs until the summer."],
        "extra_summary": "It shows {n} maps.",
    },
    "dog": {
        "role": "a coastguard volunteer",
        "lead": "A dog stranded on a sandbank off {town} was rescued on {day}.",
        "summary": "A dog stuck on a sandbank near {town} was rescued.",
        "actor": "{person}, {role}, reached the dog by boat after a search of {n} minutes.",
        "quotes": ["He was cold and very happy to see us", "The tide comes in fast on that bank"],
        "details": ["The dog had chased a ball across the sand at low tide.",
                    "Its owners were waiting on the beach.",
                    "The coastguard reminded walkers to check the tide times."],
        "extra_summary": "Rescuers searched for {n} minutes.",
    },
}


def _article(rng: random.Random, town: str, event: str, spec: dict) -> tuple[str, str]:
    """One article and its reference summary (newline-separated sentences)."""
    slots = {"town": town, "day": rng.choice(DAYS), "n": rng.randint(12, 480), "role": spec["role"],
             "person": f"{rng.choice(FIRST)} {rng.choice(LAST)}"}
    quote = rng.choice(spec["quotes"])
    sentences = [spec["lead"], spec["actor"], f'"{quote}," said {slots["person"].split()[-1]}.']
    n_details = rng.randint(0, 3)
    sentences += rng.sample(spec["details"], n_details)
    article = " ".join(s.format(**slots) for s in sentences)
    summary = [spec["summary"].format(**slots)]
    if rng.random() < 0.6:
        summary.append(spec["extra_summary"].format(**slots))
    if rng.random() < 0.3:
        summary.append(f"{slots['person']} said: \"{quote}.\"")
    return article, "\n".join(summary)


def build_tiny_news() -> dict[str, list[dict[str, str]]]:
    """The two splits: ``{"train": [...], "test": [...]}``, records ``{"id", "event", "article", "reference"}``."""
    rng = random.Random(SEED)
    pairs = [(town, event) for town in TOWNS for event in sorted(EVENTS)]
    pairs = rng.sample(pairs, TRAIN + TEST)
    rows = []
    for town, event in pairs:
        article, reference = _article(rng, town, event, EVENTS[event])
        rows.append({"event": event, "article": article, "reference": reference})
    splits = {"train": rows[:TRAIN], "test": rows[TRAIN:]}
    return {split: [{"id": f"tiny-news-{split}-{i:02d}", **row} for i, row in enumerate(records)]
            for split, records in splits.items()}


def write(out: Path) -> list[Path]:
    """Write ``tiny_news_<split>.json`` into ``out`` (created if missing); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in build_tiny_news().items():
        path = out / f"tiny_news_{split}.json"
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    for path in write(parser.parse_args(argv).out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
