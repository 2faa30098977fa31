"""Wall-clock time per phase of a step, accumulated, logged as ``time/<phase>``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """``with timer("generate"): ...`` adds the block's seconds to the phase's total; a phase entered twice in
    a step (each player's ``update``, a rollout per round) counts both. :meth:`metrics` reads the totals as
    ``{"time/<phase>": seconds}`` and :meth:`reset` starts the next step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """The totals since the last :meth:`reset`, keyed ``<prefix><phase>``."""
        return {f"{prefix}{phase}": seconds for phase, seconds in self.totals.items()}

    def reset(self) -> None:
        self.totals = {}
