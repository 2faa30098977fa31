"""One seed derivation for every random draw of a run: a function of what the draw is, never of when or where.

A draw is named by ``(seed, step, purpose, index)``: the run's seed, the training step, what the draw is for
(``"sample"``, ``"shuffle"``, ``"pool"``...) and, for per-example draws, the example's *global* index in the
dataset. :func:`derive_seed` mixes them with :class:`numpy.random.SeedSequence` (a hash built for this), so
distinct names give independent streams: unlike ``seed * K + step * 4 + salt`` formulas, no two seeds, steps
or purposes can collide. Seeding each example from its global index makes sampling independent of the world
size and of how examples are batched (see :func:`row_generators` and the sampler's per-row generators), and
makes a resumed run draw exactly what an uninterrupted one would.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["derive_seed", "generator", "row_generators", "seeded_rng"]


def _purpose_code(purpose: str) -> int:
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"purpose must be a non-empty string naming what the draw is for, got {purpose!r}")
    return zlib.crc32(purpose.encode("utf-8"))  # stable across processes (unlike hash(str))


def derive_seed(seed: int, step: int, purpose: str, index: int | None = None) -> int:
    """A 63-bit seed for the draw named by ``(seed, step, purpose, index)`` (``index``: the example's global
    index for per-example draws, ``None`` for one draw per step)."""
    for name, value in (("seed", seed), ("step", step)) + ((("index", index),) if index is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"derive_seed: {name} must be an int >= 0, got {value!r}")
    entropy = [seed, step, _purpose_code(purpose), 0 if index is None else index + 1]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def generator(seed: int, step: int, purpose: str, index: int | None = None,
              device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, step, purpose, index))


def row_generators(seed: int, step: int, purpose: str, indices: Iterable[int],
                   device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per example, from its global index: what the sampler draws for an example is then the
    same on one rank or several and in any batch."""
    return [generator(seed, step, purpose, int(i), device) for i in indices]


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """The global torch generators seeded with ``seed`` for the block, and the CPU generator and ``device``'s
    (on CUDA) restored afterwards: for draws that can only come from the global generator (dropout, a model's
    initialisation), so they repeat exactly while the caller's stream is left as it was."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
