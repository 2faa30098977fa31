"""The classifier track: backbones for classifier methods (tabular MLPs, small CNNs, ResNet and ViT from
transformers, torchvision builders, HF sequence classifiers)."""

from lit_align.classifiers.backbones import (
    RESNET_VARIANTS,
    Backbone,
    HFSequenceClassifierBackbone,
    ImageLogits,
    MLPBackbone,
    ResNetBackbone,
    SmallCNNBackbone,
    SmallInputResNetForImageClassification,
    TextLogits,
    TorchvisionBackbone,
    ViTBackbone,
    final_linear,
)

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
