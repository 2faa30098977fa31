"""The adversary/defender game (GPO): judges, the attacker's diversity terms, the schedule, a tabular toy."""

from lit_align.game.config import CriticConfig, DiversityConfig, GameSampling, PoolConfig, RewardConfig
from lit_align.game.diversity import (
    DiversityHistory,
    bleu_diversity,
    self_bleu,
    sentence_bleu,
    set_self_bleu,
    word_tokens,
)
from lit_align.game.judge import (
    CallableJudge,
    Classifier,
    ClassifierJudge,
    JudgeFactory,
    LlamaGuard,
    LlamaGuardJudge,
    RuleJudge,
    SafetyJudge,
    SafetyScores,
    build_judge,
)
from lit_align.game.schedule import GamePhase, GameSchedule
from lit_align.game.tabular import TabularResult, nash_gap, play_matrix_game
from lit_align.retrieval import MeanPoolEncoder as SentenceEncoder  # the GPO names of the shared implementations
from lit_align.retrieval import build_mean_pool_encoder as build_sentence_encoder
from lit_align.retrieval import embedding_diversity

__all__ = [
    "CallableJudge",
    "Classifier",
    "ClassifierJudge",
    "CriticConfig",
    "DiversityConfig",
    "DiversityHistory",
    "GamePhase",
    "GameSchedule",
    "GameSampling",
    "JudgeFactory",
    "LlamaGuard",
    "LlamaGuardJudge",
    "PoolConfig",
    "RewardConfig",
    "RuleJudge",
    "SafetyJudge",
    "SafetyScores",
    "SentenceEncoder",
    "TabularResult",
    "bleu_diversity",
    "build_judge",
    "build_sentence_encoder",
    "embedding_diversity",
    "nash_gap",
    "play_matrix_game",
    "self_bleu",
    "sentence_bleu",
    "set_self_bleu",
    "word_tokens",
]
