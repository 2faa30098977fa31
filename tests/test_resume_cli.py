"""``--ckpt_path`` through the real CLI: ``last`` resumes the same run (CSV and offline W&B), changed
hyperparameters are applied and announced, another method's or model's checkpoint is refused, an
unreadable checkpoint gives one named error, and exports of other runs are never overwritten."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import wandb
from conftest import CSV_LOGGER, REPO

from lit_align.callbacks.export import RUN_MARKER, _move_aside_other_run
from lit_align.checkpoint import CheckpointReadError
from lit_align.cli import cli_main
from lit_align.resume import HparamChange, ResumeError, changed_hparams

DPO, SFT = str(REPO / "configs/dpo/tiny.yaml"), str(REPO / "configs/sft/tiny.yaml")
CALLBACKS = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 2, monitor: val/loss, mode: min, save_top_k: 1,
                  filename: "best-{step}"}
    - class_path: lit_align.callbacks.HFExport
"""


def _args(root, steps, *extra, config=DPO, csv=True):
    (root / "callbacks.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "callbacks.yaml").write_text(CALLBACKS)
    logger = [*CSV_LOGGER, "--trainer.logger.save_dir", str(root)] if csv else []
    return ["fit", "-c", config, "-c", str(root / "callbacks.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.batch_size", "8", *logger, *extra]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """One 4-step tiny DPO run (CSV logger): validation and a checkpoint every 2 steps, HF export at the end."""
    root = tmp_path_factory.mktemp("dpo_run")
    cli_main(_args(root, 4))
    return root


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "root")
    return tmp_path / "root"


def test_ckpt_path_last_resumes_the_same_wandb_run(tmp_path, monkeypatch, finish_wandb):
    """Fit 4 steps with the offline W&B logger, then fit to 5 with ``--ckpt_path last``: the second run
    restores the first's last checkpoint, keeps its W&B id and folder, and its ModelCheckpoint still knows
    the first run's best checkpoint (no validation falls between steps 4 and 5). On main ``last`` looked in
    the new run's empty folder and restarted from step 0 under a new id."""
    monkeypatch.delenv("WANDB_DIR")  # the W&B run and its checkpoints then go under default_root_dir
    root = tmp_path / "root"
    first = cli_main(_args(root, 4, csv=False))
    run_id, best = first.trainer.logger.version, first.trainer.checkpoint_callback.best_model_path
    wandb.finish()  # as the first process would at exit: otherwise the next logger joins the open run
    assert best and f"/{run_id}/checkpoints/" in best
    resumed = cli_main(_args(root, 5, "--ckpt_path", "last", csv=False))
    assert resumed.trainer.ckpt_path == str((root / "lit_align" / run_id / "checkpoints" / "last.ckpt").resolve())
    assert resumed.trainer.logger.version == run_id
    assert [p.name for p in (root / "lit_align").iterdir()] == [run_id]
    callback = resumed.trainer.checkpoint_callback
    assert callback.best_model_path == best
    assert callback.best_model_score == first.trainer.checkpoint_callback.best_model_score
    assert resumed.trainer.global_step == 5
    saved = torch.load(root / "lit_align" / run_id / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5


def test_explicit_checkpoint_resumes_its_run_with_the_changed_hyperparameter(dpo_run, tmp_path):
    """``--ckpt_path <run>/checkpoints/last.ckpt --model.init_args.loss.init_args.beta 0.5``: the run
    continues in version_0 (the CSV rows logged before the resume kept beside the new ones), beta is 0.5
    (LightningCLI alone put the checkpoint's 0.1 back), and the change is announced; the run's own
    export is replaced, not moved aside."""
    root = _copy(dpo_run, tmp_path)
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"model\.init_args\.loss\.init_args\.beta: 0\.1 -> 0\.5"):
        resumed = cli_main(_args(root, 5, "--ckpt_path", str(ckpt), "--model.init_args.loss.init_args.beta", "0.5"))
    assert resumed.model.loss_fn.beta == 0.5
    assert resumed.trainer.global_step == 5
    assert sorted(p.name for p in root.glob("version_*")) == ["version_0"]
    assert (root / "version_0" / "metrics-before-step-4.csv").is_file()
    assert (root / "version_0" / "metrics.csv").is_file()
    assert json.loads((root / "hf_export" / RUN_MARKER).read_text()) == {"run": "version_0", "global_step": 5}
    assert not list(root.glob("hf_export.*"))


def test_checkpoint_of_another_method_is_refused(dpo_run):
    """A DPO checkpoint under the SFT config (on main: silently a DPO run) names both classes."""
    ckpt = dpo_run / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ResumeError, match=r"lit_align\.methods\.DPOModule.*model\.class_path is "
                                          r"lit_align\.methods\.SFTModule"):
        cli_main(_args(dpo_run, 5, "--ckpt_path", str(ckpt), config=SFT))


