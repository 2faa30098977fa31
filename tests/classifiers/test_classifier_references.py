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


def test_load_lightning_checkpoint_and_errors(tmp_path):
    """A Lightning checkpoint of a classifier method (state_dict keys under ``net.``) loads with weights_only; a
    missing file and a file of another backbone are errors naming the key."""
    net = MLPBackbone(hidden=[8]).build((4,), 3)
    path = tmp_path / "erm.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, path)
    fresh = MLPBackbone(hidden=[8]).build((4,), 3)
    load_weights(fresh, path, "model.init_args.retrain")
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(MissingPathError, match="model.init_args.retrain"):
        load_weights(fresh, tmp_path / "none.safetensors", "model.init_args.retrain")
    with pytest.raises(ConfigError, match="model.init_args.retrain.*does not fit"):
        load_weights(MLPBackbone(hidden=[9]).build((4,), 3), path, "model.init_args.retrain")


def test_reference_training_bad_input():
    with pytest.raises(ConfigError, match="reference_training.lr"):
        ReferenceTraining(lr=0.0)
    with pytest.raises(ConfigError, match="reference_training.optimizer"):
        ReferenceTraining(optimizer="lbfgs")
