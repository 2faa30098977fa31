"""Weight attribution and weight masks for modular unlearning (WAGLE; see :mod:`.attribution`, :mod:`.masks`)."""

from lit_align.unlearning.attribution import METHODS, AttributionMethod, accumulate_gradients, attribution_scores
from lit_align.unlearning.masks import ParameterMask, model_signature

__all__ = ["METHODS", "AttributionMethod", "ParameterMask", "accumulate_gradients", "attribution_scores",
           "model_signature"]