def test_resume_and_checkpoint_errors_are_one_message_from_the_command(dpo_run, tmp_path, monkeypatch, capsys):
    """Through ``lit-align`` itself, another method's checkpoint, a missing and an empty checkpoint file are each
    one ``error:`` line, no traceback, exit code 2 (they are lit_align configuration errors)."""
    import sys

    from lit_align.cli import main

    ckpt = dpo_run / "version_0" / "checkpoints" / "last.ckpt"
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for extra, text in ((["--ckpt_path", str(ckpt)], "was written by lit_align.methods.DPOModule"),
                        (["--ckpt_path", str(tmp_path / "nope.ckpt")], "no such file"),
                        (["--ckpt_path", str(empty)], str(empty))):
        config = SFT if "DPOModule" in text else DPO
        monkeypatch.setattr(sys, "argv", ["lit-align", *_args(tmp_path / "run", 5, *extra, config=config)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err and err.count("error:") == 1, err
        assert text in err, err


def test_checkpoint_of_another_model_is_refused(dpo_run):
    """Another policy architecture is refused with the differing spec key; gradient checkpointing, which
    changes how the model runs and not what it is, is only reported as a change."""
    ckpt = dpo_run / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ResumeError, match=r"model\.init_args\.model\.tiny\.hidden_size: 64 -> 32"):
        cli_main(_args(dpo_run, 5, "--ckpt_path", str(ckpt), "--model.init_args.model.tiny.hidden_size", "32"))
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    model = {"class_path": saved["_class_path"], "init_args": {k: v for k, v in saved.items() if k[0] != "_"}}
    model["init_args"]["model"] = {**saved["model"], "gradient_checkpointing": True}
    assert changed_hparams(saved, model, ckpt) == [
        HparamChange("model.init_args.model.gradient_checkpointing", False, True)]


def test_ckpt_path_last_without_a_checkpoint_starts_fresh_and_says_so(tmp_path):
    with pytest.warns(UserWarning, match="--ckpt_path last: no checkpoint"):
        cli = cli_main(_args(tmp_path, 1, "--ckpt_path", "last", "--trainer.limit_val_batches", "0"))
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 1


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_unreadable_checkpoint_names_the_file_and_the_previous_one(dpo_run, tmp_path, damage):
    """On main: EOFError, a miniz error, or an UnpicklingError advising weights_only=False."""
    root = _copy(dpo_run, tmp_path)
    checkpoints = root / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": torch.randint(
        0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()}[damage])
    best = next(checkpoints.glob("best-*.ckpt"))
    with pytest.raises(CheckpointReadError) as error:
        cli_main(_args(root, 5, "--ckpt_path", str(last)))
    message = str(error.value)
    assert str(last) in message and f"--ckpt_path {best}" in message and "weights_only=False" not in message


def test_export_of_another_run_is_moved_aside_not_overwritten(tmp_path):
    """The real helper HFExport calls before writing: another run's export is renamed to
    ``hf_export.<its run>``, an unmarked one to ``hf_export.previous``; this run's own is replaced."""
    export = tmp_path / "hf_export"
    export.mkdir()
    (export / RUN_MARKER).write_text(json.dumps({"run": "lit_align/abc123"}))
    _move_aside_other_run(export, "lit_align/abc123")
    assert export.is_dir() and not list(tmp_path.glob("hf_export.*"))
    with pytest.warns(UserWarning, match="export of run lit_align/abc123"):
        _move_aside_other_run(export, "lit_align/zzz999")
    assert not export.exists() and (tmp_path / "hf_export.lit_align-abc123" / RUN_MARKER).is_file()
    export.mkdir()
    (export / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="export of another run"):
        _move_aside_other_run(export, "lit_align/zzz999")
    assert (tmp_path / "hf_export.previous" / "config.json").is_file()
