"""The machinery every multi-player and online-RL method shares: seeds, phase timers, optimiser steps and
the PPO update. A method file holds its choreography and calls these."""

from lit_align.engine.ppo import PPOConfig, ppo_update
from lit_align.engine.seeds import derive_seed, generator, row_generators
from lit_align.engine.step import optimizer_step, player_step
from lit_align.engine.timer import PhaseTimer

__all__ = ["PPOConfig", "PhaseTimer", "derive_seed", "generator", "optimizer_step", "player_step", "ppo_update", "row_generators"]
