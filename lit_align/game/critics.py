"""The players' critics: causal LMs with a value head, on the players' tokenizer (they read their token ids)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.errors import ConfigError
from lit_align.game.config import CriticConfig
from lit_align.models import ModelSpec, RewardModelSpec, build_tokenizer, build_value_model

__all__ = ["build_critics"]


def build_critics(config: CriticConfig, defender: ModelSpec, tokenizer: PreTrainedTokenizerBase,
                  names: Sequence[str]) -> nn.ModuleDict:
    """One critic per name (``shared``, or one per player) from ``config`` (``None`` model: the defender's
    spec); errors name ``model.critic.model``."""
    spec = config.model or RewardModelSpec(model=defender)
    if spec.kind != "scalar_head":
        raise ConfigError(f"model.critic.model.kind={spec.kind!r}: a critic must be a causal LM with a value head "
                          "read at every token (kind: scalar_head) sharing the players' tokenizer. A sequence "
                          "classifier can serve as model.judge (class_path: lit_align.game.Classifier)")
    defender_tok = defender.tokenizer or defender.name_or_path
    critic_tok = spec.model.tokenizer or spec.model.name_or_path
    if critic_tok != defender_tok and build_tokenizer(spec.model, key="model.critic.model.model", needs_eos=False
                                                      ).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"model.critic.model: a critic must be a causal LM sharing the players' tokenizer (it "
                          f"reads their token ids), and its tokenizer ({critic_tok or 'bundled'}) differs from "
                          "theirs; give model.critic.model.model.tokenizer the defender's tokenizer. A reward "
                          "model with another tokenizer can serve as model.judge (lit_align.game.Classifier)")
    return nn.ModuleDict({n: build_value_model(spec, tokenizer, init_from=config.init_from) for n in names})
