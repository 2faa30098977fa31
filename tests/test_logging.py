"""Loggers: W&B decides online/offline from the credentials it can find; other loggers are chosen in YAML."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import REPO
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_align.cli import cli_main
from lit_align.loggers import AutoWandbLogger, wandb_has_credentials


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No API key, no ``WANDB_MODE``, and a home directory without ``.netrc``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    return home


def test_offline_without_credentials(no_credentials):
    assert not wandb_has_credentials()
    assert AutoWandbLogger()._offline is True


def test_online_with_an_api_key_or_a_netrc_entry(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_has_credentials() and AutoWandbLogger()._offline is False  # no run is started here
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_has_credentials() and AutoWandbLogger()._offline is False


def test_wandb_mode_and_explicit_offline_win(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert AutoWandbLogger()._offline is True
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert AutoWandbLogger()._offline is False
    monkeypatch.delenv("WANDB_MODE")
    assert AutoWandbLogger(offline=False)._offline is False
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert AutoWandbLogger(offline=True)._offline is True


def test_run_directory_follows_save_dir_then_wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    assert AutoWandbLogger().save_dir == str(tmp_path / "env")
    assert AutoWandbLogger(dir=str(tmp_path / "kw")).save_dir == str(tmp_path / "kw")
    assert AutoWandbLogger(save_dir=str(tmp_path / "arg")).save_dir == str(tmp_path / "arg")
    monkeypatch.delenv("WANDB_DIR")
    assert AutoWandbLogger().save_dir == "."


def test_default_logger_runs_offline_and_says_where(no_credentials, tmp_path, monkeypatch, caplog, finish_wandb):
    """No ``--trainer.logger``: the CLI's default W&B logger, offline because nothing authenticates."""
    wandb_dir = tmp_path / "wandb_root"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    root = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        cli = cli_main([
            "fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]",
            "--model.init_args.reference_cache_dir", str(root / "cache"),
        ])
    logger = cli.trainer.logger
    assert isinstance(logger, AutoWandbLogger) and logger._offline
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    assert f"W&B run offline (sync later with `wandb sync`): {run_dir}" in caplog.text
    assert list(run_dir.glob("run-*.wandb")), "no offline run file to sync"
    run = logger.experiment
    assert run.config["reference"] == "precomputed"  # the module's hyperparameters reached W&B
    assert run.config["model"]["tiny"]["family"] == "qwen2"
    assert "train/loss" in run.summary.keys() and run.summary["trainer/global_step"] >= 1


@pytest.mark.parametrize("logger", [CSVLogger, TensorBoardLogger], ids=lambda c: c.__name__)
def test_other_loggers_are_chosen_in_yaml(logger, tmp_path):
    override = tmp_path / "logger.yaml"
    override.write_text(json.dumps({"trainer": {"logger": {
        "class_path": f"lightning.pytorch.loggers.{logger.__name__}", "init_args": {"save_dir": str(tmp_path)}}}}))
    cli = cli_main([
        "fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--config", str(override),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--model.init_args.reference_cache_dir", str(tmp_path / "cache"),
    ])
    assert type(cli.trainer.logger) is logger
    written = {"CSVLogger": "metrics.csv", "TensorBoardLogger": "events.out.tfevents.*"}[logger.__name__]
    assert list(tmp_path.rglob(written)), f"{logger.__name__} wrote nothing under {tmp_path}"
