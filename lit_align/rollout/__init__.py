"""Everything that runs a model without an optimiser: log-probs and generation."""

from lit_align.rollout.logps import TokenLogps, sequence_logps, token_logps
from lit_align.rollout.sampler import Rollout, SamplingConfig, left_pad, sample

__all__ = ["Rollout", "SamplingConfig", "TokenLogps", "left_pad", "sample", "sequence_logps", "token_logps"]
