"""The adversary/defender game's report: curves over training and a table of sample attacks.

:class:`GameReport` reads what :class:`~lit_align.methods.AdversarialGameModule` records at each
validation (``val_history``: one row of ``val/...`` numbers per validation, ``val_samples``: seed,
attack prompt, answer, verdict and reward of a few held-out seeds) and writes, under ``dirpath``
(default ``trainer.log_dir``), after every validation and at the end of training:

* ``game_history.csv``: step and every validation metric (attack success rate on the raw seeds and
  on the attacker's prompts, harmlessness reward, attacker diversity, per-player KL);
* ``game_curves.png``: ASR and harmlessness over training (both prompt sources), and the attacker's
  diversity; the steps in which only the attacker updates are shaded;
* ``game_samples.csv``: the last validation's sample attacks and answers;

and sends the sample table (``game_samples``) and the plot to a W&B logger when one is attached.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L

from lit_align.callbacks.reporting import publish, report_dir, write_csv

__all__ = ["GameReport"]

#: (metric, label) pairs of the two panels of the plot.
_PANELS = (
    ("Attack success rate (share judged unsafe)", (("attack/asr", "attacker's prompts"), ("seed/asr", "raw seeds"))),
    ("Harmlessness reward (defender)", (("attack/reward", "attacker's prompts"), ("seed/reward", "raw seeds"))),
    ("Attacker diversity", (("attacker/bleu_diversity", "1 - SelfBLEU"),
                            ("attacker/embedding_diversity", "embedding"))),
)
SAMPLE_COLUMNS = ("seed", "attack", "response", "unsafe", "reward")


class GameReport(L.Callback):
    """Write the game's curves and sample table (see the module docstring)."""

    def __init__(self, dirpath: str | None = None, plot: bool = True, verbose: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            plot: write ``game_curves.png`` (needs matplotlib).
            verbose: print the last row and where the files are at the end of training.
        """
        self.dirpath, self.plot, self.verbose = dirpath, plot, verbose
        self.files: dict[str, Path] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=True)

    def _write(self, trainer: L.Trainer, pl_module, final: bool) -> None:
        history = getattr(pl_module, "val_history", None)
        if history is None:
            raise TypeError("GameReport needs an AdversarialGameModule (a module with val_history / val_samples)")
        directory = report_dir(trainer, self.dirpath)
        if directory is None or not history:
            return
        columns = ["step", *sorted({k for row in history for k in row} - {"step"})]
        self.files["history"] = write_csv(directory / "game_history.csv", columns,
                                          [[row.get(c) for c in columns] for row in history])
        samples = pl_module.val_samples
        data = [[s.get(c) for c in SAMPLE_COLUMNS] for s in samples]
        self.files["samples"] = write_csv(directory / "game_samples.csv", SAMPLE_COLUMNS, data)
        if self.plot:
            png = self._plot(directory / "game_curves.png", history, getattr(pl_module, "schedule", None))
            if png is not None:
                self.files["png"] = png
        if final:
            publish(trainer, "game_samples", SAMPLE_COLUMNS, data, image=self.files.get("png"))
            if self.verbose:
                last = history[-1]
                shown = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "step")
                print(f"\nGame after {int(last['step'])} steps: {shown}\n"
                      f"History: {self.files['history']}  Samples: {self.files['samples']}"
                      + (f"  Plot: {self.files['png']}" if "png" in self.files else ""))

    @staticmethod
    def _attacker_blocks(schedule, last_step: int) -> list[tuple[int, int]]:
        """[start, end) step ranges in which only the attacker updates (shaded in the plot)."""
        blocks, start = [], None
        for step in range(last_step + 1):
            attacking = schedule.active(step) == ("attacker",)
            if attacking and start is None:
                start = step
            elif not attacking and start is not None:
                blocks.append((start, step))
                start = None
        if start is not None:
            blocks.append((start, last_step))
        return blocks

    @classmethod
    def _plot(cls, path: Path, history: list[dict[str, float]], schedule=None) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("GameReport.plot: matplotlib is not installed; no game_curves.png written", stacklevel=2)
            return None
        fig = Figure(figsize=(12.0, 3.6))
        FigureCanvasAgg(fig)
        steps = [row["step"] for row in history]
        for i, (title, series) in enumerate(_PANELS):
            ax = fig.add_subplot(1, len(_PANELS), i + 1)
            for key, label in series:
                values = [row.get(key, float("nan")) for row in history]
                ax.plot(steps, values, marker="o", label=label)
            if schedule is not None and steps:
                for j, (a, b) in enumerate(cls._attacker_blocks(schedule, int(max(steps)))):
                    ax.axvspan(a, b, color="tab:red", alpha=0.08, label="attacker updates" if j == 0 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path
