"""ClassifierUnlearningModule on scikit-learn's digits: UGradSL / UGradSL+ / baselines, the reference models, the
report against Retrain, SalUn's mask, exact resume and bad input (others.md §2).

The shipped config runs once through the real CLI; the other tests drive the real Lightning Trainer directly on one
set-up DataModule with the same split (the CLI's parsing costs more than these fits), sharing the reference models
the first test trains (one cache for the file).
"""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from conftest import REPO

from lit_align.callbacks import WeightMask
from lit_align.classifiers import MLPBackbone
from lit_align.classifiers.references import ReferenceTraining, obtain_reference
from lit_align.cli import cli_main
from lit_align.data import ForgetSplit, ImageClassificationDataModule
from lit_align.errors import ConfigError
from lit_align.methods import (
    ClassifierUnlearningModule,
    FineTune,
    GradientAscent,
    RandomLabels,
    UGradSL,
    UGradSLPlus,
)

CLASS_WISE = REPO / "configs/ugradsl_cls/class_wise_digits.yaml"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One cache of reference models for the whole file (each is trained once, then read back)."""
    return str(tmp_path_factory.mktemp("references"))


def _digits(**split) -> ImageClassificationDataModule:
    dm = ImageClassificationDataModule("builtin:digits", split=ForgetSplit(**split), batch_size=64,
                                       eval_batch_size=512)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def class_wise():
    return _digits(kind="class_wise", classes=[0])


def _module(rule, references, dropout=0.0, sgd=True, **kwargs) -> ClassifierUnlearningModule:
    return ClassifierUnlearningModule(
        MLPBackbone(hidden=[64], dropout=dropout), rule,
        reference_training=ReferenceTraining(epochs=4, lr=0.05, cache_dir=references),
        optimizer=partial(torch.optim.SGD, lr=0.005, momentum=0.9) if sgd else None, **kwargs)


def _trainer(root, max_steps, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=list(callbacks), enable_checkpointing=bool(callbacks), **kwargs)


def test_ugradsl_class_wise_config_reports_against_retrain(tmp_path, references):
    """The shipped class-wise config through the CLI: starts from the original (loaded in configure_model),
    forgets class 0 (UA rises from the original's ~0 toward Retrain's 100), keeps the rest, and reports every score
    against Retrain in the log and in classifier_unlearning.json/.csv; both objective terms are logged."""
    cli = cli_main(["fit", "--config", str(CLASS_WISE), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
                    f"--model.init_args.reference_training.cache_dir={references}",
                    "--model.init_args.reference_training.epochs=4"])
    report = cli.model.report
    assert set(report) == {"unlearned", "original", "retrain"}
    for row in report.values():
        assert set(row) == {"UA", "RA", "TA", "MIA", "seconds", "avg_gap"}
    assert report["retrain"]["avg_gap"] == 0.0
    assert report["retrain"]["UA"] == 100.0  # Retrain never saw class 0
    assert report["original"]["UA"] < 10.0
    assert report["unlearned"]["UA"] > report["original"]["UA"] + 20
    assert report["unlearned"]["avg_gap"] < report["original"]["avg_gap"]
    assert report["unlearned"]["RA"] > 80.0
    assert report["retrain"]["seconds"] > 0 and report["unlearned"]["seconds"] > 0
    written = json.loads(next(tmp_path.rglob("classifier_unlearning.json")).read_text())
    assert written["unlearned"]["avg_gap"] == pytest.approx(report["unlearned"]["avg_gap"])
    assert next(tmp_path.rglob("classifier_unlearning.csv")).read_text().startswith("model,UA,RA,TA,MIA,avg_gap")
    logged = cli.trainer.logged_metrics
    for key in ("train/retain_term", "train/forget_term", "train/retain_ce", "train/forget_gls", "train/alpha"):
        assert key in logged, key
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"unlearn/UA", "unlearn/avg_gap", "unlearn/seconds", "unlearn/retrain_UA"} <= set(header)
    # UGradSL's schedule: epochs over the forget set (min_size), each forget batch with a retain batch
    forget = len(cli.datamodule.indices("forget"))
    assert cli.trainer.global_step == cli.trainer.max_epochs * -(-forget // 64)


@pytest.mark.parametrize("rule, stream_rows", [
    (GradientAscent(), {"forget"}),
    (FineTune(), {"retain"}),
    (RandomLabels(), {"train"}),
    (UGradSL(alpha=-1.0, p=0.5), {"forget", "retain"}),
    (UGradSLPlus(alpha=None, p=0.9, beta=0.3), {"forget", "retain"}),
])
def test_each_rule_trains_on_its_streams(tmp_path, references, class_wise, rule, stream_rows):
    """GA: forget only; FT: retain only; RL: the train set; UGradSL(+) both (UGradSL+ cycles the forget set over
    retain epochs); the weights move and the adaptive alpha is negative by default."""
    module = _module(rule, references)
    seen: set[int] = set()
    real_step = module.training_step

    def spy(batch, batch_idx):
        rows = batch.values() if "x" not in batch else [batch]
        seen.update(int(i) for b in rows for i in b["index"])
        return real_step(batch, batch_idx)

    module.training_step = spy
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, class_wise)
    subsets = {name: set(class_wise.indices(name).tolist()) for name in ("forget", "retain")}
    touched = {name for name, rows in subsets.items() if seen & rows}
    assert touched == ({"forget", "retain"} if stream_rows == {"train"} else stream_rows)
    assert trainer.global_step == 3
    assert module.report["unlearned"]["avg_gap"] >= 0
    if rule.needs_features:
        assert trainer.logged_metrics["train/alpha"] <= 0


def test_random_labels_are_wrong_and_fixed(class_wise):
    rule = RandomLabels()
    rule.prepare(class_wise, seed=3)
    forget = torch.as_tensor(class_wise.indices("forget"))
    true = class_wise.labels(forget)
    wrong = rule.relabel(true, forget)
    assert (wrong != true).all() and wrong.max() < class_wise.num_classes
    again = RandomLabels()
    again.prepare(class_wise, seed=3)
    assert torch.equal(again.relabel(true, forget), wrong)
    retain = torch.as_tensor(class_wise.indices("retain"))
    assert torch.equal(rule.relabel(class_wise.labels(retain), retain), class_wise.labels(retain))


def test_salun_mask_keeps_half_the_weights(tmp_path, references, class_wise):
    """SalUn = RandomLabels under WeightMask(method=gradient, ratio=0.5) on a classifier (through the module's
    hooks): the weights outside the mask (the smallest forget-gradient magnitudes) stay at the original's."""
    module = _module(RandomLabels(), references)
    _trainer(tmp_path, 3, callbacks=[WeightMask(method="gradient", ratio=0.5)]).fit(module, class_wise)
    original = obtain_reference("original", None, module.backbone, class_wise, module.reference_training,
                                module.seed).net
    moved = torch.cat([(p.detach() != q).flatten() for p, q in zip(module.net.parameters(), original.parameters())])
    assert 0.3 < moved.float().mean() <= 0.5 + 1e-3


