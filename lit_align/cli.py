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
* library messages a user cannot act on are silenced (:mod:`lit_align.quiet`);
* ``--ckpt_path`` follows :mod:`lit_align.resume` rather than LightningCLI: ``last`` is the newest
  ``*.ckpt`` under ``trainer.default_root_dir`` (none: a warning and a fresh run); ``fit`` resumes the
  checkpoint's own run folder and W&B id; a checkpoint of another method (``model.class_path``) or model
  (a model spec) is refused; any other hyperparameter takes the config / command-line value, each
  changed key announced as ``key: old -> new`` (LightningCLI would let the checkpoint's values win);
* checkpoints are written atomically in their own directory (:mod:`lit_align.checkpoint`);
* ``predict`` writes ``predictions.jsonl`` under the run directory (a :class:`~lit_align.callbacks.PredictionWriter`
  is added when the config's callbacks hold no prediction writer);
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
from typing import Any, Literal

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# imported so that `--help` lists lit_align's methods and DataModules among the known subclasses
import lit_align.data
import lit_align.methods
from lit_align.callbacks import (
    CPUThreads,
    FEWLReport,
    PredictionWriter,
    SummarizationReport,
    UnlearningAssessmentReport,
)
from lit_align.checkpoint import install_atomic_checkpoint_io
from lit_align.cli_parser import LitAlignArgumentParser, model_override_args
from lit_align.data.summarization import SummarizationDataModule
from lit_align.errors import debug_requested, one_message_errors
from lit_align.quiet import quiet_library_noise
from lit_align.resume import prepare_resume

__all__ = ["LitAlignCLI", "add_fewl_report", "add_prediction_writer", "add_summarization_report", "cli_main", "main", "set_up_data_early"]

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
        quiet_library_noise()
        kwargs.setdefault("parser_class", LitAlignArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads", type=int | Literal["auto"], default="auto",
            help="torch CPU threads per process on the CPU accelerator: 'auto' (one per process for models under "
                 "100M parameters and for multi-process CPU runs, torch's default otherwise; OMP_NUM_THREADS wins), "
                 "or a number (0: torch's default). See lit_align.callbacks.CPUThreads.")

    def _install_cpu_threads(self) -> None:
        """Add :class:`CPUThreads` with ``--threads`` unless the config's callbacks already hold one."""
        if not any(isinstance(cb, CPUThreads) for cb in self.trainer.callbacks):
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.trainer.callbacks.insert(0, CPUThreads(config.get("threads", "auto")))

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's hook, which lets a checkpoint's hyperparameters override the config:
        ``--ckpt_path`` follows :mod:`lit_align.resume` instead (``last`` = newest checkpoint of the root,
        same run folder and W&B id, another method or model refused, changed keys applied and announced)."""
        self._prepare_resume()

    def _prepare_resume(self) -> None:
        """Resolve and check ``--ckpt_path`` before any class is built (see :mod:`lit_align.resume`)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_resume(self.config[subcommand], subcommand, lambda: self._dumped_config()[subcommand]["model"])

    def _dumped_config(self) -> dict[str, Any]:
        """The parsed config as plain data, as Lightning stores it in checkpoints (``hyper_parameters``)."""
        return yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml"))

    def after_instantiate_classes(self) -> None:
        self._install_atomic_checkpoint_io()
        self._install_cpu_threads()
        # load and check the data now, before a logger starts a run (Lightning sets data up after that)
        set_up_data_early(self.datamodule, self.model, self.subcommand)

    def _install_atomic_checkpoint_io(self) -> None:
        """Checkpoints written as a temporary file in their own directory + fsync + rename (all strategies
        with Lightning's plain ``TorchCheckpointIO``; sharded DCP directories are left to their strategy)."""
        if getattr(self, "trainer", None) is not None:
            install_atomic_checkpoint_io(self.trainer)

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

    def before_test(self) -> None:
        """A FEWL evaluation, a summarisation evaluation or an unlearning assessment writes its report (see
        :func:`add_fewl_report`, :func:`add_summarization_report`)."""
        add_fewl_report(self.trainer, self.model)
        add_summarization_report(self.trainer, self.model)

    # -- short errors, tiny -> real model switch, help (lit_align.cli_parser, lit_align.errors) ----------
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse with ``--<spec>.name_or_path`` replacing a config's ``tiny`` (see :func:`model_override_args`)."""
        if args is None or isinstance(args, (list, tuple)):
            self.config = parser.parse_args(model_override_args(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)


def add_prediction_writer(trainer: Trainer) -> None:
    """Give ``trainer`` a :class:`~lit_align.callbacks.PredictionWriter` (``predictions.jsonl`` under the run
    directory) unless its callbacks already hold a prediction writer."""
    if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())


def add_fewl_report(trainer: Trainer, model: Any) -> None:
    """Give ``trainer`` a :class:`~lit_align.callbacks.FEWLReport` when ``model`` is a FEWL evaluation and its
    callbacks hold none (the selection, the scores and the generation log are always written); likewise an
    :class:`~lit_align.callbacks.UnlearningAssessmentReport` to an unlearning assessment."""
    fewl = isinstance(model, lit_align.methods.FEWLEvaluationModule)
    if fewl and not any(isinstance(c, FEWLReport) for c in trainer.callbacks):
        trainer.callbacks.append(FEWLReport())
    assessment = isinstance(model, lit_align.methods.UnlearningAssessmentModule)
    if assessment and not any(isinstance(c, UnlearningAssessmentReport) for c in trainer.callbacks):
        trainer.callbacks.append(UnlearningAssessmentReport())


def add_summarization_report(trainer: Trainer, model: Any) -> None:
    """Give ``trainer`` a :class:`~lit_align.callbacks.SummarizationReport` when ``model`` is a summarisation
    evaluation and its callbacks hold none (the table, the per-article rows and the plot are always written)."""
    summarization = isinstance(model, lit_align.methods.SummarizationEvaluationModule)
    if summarization and not any(isinstance(c, SummarizationReport) for c in trainer.callbacks):
        trainer.callbacks.append(SummarizationReport())


def set_up_data_early(datamodule: Any, module: Any, subcommand: str | None) -> None:
    """Run a lit_align DataModule's (idempotent) ``setup`` with the module's tokenizer before the Trainer
    runs, so a data error stops the run before any logger or W&B run starts. An unlearning assessment's
    DataModule (no tokenizer) checks its splits here too."""
    if subcommand is not None and isinstance(datamodule, lit_align.methods.UnlearningAssessmentDataModule):
        datamodule.setup(subcommand)
        return
    bases = (lit_align.data.TokenizedDataModule, lit_align.data.ForgetRetainDataModule, SummarizationDataModule,
             lit_align.data.ClassificationDataModule)
    if subcommand is None or not isinstance(datamodule, bases):
        return
    if getattr(datamodule, "tokenizer", False) is None and getattr(module, "tokenizer", None) is not None:
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
