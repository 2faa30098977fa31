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

from lit_align.callbacks.reporting import HistoryReport

__all__ = ["GameReport"]

#: (metric, label) pairs of the two panels of the plot.
_PANELS = (
    ("Attack success rate (share judged unsafe)", (("attack/asr", "attacker's prompts"), ("seed/asr", "raw seeds"))),
    ("Harmlessness reward (defender)", (("attack/reward", "attacker's prompts"), ("seed/reward", "raw seeds"))),
    ("Attacker diversity", (("attacker/bleu_diversity", "1 - SelfBLEU"),
                            ("attacker/embedding_diversity", "embedding"))),
)
SAMPLE_COLUMNS = ("seed", "attack", "response", "unsafe", "reward")


class GameReport(HistoryReport):
    """Write the game's curves and sample table (see the module docstring)."""

    name, samples_attr, samples_key, png_name = "game", "val_samples", "samples", "game_curves.png"
    module_kind = "AdversarialGameModule"

    def sample_columns(self, samples: list[dict]) -> list[str]:
        return list(SAMPLE_COLUMNS)

    def summary(self, history: list[dict]) -> str:
        last = history[-1]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "step")
        return f"Game after {int(last['step'])} steps: {shown}"

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

    def draw(self, fig, history: list[dict], pl_module) -> None:
        fig.set_size_inches(12.0, 3.6)
        schedule = getattr(pl_module, "schedule", None)
        steps = [row["step"] for row in history]
        for i, (title, series) in enumerate(_PANELS):
            ax = fig.add_subplot(1, len(_PANELS), i + 1)
            for key, label in series:
                ax.plot(steps, [row.get(key, float("nan")) for row in history], marker="o", label=label)
            if schedule is not None and steps:
                for j, (a, b) in enumerate(self._attacker_blocks(schedule, int(max(steps)))):
                    ax.axvspan(a, b, color="tab:red", alpha=0.08, label="attacker updates" if j == 0 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
            ax.legend(fontsize=7)
