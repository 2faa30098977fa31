"""Rewards for online RL: the sources that score a response, the contrastive baseline on top of them, and the
rankers online preference methods label their candidates with."""

from lit_align.rewards.contrastive import BaselineTable, ContrastiveRewards
from lit_align.rewards.rankers import (
    CallableRanker,
    PairRMRanker,
    Ranker,
    RewardRanker,
    ranks_from_scores,
    select_pair,
)
from lit_align.rewards.sources import (
    CallableReward,
    JudgeReward,
    Mix,
    ModelReward,
    PromptOffset,
    Reward,
    RewardInput,
)

__all__ = ["BaselineTable", "CallableRanker", "CallableReward", "ContrastiveRewards", "JudgeReward", "Mix", "ModelReward",
           "PairRMRanker", "PromptOffset", "Ranker", "Reward", "RewardInput", "RewardRanker", "ranks_from_scores",
           "select_pair"]
