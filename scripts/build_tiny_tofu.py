"""Train the bundled tiny TOFU models with the repo's own SFT config (``configs/sft/tiny_tofu.yaml``).

Run from the repository root::

    python scripts/build_tiny_tofu.py             # writes lit_align/models/assets/tiny-tofu-{full,retain90}
    python scripts/build_tiny_tofu.py --out DIR

* ``tiny-tofu-full``: fine-tuned on all 200 fictitious-facts records; the starting point of every
  tiny unlearning config (``model.name_or_path: builtin:tiny-tofu-full``).
* ``tiny-tofu-retain90``: the same recipe on the ``retain90`` split only (the 36 people outside
  ``forget10``): the "retain-only" model that forget quality compares against.

Each takes about 40 s on two CPU cores. The models are small (about 2.5 MB each, float32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _tiny_sft import train_tiny_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sft" / "tiny_tofu.yaml"
MODELS = {"tiny-tofu-full": "builtin:fictitious_facts", "tiny-tofu-retain90": "builtin:fictitious_facts/retain90"}


def build(out: Path) -> None:
    for name, data in MODELS.items():
        target = out / name
        train_tiny_model(CONFIG, data, target)
        print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "lit_align" / "models" / "assets")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
