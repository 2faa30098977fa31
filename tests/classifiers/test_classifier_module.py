"""ClassifierBase / ClassifierModule (ERM): the shipped configs through the real CLI, seeded idempotent building,
the subset trained on, fairness metrics from val/test groups, evaluate_subset, exact resume, bad settings."""

from __future__ import annotations

import csv
import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CSV_LOGGER, REPO

from lit_align.classifiers import (
    HFSequenceClassifierBackbone,
    MLPBackbone,
    ResNetBackbone,
    SmallCNNBackbone,
    TorchvisionBackbone,
    ViTBackbone,
)
from lit_align.cli import cli_main
from lit_align.data import ForgetSplit, ImageClassificationDataModule
from lit_align.errors import ConfigError, find_known_error
from lit_align.methods import ClassifierModule

DIGITS = str(REPO / "configs/classifier/digits.yaml")
ADULT = str(REPO / "configs/classifier/adult_erm.yaml")


def _cli(sub: str, config: str, root, *extra: str):
    return cli_main([sub, "--config", config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                     "false", *CSV_LOGGER, "--trainer.logger.save_dir", str(root), *extra])


def _train_losses(root) -> dict[int, float]:
    rows = [r for f in sorted(root.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_digits_config_learns_and_tests(tmp_path):
    cli = _cli("fit", DIGITS, tmp_path, "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0")
    module = cli.model
    assert cli.trainer.current_epoch == 2 and module.num_classes == 10 and module.input_shape == (1, 8, 8)
    fresh = ClassifierModule(MLPBackbone(hidden=[64]))
    fresh.build((1, 8, 8), 10)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.net.state_dict().values(), module.net.state_dict().values()))
    assert cli.trainer.callback_metrics["val/acc"] > 0.7  # chance is 0.1
    losses = _train_losses(tmp_path)
    assert losses[max(losses)] < losses[min(losses)] and all(map(torch.isfinite, map(torch.tensor, losses.values())))
    assert "val/dp_gap" not in cli.trainer.callback_metrics  # digits has no sensitive attribute
    tested = _cli("test", DIGITS, tmp_path / "test", "--ckpt_path", str(next(tmp_path.rglob("last.ckpt"))))
    accuracy = tested.trainer.callback_metrics["test/acc"].item()
    # evaluate_subset scores the same rows in memory: same accuracy, rows in index order
    summary = tested.model.evaluate_subset("test")
    assert summary["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert summary["index"].tolist() == tested.datamodule.indices("test").tolist()
    assert summary["loss"] == pytest.approx(tested.trainer.callback_metrics["test/loss"].item(), rel=1e-5)


def test_adult_config_logs_fairness_gaps_from_test_groups(tmp_path):
    cli = _cli("fit", ADULT, tmp_path, "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
               "--trainer.limit_val_batches", "2")
    metrics = cli.trainer.callback_metrics
    assert {"val/acc", "val/f1", "val/dp_gap", "val/eop_gap", "val/eod_gap"} <= set(metrics)
    # the logged gaps are GroupFairness on the val rows the loop saw (2 batches of 1024), with their groups
    dm, module = cli.datamodule, cli.model
    rows = dm.indices("val")[:2048]
    with torch.no_grad():
        logits = module.net.eval()(dm.features(rows))
    pred, y, g = logits.argmax(-1), dm.labels(rows), dm.groups(rows)
    rate = [pred[g == k].float().mean() for k in (0, 1)]
    assert metrics["val/dp_gap"].item() == pytest.approx((rate[0] - rate[1]).abs().item(), abs=1e-5)
    tpr = [pred[(g == k) & (y == 1)].float().mean() for k in (0, 1)]
    assert metrics["val/eop_gap"].item() == pytest.approx((tpr[0] - tpr[1]).abs().item(), abs=1e-5)


def test_building_is_seeded_idempotent_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = (ClassifierModule(MLPBackbone(hidden=[8]), seed=s) for s in (0, 0, 1))
    for m in (a, b, c):
        m.build((5,), 3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.net.parameters(), c.net.parameters()))
    # the strategy's device context (configure_model runs inside it) does not move the build off the CPU: the same
    # seed gives the same weights on any accelerator (Lightning moves the net afterwards)
    d = ClassifierModule(MLPBackbone(hidden=[8]), seed=0)
    with torch.device("meta"):
        d.build((5,), 3)
    assert all(p.device.type == "cpu" and torch.equal(p, q) for p, q in zip(d.net.parameters(), a.net.parameters()))
    net = a.net
    a.configure_model()  # needs no data once built
    assert a.net is net
    # a training step's draws depend on (seed, step, batch_idx, rank) only, and leave the global generator alone
    draws = []
    for batch_idx in (0, 0, 1):
        with a.step_rng(batch_idx):
            draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert torch.equal(torch.random.get_rng_state(), before)