def test_resume_is_exact(tmp_path, references, class_wise):
    """UGradSL+ with adaptive alpha, dropout and Adam: 5 steps straight == 2 steps, resume from the step-2
    checkpoint (read with weights_only=True), 3 more (the cycled forget stream, the retain stream, the optimiser and
    the dropout draws come back; the original's weights are not reloaded over the checkpoint's)."""
    rule = partial(UGradSLPlus, alpha=None, p=0.9, beta=0.3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1, every_n_train_steps=1)
    straight = _module(rule(), references, dropout=0.2, sgd=False)
    _trainer(tmp_path / "a", 5).fit(straight, class_wise)
    _trainer(tmp_path / "b", 2, callbacks=[ckpt]).fit(_module(rule(), references, 0.2, sgd=False), class_wise)
    resumed = _module(rule(), references, dropout=0.2, sgd=False)
    # built in Python (not by the CLI), the module's hyperparameters hold the backbone and rule objects: both are
    # registered safe globals, so the checkpoint loads with weights_only=True as it is
    _trainer(tmp_path / "c", 5).fit(resumed, class_wise, ckpt_path=str(next((tmp_path / "b").glob("*step=2.ckpt"))))
    a, c = straight.net.state_dict(), resumed.net.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)
    assert resumed.report["unlearned"]["UA"] == straight.report["unlearned"]["UA"]
    # `test` reports the same scores under test/unlearn_*
    tester = _trainer(tmp_path / "d", 1)
    tester.test(resumed, class_wise, verbose=False)
    assert tester.logged_metrics["test/unlearn_avg_gap"].item() == pytest.approx(resumed.report["unlearned"]["avg_gap"])
    assert "test/acc" in tester.logged_metrics


def test_reference_weights_from_a_file(tmp_path, references, class_wise):
    """original given as a safetensors file is loaded (not trained) into the starting network; a file of another
    backbone is a ConfigError naming the key."""
    from safetensors.torch import save_file

    net = MLPBackbone(hidden=[64]).build((1, 8, 8), 10)
    path = tmp_path / "original.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    module = _module(GradientAscent(), references, original=str(path))
    _trainer(tmp_path, 1).validate(module, class_wise)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[name], value, rtol=0, atol=0)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in MLPBackbone(hidden=[32]).build((1, 8, 8), 10).state_dict().items()},
              str(wrong))
    with pytest.raises(ConfigError, match="model.init_args.original"):
        _trainer(tmp_path, 1).validate(_module(GradientAscent(), references, original=str(wrong)), class_wise)


