"""The game on 2 processes: DDP and FSDP2 (gloo) equal one process on the same global batch, and an FSDP2
run resumed from a mid-run (DCP) checkpoint equals the uninterrupted one.

One process with batch 8 and two with batch 4 each play the same 8 seeds per step (the sharded sampler
interleaves the ranks). Every row samples from its own generator (its global index), the diversity
history is built from every rank's prompts in global-index order, whitening and token means are global
and validation means are synced torchmetrics, so the players, their averages and the validation rows
agree up to floating-point reduction order. The short schedule (one defender step, one attacker step)
updates both players, the snapshot pool (``pool_prob`` 0.5) attacks in defender steps, and 2 epochs of 2
batches put the checkpoint of the resume test between two blocks of the schedule.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import REPO, max_diff, run_cli
from safetensors.torch import load_file

# the 2-process equality and resume checks of the multi-player methods: make test-integration (CI runs it)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

COMMON = [
    "fit", "--config", str(REPO / "configs/game/tiny.yaml"), "--trainer.limit_train_batches", "2",
    "--trainer.val_check_interval", "1.0", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar",
    "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--model.init_args.schedule.defender_steps",
    "1", "--model.init_args.schedule.attacker_steps", "1", "--model.init_args.pool.snapshot_every", "1",
]
FSDP2 = ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml"), "--trainer.callbacks", "lit_align.callbacks.HFExport",
         "--trainer.callbacks+=lit_align.callbacks.GameReport"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _run(root, extra: list[str], batch: int, epochs: int = 2) -> None:
    run_cli([*COMMON, *extra, "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(root),
             "--trainer.logger.save_dir", str(root), "--data.init_args.batch_size", str(batch),
             "--data.init_args.eval_batch_size", str(batch)])


def _outputs(root) -> dict:
    """The exported defender, both players' averaged weights and the validation rows of a run."""
    out = {"defender": load_file(root / "hf_export" / "model.safetensors")}
    for player in ("defender", "attacker"):
        out[f"averaged/{player}"] = torch.load(root / "averaged" / f"{player}.pt", weights_only=True)
    history = next(root.rglob("game_history.csv"), None)
    out["history"] = list(csv.DictReader(history.open())) if history is not None else None
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    _run(root, [], batch=8)
    return _outputs(root)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    _run(root, FSDP2, batch=4)
    return root


def _assert_matches(multi: dict, single: dict) -> None:
    from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer

    spec = ModelSpec(name_or_path="builtin:tiny-game-base")
    start = {k: v for k, v in build_causal_lm(spec, build_tokenizer(spec)).state_dict().items()
             if k in single["defender"]}
    moved = max_diff(single["defender"], start)
    assert moved > 1e-3, "training did not move the defender"
    assert max_diff(multi["defender"], single["defender"]) < 2e-5 < moved / 50
    for player in ("defender", "attacker"):  # the attacker is seen through its averaged weights
        assert max_diff(multi[f"averaged/{player}"], single[f"averaged/{player}"]) < 2e-5
    rows_one, rows_two = single["history"], multi["history"]
    assert rows_one and len(rows_one) == len(rows_two) == 2  # one validation per epoch
    for one, two in zip(rows_one, rows_two):
        assert sorted(one) == sorted(two)
        for key in one:  # synced means and the gathered attacks' diversity: the numbers of the global batch
            assert float(two[key]) == pytest.approx(float(one[key]), abs=1e-5), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, fsdp2, tmp_path):
    if strategy == "ddp":
        root = tmp_path
        _run(root, DDP, batch=4)  # the tiny config's callbacks: GameReport, HFExport, ModelCheckpoint
    else:
        root = fsdp2
    _assert_matches(_outputs(root), single)


def test_fsdp2_resumed_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(fsdp2, tmp_path):
    """The DCP checkpoint after epoch 1 holds the sharded players, critics and optimisers (the inactive
    adapter's optimiser state included), and the game state (schedule clock, history, the pool and the
    averages gathered whole) in Lightning's metadata file: the resumed run ends bit for bit where the
    uninterrupted one does."""
    _run(tmp_path / "half", FSDP2, batch=4, epochs=1)
    checkpoint = next((tmp_path / "half").rglob("epoch=0-*.ckpt"))
    assert checkpoint.is_dir()  # a DCP directory
    _run(tmp_path / "resumed", [*FSDP2, "--ckpt_path", str(checkpoint)], batch=4)
    resumed, straight = _outputs(tmp_path / "resumed"), _outputs(fsdp2)
    for key in ("defender", "averaged/defender", "averaged/attacker"):
        assert max_diff(resumed[key], straight[key]) == 0.0, key
