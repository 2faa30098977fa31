"""The original and Retrain reference models (lit_align.classifiers.references): trained once, cached by fingerprint,
loaded from files with weights_only / safetensors, clear errors."""

from __future__ import annotations

import pytest
import torch

from lit_align.classifiers import MLPBackbone
from lit_align.classifiers.references import ReferenceTraining, fingerprint, load_weights, obtain_reference
from lit_align.data import ForgetSplit, ImageClassificationDataModule
from lit_align.errors import ConfigError, MissingPathError


@pytest.fixture(scope="module")
def dm():
    dm = ImageClassificationDataModule("builtin:digits", split=ForgetSplit(kind="class_wise", classes=[3]),
                                       batch_size=128)
    dm.setup("fit")
    return dm


def test_trained_once_then_cached(tmp_path, dm):
    """The first call trains (and records the seconds: Retrain's run time), the second reads the cache: same weights,
    same recorded seconds; another seed, epoch count, subset or split is another fingerprint."""
    training = ReferenceTraining(epochs=2, lr=0.05, cache_dir=str(tmp_path))
    first = obtain_reference("retrain", None, MLPBackbone(hidden=[16]), dm, training, seed=0)
    again = obtain_reference("retrain", None, MLPBackbone(hidden=[16]), dm, training, seed=0)
    assert (first.source, again.source) == ("trained", "cache")
    assert first.seconds > 0 and again.seconds == first.seconds
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    key = fingerprint(MLPBackbone(hidden=[16]), dm, "retain", training, 0)
    assert key != fingerprint(MLPBackbone(hidden=[16]), dm, "retain", training, 1)
    assert key != fingerprint(MLPBackbone(hidden=[16]), dm, "train", training, 0)
    assert key != fingerprint(MLPBackbone(hidden=[32]), dm, "retain", training, 0)
    assert key != fingerprint(MLPBackbone(hidden=[16]), dm, "retain", ReferenceTraining(epochs=3, cache_dir=str(tmp_path)), 0)
    other = ImageClassificationDataModule("builtin:digits", split=ForgetSplit(kind="class_wise", classes=[4]))
    other.setup("fit")
    assert key != fingerprint(MLPBackbone(hidden=[16]), other, "retain", training, 0)
    # Retrain never saw class 3: it gets (almost) none of its training rows right
    forget = torch.as_tensor(dm.indices("forget"))
    with torch.no_grad():
        assert (first.net(dm.features(forget)).argmax(-1) == 3).float().mean() < 0.05


def test_load_lightning_checkpoint_and_errors(tmp_path, dm):
    """A real Lightning checkpoint of ClassifierModule (ERM on ``retain``, built in Python: its hparams hold the
    backbone object) loads with weights_only; a file with objects weights_only refuses, a missing file and a file of
    another backbone are ConfigErrors naming the key (R1 finding 3)."""
    import lightning as L

    from lit_align.methods import ClassifierModule

    module = ClassifierModule(MLPBackbone(hidden=[8]), train_on="retain")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, dm)
    path = tmp_path / "erm.ckpt"
    trainer.save_checkpoint(path)
    fresh = MLPBackbone(hidden=[8]).build((1, 8, 8), 10)
    load_weights(fresh, path, "model.init_args.retrain")
    for a, b in zip(fresh.state_dict().values(), module.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": module.net.state_dict(), "dm_settings": _Opaque()}, pickled)
    with pytest.raises(ConfigError, match=r"model.init_args.original: .*weights_only.*\.safetensors"):
        load_weights(fresh, pickled, "model.init_args.original")
    with pytest.raises(MissingPathError, match="model.init_args.retrain"):
        load_weights(fresh, tmp_path / "none.safetensors", "model.init_args.retrain")
    with pytest.raises(ConfigError, match="model.init_args.retrain.*does not fit"):
        load_weights(MLPBackbone(hidden=[9]).build((1, 8, 8), 10), path, "model.init_args.retrain")


class _Opaque:
    """An object torch.load(weights_only=True) does not allow."""


def test_fingerprint_ignores_the_trainer_and_sees_the_content(tmp_path, dm):
    """R1 finding 5: attaching a trainer (fit) leaves the key unchanged; a data file whose features change under
    the same path, settings, rows and labels changes it."""
    import lightning as L

    from lit_align.data import TabularDataModule
    from lit_align.methods import ClassifierModule

    training = ReferenceTraining(epochs=1, cache_dir=str(tmp_path))
    before = fingerprint(MLPBackbone(hidden=[16]), dm, "retain", training, 0)
    L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False).fit(
        ClassifierModule(MLPBackbone(hidden=[8])), dm)
    assert dm.trainer is not None
    assert fingerprint(MLPBackbone(hidden=[16]), dm, "retain", training, 0) == before
    csv = tmp_path / "rows.csv"

    def keyed(b_of_row_5: int) -> str:
        rows = [(i, b_of_row_5 if i == 5 else i % 7, i % 2) for i in range(60)]
        csv.write_text("a,b,y\n" + "".join(f"{a},{b},{y}\n" for a, b, y in rows))
        tab = TabularDataModule(str(csv), target="y", split=ForgetSplit(kind="random", fraction=0.2))
        tab.setup("fit")
        return fingerprint(MLPBackbone(hidden=[16]), tab, "retain", training, 0)

    assert keyed(5) == keyed(5)
    assert keyed(6) != keyed(5)  # one feature value of one row, same path, settings, rows and labels


def test_reference_training_logs_progress(tmp_path, dm, caplog):
    """R1 finding 4: reference training reports each epoch (rank-zero log lines)."""
    import logging

    with caplog.at_level(logging.INFO):
        obtain_reference("original", None, MLPBackbone(hidden=[8]), dm, ReferenceTraining(epochs=2,
                         cache_dir=str(tmp_path)), seed=0)
    lines = [r.getMessage() for r in caplog.records if "reference on 'train'" in r.getMessage()]
    assert len(lines) == 2 and "epoch 2/2" in lines[1]


def test_reference_training_bad_input():
    with pytest.raises(ConfigError, match="reference_training.lr"):
        ReferenceTraining(lr=0.0)
    with pytest.raises(ConfigError, match="reference_training.optimizer"):
        ReferenceTraining(optimizer="lbfgs")
