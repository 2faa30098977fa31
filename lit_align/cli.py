"""The ``lit-align`` command: LightningCLI with lit_align's defaults.

``lit-align fit|validate|test|predict --config configs/<method>/<variant>.yaml [--config callbacks/<preset>.yaml]``

* model and data are chosen by ``class_path`` (subclass mode), so any method and DataModule work;
* configs use OmegaConf interpolation resolved *after* command-line overrides
  (``parser_mode: omegaconf+``): ``max_length: ${data.init_args.max_length}`` follows
  ``--data.init_args.max_length 1024``;
* the default logger is W&B, offline unless credentials are configured (``WANDB_MODE`` wins),
  writing its run and the checkpoints under ``trainer.default_root_dir``;
* DataModules shard and resume their own samplers, so Lightning's sampler replacement is off;
* ``--threads auto|N`` chooses torch's CPU thread count (:class:`~lit_align.callbacks.CPUThreads`: one
  thread per process for small models and multi-process CPU runs by default);
* library messages a user cannot act on are silenced (:mod:`lit_align.quiet`).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_align.callbacks.cpu_threads import CPUThreads
from lit_align.quiet import quiet_library_noise

__all__ = ["LitAlignCLI", "cli_main", "main"]

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
        quiet_library_noise()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads", type=int | Literal["auto"], default="auto",
            help="torch CPU threads per process on the CPU accelerator: 'auto' (one per process for models under "
                 "100M parameters and for multi-process CPU runs, torch's default otherwise; OMP_NUM_THREADS wins), "
                 "or a number (0: torch's default). See lit_align.callbacks.CPUThreads.")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self._install_cpu_threads()

    def _install_cpu_threads(self) -> None:
        """Add :class:`CPUThreads` with ``--threads`` unless the config's callbacks already hold one."""
        if not any(isinstance(cb, CPUThreads) for cb in self.trainer.callbacks):
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.trainer.callbacks.insert(0, CPUThreads(config.get("threads", "auto")))

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


def cli_main(args: list[str] | None = None, run: bool = True) -> LitAlignCLI:
    """Entry point of ``lit-align``; tests and notebooks pass ``args`` to take the shell's path."""
    return LitAlignCLI(args=args, run=run)


def main() -> None:
    """Console-script entry point (returns nothing, so the shell sees exit code 0)."""
    cli_main()


if __name__ == "__main__":
    main()
