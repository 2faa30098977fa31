"""Classifier backbones: each builds a network whose forward gives (B, K) logits, head_parameters is its last
layer, and the transformers ones round-trip through save_pretrained / from_pretrained."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_bert import save_tiny_bert
from torch import nn

from lit_align.classifiers import (
    HFSequenceClassifierBackbone,
    MLPBackbone,
    ResNetBackbone,
    SmallCNNBackbone,
    TorchvisionBackbone,
    ViTBackbone,
)
from lit_align.errors import ConfigError, MissingPathError

#: ResNet-18's block structure at a tiny width (the variant's widths are tested on the config only).
TINY_RESNET = {"hidden_sizes": [4, 8, 8, 8]}
TINY_VIT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def _trains(net: nn.Module, x, params: list[nn.Parameter]) -> None:
    """One backward pass reaches the head parameters."""
    net(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("backbone, shape", [
    (MLPBackbone(hidden=[8, 4]), (5,)),
    (MLPBackbone(hidden=[]), (5,)),
    (MLPBackbone(hidden=[8], dropout=0.5), (1, 8, 8)),
    (SmallCNNBackbone(), (1, 8, 8)),
    (SmallCNNBackbone(channels=[4, 4, 4, 4]), (3, 5, 7)),
    (ResNetBackbone(**TINY_RESNET), (3, 32, 32)),
    (ResNetBackbone(small_input=True, **TINY_RESNET), (3, 32, 32)),
    (ViTBackbone(image_size=8, patch_size=4, **TINY_VIT), (1, 8, 8)),
], ids=["mlp", "logistic", "mlp-image", "cnn", "cnn-pool-stops", "resnet", "resnet-small-input", "vit"])
def test_backbones_give_logits_and_their_head(backbone, shape):
    torch.manual_seed(0)
    net = backbone.build(shape, 3)
    x = torch.randn(2, *shape)
    assert net(x).shape == (2, 3)
    head = backbone.head_parameters(net)
    assert [tuple(p.shape) for p in head][1] == (3,)  # weight (3, d), bias (3,): the logits layer
    _trains(net, x, head)


def test_resnet18_is_basic_blocks_2222_and_small_input_keeps_32x32_maps():
    config = ResNetBackbone().config(3, 10)
    assert (config.layer_type, config.depths, config.hidden_sizes) == ("basic", [2, 2, 2, 2], [64, 128, 256, 512])
    image = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    imagenet = ResNetBackbone(**TINY_RESNET).build((3, 32, 32), 10)
    small = ResNetBackbone(small_input=True, **TINY_RESNET).build((3, 32, 32), 10)
    # the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) leaves 8x8 maps, the small-input stem (3x3/1, no pool) 32x32
    assert imagenet.model.resnet.embedder(image).shape[-2:] == (8, 8)
    assert small.model.resnet.embedder(image).shape[-2:] == (32, 32)
    assert small.model.resnet.embedder.embedder.convolution.kernel_size == (3, 3)


def test_resnet_pretrained_loads_a_save_pretrained_dir(tmp_path):
    torch.manual_seed(0)
    trained = ResNetBackbone(small_input=True, **TINY_RESNET).build((3, 32, 32), 10)
    trained.model.save_pretrained(tmp_path / "r")
    same = ResNetBackbone(small_input=True, pretrained=str(tmp_path / "r")).build((3, 32, 32), 10)
    expected = trained.state_dict()
    for name, value in same.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert same.training  # from_pretrained returns eval mode; a network to train starts in train mode
    # another class count re-initialises the head only
    other = ResNetBackbone(small_input=True, pretrained=str(tmp_path / "r")).build((3, 32, 32), 4)
    changed = {n for n, v in other.state_dict().items() if v.shape != expected[n].shape or not torch.equal(v, expected[n])}
    assert changed == {"model.classifier.1.weight", "model.classifier.1.bias"}
    # an ImageNet-stem checkpoint under small_input: the 7x7 stem is replaced by a fresh 3x3 one, the rest loads
    torch.manual_seed(0)
    ResNetBackbone(**TINY_RESNET).build((3, 32, 32), 10).model.save_pretrained(tmp_path / "imagenet")
    small = ResNetBackbone(small_input=True, pretrained=str(tmp_path / "imagenet")).build((3, 32, 32), 10)
    assert small.model.resnet.embedder.embedder.convolution.weight.shape[-1] == 3
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_vit_defaults_are_vit_b8_at_32x32_and_pretrained_round_trips(tmp_path):
    config = ViTBackbone().config(3, 2)
    assert (config.patch_size, config.image_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.intermediate_size) == (8, 32, 768, 12, 12, 3072)
    torch.manual_seed(0)
    net = ViTBackbone(**TINY_VIT).build((3, 32, 32), 2)
    net.model.save_pretrained(tmp_path / "vit")
    loaded = ViTBackbone(pretrained=str(tmp_path / "vit")).build((3, 32, 32), 2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), net.eval()(x))
    with pytest.raises(ConfigError, match=r"image_size.*3x32x32 images, the data gives 3x8x8"):
        ViTBackbone(**TINY_VIT).build((3, 8, 8), 2)


def test_hf_sequence_classifier_takes_the_text_dict(tmp_path):
    path = save_tiny_bert(tmp_path / "bert", num_labels=1)
    backbone = HFSequenceClassifierBackbone(model=path)
    torch.manual_seed(0)
    net = backbone.build((), 4)  # the saved head has 1 label: re-initialised with 4
    x = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert net(x).shape == (2, 4) and net.training
    head = backbone.head_parameters(net)
    assert head[0] is net.model.classifier.weight
    _trains(net, x, head)


def test_missing_pretrained_dirs_name_the_key(tmp_path):
    with pytest.raises(MissingPathError, match=r"backbone.init_args.model=.*no such directory"):
        HFSequenceClassifierBackbone(model=str(tmp_path / "nope")).build((), 2)
    with pytest.raises(MissingPathError, match=r"backbone.init_args.pretrained=.*no such directory"):
        ResNetBackbone(pretrained=str(tmp_path / "nope")).build((3, 32, 32), 2)


def test_torchvision_backbone_fails_clearly_when_torchvision_cannot_load(monkeypatch):
    """torchvision is not importable beside this torch build (sys.modules None = import fails, as it does here)."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError, match=r"TorchvisionBackbone needs torchvision.*ResNetBackbone or ViTBackbone"):
        TorchvisionBackbone(name="resnet18").build((3, 32, 32), 10)


def test_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"backbone.init_args.hidden\[1\] must be an int >= 1"):
        MLPBackbone(hidden=[8, 0])
    with pytest.raises(ConfigError, match=r"backbone.init_args.variant must be one of resnet18"):
        ResNetBackbone(variant="resnet7")
    with pytest.raises(ConfigError, match=r"needs images"):
        SmallCNNBackbone().build((5,), 2)
    with pytest.raises(ConfigError, match=r"num_heads must be a divisor of hidden_size"):
        ViTBackbone(hidden_size=10, num_heads=3)
