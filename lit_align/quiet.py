"""Silence library messages a lit_align user cannot act on; real warnings stay visible.

Called by the ``lit-align`` CLI and the demo (not at import: a library should not change the warning
filters of a program that merely imports it). Each filter matches one known message exactly:

* Lightning's "Tip: ... litlogger / litmodels" advertisements (logged at INFO on every run);
* Lightning's own deprecation of ``LeafSpec`` inside ``lightning.pytorch.utilities._pytree`` (raised by
  Lightning's code on torch >= 2.10, not by anything a user wrote);
* Lightning's "Found N module(s) in eval mode at the start of training": lit_align's methods keep their
  frozen models (reference copies, judges, detectors' frozen parts, the retain-only model) in eval mode on
  purpose, so dropout never perturbs a reference;
* transformers' deprecations raised from inside other libraries: ``is_gradient_checkpointing`` (read by
  peft when it wraps a model) and ``past_key_values`` (passed by transformers' own ``generate``, which the
  paraphrase attack of the watermark evaluation uses; lit_align's sampler passes ``cache``).

The W&B "anonymous setting" and "git root does not exist" warnings are fixed at their cause in
:class:`lit_align.loggers.AutoWandbLogger`, and transformers' ``past_key_values`` deprecation in the sampler.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_library_noise"]

_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drop Lightning's advertisement lines ("💡 Tip: ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_FILTER = _DropTips()


def quiet_library_noise() -> None:
    """Install the filters (idempotent)."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    # manual-optimisation methods count their own steps and checkpoint the state after a whole step, which is
    # what a resume must continue from (tests/methods/test_*resume* and the distributed tests check it exactly)
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
