"""``make demo``: SFT then DPO on the built-in data with a tiny model, with a before/after summary.

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

import wandb
from lightning.pytorch.loggers import WandbLogger

from lit_align.cli import cli_main

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft-config", default="configs/sft/tiny.yaml")
    parser.add_argument("--dpo-config", default="configs/dpo/tiny.yaml")
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--dpo-lr", default="5.0e-4", help="DPO learning rate when starting from the SFT model")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

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
