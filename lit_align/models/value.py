"""PPO critic: a causal-LM backbone plus a scalar head read at every position.

The critic has the architecture of a ``scalar_head`` :class:`~lit_align.models.reward.RewardModel`
(and is built by the same builder), but reads its head at every token instead of only the last one.
That lets it start from a trained reward model or detector: the released code of the RL watermark
(Xu, Yao, Liu 2024, arXiv 2403.10553; github.com/xiaojunxu/learning-to-watermark-llm, ``main.py``)
initialises the PPO value net from the pretrained detector checkpoint, as a separate copy of the
parameters. At initialisation the critic's value at a sequence's last real token is then exactly
the reward model's score of that sequence.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.checkpoint import load_checkpoint
from lit_align.errors import ConfigError
from lit_align.models.reward import RewardModel, RewardModelSpec, ScalarHead, build_reward_model
from lit_align.models.spec import ModelSpec
from lit_align.rollout.logps import causal_lm_parts, position_ids_from_mask

__all__ = ["CriticSpec", "ValueModel", "build_critic", "build_value_model"]


class ValueModel(nn.Module):
    """Backbone (an HF causal LM, optionally PEFT-wrapped; its LM head is unused) and a linear head
    from the hidden size to 1 (a :class:`~lit_align.models.reward.ScalarHead`, with or without bias
    as the spec's ``head_bias`` says; heads saved in the other form load, see there), applied at every position.

    Two readings of the same pass:

    * :meth:`forward`: ``values[:, t] = head(h_t)``, the value of the state after reading tokens
      ``<= t`` (at the last real token this is what a reward model with the same weights scores);
    * :meth:`action_values`: shifted right by one and aligned with the tokens like
      :class:`~lit_align.rollout.TokenLogps`: ``values[:, t] = head(h_{t-1})``, the value of the
      state in which token ``t`` is emitted; this is the ``V_t`` of
      :func:`lit_align.losses.ppo.gae` and ``ppo_value_loss``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"the value head must map to 1 output, got out_features={head.out_features}")
        self.backbone, self.head = backbone, head

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> ValueModel:
        """A critic with deep copies of ``reward_model``'s backbone and head (separate parameters)."""
        if reward_model.kind != "scalar_head" or reward_model.head is None:
            raise ValueError(f"a ValueModel can only start from a 'scalar_head' reward model, got kind "
                             f"{reward_model.kind!r}")
        return cls(copy.deepcopy(reward_model.backbone), copy.deepcopy(reward_model.head))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) float32 ``head(h_t)`` at every position (input_ids and attention_mask are (B, T)).

        Positions come from the attention mask, so either padding side works; values at padded
        positions are meaningless (mask them)."""
        decoder = causal_lm_parts(self.backbone)[0]
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    def action_values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ``V`` of the state before each token: ``out[:, t] = forward(...)[:, t - 1]``, 0 in column 0."""
        values = self(input_ids, attention_mask)  # (B, T)
        return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)