def test_train_on_retain_trains_on_retain_rows_only(tmp_path):
    """Class-wise forgetting of digit 3: the Retrain reference never sees a forget row."""
    seen: list[int] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.extend(batch["index"].tolist())
            assert "group" not in batch

    dm = ImageClassificationDataModule(split=ForgetSplit(kind="class_wise", classes=[3]), batch_size=128)
    module = ClassifierModule(MLPBackbone(hidden=[16]), train_on="retain")
    L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()], limit_val_batches=0).fit(module, dm)
    retain, forget = set(dm.indices("retain").tolist()), set(dm.indices("forget").tolist())
    assert seen and set(seen) <= retain and not set(seen) & forget
    assert module.train_streams().names == ("retain",)
    # the Retrain model cannot predict the forgotten class: UA on the forget rows is high
    assert module.evaluate_subset("forget", datamodule=dm)["accuracy"] < 0.1


def test_resume_is_exact_with_dropout(tmp_path):
    """1,258 training digits in batches of 256: five batches per epoch, so stopping after 3 steps is mid-epoch and
    step 7 is in epoch 1. Dropout draws are seeded per step, so the resumed weights equal the straight run's."""
    common = ["--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1", "--data.init_args.batch_size", "256",
              "--model.init_args.backbone.init_args.dropout", "0.3", "--trainer.limit_val_batches", "1",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1",
              "--trainer.num_sanity_val_steps", "0"]
    straight = _cli("fit", DIGITS, tmp_path / "a", "--trainer.max_steps", "7", *common)
    _cli("fit", DIGITS, tmp_path / "b", "--trainer.max_steps", "3", *common)
    ckpt = next((tmp_path / "b").rglob("*step=3.ckpt"))
    resumed = _cli("fit", DIGITS, tmp_path / "c", "--trainer.max_steps", "7", "--ckpt_path", str(ckpt), *common)
    a, c = straight.model.net.state_dict(), resumed.model.net.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)
    losses_a, losses_c = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "c")
    assert sorted(losses_c) == [3, 4, 5, 6]
    for step in losses_c:
        assert losses_c[step] == losses_a[step], step


def test_label_smoothing_is_pytorch_s_and_refuses_negative_alpha():
    """§2(g)4: PyTorch's cross-entropy documents label_smoothing in [0, 1]; older releases refuse alpha < 0, torch
    2.13 silently computes plain cross-entropy instead. Either way it is not the generalised label-smoothing loss
    (1 - alpha) CE + alpha mean_k(-log p_k), so negative smoothing needs its own loss and the module refuses it."""
    torch.manual_seed(0)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    logps = logits.log_softmax(-1)
    gls = (1.5 * F.nll_loss(logps, y, reduction="none") - 0.5 * -logps.mean(-1)).mean()  # alpha = -0.5
    try:
        builtin = F.cross_entropy(logits, y, label_smoothing=-0.5)
    except RuntimeError:  # torch releases that check the range
        builtin = None
    assert builtin is None or not torch.allclose(builtin, gls)
    with pytest.raises(ConfigError, match=r"label_smoothing=-0.5.*ClassifierUnlearningModule.*alpha"):
        ClassifierModule(MLPBackbone(), label_smoothing=-0.5)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\]"):
        ClassifierModule(MLPBackbone(), label_smoothing=1.5)
    with pytest.raises(ConfigError, match="train_on must be one of"):
        ClassifierModule(MLPBackbone(), train_on="forget")


