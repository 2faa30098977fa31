"""OnlineDPOModule on 2 DDP processes (gloo) ends where one process on the same global batch ends.

One process with 4 prompts per step and two with 2 see the same prompts (the sharded sampler interleaves ranks);
each rank generates for its own prompts with generators seeded by the prompt's global index (so the candidates are
those of one process), ranks them, and weights its loss by its share of the pairs kept over both ranks, so the
averaged gradient is the one-process gradient. 3 iterations (with reference refreshes) of 2 steps each.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import CSV_LOGGER, REPO, max_diff, run_cli
from safetensors.torch import load_file

from lit_align.cli import cli_main

pytestmark = pytest.mark.slow

DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
EXPORT = "hf_export/model.safetensors"


def _args(root, prompts: int) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/selm/tiny.yaml"), *CSV_LOGGER, "--trainer.logger.save_dir", str(root),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.callbacks", "lit_align.callbacks.HFExport",
            "--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.limit_val_batches", "0",
            "--trainer.log_every_n_steps", "1", "--data.init_args.train.limit", "24",
            "--data.init_args.batch_size", str(prompts)]


def _pairs(root) -> list[float]:
    rows = [r for f in root.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    return [float(r["train/pairs"]) for r in rows if r.get("train/pairs")]


def test_ddp_matches_one_process(tmp_path):
    """SELM (the optimism term included) with the rule-judge ranker, some prompts without a pair (all candidates
    tied): the exported weights agree up to float noise amplified by AdamW, a small fraction of how far training
    moved them."""
    cli = cli_main(_args(tmp_path / "one", prompts=4))
    one = load_file(tmp_path / "one" / EXPORT)
    start = cli_main(["--config", str(REPO / "configs/selm/tiny.yaml"), *CSV_LOGGER, "--trainer.logger.save_dir",
                      str(tmp_path)], run=False).model
    start.configure_model()
    first = start.policy.state_dict()
    assert set(one) <= set(first)
    moved = max((one[k].float() - first[k].float()).abs().max().item() for k in one)
    proc = run_cli(_args(tmp_path / "two", prompts=2) + DDP)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr or "distributed_backend=gloo" in proc.stderr
    two = load_file(tmp_path / "two" / EXPORT)
    assert max_diff(two, one) < moved / 20, (max_diff(two, one), moved)
    assert cli.trainer.global_step == 6
    assert sum(_pairs(tmp_path / "one")) > 0
    # the checkpoint keeps every rank's generations of the last iteration: 8 prompts x (2 samples + y_ref)
    for name in ("one", "two"):
        ckpt = torch.load(next((tmp_path / name).rglob("*.ckpt")), map_location="cpu", weights_only=False)
        assert len(ckpt["online_dpo"]["generations"]) == 8 * 3, name
