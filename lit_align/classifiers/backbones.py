"""Classifier backbones: builders chosen in YAML by ``class_path`` that make the network of a classifier method.

Every builder has ``build(input_shape, num_classes) -> nn.Module``; the built module's ``forward(x)`` takes a
batch's ``"x"`` (a float tensor ``(B, F)`` or ``(B, C, H, W)``, or for text the dict ``{"input_ids",
"attention_mask"}``) and returns logits ``(B, K)``. ``head_parameters(module)`` gives the parameters of the final
classification layer (the last ``nn.Linear`` of the module, whose output is the logits), the parameter subset FIS
takes gradients over. The builders hold settings only; weights are made in ``build``, which a classifier method
calls from ``configure_model`` (seeded there).

* :class:`MLPBackbone`: fully connected layers for tabular rows (images are flattened);
* :class:`SmallCNNBackbone`: a few conv stages for small images (the digits set);
* :class:`ResNetBackbone`: ResNet-18/34/50 from transformers (``ResNetForImageClassification``), with a
  ``small_input`` stem for 32x32 images (CIFAR);
* :class:`ViTBackbone`: a ViT from transformers (``ViTForImageClassification``); the defaults are the ViT-B/8 on
  32x32 images that FIS trains on CelebA;
* :class:`TorchvisionBackbone`: any ``torchvision.models`` builder (needs a torchvision built for the installed
  torch);
* :class:`HFSequenceClassifierBackbone`: any ``AutoModelForSequenceClassification`` for text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

from lit_align.errors import ConfigError, MissingPathError, check_int, check_number, require
from lit_align.paths import hub_offline, looks_local

__all__ = [
    "RESNET_VARIANTS",
    "Backbone",
    "HFSequenceClassifierBackbone",
    "ImageLogits",
    "MLPBackbone",
    "ResNetBackbone",
    "SmallCNNBackbone",
    "SmallInputResNetForImageClassification",
    "TextLogits",
    "TorchvisionBackbone",
    "ViTBackbone",
    "final_linear",
]

#: The config key of a backbone's settings, named in errors.
_KEY = "model.init_args.backbone.init_args"

#: ResNet variants as transformers ``ResNetConfig`` fields (He et al., 2016, Table 1): ResNet-18/34 stack basic
#: blocks (two 3x3 convs), ResNet-50 bottleneck blocks (1x1, 3x3, 1x1 with 4x wider outputs).
RESNET_VARIANTS: dict[str, dict[str, Any]] = {
    "resnet18": {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    "resnet34": {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]},
    "resnet50": {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}


def final_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``module``: the layer that outputs the logits in every backbone here
    (the head of HF classifiers is registered after their body: ``classifier``, ``classifier.out_proj``,
    ``score``)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer to call its classification head")
    return linears[-1]


class Backbone:
    """A classifier network builder (base class; pick a subclass by ``class_path``)."""

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A fresh network for inputs of ``input_shape`` (one row, no batch dimension) and ``num_classes`` logits."""
        raise NotImplementedError

    def head_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of the final classification layer of ``module`` (a network :meth:`build` made): its
        last ``nn.Linear`` (weight, then bias). FIS computes per-example gradients over this subset."""
        return list(final_linear(module).parameters())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _image_shape(input_shape: tuple[int, ...], backbone: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image source, or a ConfigError saying which backbone needs images."""
    if len(input_shape) != 3:
        raise ConfigError(f"{backbone} needs images (input_shape (C, H, W)); the data gives rows of shape "
                          f"{tuple(input_shape)}: use MLPBackbone for tabular data or HFSequenceClassifierBackbone "
                          "for text")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


# -- small networks built with torch alone -----------------------------------------------------------------------

class MLPBackbone(Backbone):
    """Fully connected ReLU layers: ``Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear(K)``.

    For tabular rows ``(F,)``; an image ``(C, H, W)`` is flattened to ``C*H*W`` features. ``hidden: []`` is
    multinomial logistic regression. FIS's Adult, COMPAS and Jigsaw runs use an MLP.
    """

    def __init__(self, hidden: list[int] | None = None, dropout: float = 0.0) -> None:
        """
        Args:
            hidden: widths of the hidden layers, in order; default ``[64]``; ``[]`` for logistic regression.
            dropout: dropout probability after each hidden layer, in [0, 1).
        """
        hidden = [64] if hidden is None else list(hidden)
        for i, width in enumerate(hidden):
            check_int(f"{_KEY}.hidden[{i}]", width)
        require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, f"{_KEY}.dropout", "in [0, 1)", dropout)
        self.hidden, self.dropout = hidden, float(dropout)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        width = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for out in self.hidden:
            layers += [nn.Linear(width, out), nn.ReLU()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = out
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)


