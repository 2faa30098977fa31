"""WatermarkEvaluation after a real tiny WatermarkModule fit (configs/watermark/tiny.yaml, 2 batches).

The tiny run's "human" text is sampled from the frozen starting LLM (``human_from_reference``), so
after two batches the learned detector is near chance: these tests check the table's plumbing
(rows, ranges, identities, files, W&B calls), not the watermark's strength. KGW, a statistical
watermark, needs no training and is already strong on 16 tokens at δ = 2.
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from lightning.pytorch.loggers import WandbLogger

from lit_align.callbacks.watermark_eval import WatermarkEvaluation
from lit_align.cli import cli_main

CONFIG = str(REPO / "configs/watermark/tiny.yaml")
ORACLE = {"tiny": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                   "intermediate_size": 64}}
SUBSTITUTION = [0.0, 0.1, 0.5]
DELETION = [0.0, 0.3]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two co-training batches, validation at the end of the epoch, then the callback on the same 2 batches."""
    root = tmp_path_factory.mktemp("wm_eval")
    stack = root / "callbacks.yaml"
    stack.write_text(json.dumps({"trainer": {"callbacks": [{
        "class_path": "lit_align.callbacks.watermark_eval.WatermarkEvaluation",
        "init_args": {"num_batches": 2, "substitution_ratios": SUBSTITUTION, "deletion_ratios": DELETION,
                      "paraphraser": {"class_path": "lit_align.metrics.detection.ShuffleWordsParaphraser"},
                      "oracle": ORACLE, "verbose": True},
    }]}}))  # JSON is YAML
    cli = cli_main(["fit", "--config", CONFIG, "--config", str(stack), f"--trainer.default_root_dir={root}",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
                    "--trainer.check_val_every_n_epoch=1", "--model.init_args.sampling.max_new_tokens=16"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, WatermarkEvaluation)]
    return cli, callback, root


def test_table_rows_ranges_and_identities(fitted):
    cli, cb, _ = fitted
    res = cb.results
    conditions = ["clean", *(f"substitution_{r:g}" for r in SUBSTITUTION), *(f"deletion_{r:g}" for r in DELETION),
                  "paraphrase"]
    for row in conditions + [f"kgw_{c}" for c in conditions]:
        assert row in res, row
        assert 0.0 <= res[row]["auroc"] <= 1.0
        for key in ("tpr_at_fpr_1", "fpr_at_tpr_90", "fpr_at_tpr_99"):
            assert 0.0 <= res[row][key] <= 1.0
        assert res[row]["n_watermarked"] == res[row]["n_human"] == res["clean"]["n_human"] > 0
    # ratio 0 changes no token: identical to clean text, for both detectors
    for prefix in ("", "kgw_"):
        clean = {k: v for k, v in res[f"{prefix}clean"].items() if k != "perplexity"}
        assert res[f"{prefix}substitution_0"] == clean
    # the same batches and sampling seeds as the module's last validation
    assert res["clean"]["auroc"] == pytest.approx(float(cli.trainer.callback_metrics["val/auroc"]), abs=1e-12)
    # KGW (δ = 2, γ = 0.5) on 16 tokens: the green excess separates it from the same human text...
    assert res["kgw_clean"]["auroc"] > 0.9
    # ...and half the tokens replaced at random wipes out most of it
    assert res["kgw_substitution_0.5"]["auroc"] < res["kgw_clean"]["auroc"]
    # perplexity under the oracle: watermarked, KGW, original model's and human text
    for row in ("clean", "kgw_clean", "original", "human"):
        assert math.isfinite(res[row]["perplexity"]) and res[row]["perplexity"] > 1.0
    assert cb.dropped + res["clean"]["n_human"] == min(2 * 16, len(cli.datamodule.val_dataset))  # 2 batches of 16
    fpr, tpr = cb.roc["kgw"]
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    area = float(((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2).sum())
    assert area == pytest.approx(res["kgw_clean"]["auroc"], abs=1e-6)  # binary_auc is torchmetrics' float32 value


def test_csv_png_and_summary_are_written(fitted, capsys):
    _, cb, root = fitted
    assert cb.files["csv"].parent == root and cb.files["csv"].name == "watermark_eval.csv"
    with cb.files["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == list(cb.results)
    assert list(rows[0])[:5] == ["condition", "auroc", "tpr_at_fpr_1", "fpr_at_tpr_90", "fpr_at_tpr_99"]
    clean = next(r for r in rows if r["condition"] == "clean")
    assert float(clean["auroc"]) == pytest.approx(cb.results["clean"]["auroc"])
    assert next(r for r in rows if r["condition"] == "human")["auroc"] == ""  # perplexity-only row
    png = cb.files["png"]
    assert png.name == "watermark_roc.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _RecordingWandb(WandbLogger):
    """A WandbLogger that records calls instead of starting a run."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.calls: list[tuple[str, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", {"metrics": metrics, "step": step}))

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.calls.append(("table", {"key": key, "columns": columns, "data": data}))

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append(("image", {"key": key, "images": images}))


def test_wandb_table_and_image(fitted, tmp_path):
    _, cb, _ = fitted
    copy = WatermarkEvaluation(dirpath=str(tmp_path), verbose=False)
    copy.results, copy.roc = cb.results, cb.roc
    logger = _RecordingWandb()
    trainer = SimpleNamespace(log_dir=None, global_rank=0, global_step=7, default_root_dir=str(tmp_path),
                              loggers=[logger])
    copy._write(trainer)
    kinds = {kind: payload for kind, payload in logger.calls}
    assert kinds["table"]["key"] == "watermark_eval" and kinds["table"]["columns"][0] == "condition"
    assert [row[0] for row in kinds["table"]["data"]] == list(cb.results)
    assert kinds["image"] == {"key": "watermark_roc", "images": [str(tmp_path / "watermark_roc.png")]}
    assert kinds["metrics"]["metrics"]["watermark/clean/auroc"] == cb.results["clean"]["auroc"]
    assert (tmp_path / "watermark_eval.csv").is_file()


def test_optional_rows_and_modes_restored(fitted):
    """Without KGW, paraphraser, oracle or attacks only ``clean`` remains; train/eval modes come back."""
    cli, _, _ = fitted
    module = cli.model
    module.policy.train()
    module.detector.train()
    first = module.detector
    inner = list(module.detector.modules())[3]
    inner.eval()  # a mixed state must survive as it is
    modes = {name: m.training for name, m in module.named_modules()}
    cb = WatermarkEvaluation(num_batches=1, substitution_ratios=(), deletion_ratios=(), kgw=False, verbose=False)
    res = cb.evaluate(cli.trainer, module)
    assert list(res) == ["clean"] and "perplexity" not in res["clean"]
    assert res["clean"]["n_human"] + cb.dropped == 16
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert first.training and not inner.training
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("kwargs", [{"num_batches": 0}, {"substitution_ratios": (0.1, 1.5)},
                                    {"deletion_ratios": (-0.1,)}, {"kgw_gamma": 1.0}, {"kgw_delta": -1.0}])
def test_bad_arguments_fail_early(kwargs):
    with pytest.raises(ValueError):
        WatermarkEvaluation(**kwargs)
