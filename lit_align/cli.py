"""The ``lit-align`` command: LightningCLI with lit_align's defaults.

``lit-align fit|validate|test|predict --config configs/<method>/<variant>.yaml [--config callbacks/<preset>.yaml]``

* model and data are chosen by ``class_path`` (subclass mode), so any method and DataModule work;
* configs use OmegaConf interpolation resolved *after* command-line overrides
  (``parser_mode: omegaconf+``): ``max_length: ${data.init_args.max_length}`` follows
  ``--data.init_args.max_length 1024``;
* the default logger is W&B, offline unless credentials are configured (``WANDB_MODE`` wins),
  writing its run and the checkpoints under ``trainer.default_root_dir``;
* DataModules shard and resume their own samplers, so Lightning's sampler replacement is off;
* mistakes fail fast and short: the data is loaded and checked before any logger starts, a lit_align
  configuration or data error is one message and exit code 2 (``--debug`` or ``LIT_ALIGN_DEBUG=1`` keeps
  the traceback), and an unknown key names the closest accepted one (:mod:`lit_align.errors`,
  :mod:`lit_align.cli_parser`);
* ``--<spec>.name_or_path ./my_model`` replaces a config's ``tiny`` model (``--<spec>.tiny null`` parses);
* ``--help`` lists lit_align's methods and DataModules, and every field's attribute docstring.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

# imported so that `--help` lists lit_align's methods and DataModules among the known subclasses
import lit_align.data
import lit_align.methods
from lit_align.cli_parser import LitAlignArgumentParser, model_override_args
from lit_align.errors import debug_requested, one_message_errors

__all__ = ["LitAlignCLI", "cli_main", "main"]

# Configs write absolute interpolations (``${trainer.default_root_dir}``); they are resolved
# relative to where they stand, so they work with and without a subcommand (``fit.`` prefix).
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
# Config fields are documented once, as attribute docstrings (specs, TinyArch...): `--help` shows them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

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
        kwargs.setdefault("parser_class", LitAlignArgumentParser)
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

    # -- short errors, tiny -> real model switch, help (lit_align.cli_parser, lit_align.errors) ----------
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse with ``--<spec>.name_or_path`` replacing a config's ``tiny`` (see :func:`model_override_args`)."""
        if args is None or isinstance(args, (list, tuple)):
            self.config = parser.parse_args(model_override_args(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)

    def after_instantiate_classes(self) -> None:
        """Load and check the data now, before a logger starts a run (Lightning sets data up after that)."""
        set_up_data_early(self.datamodule, self.model, self.subcommand)


def set_up_data_early(datamodule: Any, module: Any, subcommand: str | None) -> None:
    """Run a lit_align DataModule's (idempotent) ``setup`` with the module's tokenizer before the Trainer
    runs, so a data error stops the run before any logger or W&B run starts."""
    bases = (lit_align.data.TokenizedDataModule, lit_align.data.ForgetRetainDataModule)
    if subcommand is None or not isinstance(datamodule, bases):
        return
    if datamodule.tokenizer is None and getattr(module, "tokenizer", None) is not None:
        datamodule.tokenizer = module.tokenizer
    datamodule.setup(subcommand)


def cli_main(args: list[str] | None = None, run: bool = True) -> LitAlignCLI:
    """Entry point of ``lit-align``; tests and notebooks pass ``args`` to take the shell's path."""
    return LitAlignCLI(args=args, run=run)


def main() -> None:
    """Console-script entry point (returns nothing, so the shell sees exit code 0).

    A lit_align configuration or data error is printed as one message with exit code 2; ``--debug`` (any
    position) or ``LIT_ALIGN_DEBUG=1`` shows the traceback instead."""
    debug = debug_requested(sys.argv[1:])
    sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    with one_message_errors(debug):
        cli_main()


if __name__ == "__main__":
    main()