class SmallCNNBackbone(Backbone):
    """A small convolutional network for small images: per stage ``Conv3x3 -> ReLU -> MaxPool2x2`` (the pool is
    skipped once the map is a single pixel), then global average pooling and ``Linear(channels[-1], K)``.
    Two stages take the 8x8 digits to 2x2 maps."""

    def __init__(self, channels: list[int] | None = None) -> None:
        """
        Args:
            channels: output channels of each conv stage, in order; default ``[16, 32]``.
        """
        channels = [16, 32] if channels is None else list(channels)
        require(len(channels) > 0, f"{_KEY}.channels", "a non-empty list of ints", channels)
        for i, c in enumerate(channels):
            check_int(f"{_KEY}.channels[{i}]", c)
        self.channels = channels

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, h, w = _image_shape(input_shape, "SmallCNNBackbone")
        layers: list[nn.Module] = []
        for out in self.channels:
            layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        return nn.Sequential(*layers)


# -- transformers image and text classifiers ---------------------------------------------------------------------

class ImageLogits(nn.Module):
    """An HF image classifier as a plain network: ``forward(x)`` = ``model(pixel_values=x).logits`` ``(B, K)``.
    ``model`` is the transformers model (``save_pretrained`` it to share the weights)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits  # (B, K)


class TextLogits(nn.Module):
    """An HF sequence classifier as a plain network: ``forward(x)`` with the batch's text dict (``input_ids``,
    ``attention_mask``, ``(B, T)``) returns ``model(**x).logits`` ``(B, K)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**x).logits  # (B, K)


def _from_pretrained(load, name: str, key: str):
    """``load(name)`` (a transformers ``from_pretrained``), failing fast for a local path that does not exist and
    with a MissingPathError naming ``key`` when the hub id or directory cannot be loaded."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise MissingPathError(f"{key}={name!r}: no such directory. Give a directory written by `save_pretrained` "
                               "or a hub id of the form `org/name`.")
    try:
        return load(name)
    except OSError as err:
        where = ("HF_HUB_OFFLINE is set, so only the local HF cache was searched" if hub_offline()
                 else f"{err}")
        raise MissingPathError(f"{key}={name!r}: could not load it ({where}). Give a directory written by "
                               "`save_pretrained`, or a hub id already in the HF cache.") from err


class SmallInputResNetForImageClassification(ResNetForImageClassification):
    """transformers' ``ResNetForImageClassification`` whose stem is a 3x3 stride-1 conv with no max-pool when its
    config has ``small_input: true`` (else the ImageNet stem). The flag is saved in ``config.json``, so
    ``from_pretrained`` of this class rebuilds the same network."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if getattr(config, "small_input", False):
            stem = self.resnet.embedder
            stem.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1,
                                            activation=config.hidden_act)
            stem.pooler = nn.Identity()
            stem.apply(self._init_weights)


