"""Loggers: W&B that goes offline by itself when no API key is configured."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["AutoWandbLogger", "wandb_has_credentials"]


def wandb_has_credentials() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B API."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to "no credentials found".

    ``WANDB_MODE`` wins when set (``offline``, ``online``, ``disabled``). The run directory is
    printed when the run starts so offline runs can be found and ``wandb sync``-ed later.
    """

    def __init__(self, project: str = "lit_align", offline: bool | None = None, save_dir: str | None = None,
                 **kwargs: Any) -> None:
        """
        Args:
            project: W&B project.
            offline: ``None`` decides from ``WANDB_MODE`` and the credentials found.
            save_dir: where the ``wandb/`` run directories go; default: the ``dir`` argument, else
                ``$WANDB_DIR``, else the working directory.
        """
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode is None and not wandb_has_credentials())
        # WandbLogger passes `save_dir or dir` to wandb.init, so WANDB_DIR must go in save_dir to count
        save_dir = save_dir or kwargs.pop("dir", None) or os.environ.get("WANDB_DIR") or "."
        super().__init__(project=project, offline=offline, save_dir=save_dir, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns on every run that the setting has no effect
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        if self._experiment is None and self._save_dir:
            # W&B looks for the git repository from its directory and warns when that does not exist yet
            os.makedirs(self._save_dir, exist_ok=True)
        run = super().experiment
        if not getattr(self, "_announced", False) and getattr(run, "dir", None):
            self._announced = True
            where = "offline (sync later with `wandb sync`)" if self._offline else "online"
            rank_zero_info(f"W&B run {where}: {os.path.abspath(os.path.dirname(run.dir))}")
        return run
