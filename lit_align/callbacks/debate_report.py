"""The debate team's report: accuracy against round, per validation, and sample transcripts.

:class:`DebateReport` reads what :class:`~lit_align.methods.DebateModule` records at each validation
(``val_history``: accuracy after each round, improvement, answer changes; ``val_transcripts``: a few
debates) and writes, under ``dirpath`` (default ``trainer.log_dir``), after every validation and at the
end of training:

* ``debate_history.csv``: one row per validation (step, phase, accuracy by round, improvement, the
  share of answers that went right-to-wrong and wrong-to-right);
* ``debate_accuracy.png``: accuracy against round, one line per validation, from the untrained team
  (the first, e.g. the sanity check with ``num_sanity_val_steps: -1``) to the trained one (the last);
* ``debate_transcripts.csv``: the last validation's sample debates (each round's actor response and
  answer and critic response);

and sends the transcript table (``debate_transcripts``) and the plot to a W&B logger when one is attached.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L

from lit_align.callbacks.reporting import publish, report_dir, write_csv

__all__ = ["DebateReport"]


class DebateReport(L.Callback):
    """Write the debate curves and transcript table (see the module docstring)."""

    def __init__(self, dirpath: str | None = None, plot: bool = True, verbose: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            plot: write ``debate_accuracy.png`` (needs matplotlib).
            verbose: print the first and last accuracy by round at the end of training.
        """
        self.dirpath, self.plot, self.verbose = dirpath, plot, verbose
        self.files: dict[str, Path] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=True)

    def _write(self, trainer: L.Trainer, pl_module, final: bool) -> None:
        history = getattr(pl_module, "val_history", None)
        if history is None or not hasattr(pl_module, "val_transcripts"):
            raise TypeError("DebateReport needs a DebateModule (a module with val_history / val_transcripts)")
        directory = report_dir(trainer, self.dirpath)
        if directory is None or not history:
            return
        columns = ["step", "phase", "label", *sorted({k for row in history for k in row} - {"step", "phase", "label"})]
        self.files["history"] = write_csv(directory / "debate_history.csv", columns,
                                          [[row.get(c) for c in columns] for row in history])
        transcripts = pl_module.val_transcripts
        t_columns = list(dict.fromkeys(k for row in transcripts for k in row))
        data = [[row.get(c) for c in t_columns] for row in transcripts]
        self.files["transcripts"] = write_csv(directory / "debate_transcripts.csv", t_columns, data)
        if self.plot:
            png = self._plot(directory / "debate_accuracy.png", history)
            if png is not None:
                self.files["png"] = png
        if final:
            publish(trainer, "debate_transcripts", t_columns, data, image=self.files.get("png"))
            if self.verbose:
                rounds = sorted(k for k in history[0] if k.startswith("accuracy/round_"))
                first = ", ".join(f"{history[0][k]:.3f}" for k in rounds)
                last = ", ".join(f"{history[-1][k]:.3f}" for k in rounds)
                print(f"\nDebate accuracy by round: start [{first}] -> now [{last}] (step {int(history[-1]['step'])})\n"
                      f"History: {self.files['history']}  Transcripts: {self.files['transcripts']}"
                      + (f"  Plot: {self.files['png']}" if "png" in self.files else ""))

    @staticmethod
    def _plot(path: Path, history: list[dict]) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("DebateReport.plot: matplotlib is not installed; no debate_accuracy.png written", stacklevel=2)
            return None
        rounds = sorted((k for k in history[0] if k.startswith("accuracy/round_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        fig = Figure(figsize=(6.0, 4.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, row in enumerate(history):
            label = f"step {int(row['step'])} ({row.get('label', '')})" + (" untrained" if i == 0 else "")
            ax.plot(range(len(rounds)), [row.get(k, float("nan")) for k in rounds], marker="o", label=label,
                    alpha=0.4 + 0.6 * (i + 1) / len(history))
        ax.set_xticks(range(len(rounds)))
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy of the actor's answer")
        ax.set_title("Debate accuracy by round")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path
