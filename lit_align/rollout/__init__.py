"""Everything that runs a model without an optimiser: log-probs, token statistics, KL and generation."""

from lit_align.rollout.experience import Experience, make_experience, minibatches
from lit_align.rollout.logps import (
    TokenKL,
    TokenLogps,
    TokenStats,
    sequence_logps,
    token_kl,
    token_logps,
    token_stats,
)
from lit_align.rollout.sampler import Rollout, SamplingConfig, left_pad, sample

__all__ = [
    "Experience",
    "Rollout",
    "SamplingConfig",
    "TokenKL",
    "TokenLogps",
    "TokenStats",
    "left_pad",
    "make_experience",
    "minibatches",
    "sample",
    "sequence_logps",
    "token_kl",
    "token_logps",
    "token_stats",
]
