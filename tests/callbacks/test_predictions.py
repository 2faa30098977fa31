"""``lit-align predict`` writes predictions.jsonl (and a W&B table) for every method with a predict_step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CSV_LOGGER, REPO, run_cli

from lit_align.callbacks import PredictionWriter
from lit_align.cli import cli_main

#: Two predict batches of two examples: rows 0-3 of each method's predict (= test, else validation) set.
FEW = ["--data.init_args.eval_batch_size", "2", "--trainer.limit_predict_batches", "2",
       "--trainer.enable_progress_bar", "false"]

#: Each method's tiny config, with what makes its predict_step cheap.
METHODS = {
    "sft": ("configs/sft/tiny.yaml", []),
    "dpo": ("configs/dpo/tiny.yaml", []),
    "unlearning": ("configs/unlearning/npo/tiny.yaml", []),
    "wagle": ("configs/wagle/npo_tiny.yaml", []),
    "watermark": ("configs/watermark/tiny.yaml", []),
    "ppo": ("configs/ppo/tiny.yaml", ["--model.init_args.sampling.max_new_tokens", "8"]),
    "game": ("configs/game/tiny.yaml", ["--model.init_args.sampling.defender_max_new_tokens", "8"]),
    "debate": ("configs/debate/tiny.yaml", ["--model.init_args.debate.rounds", "1",
                                           "--model.init_args.debate.max_new_tokens", "8"]),
}


def _predict(root: Path, config: str, *extra: str, logger: list[str] = CSV_LOGGER):
    save_dir = ["--trainer.logger.save_dir", str(root)] if logger else []
    return cli_main(["predict", "--config", str(REPO / config), "--trainer.default_root_dir", str(root),
                     *logger, *save_dir, *FEW, *extra])


def _files_written(folder: Path, pattern: str, timeout: float = 60.0) -> list[Path]:
    """The files matching ``pattern`` once W&B's service has written them: it writes media after the run
    returns, which on a loaded machine (CI under xdist) can take seconds."""
    deadline = time.monotonic() + timeout
    while not (found := sorted(folder.glob(pattern))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _writer(cli) -> PredictionWriter:
    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
    return writer


@pytest.mark.parametrize("method", list(METHODS))
def test_predict_writes_one_row_per_example(method, tmp_path, capsys):
    config, extra = METHODS[method]
    cli = _predict(tmp_path, config, *extra)
    (path,) = tmp_path.rglob("predictions.jsonl")
    assert path == _writer(cli).path and path.parent == Path(cli.trainer.log_dir)  # the CSV logger's run dir
    assert f"Predictions (4 rows): {path}" in capsys.readouterr().out
    rows = _rows(path)
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        assert set(row) == {"index", "prompt", "completion"}, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row
        assert isinstance(row["completion"], str) and row["completion"].strip(), row
    assert len({row["prompt"] for row in rows}) == 4, "each row is a different example"


def test_predict_from_a_checkpoint_to_wandb(tmp_path, monkeypatch, finish_wandb):
    """A short SFT fit writes last.ckpt; predict from it writes the file in the W&B run's directory
    (``<save_dir>/<project>/<run id>``, where its checkpoints would go) and the table ``predictions``, and its completions are the trained
    model's, not the untrained one's."""
    config = "configs/sft/tiny.yaml"
    fit_root = tmp_path / "fit"
    cli_main(["fit", "--config", str(REPO / config), "--trainer.default_root_dir", str(fit_root), *CSV_LOGGER,
              "--trainer.logger.save_dir", str(fit_root), "--trainer.max_steps", "3", "--trainer.callbacks",
              "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last", "true",
              "--trainer.enable_progress_bar", "false"])
    (ckpt,) = fit_root.rglob("last.ckpt")
    untrained = _rows(_writer(_predict(tmp_path / "untrained", config)).path)

    wandb_dir = tmp_path / "wandb_root"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    cli = _predict(tmp_path / "trained", config, "--ckpt_path", str(ckpt), logger=[])  # default logger: W&B
    logger = cli.trainer.logger
    path = _writer(cli).path
    assert path == wandb_dir / "lit_align" / logger.version / "predictions.jsonl"  # save_dir is $WANDB_DIR here
    trained = _rows(path)
    assert [r["prompt"] for r in trained] == [r["prompt"] for r in untrained]
    assert [r["completion"] for r in trained] != [r["completion"] for r in untrained], "checkpoint not loaded"

    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    (table,) = _files_written(run_dir / "files" / "media" / "table", "predictions_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["index", "prompt", "completion"]
    assert table["data"] == [[r["index"], r["prompt"], r["completion"]] for r in trained]


def test_a_configured_prediction_writer_is_not_doubled(tmp_path):
    out = tmp_path / "mine"
    cli = _predict(tmp_path, "configs/sft/tiny.yaml", "--trainer.callbacks", "lit_align.callbacks.PredictionWriter",
                   "--trainer.callbacks.dirpath", str(out), "--trainer.callbacks.filename", "sft.jsonl")
    assert _writer(cli).path == out / "sft.jsonl"
    assert [p.name for p in tmp_path.rglob("*.jsonl")] == ["sft.jsonl"]
    assert len(_rows(out / "sft.jsonl")) == 4


class _Lengths(L.LightningModule):
    """A predict_step whose rows hold a tensor."""

    def predict_step(self, batch, batch_idx):
        return [{"prompt": p, "lengths": torch.tensor([len(p), batch_idx])} for p in batch]


class _Batches:
    """Two batches of prompts from a plain iterable (not a DataLoader)."""

    def __iter__(self):
        yield from (["ab", "c"], ["def"])


def test_rows_of_a_loader_without_indices_keep_their_order(tmp_path):
    """Batches from a plain iterable (no DataLoader: Lightning tracks no indices): ``index`` is null, the rows keep
    their order, and tensors are written as lists."""
    writer = PredictionWriter(dirpath=str(tmp_path), filename="lengths.jsonl", wandb_table=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(_Lengths(), _Batches(), return_predictions=False)
    assert _rows(tmp_path / "lengths.jsonl") == [{"index": None, "prompt": "ab", "lengths": [2, 0]},
                                                 {"index": None, "prompt": "c", "lengths": [1, 0]},
                                                 {"index": None, "prompt": "def", "lengths": [3, 1]}]


def test_predict_step_rows_must_be_dicts(tmp_path):
    with pytest.raises(TypeError, match="predict_step must return one dict per example"):
        PredictionWriter().write_on_batch_end(None, None, ["a", "b"], [0, 1], None, 0, 0)


@pytest.mark.slow
def test_two_processes_write_the_one_process_file(tmp_path):
    """Five examples over 2 DDP ranks: the sampler pads rank 1 with example 0 again; the gathered file has
    each example once, in order, with the completions one process writes."""
    five = ["predict", "--config", str(REPO / "configs/sft/tiny.yaml"), *CSV_LOGGER,
            "--data.init_args.test", "{path: 'builtin:instructions', limit: 5}", "--data.init_args.eval_batch_size",
            "2", "--trainer.enable_progress_bar", "false"]
    one = _writer(cli_main([*five, "--trainer.default_root_dir", str(tmp_path / "one"),
                            "--trainer.logger.save_dir", str(tmp_path / "one")])).path
    proc = run_cli([*five, "--trainer.default_root_dir", str(tmp_path / "two"), "--trainer.logger.save_dir",
                    str(tmp_path / "two"), "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    (two,) = (tmp_path / "two").rglob("predictions.jsonl")
    assert [r["index"] for r in _rows(two)] == [0, 1, 2, 3, 4]
    assert _rows(two) == _rows(one)
    records = [json.loads(line) for line in (REPO / "lit_align/data/builtin/instructions.jsonl").open()][:5]
    assert all(r["prompt"] in row["prompt"] for r, row in zip(records, _rows(two)))