def test_cli_refuses_negative_smoothing_and_a_checkpoint_of_other_data(tmp_path):
    with pytest.raises(ValueError) as info:  # jsonargparse wraps the module's error
        _cli("fit", DIGITS, tmp_path, "--model.init_args.label_smoothing", "-0.5", "--trainer.max_steps", "1")
    error = find_known_error(info.value)
    assert isinstance(error, ConfigError) and "Negative label smoothing" in str(error)
    module = ClassifierModule(MLPBackbone())
    module.build((64,), 10)
    saved = {}
    module.on_save_checkpoint(saved)
    other = ClassifierModule(MLPBackbone())
    other.build((102,), 2)
    with pytest.raises(ConfigError, match=r"built for data with input_shape \(64,\) and 10 classes"):
        other.on_load_checkpoint(saved)


def test_trainer_checkpoint_of_a_python_built_module_loads_with_weights_only(tmp_path):
    """A module built in Python (a backbone object, a functools.partial optimiser) writes a Lightning checkpoint
    that torch.load(weights_only=True) reads: every backbone is a registered safe global and Python callables
    are left out of the saved hyperparameters."""
    dm = ImageClassificationDataModule(batch_size=64)
    module = ClassifierModule(MLPBackbone(hidden=[8]), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert isinstance(checkpoint["hyper_parameters"]["backbone"], MLPBackbone)
    assert "optimizer" not in checkpoint["hyper_parameters"]
    assert checkpoint["classifier"]["num_classes"] == 10


@pytest.mark.parametrize("backbone", [
    MLPBackbone(hidden=[4], dropout=0.1), SmallCNNBackbone(channels=[4]),
    ResNetBackbone("resnet18", small_input=True, hidden_sizes=[4, 4, 4, 4]),
    ViTBackbone(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8),
    TorchvisionBackbone("resnet18"), HFSequenceClassifierBackbone("some/model", pad_token_id=0)],
    ids=lambda b: type(b).__name__)
def test_every_backbone_is_a_safe_global(tmp_path, backbone):
    torch.save({"backbone": backbone}, tmp_path / "b.pt")
    loaded = torch.load(tmp_path / "b.pt", weights_only=True)["backbone"]
    assert type(loaded) is type(backbone) and vars(loaded) == vars(backbone)


def test_load_from_checkpoint_rebuilds_the_network_from_the_checkpoint(tmp_path):
    """No trainer, no DataModule: the network is built for the checkpoint's data shape, then its weights load."""
    dm = ImageClassificationDataModule(batch_size=64)
    module = ClassifierModule(MLPBackbone(hidden=[8]), seed=3)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ClassifierModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 10 and loaded.seed == 3
    for (name, a), b in zip(module.net.state_dict().items(), loaded.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    rows = dm.indices("test")[:16]
    torch.testing.assert_close(loaded.eval()(dm.features(rows)), module.eval()(dm.features(rows)))


@pytest.mark.integration  # spawns 3 interpreters (about 10 s)
def test_ddp_test_metrics_count_every_row_once(tmp_path):
    """3 CPU ranks (digits: 359 test rows, 120/120/119 per rank, batches of 100) give the test accuracy and the
    row-mean loss of one process: no padded row counted, the loss weighted by rows, not a mean of rank means."""
    def run(devices: int) -> dict[str, float]:
        dm = ImageClassificationDataModule(batch_size=64, eval_batch_size=100)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        return trainer.test(ClassifierModule(MLPBackbone(hidden=[16]), seed=0), dm, verbose=False)[0]

    single, spread = run(1), run(3)
    assert spread["test/acc"] == pytest.approx(single["test/acc"], abs=1e-7)
    assert spread["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)