class ResNetBackbone(Backbone):
    """A ResNet from transformers (``ResNetForImageClassification`` built from a ``ResNetConfig``; no download).

    ``variant`` picks the block type and stage sizes (:data:`RESNET_VARIANTS`; ``resnet18`` = basic blocks,
    depths ``[2, 2, 2, 2]``, widths ``[64, 128, 256, 512]``). ``small_input`` is the usual CIFAR change (He et al.,
    2016, section 4.2; the stem most CIFAR unlearning code, SalUn's and UGradSL's included, uses): the ImageNet stem
    (a 7x7 stride-2 conv and a 3x3 stride-2 max-pool, which shrink a 32x32 image to 8x8 before the first stage) is
    replaced by one 3x3 stride-1 conv and no pool, so the stages see 32x32 maps. ``pretrained`` loads a directory
    written by ``save_pretrained`` or a hub id with ``from_pretrained``; the head is re-initialised when its class
    count differs, and so is an ImageNet 7x7 stem under ``small_input`` (it does not fit a 3x3 conv).
    """

    def __init__(self, variant: Literal["resnet18", "resnet34", "resnet50"] = "resnet18", small_input: bool = False,
                 pretrained: str | None = None, hidden_sizes: list[int] | None = None,
                 depths: list[int] | None = None) -> None:
        """
        Args:
            variant: ``resnet18``, ``resnet34`` or ``resnet50`` (block type, depths and widths).
            small_input: a 3x3 stride-1 stem and no max-pool, for 32x32 images (CIFAR); default the ImageNet stem.
            pretrained: a directory written by ``save_pretrained`` or a hub id to start from (its config replaces
                ``variant``, ``hidden_sizes`` and ``depths``); default random init.
            hidden_sizes: stage widths replacing the variant's (tiny test networks); the stem width follows the
                first stage.
            depths: blocks per stage replacing the variant's.
        """
        require(variant in RESNET_VARIANTS, f"{_KEY}.variant", f"one of {', '.join(RESNET_VARIANTS)}", variant)
        for name, values in (("hidden_sizes", hidden_sizes), ("depths", depths)):
            for i, v in enumerate(values or []):
                check_int(f"{_KEY}.{name}[{i}]", v)
        self.variant, self.small_input, self.pretrained = variant, bool(small_input), pretrained
        self.hidden_sizes = None if hidden_sizes is None else list(hidden_sizes)
        self.depths = None if depths is None else list(depths)

    def config(self, num_channels: int, num_classes: int):
        """The transformers ``ResNetConfig`` this backbone builds from scratch."""
        from transformers import ResNetConfig

        fields = dict(RESNET_VARIANTS[self.variant])
        if self.hidden_sizes is not None:
            fields["hidden_sizes"] = self.hidden_sizes
        if self.depths is not None:
            fields["depths"] = self.depths
        require(len(fields["depths"]) == len(fields["hidden_sizes"]), f"{_KEY}.depths",
                f"as long as hidden_sizes ({len(fields['hidden_sizes'])} stages)", fields["depths"])
        stem = 64 if self.hidden_sizes is None else self.hidden_sizes[0]  # ResNet's stem width is 64
        return ResNetConfig(num_channels=num_channels, embedding_size=stem, num_labels=num_classes,
                            small_input=self.small_input, **fields)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, _, _ = _image_shape(input_shape, "ResNetBackbone")
        cls = SmallInputResNetForImageClassification
        if self.pretrained is None:
            return ImageLogits(cls(self.config(c, num_classes)))
        from transformers import ResNetConfig

        key = f"{_KEY}.pretrained"
        config = _from_pretrained(ResNetConfig.from_pretrained, self.pretrained, key)
        config.num_labels, config.small_input = num_classes, self.small_input
        if config.num_channels != c:
            raise ConfigError(f"{key}={self.pretrained!r} takes {config.num_channels}-channel images; the data has "
                              f"{c} channels")
        model = _from_pretrained(lambda n: cls.from_pretrained(n, config=config, ignore_mismatched_sizes=True),
                                 self.pretrained, key)
        return ImageLogits(model.train())  # from_pretrained returns eval mode


class ViTBackbone(Backbone):
    """A Vision Transformer from transformers (``ViTForImageClassification`` built from a ``ViTConfig``).

    The defaults are ViT-B/8 at 32x32 (12 layers, width 768, 12 heads, MLP 3072, 8x8 patches: 16 patches and a
    CLS token), the "ViT-B/8 lowres" FIS trains on CelebA resized to 32x32 (the FIS code's CelebA setting); smaller
    widths make tiny test networks. ``image_size`` must equal the data's image height and width. ``pretrained``
    loads a directory written by ``save_pretrained`` or a hub id (its own architecture and image size; the head is
    re-initialised when its class count differs).
    """

    def __init__(self, patch_size: int = 8, image_size: int = 32, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int = 3072, dropout: float = 0.0,
                 pretrained: str | None = None) -> None:
        """
        Args:
            patch_size: side of the square patches (8: ViT-B/8).
            image_size: side of the square input images; must match the data.
            hidden_size: transformer width (768: ViT-B).
            num_layers: transformer blocks (12: ViT-B).
            num_heads: attention heads per block (12: ViT-B); must divide ``hidden_size``.
            intermediate_size: MLP width in each block (3072: ViT-B).
            dropout: dropout probability of the hidden states and attention weights.
            pretrained: a directory written by ``save_pretrained`` or a hub id; its config replaces the fields above.
        """
        for name, value in (("patch_size", patch_size), ("image_size", image_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size)):
            check_int(f"{_KEY}.{name}", value)
        require(hidden_size % num_heads == 0, f"{_KEY}.num_heads", f"a divisor of hidden_size ({hidden_size})",
                num_heads)
        require(image_size % patch_size == 0, f"{_KEY}.patch_size", f"a divisor of image_size ({image_size})",
                patch_size)
        check_number(f"{_KEY}.dropout", dropout, minimum=0)
        self.patch_size, self.image_size, self.hidden_size = patch_size, image_size, hidden_size
        self.num_layers, self.num_heads, self.intermediate_size = num_layers, num_heads, intermediate_size
        self.dropout, self.pretrained = float(dropout), pretrained

    def config(self, num_channels: int, num_classes: int):
        """The transformers ``ViTConfig`` this backbone builds from scratch."""
        from transformers import ViTConfig

        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, num_channels=num_channels,
                         hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                         num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
                         hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
                         num_labels=num_classes)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        c, h, w = _image_shape(input_shape, "ViTBackbone")
        key = f"{_KEY}.pretrained" if self.pretrained else f"{_KEY}.image_size"
        if self.pretrained is None:
            config = self.config(c, num_classes)
        else:
            config = _from_pretrained(ViTConfig.from_pretrained, self.pretrained, key)
            config.num_labels = num_classes
        if (config.image_size, config.image_size, config.num_channels) != (h, w, c):
            raise ConfigError(f"{key}: the ViT takes {config.num_channels}x{config.image_size}x{config.image_size} "
                              f"images, the data gives {c}x{h}x{w}; set image_size (and patch_size) to the data's, or "
                              "resize the images")
        if self.pretrained is None:
            return ImageLogits(ViTForImageClassification(config))
        model = _from_pretrained(
            lambda n: ViTForImageClassification.from_pretrained(n, config=config, ignore_mismatched_sizes=True),
            self.pretrained, key)
        return ImageLogits(model.train())


