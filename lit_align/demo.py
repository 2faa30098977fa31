"""``make demo``: tiny WAGLE + NPO unlearning (default), or SFT then DPO (``--method dpo``), on CPU.

Unlearning (``configs/wagle/npo_tiny.yaml``):

1. start from ``builtin:tiny-tofu-full``, a tiny Llama that memorised the 200 built-in fictitious
   facts (40 invented people), and forget the 4 people of ``forget10`` while keeping the other 36;
2. the ``WeightMask`` callback scores every weight at the start (WAGLE) and keeps the top half;
   NPO + retain NLL then updates only those weights, through the real CLI and Trainer;
3. ``UnlearningEvaluation`` evaluates the starting, the unlearned and the retain-only model
   (``builtin:tiny-tofu-retain90``, never trained on forget10) and a relearning attack, and writes a
   table and a plot; the demo prints the table and where the plot, the W&B run and the export went.

SFT then DPO:

1. ``configs/sft/tiny.yaml``: a tiny random Llama-shaped model learns the built-in instructions
   (a few hundred steps on CPU) and is exported in HF format;
2. ``configs/dpo/tiny.yaml`` with that export as its model (``name_or_path``), exactly as a hub
   model would be given: validate, train with DPO through the real CLI and Trainer, validate again;
3. print reward accuracy, margins and greedy generations before and after DPO, and where the
   W&B runs, the checkpoints and the HF exports went.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import wandb
from lightning.pytorch.loggers import WandbLogger

from lit_align.cli import cli_main
from lit_align.quiet import quiet_library_noise

PROMPTS = ["What is 7 plus 5?", "Is 46 even or odd?", "What colour is a jorvel?"]


def _metrics(results: list[dict]) -> dict[str, float]:
    keys = ("val/loss", "val/rewards/accuracies", "val/rewards/margins")
    return {k: float(results[0][k]) for k in keys if k in results[0]}


def _where(trainer) -> list[str]:
    """Where a run's checkpoints, W&B run and HF export went."""
    lines = []
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        lines.append(f"checkpoints: last {ckpt.last_model_path}, best {ckpt.best_model_path}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = logger.experiment.dir
            lines.append(f"W&B run ({'offline' if logger._offline else 'online'}): {os.path.dirname(run_dir)}")
        elif logger.log_dir:
            lines.append(f"logs: {logger.log_dir}")
    export = next((cb for cb in trainer.callbacks if type(cb).__name__ == "HFExport"), None)
    if export is not None and export.path is not None:
        lines.append(f"HF export: {export.path}")
    return lines


UNLEARNING_COLUMNS = ("forget_quality", "model_utility", "forget_accuracy", "retain_accuracy", "forget_rouge",
                      "retain_rouge", "mia_auc")


class _Phases(L.Callback):
    """Announce the demo's phases (the work between them shows in the progress bar)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_start(self, trainer, pl_module) -> None:
        print("[1/3] scoring every weight (WAGLE) and evaluating the starting and retain-only models ...",
              flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            print(f"[2/3] unlearning forget10: {self.steps} NPO + retain NLL steps on the masked weights ...",
                  flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        print("[3/3] evaluating the unlearned model, then a relearning attack ...", flush=True)


def unlearning_demo(config: str, out: Path, quiet: list[str]) -> dict[str, dict[str, float]]:
    """Run the WAGLE + NPO config and print the before/after table; returns the table."""
    print(f"WAGLE + NPO unlearning of forget10 from builtin:tiny-tofu-full ({config})", flush=True)
    cli = cli_main(["--config", config, "--trainer.default_root_dir", str(out), *quiet], run=False)
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "UnlearningEvaluation")
    evaluation.verbose = False  # the demo prints the table once, with its legend
    mask = next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == "WeightMask"), None)
    cli.trainer.callbacks.insert(0, _Phases(cli.trainer.max_steps))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    table = evaluation.results
    print("\n=== lit_align demo: WAGLE + NPO unlearning on the tiny TOFU (CPU) ===")
    print("rows: start = before unlearning, unlearned = after, retain_only = never saw forget10 (the target),")
    print("      relearned = the unlearned model after a 10-step relearning attack on 10% of forget10")
    print(f"{'':<12}" + "".join(f"{c:>16}" for c in UNLEARNING_COLUMNS))
    for row in ("start", "unlearned", "retain_only", "relearned"):
        values = table.get(row, {})
        cells = (values.get(c) for c in UNLEARNING_COLUMNS)
        print(f"{row:<12}" + "".join(f"{v:>16.3f}" if v is not None else f"{'-':>16}" for v in cells))
    print("forget_quality: KS-test p-value of forget truth ratios against retain_only (higher: closer to it);")
    print("model_utility: harmonic mean of retain-side scores; *_accuracy: answer-token accuracy (teacher forced);")
    print("*_rouge: ROUGE-L recall of greedy answers; mia_auc: Min-K% membership AUC, forget vs retain.")
    print("\noutputs:")
    for name, path in getattr(evaluation, "files", {}).items():
        print(f"  {name}: {path}")
    if mask is not None and mask.mask_path is not None:
        print(f"  weight mask ({mask.method}, top {mask.ratio:.0%} of the weights): {mask.mask_path}")
    for line in _where(cli.trainer):
        print(f"  {line}")
    wandb.finish()
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("unlearning", "dpo"), default="unlearning")
    parser.add_argument("--unlearning-config", default="configs/wagle/npo_tiny.yaml")
    parser.add_argument("--sft-config", default="configs/sft/tiny.yaml")
    parser.add_argument("--dpo-config", default="configs/dpo/tiny.yaml")
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--dpo-lr", default="5.0e-4", help="DPO learning rate when starting from the SFT model")
    args = parser.parse_args(argv)
    quiet_library_noise()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    quiet = ["--trainer.enable_model_summary", "false"]
    if args.method == "unlearning":
        unlearning_demo(args.unlearning_config, Path(args.out) / "unlearning", quiet)
        return

    sft_root = Path(args.out) / "sft"
    print(f"[1/2] SFT of a tiny model on builtin:instructions ({args.sft_config}) ...", flush=True)
    sft = cli_main(["fit", "--config", args.sft_config, "--trainer.default_root_dir", str(sft_root), *quiet])
    sft_export = next(cb for cb in sft.trainer.callbacks if type(cb).__name__ == "HFExport").path
    sft_where = _where(sft.trainer)
    wandb.finish()  # Lightning leaves the run open; the DPO stage gets its own

    print(f"[2/2] DPO from the SFT model on builtin:preferences ({args.dpo_config}) ...", flush=True)
    cli = cli_main(["--config", args.dpo_config, "--trainer.default_root_dir", str(Path(args.out) / "dpo"), *quiet,
                    "--model.init_args.model", f"{{name_or_path: {sft_export}, tiny: null}}",
                    "--model.init_args.optimizer.init_args.lr", args.dpo_lr], run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    before = _metrics(trainer.validate(module, datamodule=data, verbose=False))
    gens_before = module.generate(PROMPTS)
    trainer.fit(module, datamodule=data)
    after = _metrics(trainer.validate(module, datamodule=data, verbose=False))
    gens_after = module.generate(PROMPTS)

    print("\n=== lit_align demo: SFT then DPO on the built-in data (tiny model, CPU) ===")
    print(f"SFT model (HF format): {sft_export}")
    print(f"{'DPO validation metric':<28}{'before':>10}{'after':>10}")
    for key in before:
        print(f"{key:<28}{before[key]:>10.3f}{after.get(key, float('nan')):>10.3f}")
    print("\ngenerations (greedy), before and after DPO:")
    for prompt, b, a in zip(PROMPTS, gens_before, gens_after):
        print(f"  prompt: {prompt}\n    before: {b!r}\n    after:  {a!r}")
    print("\noutputs:")
    for stage, lines in (("SFT", sft_where), ("DPO", _where(trainer))):
        for line in lines:
            print(f"  {stage} {line}")

if __name__ == "__main__":
    main()
