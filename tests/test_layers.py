"""The package's layering (the import-linter contract in pyproject.toml) holds: CI runs it with the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_layers_are_kept():
    """A lower layer (losses, rollout, models, data...) never imports a higher one; a cycle such as
    ``losses -> rollout -> losses`` breaks the contract and this test."""
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout
