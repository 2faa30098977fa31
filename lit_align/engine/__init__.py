"""The machinery every multi-player and online-RL method shares: seeds, phase timers, optimiser steps and
the PPO update. A method file holds its choreography and calls these."""

from lit_align.engine import distributed
from lit_align.engine.player import Optimization, Player, configure_players, resolve_optimization
from lit_align.engine.ppo import PPOConfig, ppo_update
from lit_align.engine.seeds import derive_seed, generator, row_generators, seeded_rng
from lit_align.engine.step import optimizer_step, overlapped_steps, settle_steps
from lit_align.engine.timer import PhaseTimer
from lit_align.rollout.advantages import GAE, GRPO, RLOO, AdvantageEstimator

__all__ = ["GAE", "GRPO", "RLOO", "AdvantageEstimator", "Optimization", "PPOConfig", "PhaseTimer", "Player", "configure_players", "derive_seed", "distributed",
           "generator", "optimizer_step", "overlapped_steps", "ppo_update", "resolve_optimization", "row_generators",
           "seeded_rng", "settle_steps"]
