"""Tiny end-to-end training runs: the intended effect moves the right way."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main
from lit_align.data.batches import SequenceBatch
from lit_align.methods.dpo import pair_logps


def _fit(config: str, root, *extra: str):
    return cli_main(["fit", "--config", str(REPO / config), "--trainer.default_root_dir", str(root),
                     "--trainer.enable_progress_bar", "false", *CSV_LOGGER, "--trainer.logger.save_dir", str(root),
                     "--trainer.callbacks", "lit_align.callbacks.HFExport", *extra])


def _fresh(config: str, root, *extra: str):
    module = cli_main(["--config", str(REPO / config), *CSV_LOGGER, "--trainer.logger.save_dir", str(root), *extra],
                      run=False).model
    module.configure_model()
    return module


@torch.no_grad()
def _train_pair_accuracy(module, datamodule) -> float:
    """Share of training pairs whose implicit reward prefers the chosen response."""
    module.eval()
    right = total = 0
    for batch in datamodule.split_loaders()["train"]:
        pc, pr, rc, rr = pair_logps(module, batch, "train")
        right += int(((pc - rc) > (pr - rr)).sum())
        total += len(batch)
    return right / total


def test_tiny_dpo_learns_its_preferences(tmp_path):
    cli = _fit("configs/dpo/tiny.yaml", tmp_path)
    start = _fresh("configs/dpo/tiny.yaml", tmp_path).policy.state_dict()
    trained = cli.model.policy.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start), "parameters did not change"
    accuracy = _train_pair_accuracy(cli.model, cli.datamodule)
    assert accuracy > 0.9, accuracy
    val = cli.trainer.callback_metrics
    assert math.isfinite(float(val["val/loss"])) and float(val["val/rewards/margins"]) > 0


def test_tiny_sft_lowers_its_loss(tmp_path):
    cli = _fit("configs/sft/tiny.yaml", tmp_path, "--trainer.val_check_interval", "1.0",
               "--trainer.check_val_every_n_epoch", "1", "--trainer.max_steps", "-1", "--trainer.max_epochs", "2")
    start = _fresh("configs/sft/tiny.yaml", tmp_path)
    loader = cli.datamodule.val_dataloader()

    @torch.no_grad()
    def val_nll(module) -> float:
        module.eval()
        out = [module.policy_logps(b) for b in loader]
        return -sum(float(o.logps.sum()) for o in out) / sum(float(o.mask.sum()) for o in out)

    before, after = val_nll(start), val_nll(cli.model)
    assert after < before - 1.0, (before, after)
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(after, rel=0.05)


@pytest.mark.parametrize("reference, lora", [("adapter", True), ("copy", False), ("precomputed", True)])
def test_reference_modes_train_and_log_kl(reference, lora, tmp_path):
    extra = ["--model.init_args.reference", reference, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
             "--model.init_args.kl_every_n_steps", "3", "--trainer.log_every_n_steps", "1"]
    if lora:
        extra += ["--model.init_args.model.lora", "{r: 4, alpha: 8}"]
    cli = _fit("configs/dpo/tiny.yaml", tmp_path, *extra)
    metrics = cli.trainer.callback_metrics
    assert "val/kl" in metrics and math.isfinite(float(metrics["val/kl"]))
    assert float(metrics["val/kl"]) > -0.5  # a Monte-Carlo KL estimate: around or above zero
    assert float(metrics["train/tokens_per_sec"]) > 0


def test_ipo_is_selected_in_yaml_and_uses_mean_logps(tmp_path):
    cli = _fit("configs/dpo/tiny.yaml", tmp_path, "--model.init_args.loss", "lit_align.losses.IPOLoss",
               "--model.init_args.loss.beta", "0.5", "--trainer.max_steps", "4")
    assert type(cli.model.loss_fn).__name__ == "IPOLoss" and cli.model.loss_fn.reduction == "mean"
    batch = next(iter(cli.datamodule.split_loaders()["train"]))
    pc, pr, rc, rr = pair_logps(cli.model, batch, "train")
    both = SequenceBatch.cat([batch.chosen, batch.rejected], cli.model.tokenizer.pad_token_id)
    tokens = both.loss_mask[:, 1:].sum(-1).float()
    assert torch.all(pc.abs() < 20) and torch.all(rc * tokens[: len(batch)] < 0)  # per-token means, not sums
