"""Rewards for online RL: the sources that score a response and the contrastive baseline on top of them."""

from lit_align.rewards.contrastive import BaselineTable, ContrastiveRewards
from lit_align.rewards.sources import (
    CallableReward,
    JudgeReward,
    Mix,
    ModelReward,
    PromptOffset,
    Reward,
    RewardInput,
)

__all__ = ["BaselineTable", "CallableReward", "ContrastiveRewards", "JudgeReward", "Mix", "ModelReward", "PromptOffset", "Reward",
           "RewardInput"]
