"""WatermarkModule on 2 processes (gloo): DDP and FSDP2 equal one process on the same global batch, and an
FSDP2 run resumed from a mid-epoch (DCP) checkpoint equals the uninterrupted FSDP2 run exactly.

One process with batch 16 and two with batch 8 see the same 16 prompts per step (the sharded sampler
interleaves ranks). Every continuation is sampled from a generator seeded by its prompt's global index, the
whitening uses global moments and the PPO and detector losses are means over every rank's tokens and rows,
so after the same steps the policy and the detector agree up to floating-point reduction order. The run
covers detector pretraining (step 0), the critic's copy of the detector at stage 2 (sharded under FSDP2),
the reference's samples as the human text, per-row random substitution, a validation epoch and the
end-of-fit WatermarkEvaluation; a last test runs LoRA actor and detector under FSDP2.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import REPO, max_diff, run_cli
from safetensors.torch import load_file

from lit_align.cli import cli_main

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs/watermark/tiny.yaml")
COMMON = [
    "fit", "--config", CONFIG, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
    "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.callbacks", "lit_align.callbacks.HFExport",
    "--model.init_args.detector_training.pretrain_steps", "1", "--model.init_args.detector_training.substitution_ratio", "0.25",
]
FSDP2 = ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml"), "--trainer.callbacks", "lit_align.callbacks.HFExport"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
FILES = ("hf_export/model.safetensors", "detector_export/model.safetensors", "detector_export/head.safetensors")
#: optimiser steps after two batches: 1 (the detector's, stage 1) + 3 (actor, critic, detector)
MID_RUN_STEPS = "4"


def _args(root, *extra: str, batch: str = "8", evaluate: bool = False) -> list[str]:
    """The run's arguments; ``evaluate``: also the end-of-fit WatermarkEvaluation (one validation batch)."""
    evaluation = ["--trainer.callbacks+=lit_align.callbacks.WatermarkEvaluation", "--trainer.callbacks.num_batches",
                  "1", "--trainer.callbacks.plot", "false", "--trainer.callbacks.dirpath", str(root / "eval")]
    return [*COMMON, *extra, *(evaluation if evaluate else []), "--trainer.default_root_dir", str(root),
            "--trainer.logger.save_dir", str(root), "--data.init_args.batch_size", batch]


def _table(root) -> dict[str, float]:
    """WatermarkEvaluation's table: ``{"<condition>/<column>": value}``."""
    with open(root / "eval" / "watermark_eval.csv") as f:
        return {f"{r['condition']}/{k}": float(v) for r in csv.DictReader(f) for k, v in r.items() if k != "condition"}


def _same_table(two: dict[str, float], one: dict[str, float]) -> None:
    """The same conditions over the same prompts, the same counts and AUROCs. The detector's weights differ
    by float noise, so a score may cross a percentile threshold: the threshold columns are not compared."""
    assert sorted(two) == sorted(one)
    for key, value in one.items():
        if key.endswith(("/n_watermarked", "/n_human")):
            assert two[key] == value, key
        elif key.endswith("/auroc"):
            assert two[key] == pytest.approx(value, abs=0.01), key


def _weights(root) -> dict[str, torch.Tensor]:
    return {f"{f}:{k}": v for f in FILES for k, v in load_file(root / f).items()}


def _auroc(root) -> float:
    rows = [r for f in root.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    values = [float(r["val/auroc"]) for r in rows if r.get("val/auroc")]
    assert values, f"no val/auroc logged under {root}"
    return values[-1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 16; its weights and how far training moved them."""
    root = tmp_path_factory.mktemp("single")
    cli = cli_main([*_args(root, "--trainer.enable_checkpointing", "false", batch="16", evaluate=True)])
    start = tmp_path_factory.mktemp("start")
    module = cli_main(["--config", CONFIG, "--trainer.logger=false", "--trainer.callbacks=[]",
                       f"--trainer.default_root_dir={start}"], run=False).model
    module.configure_model()
    module.save_detector(start / "detector_export")
    start_weights = {f"{FILES[0]}:{k}": v for k, v in module.policy.state_dict().items()}
    start_weights |= {f"{f}:{k}": v for f in FILES[1:] for k, v in load_file(start / f).items()}
    trained = _weights(root)
    moved = max_diff(trained, {k: start_weights[k] for k in trained})
    assert cli.model.step_count == 4 and moved > 1e-3, "training did not move the weights"
    table = _table(root)
    assert table["clean/n_watermarked"] >= 8 and table["kgw_clean/auroc"] > 0.8
    return trained, moved, _auroc(root), table


def test_ddp_matches_one_process(single, tmp_path):
    one, moved, auroc, table = single
    proc = run_cli(_args(tmp_path, *DDP, "--trainer.enable_checkpointing", "false", evaluate=True))
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    two, two_auroc = _weights(tmp_path), _auroc(tmp_path)
    _same_table(_table(tmp_path), table)  # every rank's prompts, the same draws
    assert max_diff(two, one) < 1e-4 < moved / 10
    assert two_auroc == auroc  # the same samples, scores gathered from both ranks


@pytest.mark.integration
def test_fsdp2_matches_one_process_and_resumes_mid_epoch_exactly(single, tmp_path):
    """FSDP2 equals one process; and two batches, a DCP checkpoint, then the last two batches resumed from
    it equal the uninterrupted FSDP2 run: the actor, critic and detector, their three optimisers, the stage
    counter and the data position come back."""
    one, moved, auroc, table = single
    straight = tmp_path / "straight"
    run_cli(_args(straight, *FSDP2, "--trainer.enable_checkpointing", "false", evaluate=True))
    uninterrupted = _weights(straight)
    assert max_diff(uninterrupted, one) < 1e-4 < moved / 10
    assert _auroc(straight) == auroc
    _same_table(_table(straight), table)
    ckpt = tmp_path / "ckpt"
    run_cli(_args(tmp_path / "first", *FSDP2, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(ckpt), "--trainer.callbacks.every_n_train_steps", MID_RUN_STEPS,
                  "--trainer.max_steps", MID_RUN_STEPS))
    (saved,) = ckpt.iterdir()
    assert saved.is_dir(), "FSDP2 checkpoints are DCP directories"
    resumed = tmp_path / "resumed"
    run_cli([*_args(resumed, *FSDP2, "--trainer.enable_checkpointing", "false"), "--ckpt_path", str(saved)])
    assert max_diff(_weights(resumed), uninterrupted) == 0.0  # the same operations on the restored state


def test_lora_actor_and_detector_under_fsdp2_match_one_process(tmp_path):
    """LoRA on the actor (its reference: the same sharded base with the adapter off, no copy) and on the
    detector (the critic copies it, adapters included): the adapters are sharded with their layers and train
    as in one process."""
    lora = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    args = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing",
            "false", f"--model.init_args.model.lora={lora}", f"--model.init_args.detector.model.lora={lora}"]
    files = ("hf_export/adapter_model.safetensors", "detector_export/adapter_model.safetensors")
    cli = cli_main(_args(tmp_path / "one", *args, batch="16"))
    assert cli.model.reference.mode == "adapter" and cli.model.reference.copy is None
    run_cli(_args(tmp_path / "two", *FSDP2, *args))
    one, two = ({f"{f}:{k}": v for f in files for k, v in load_file(root / f).items()}
                for root in (tmp_path / "one", tmp_path / "two"))
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # lora_B starts at 0
    assert max_diff(two, one) < 1e-5 < moved / 100
