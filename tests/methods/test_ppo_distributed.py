"""PPOModule on 2 processes (gloo): DDP and FSDP2 end where one process on the same global batch ends.

One process with 8 prompts per step and two with 4 see the same prompts (the sharded sampler interleaves
ranks); every sample is drawn from a generator seeded by its prompt's global index and its number in the group,
the whitening is global and the losses' token shares are global, so after the same steps the policy agrees up to
floating-point reduction order. PPO with a critic (sharded under FSDP2 like the policy) and GRPO (groups of 4
samples of one prompt, never split across ranks) and contrastive rewards are covered, with a validation epoch.
"""

from __future__ import annotations

import csv

import pytest
from conftest import CSV_LOGGER, REPO, max_diff, run_cli
from safetensors.torch import load_file

from lit_align.cli import cli_main

pytestmark = pytest.mark.slow

FSDP2 = ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml"), "--trainer.callbacks", "lit_align.callbacks.HFExport"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.callbacks", "lit_align.callbacks.HFExport"]
EXPORT = "hf_export/adapter_model.safetensors"


def _args(config: str, root, *extra: str, prompts: int) -> list[str]:
    return ["fit", "--config", str(REPO / f"configs/{config}.yaml"), *CSV_LOGGER,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks", "lit_align.callbacks.HFExport", "--trainer.enable_checkpointing", "false",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval",
            "3", "--trainer.num_sanity_val_steps", "0", *extra,
            "--trainer.default_root_dir", str(root), "--trainer.logger.save_dir", str(root),
            "--data.init_args.batch_size", str(prompts), "--data.init_args.eval_batch_size", str(2 * prompts)]


def _val_reward(root) -> float:
    rows = [r for f in root.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    values = [float(r["val/reward"]) for r in rows if r.get("val/reward")]
    assert values, f"no val/reward logged under {root}"
    return values[-1]


CONTRASTIVE = ["--data.init_args.train.limit", "24", "--model.init_args.contrastive", "{samples: 2, batch_size: 5}"]


@pytest.mark.parametrize(("config", "prompts", "strategies", "extra", "tol"), [
    # PPO on both strategies spawns 3 runs (about a minute): in the integration tier, which CI also runs
    pytest.param("ppo/tiny", 8, ("ddp", "fsdp2"), [], 1e-4, marks=pytest.mark.integration),
    ("grpo/tiny", 4, ("fsdp2",), [], 1e-4),
    ("ppo/contrastive_tiny", 8, ("fsdp2",), CONTRASTIVE, 8e-4)], ids=["ppo", "grpo", "contrastive"])
def test_ddp_and_fsdp2_match_one_process(config, prompts, strategies, extra, tol, tmp_path):
    """PPO with a critic, GRPO's groups, and contrastive rewards (the baseline table made in shares on each rank
    and gathered, 24 prompts: the ranks' shares and generation batches are uneven; the table itself is equal bit
    for bit). Adam turns float noise in near-zero gradients into steps of up to the learning rate, so the
    tolerance is a fraction of how far training moved the weights, not of float precision."""
    cli_main(_args(config, tmp_path / "one", *extra, prompts=prompts))
    one = load_file(tmp_path / "one" / EXPORT)
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # lora_B starts at 0
    for name in strategies:
        strategy = {"ddp": DDP, "fsdp2": FSDP2}[name]
        proc = run_cli(_args(config, tmp_path / name, *extra, *strategy, prompts=prompts // 2))
        assert "Starting with 2 processes" in proc.stdout + proc.stderr or name == "fsdp2"
        two = load_file(tmp_path / name / EXPORT)
        assert max_diff(two, one) < tol < moved / 10, (name, max_diff(two, one), moved)
        # the val rows are the same prompts and draws (the weights agree to float noise: a sampled token may differ)
        assert _val_reward(tmp_path / name) == pytest.approx(_val_reward(tmp_path / "one"), abs=0.1), name
