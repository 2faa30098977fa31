"""The classifier track: backbones for classifier methods (tabular MLPs, small CNNs, ResNet and ViT from
transformers, torchvision builders, HF sequence classifiers), and FIS's active-sampling strategies
(``FairInfluenceSampler``, ``RandomSampler``, ``EntropySampler``, ``JTTSampler``; influences in
:mod:`lit_align.classifiers.influence`)."""

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
from lit_align.classifiers.sampling import (
    EntropySampler,
    FairInfluenceSampler,
    JTTSampler,
    RandomSampler,
    Sampler,
    Selection,
    SelectionContext,
)

__all__ = [
    "EntropySampler",
    "FairInfluenceSampler",
    "JTTSampler",
    "RandomSampler",
    "Sampler",
    "Selection",
    "SelectionContext",
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
