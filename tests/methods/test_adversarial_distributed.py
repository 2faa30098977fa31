"""C-AdvIPO on 2 processes (DDP, FSDP2 over gloo) == 1 process with the whole batch, training and validation.

Training: the attack is row-wise (the sign of a batch-mean's gradient w.r.t. one row's perturbation does not
depend on the other rows), IPO is a mean over pairs and the reference is precomputed per pair, so one SGD step
of 2 ranks x 2 pairs moves the adapter like 1 rank x 4 pairs, and only if the ranks' gradients are averaged
(SGD, unclipped: a sum, or a rank's own gradient, moves it differently; Adam's first step would hide a sum).

Validation (one pair and one utility row, batch 1): rank 0 holds only the pair, rank 1 only the utility row.
Both ranks must log the same keys (each is one collective at epoch end: different key sets crash or hang), and
the synced epoch means (adversarial metrics weighted by pairs, utility_loss by utility rows, loss by rows) equal
one process validating the same two batches.

Under FSDP2 the perturbation hook lives on the (sharded) embedding module: the root forward unshards it as usual.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO, max_diff, run_cli
from safetensors.torch import load_file

from lit_align.cli import cli_main

pytestmark = pytest.mark.slow

#: pairs per rank and step (one process takes twice as many)
BATCH = 2
COMMON = [
    "fit", "--config", str(REPO / "configs/adv_training/ipo_tiny.yaml"), "--trainer.max_steps", "1",
    "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "null", "--trainer.gradient_clip_val", "null",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.enable_checkpointing", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
    "--model.init_args.model.lora.dropout", "0.0", "--model.init_args.attack.iters", "1",
    "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.lr", "1.0",
    "--model.init_args.optimizer.weight_decay", "0.0",
    "--data.init_args.behaviours.limit", "2",  # 2 behaviours x 2 targets: the 2 x BATCH pairs of the one step
    "--data.init_args.max_length", "64",
    "--data.init_args.val_batch_size", "1", "--data.init_args.val_utility", "{path: builtin:adv_utility/val, limit: 1}",
]
TWO = {"ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
       "fsdp2": ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml")]}


@pytest.fixture(scope="module")
def val_behaviours(tmp_path_factory) -> str:
    """One held-out behaviour with one target: a single validation pair."""
    first = json.loads((REPO / "lit_align/data/builtin/adv_behaviours_val.json").read_text())[0]
    path = tmp_path_factory.mktemp("data") / "val_behaviours.json"
    path.write_text(json.dumps([{**first, "targets": first["targets"][:1]}]))
    return str(path)


def _args(root, batch: int, val_behaviours: str, *extra: str) -> list[str]:
    return [*COMMON, *extra, "--trainer.callbacks", "lit_align.callbacks.HFExport", "--trainer.default_root_dir",
            str(root), "--trainer.logger.save_dir", str(root), "--data.init_args.batch_size", str(batch),
            "--data.init_args.val_behaviours.path", val_behaviours,
            "--model.init_args.reference_cache_dir", str(root / "cache")]


def _results(root) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The exported adapter (LoRA) and the validation epoch's metrics."""
    rows = [r for f in root.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    return load_file(root / "hf_export" / "adapter_model.safetensors"), val


@pytest.fixture(scope="module")
def single(tmp_path_factory, val_behaviours):
    """One process (in this one), batch 2 x BATCH: its adapter, how far the step moved it, its val metrics."""
    root = tmp_path_factory.mktemp("single")
    cli_main(_args(root, 2 * BATCH, val_behaviours))
    adapter, val = _results(root)
    moved = max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k)  # LoRA's B starts at 0
    assert moved > 1e-3, "training did not move the adapter"
    # both parts validated: the pair's objective and attack, the utility row's NLL; loss = mean of the 2 batches
    assert {"val/ipo_loss", "val/attack/ce_end", "val/utility_loss"} <= set(val)
    assert val["val/loss"] == pytest.approx((val["val/ipo_loss"] + val["val/utility_loss"]) / 2, rel=1e-5)
    return adapter, moved, val


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, val_behaviours, tmp_path):
    one, moved, one_val = single
    # a validation whose ranks logged different keys crashes or hangs: the timeout fails it
    run_cli(_args(tmp_path, BATCH, val_behaviours, *TWO[strategy]), timeout=180)
    two, two_val = _results(tmp_path)
    # float reduction order only (measured ~1e-7) vs an unaveraged step (~moved)
    assert max_diff(two, one) < 1e-5 < moved / 10, (max_diff(two, one), moved)
    assert sorted(two_val) == sorted(one_val)
    for key, value in one_val.items():
        assert two_val[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
