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

from lit_align.callbacks.reporting import HistoryReport

__all__ = ["DebateReport"]


class DebateReport(HistoryReport):
    """Write the debate curves and transcript table (see the module docstring)."""

    name, samples_attr, samples_key, png_name = "debate", "val_transcripts", "transcripts", "debate_accuracy.png"
    lead_columns = ("step", "phase", "label")
    module_kind = "DebateModule"

    @staticmethod
    def _rounds(history: list[dict]) -> list[str]:
        return sorted((k for k in history[0] if k.startswith("accuracy/round_")), key=lambda k: int(k.rsplit("_", 1)[1]))

    def summary(self, history: list[dict]) -> str:
        rounds = self._rounds(history)
        first = ", ".join(f"{history[0][k]:.3f}" for k in rounds)
        last = ", ".join(f"{history[-1][k]:.3f}" for k in rounds)
        return f"Debate accuracy by round: start [{first}] -> now [{last}] (step {int(history[-1]['step'])})"

    def draw(self, fig, history: list[dict], pl_module) -> None:
        fig.set_size_inches(6.0, 4.0)
        rounds = self._rounds(history)
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
