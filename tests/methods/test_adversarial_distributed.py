"""C-AdvIPO on 2 processes (DDP, FSDP2 over gloo) == 1 process with the whole batch.

The attack is row-wise (the sign of a batch-mean's gradient w.r.t. one row's perturbation does not depend on the
other rows), IPO is a mean over pairs and the reference is precomputed per pair, so 2 ranks x 4 pairs train like
1 rank x 8 pairs. Under FSDP2 the perturbation hook lives on the (sharded) embedding module: the root forward
unshards it as usual.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, max_diff, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ["fit", "--config", str(REPO / "configs/adv_training/ipo_tiny.yaml"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--model.init_args.model.lora.dropout", "0.0", "--model.init_args.attack.iters", "3"]
TWO = {"ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
       "fsdp2": ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml")]}


def _run(root, batch: int, extra: list[str]) -> dict[str, torch.Tensor]:
    run_cli([*COMMON, *extra, "--trainer.callbacks", "lit_align.callbacks.HFExport", "--trainer.default_root_dir",
             str(root), "--trainer.logger.save_dir", str(root), "--data.init_args.batch_size", str(batch),
             "--model.init_args.reference_cache_dir", str(root / "cache")])
    return load_file(root / "hf_export" / "adapter_model.safetensors")  # LoRA: the adapter


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 8, [])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, tmp_path):
    one = single
    two = _run(tmp_path / "two", 4, TWO[strategy])
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # LoRA's B starts at 0
    assert moved > 1e-4, "training did not move the adapter"
    # measured: 2.4e-5 for both strategies (float reduction order through 3 signed attack steps and AdamW) vs 4e-3
    assert max_diff(two, one) < 1e-4 < moved / 10, (max_diff(two, one), moved)