def _reward_model_state(path: str | os.PathLike, prefix: str | None) -> dict[str, Tensor]:
    """The ``backbone.* / head.*`` state dict of a reward model stored at ``path``.

    ``path`` holds a safetensors file, or a ``torch.save``-d state dict or Lightning checkpoint
    (``{"state_dict": ...}``). The reward model's keys may sit under a prefix (e.g. ``"detector."``
    inside a LightningModule); without an explicit ``prefix`` it is found from the ``head.weight`` key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_checkpoint(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {path} does not hold a state dict")
    if prefix is None:
        found = sorted(k.removesuffix("head.weight") for k in state if k.endswith("head.weight")
                       and any(s.startswith(k.removesuffix("head.weight") + "backbone.") for s in state))
        if len(found) != 1:
            raise ValueError(f"init_from: {path} must hold exactly one reward model ('<prefix>backbone.*' and "
                             f"'<prefix>head.weight'); found prefixes {found}: pass init_prefix")
        prefix = found[0]
    out = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if "head.weight" not in out:
        raise ValueError(f"init_from: no '{prefix}head.weight' in {path}")
    return out


def build_value_model(
    spec: RewardModelSpec,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    init_from: str | os.PathLike | None = None,
    init_prefix: str | None = None,
) -> ValueModel:
    """Build a critic with the architecture of the ``scalar_head`` reward model ``spec`` describes.

    Args:
        spec: the reward-model spec (backbone, LoRA, head init); ``kind`` must be ``scalar_head``.
        tokenizer: defaults to the backbone's.
        init_from: a checkpoint of a reward model / detector of that architecture (see
            :func:`_reward_model_state` for the formats); its weights are loaded strictly.
            None keeps the builder's initialisation (zero head: every value starts at 0).
        init_prefix: the key prefix of the reward model inside the checkpoint (found if None).
    """
    if spec.kind != "scalar_head":
        raise ValueError(f"build_value_model needs a 'scalar_head' reward-model spec, got kind {spec.kind!r}")
    reward_model = build_reward_model(spec, tokenizer)
    if init_from is not None:
        reward_model.load_state_dict(_reward_model_state(init_from, init_prefix), strict=True)
    return ValueModel(reward_model.backbone, reward_model.head)


@dataclass
class CriticSpec:
    """The PPO critic (``model.critic``): its architecture and where its weights start."""

    model: RewardModelSpec | None = None
    """A ``scalar_head`` spec on the policy's tokenizer (it reads the policy's token ids); ``None``: the policy's
    spec (its LoRA included: a frozen base, trainable adapters and a zero value head)."""
    init_from: str = "policy"
    """``policy``: the architecture's own starting weights (the policy's, unless ``model`` says otherwise) and a
    zero head, so every value starts at 0; ``reward``: a copy of the reward model (a
    :class:`~lit_align.rewards.ModelReward` of kind ``scalar_head`` on the policy's tokenizer), as InstructGPT
    starts its value function; or a reward-model checkpoint file (see :func:`build_value_model`)."""


def build_critic(spec: CriticSpec, policy: ModelSpec, tokenizer: PreTrainedTokenizerBase, *, reward: nn.Module | None = None,
                 mesh=None, precision=None, device=None, rank: int = 0) -> ValueModel:
    """The critic ``spec`` describes. With a ``mesh`` (FSDP2) it is sharded like the policy, rank 0 building
    the weights and broadcasting them (:func:`~lit_align.models.fsdp.load_from_rank0`)."""
    arch = spec.model or RewardModelSpec(model=policy)
    if arch.kind != "scalar_head":
        raise ConfigError(f"model.critic.model.kind={arch.kind!r}: a critic is a causal LM with a value head read at "
                          "every token (kind: scalar_head) on the policy's tokenizer")

    def built(meta: bool = False) -> ValueModel:
        if spec.init_from == "reward" and not meta:
            scorer = getattr(reward, "model", None)
            if scorer is None or getattr(reward, "_own_tokenizer", None) is not None:
                raise ConfigError("model.critic.init_from: 'reward' copies a reward model on the policy's tokenizer "
                                  "(lit_align.rewards.ModelReward); this reward is not one. Use 'policy' or a "
                                  "checkpoint file")
            if scorer.kind == "sequence_classification":
                return _from_decoder_classifier(scorer.backbone)
            return ValueModel.from_reward_model(scorer)
        if meta:
            scorer = build_reward_model(arch, tokenizer, key="model.critic.model", meta=True)
            return ValueModel(scorer.backbone, scorer.head)
        init = None if spec.init_from in ("policy", "reward") else spec.init_from
        return build_value_model(arch, tokenizer, init_from=init)

    if mesh is None:
        return built()
    from lit_align.models.fsdp import bf16_policy, load_from_rank0, shard_scorer

    source = built() if rank == 0 else None
    critic = built(meta=True)
    shard_scorer(critic, mesh, bf16_policy(precision))
    load_from_rank0(critic, source, device)
    return critic


def _from_decoder_classifier(classifier: nn.Module) -> ValueModel:
    """A critic copied from an HF decoder sequence classifier with one label (e.g. a ``RewardModelModule``
    export): its decoder inside a causal LM of the same config (whose LM head the critic never reads, frozen)
    and its ``score`` layer as the value head, so at a sequence's last token the value is the reward."""
    from transformers import AutoModelForCausalLM

    decoder, score = getattr(classifier, classifier.base_model_prefix, None), getattr(classifier, "score", None)
    if decoder is None or not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ConfigError("model.critic.init_from: 'reward' needs a decoder classifier with one label (a `score` "
                          f"layer), got {type(classifier).__name__}; an encoder reward model cannot start a critic")
    with torch.random.fork_rng(devices=[]):  # the LM head's random init draws nothing from the run's RNG
        lm = AutoModelForCausalLM.from_config(classifier.config)
    lm.get_decoder().load_state_dict(decoder.state_dict())
    lm = lm.to(next(classifier.parameters()).dtype)
    if lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
        lm.get_output_embeddings().requires_grad_(False)
    head = ScalarHead(score.in_features, 1, bias=score.bias is not None, dtype=score.weight.dtype)
    head.load_state_dict(score.state_dict())
    return ValueModel(lm, head)


# the critic block is saved with a method's hyperparameters in every checkpoint; allow it in weights-only loads
torch.serialization.add_safe_globals([CriticSpec])
