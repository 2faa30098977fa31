"""``make demo``: the tiny DPO config end to end, with a before/after summary.

Validates the untrained policy, trains it with ``configs/dpo/tiny.yaml`` through the real CLI
and Trainer, validates again, and prints reward accuracy, margins, a few generations and
where the W&B run, the checkpoints and the HF export went.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lit_align.cli import cli_main

PROMPTS = ["What is 3 plus 4?", "Please name the capital of Veloria.", "How should I greet a new colleague?"]


def _metrics(results: list[dict]) -> dict[str, float]:
    keys = ("val/loss", "val/rewards/accuracies", "val/rewards/margins")
    return {k: float(results[0][k]) for k in keys if k in results[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/dpo/tiny.yaml")
    parser.add_argument("--out", default="outputs/demo-dpo")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_DIR", args.out)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    cli = cli_main(["--config", args.config, "--trainer.default_root_dir", args.out,
                    "--trainer.enable_progress_bar", "false"], run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    before = _metrics(trainer.validate(module, datamodule=data, verbose=False))
    gens_before = module.generate(PROMPTS)
    trainer.fit(module, datamodule=data)
    after = _metrics(trainer.validate(module, datamodule=data, verbose=False))
    gens_after = module.generate(PROMPTS)

    print("\n=== lit_align demo: DPO on the built-in preference pairs (tiny Qwen2-shaped model, CPU) ===")
    print(f"{'metric':<28}{'before':>10}{'after':>10}")
    for key in before:
        print(f"{key:<28}{before[key]:>10.3f}{after.get(key, float('nan')):>10.3f}")
    print("\ngenerations (greedy):")
    for prompt, b, a in zip(PROMPTS, gens_before, gens_after):
        print(f"  prompt: {prompt}\n    before: {b!r}\n    after:  {a!r}")
    ckpt = next((cb for cb in trainer.checkpoint_callbacks), None)
    print("\noutputs:")
    if ckpt is not None:
        print(f"  checkpoints: {ckpt.dirpath} (last: {ckpt.last_model_path}, best: {ckpt.best_model_path})")
    for logger in trainer.loggers:
        run_dir = getattr(getattr(logger, "experiment", None), "dir", None)
        if run_dir:
            print(f"  W&B run ({'offline' if logger._offline else 'online'}): {os.path.dirname(run_dir)}")
    export = next((cb for cb in trainer.callbacks if type(cb).__name__ == "HFExport"), None)
    if export is not None and export.path is not None:
        print(f"  HF export: {export.path}")


if __name__ == "__main__":
    main()