class TorchvisionBackbone(Backbone):
    """Any ``torchvision.models`` builder by name (``resnet18``, ``vgg16_bn``, ...), with ``num_classes`` outputs.

    torchvision is imported on first use, and a torchvision that cannot load (missing, or built for another torch:
    "operator torchvision::nms does not exist") is a ConfigError that says to use :class:`ResNetBackbone` /
    :class:`ViTBackbone` (transformers) or install a matching torchvision. With ``weights`` the pretrained network's
    last ``nn.Linear`` is replaced by a fresh one with ``num_classes`` outputs.
    """

    def __init__(self, name: str = "resnet18", weights: str | None = None) -> None:
        """
        Args:
            name: a ``torchvision.models.get_model`` name.
            weights: a torchvision weights name (``IMAGENET1K_V1``) to start from; default random init.
        """
        self.name, self.weights = name, weights

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        _image_shape(input_shape, "TorchvisionBackbone")
        try:
            from torchvision import models
        except Exception as err:  # ImportError, or RuntimeError when its C++ ops do not match torch
            raise ConfigError(
                f"{_KEY.removesuffix('.init_args')}: TorchvisionBackbone needs torchvision, which cannot be imported "
                f"here ({type(err).__name__}: {err}). Use lit_align.classifiers.ResNetBackbone or ViTBackbone "
                "(transformers, no torchvision), or install the torchvision release built for torch "
                f"{torch.__version__}.") from err
        if self.weights is None:
            return models.get_model(self.name, weights=None, num_classes=num_classes)
        model = models.get_model(self.name, weights=self.weights)
        head = final_linear(model)
        for parent in model.modules():  # swap the head in place, wherever it is registered
            for child_name, child in parent.named_children():
                if child is head:
                    setattr(parent, child_name, nn.Linear(head.in_features, num_classes))
        return model


class HFSequenceClassifierBackbone(Backbone):
    """A transformers ``AutoModelForSequenceClassification`` for text (BERT, RoBERTa, Qwen, ...), loaded with
    ``from_pretrained`` from a directory written by ``save_pretrained`` or a hub id, with ``num_classes`` labels (a
    head of another size is re-initialised). The network takes the batch's text dict. Decoder-only models need a
    ``pad_token_id`` in their config to classify padded batches; ``pad_token_id`` sets it."""

    def __init__(self, model: str, pad_token_id: int | None = None) -> None:
        """
        Args:
            model: a directory written by ``save_pretrained`` or a hub id.
            pad_token_id: the padding token id to write into the model config (the tokenizer's; decoder-only models
                read it to find each row's last real token); default the model config's.
        """
        require(isinstance(model, str) and bool(model), f"{_KEY}.model", "a directory or hub id", model)
        self.model, self.pad_token_id = model, pad_token_id

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        extra = {} if self.pad_token_id is None else {"pad_token_id": self.pad_token_id}
        model = _from_pretrained(
            lambda n: AutoModelForSequenceClassification.from_pretrained(n, num_labels=num_classes,
                                                                         ignore_mismatched_sizes=True, **extra),
            self.model, f"{_KEY}.model")
        return TextLogits(model.train())  # from_pretrained returns eval mode


# checkpoints of modules built in Python hold the backbone object in their hyperparameters
torch.serialization.add_safe_globals([MLPBackbone, SmallCNNBackbone, ResNetBackbone, ViTBackbone, TorchvisionBackbone,
                                      HFSequenceClassifierBackbone])
