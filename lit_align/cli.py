"""The ``lit-align`` command: LightningCLI with lit_align's defaults.

``lit-align fit|validate|test|predict --config configs/<method>/<variant>.yaml [--config callbacks/<preset>.yaml]``

* model and data are chosen by ``class_path`` (subclass mode), so any method and DataModule work;
* configs use OmegaConf interpolation resolved *after* command-line overrides
  (``parser_mode: omegaconf+``): ``max_length: ${data.init_args.max_length}`` follows
  ``--data.init_args.max_length 1024``;
* the default logger is W&B, offline unless credentials are configured (``WANDB_MODE`` wins),
  writing its run and the checkpoints under ``trainer.default_root_dir``;
* DataModules shard and resume their own samplers, so Lightning's sampler replacement is off;
* ``predict`` writes ``predictions.jsonl`` under the run directory (a :class:`~lit_align.callbacks.PredictionWriter`
  is added when the config's callbacks hold no prediction writer).
"""

from __future__ import annotations

import os
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

__all__ = ["LitAlignCLI", "add_prediction_writer", "cli_main", "main"]

# Configs write absolute interpolations (``${trainer.default_root_dir}``); they are resolved
# relative to where they stand, so they work with and without a subcommand (``fit.`` prefix).
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {"class_path": "lit_align.loggers.AutoWandbLogger"},
    "use_distributed_sampler": False,
}


class LitAlignCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with OmegaConf interpolation and W&B defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("parser_mode", "omegaconf+")
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """W&B runs and checkpoints go under ``trainer.default_root_dir`` unless a directory is given."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        loggers = logger if isinstance(logger, list) else [logger]
        for entry in loggers:
            init = getattr(entry, "init_args", None)
            if (str(getattr(entry, "class_path", "")).endswith("AutoWandbLogger") and init is not None
                    and init.get("save_dir") is None and init.get("dir") is None and not os.environ.get("WANDB_DIR")):
                init.save_dir = config.trainer.default_root_dir or "."

    def before_predict(self) -> None:
        """``lit-align predict`` writes what it predicts (see :func:`add_prediction_writer`)."""
        add_prediction_writer(self.trainer)


def add_prediction_writer(trainer: Trainer) -> None:
    """Give ``trainer`` a :class:`~lit_align.callbacks.PredictionWriter` (``predictions.jsonl`` under the run
    directory) unless its callbacks already hold a prediction writer."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    from lit_align.callbacks import PredictionWriter

    if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())


def cli_main(args: list[str] | None = None, run: bool = True) -> LitAlignCLI:
    """Entry point of ``lit-align``; tests and notebooks pass ``args`` to take the shell's path."""
    return LitAlignCLI(args=args, run=run)


def main() -> None:
    """Console-script entry point (returns nothing, so the shell sees exit code 0)."""
    cli_main()


if __name__ == "__main__":
    main()
