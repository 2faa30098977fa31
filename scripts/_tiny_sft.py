"""The step every tiny-model build script shares: run an SFT config of the repo, keep its HF export."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def train_tiny_model(config: Path, data: str | list[dict], target: Path) -> None:
    """``lit-align fit --config config`` on ``data`` (a data path or builtin id, or rows written to a temporary
    ``.jsonl``), then the model the config's ``HFExport`` wrote, copied to ``target`` (replacing it)."""
    from lit_align.cli import cli_main

    with tempfile.TemporaryDirectory() as root:
        if not isinstance(data, str):
            path = Path(root) / "sft.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
            data = str(path)
        export = Path(root) / "export"
        cli_main([
            "fit", "--config", str(config), f"--data.train.path={data}", f"--trainer.default_root_dir={root}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.callbacks.dirpath={export}",
        ])
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(export, target)
