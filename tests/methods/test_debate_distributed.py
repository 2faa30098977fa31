"""DebateModule on 2 processes (DDP, and FSDP2 over gloo) equals one process on the same global batch, and a
2-process FSDP2 run resumed from a mid-DPO checkpoint equals the uninterrupted one.

One process takes 4 questions a generate step and 4 pairs a DPO step; two take 2 each. Every sampled text
is drawn per question (its global index), each rank debates its share of the step's questions (7
training + 3 validation questions: the last chunk of each leaves a rank a padding row), the pairs are
gathered in one order, the reference and validation log-probs are scored in shares and gathered, and
the DPO early stop is decided on the gathered validation loss, so both players' adapters end equal up
to float reduction order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_cli

# the 2-process equality and resume checks of the multi-player methods: make test-integration (CI runs it)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

COMMON = [
    "fit", "--config", str(REPO / "configs/debate/tiny.yaml"), "--trainer.enable_progress_bar", "false",
    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.limit_val_batches", "1",
    "--model.init_args.debate.rounds", "2", "--model.init_args.generate.k", "2",
    "--model.init_args.debate.max_new_tokens", "8", "--model.init_args.generate.questions_per_phase", "7",
    "--model.init_args.generate.dpo_val_questions", "3", "--model.init_args.dpo.epochs", "2",
    "--model.init_args.dpo.eval_every", "1", "--model.init_args.dpo.patience", "2",
    "--data.init_args.val.limit", "4",
]
CALLBACKS = ["--trainer.callbacks", "lit_align.callbacks.BatchCheckpoint", "--trainer.callbacks+=lit_align.callbacks.HFExport"]
ONE = ["--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4", "--model.init_args.dpo.batch_size", "4"]
TWO = ["--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2", "--model.init_args.dpo.batch_size", "2"]
STRATEGY = {"ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
            "fsdp2": ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml")]}


def _run(root, *extra: str) -> dict:
    """Run the tiny debate with ``extra`` under ``root``; the last batch checkpoint (a file, or FSDP2's DCP
    directory read whole) as ``{"state_dict": ..., "debate": ...}``."""
    proc = run_cli([*COMMON, *extra, *CALLBACKS, "--trainer.default_root_dir", str(root), "--trainer.logger.save_dir",
                    str(root)])
    path = next(root.rglob("last-batch.ckpt"))
    if path.is_file():
        out = torch.load(path, weights_only=True)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, root / "whole.pt")
        out = {**torch.load(root / "whole.pt", weights_only=True), **torch.load(path / "meta.pt", weights_only=True)}
    out["log"] = proc.stdout + proc.stderr
    return out


def _adapters(ckpt: dict, player: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if f".{player}." in k}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), *ONE)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fsdp2"), *STRATEGY["fsdp2"], *TWO)


def _assert_equal_players(multi: dict, single: dict, atol: float = 2e-5) -> None:
    assert multi["debate"]["pair_counts"] == single["debate"]["pair_counts"] and all(single["debate"]["pair_counts"])
    assert multi["debate"]["step_count"] == single["debate"]["step_count"]
    for player in ("actor", "critic"):
        one, two = _adapters(single, player), _adapters(multi, player)
        assert one and sorted(one) == sorted(two)
        moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # B starts at 0
        diff = max((one[k] - two[k]).abs().max().item() for k in one)
        assert moved > 1e-3 and diff < atol < moved / 10, (player, diff, moved)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, fsdp2, tmp_path):
    multi = fsdp2 if strategy == "fsdp2" else _run(tmp_path, *STRATEGY["ddp"], *TWO)
    assert "Starting with 2 processes" in multi["log"]
    _assert_equal_players(multi, single)
    history = [row["accuracy"] for row in multi["debate"]["val_history"]]
    assert history == [row["accuracy"] for row in single["debate"]["val_history"]]


def test_fsdp2_resumed_mid_dpo_equals_the_uninterrupted_run(fsdp2, tmp_path):
    """Stopped after 2 optimiser steps (the actor's DPO stage: pairs, reference log-probs, DPO order, best
    weights and both optimisers in the DCP checkpoint), resumed, it ends where the uninterrupted run ends."""
    stopped = _run(tmp_path / "stopped", *STRATEGY["fsdp2"], *TWO, "--trainer.max_steps", "2")
    state = stopped["debate"]["state"]
    assert stopped["global_step"] == 2 and state["stage"] == "train" and stopped["debate"]["phase"] == 0
    path = next((tmp_path / "stopped").rglob("last-batch.ckpt"))
    resumed = _run(tmp_path / "resumed", *STRATEGY["fsdp2"], *TWO, "--ckpt_path", str(path))
    for player in ("actor", "critic"):
        whole, again = _adapters(fsdp2, player), _adapters(resumed, player)
        for key in whole:
            torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0, msg=key)
    assert resumed["debate"]["pair_counts"] == fsdp2["debate"]["pair_counts"]