@pytest.mark.parametrize("build, match", [
    (lambda: UGradSL(alpha=-1.0, p=1.5), r"rule\.init_args\.p .*\[0, 1\]"),
    (lambda: UGradSLPlus(alpha=-1.0, p=-0.1), r"rule\.init_args\.p .*\[0, 1\]"),
    (lambda: UGradSL(alpha=2.0), r"rule\.init_args\.alpha"),
    (lambda: UGradSL(alpha=None, beta=1.5), r"rule\.init_args\.beta"),
    (lambda: _module(UGradSL(alpha=-1.0), None, label_smoothing=0.1), r"label_smoothing.*alpha"),
    (lambda: _module(FineTune(), None, label_smoothing=-0.5), r"label_smoothing.*\[0, 1\).*ignores negative"),
    (lambda: _module(GradientAscent(), None, label_smoothing=0.1), r"label_smoothing=0.1 is not used by GradientAscent"),
    (lambda: UGradSL(alpha=True), r"rule\.init_args\.alpha"),
])
def test_bad_input(build, match):
    """p outside [0, 1], alpha above 1 (or a bool), and PyTorch's built-in smoothing given with UGradSL's alpha,
    negative (PyTorch silently ignores it) or to GA (which does not use it: R1 finding 7) are ConfigErrors naming
    the key, raised before anything is trained."""
    with pytest.raises(ConfigError, match=match):
        build()


def test_bad_input_through_the_cli(tmp_path):
    """The same error reaches a YAML user through the CLI (jsonargparse keeps the ConfigError as the cause)."""
    rule = json.dumps({"class_path": "lit_align.methods.UGradSL", "init_args": {"alpha": -1.0, "p": 1.5}})
    with pytest.raises(ValueError, match=r"rule\.init_args\.p") as err:
        cli_main(["fit", "--config", str(CLASS_WISE), f"--trainer.default_root_dir={tmp_path}",
                  f"--model.init_args.rule={rule}"])
    assert isinstance(err.value, ConfigError) or isinstance(err.value.__cause__, ConfigError)


def test_ugradsl_plus_schedule_and_adaptive_alpha(tmp_path, references, class_wise):
    """R1 finding 9: one UGradSL+ epoch is ceil(|D_r| / B) steps (epochs over the retain set), the forget rows
    recur within it (the forget stream is cycled), and the adaptive alpha is strictly negative at every step when
    retain neighbours exist (beta 0.5: ReLU features have cosine >= 0, so every retain row is within reach)."""
    module = _module(UGradSLPlus(alpha=None, p=0.9, beta=0.5), references)
    forget_seen: list[int] = []
    alphas: list[float] = []
    real_step, real_objective = module.training_step, module.rule.objective

    def spy(batch, batch_idx):
        forget_seen.extend(int(i) for i in batch["forget"]["index"])
        return real_step(batch, batch_idx)

    def objective(parts, label_smoothing=0.0):
        loss, metrics = real_objective(parts, label_smoothing)
        alphas.append(float(metrics["alpha_min"]))
        alphas.append(float(metrics["alpha"]))
        return loss, metrics

    module.training_step, module.rule.objective = spy, objective
    trainer = _trainer(tmp_path, -1, max_epochs=1)
    trainer.fit(module, class_wise)
    retain, forget = len(class_wise.indices("retain")), len(class_wise.indices("forget"))
    assert trainer.global_step == -(-retain // 64)
    assert len(forget_seen) > forget and len(set(forget_seen)) == forget  # cycled: every row, some twice
    assert alphas and max(alphas) < 0


def test_run_time_is_training_batches_only(tmp_path, references, class_wise):
    """R1 finding 8: ``seconds`` leaves out validation (run after every batch here), epoch-end work and checkpoint
    writes, at batch ends and at epoch-end validations (each made slow: 0.1 s per call, about 1.3 s in all), but counts
    the training batches; the checkpoints store the training seconds so far."""
    import time

    class Slow(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            time.sleep(0.1)

        def on_train_epoch_end(self, trainer, pl_module):
            time.sleep(0.1)

    class SlowCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            super()._save_checkpoint(trainer, filepath)
            time.sleep(0.1)

    module = _module(GradientAscent(), references)
    at_steps = SlowCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=2)
    at_validation = SlowCheckpoint(dirpath=tmp_path / "val", save_top_k=-1, filename="{epoch}-{step}-val")
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=1, callbacks=[Slow(), at_steps, at_validation])
    trainer.fit(module, class_wise)
    assert trainer.global_step >= 4
    assert len(list((tmp_path / "steps").glob("*.ckpt"))) >= 2 and len(list((tmp_path / "val").glob("*.ckpt"))) >= 2
    seconds = module.report["unlearned"]["seconds"]
    assert 0 < seconds < 0.5
    for ckpt in (tmp_path / "steps").glob("*.ckpt"):
        stored = torch.load(ckpt, weights_only=True)["classifier_unlearning"]["seconds"]
        assert 0 < stored <= seconds + 1e-6


@pytest.mark.integration  # about 10-20 s: two DDP processes start and stop
def test_two_processes_refuse_a_missing_reference(tmp_path):
    """R1 finding 4: with 2 processes and no cached / given original model, the run stops with a ConfigError that
    says to train the references first, instead of rank 0 training them while rank 1 waits at a barrier."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("lit-align")
    proc = subprocess.run(
        [str(exe), "fit", "--config", str(CLASS_WISE), f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=2",
         "--trainer.strategy=ddp", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         f"--model.init_args.reference_training.cache_dir={tmp_path / 'empty_cache'}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode != 0
    assert "model.init_args.original is null" in proc.stderr and "Train it first" in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "empty_cache").glob("*.safetensors"))
