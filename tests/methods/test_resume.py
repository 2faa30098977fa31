"""Resume equality: N steps straight == k steps, stop, resume from the checkpoint, N - k more."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main


def _losses(root) -> dict[int, float]:
    rows = [r for f in sorted(root.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _run(config, root, steps, *extra):
    return cli_main([
        "fit", "--config", str(REPO / config), "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "3", *CSV_LOGGER, "--trainer.logger.save_dir", str(root),
        "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_top_k", "-1",
        "--data.init_args.batch_size", "64", *extra,
    ])


@pytest.mark.parametrize("config, stop, extra", [
    ("configs/dpo/tiny.yaml", 3, []),
    ("configs/dpo/tiny.yaml", 3, ["--model.init_args.reference", "copy"]),
    ("configs/sft/tiny.yaml", 3, []),
    ("configs/sft/tiny.yaml", 5, []),
], ids=["dpo-mid-epoch", "dpo-copy-reference", "sft-mid-epoch", "sft-epoch-end"])
def test_resume_is_exact(config, stop, extra, tmp_path):
    """270 training examples in batches of 64: five batches (the last of 14) form epoch 0, so
    stopping after 3 steps is mid-epoch, after 5 steps is the end of the epoch, and step 7 falls in
    epoch 1; the data order, optimiser state, reference log-probs and RNG all have to come back for
    the parameters to match bit for bit."""
    total = 7
    straight = _run(config, tmp_path / "a", total, *extra)
    _run(config, tmp_path / "b", stop, *extra)
    ckpt = next((tmp_path / "b").rglob(f"*step={stop}.ckpt"))  # written after optimiser step `stop`
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("reference.copy.") for k in saved)  # a frozen copy is rebuilt, not stored
    resumed = _run(config, tmp_path / "c", total, "--ckpt_path", str(ckpt), *extra)

    a, c = straight.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)
    fresh = cli_main(["--config", str(REPO / config), *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path)],
                     run=False).model
    fresh.configure_model()
    first = fresh.policy.state_dict()
    assert any(not torch.equal(first[n], a[n]) for n in a), "training did not change the parameters"
    losses_a, losses_b, losses_c = _losses(tmp_path / "a"), _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert sorted(losses_b) == list(range(stop)) and sorted(losses_c) == list(range(stop, total))
    for step, value in {**losses_b, **losses_c}.items():
        assert value == pytest.approx(losses_a[step], abs=1e-6), step
