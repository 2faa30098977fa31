"""The FSDP1 auto-wrap policy and the decoder-layer discovery behind the FSDP2 plan."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm
from torch import nn

from lit_align.models.fsdp import DecoderLayerPolicy, decoder_layers


def _gpt_neox():
    """A tiny GPT-NeoX: its layer class (``GPTNeoXLayer``) matches no "DecoderLayer"/"Block" suffix."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                           vocab_size=64)
    return AutoModelForCausalLM.from_config(config).eval()


def _mixtral():
    """A tiny Mixtral: each decoder layer holds a ``MixtralSparseMoeBlock`` that must not be wrapped on its own."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=32, vocab_size=64, num_local_experts=2, num_experts_per_tok=1)
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {
    "llama": lambda: tiny_lm("llama", vocab_size=64, hidden_size=16),
    "qwen2": lambda: tiny_lm("qwen2", vocab_size=64, hidden_size=16),
    "gpt_neox": _gpt_neox,
    "mixtral": _mixtral,
}


def _fsdp1_wrapped(policy, root: nn.Module) -> list[nn.Module]:
    """The modules FSDP1's auto-wrap would wrap, asking the policy in its order.

    As ``torch.distributed.fsdp.wrap._recursive_wrap``: ``recurse=True`` of a module before its children,
    ``recurse=False`` of each child after its own children; the root itself is never wrapped by the policy.
    """
    wrapped: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if policy(module, recurse=True, nonwrapped_numel=0):
            for child in module.children():
                visit(child)
                if policy(child, recurse=False, nonwrapped_numel=0):
                    wrapped.append(child)

    visit(root)
    return wrapped


@pytest.mark.parametrize("family", list(MODELS))
def test_decoder_layers_are_the_no_split_module_classes(family):
    model = MODELS[family]()
    layers = decoder_layers(model)
    assert len(layers) == 2 and {type(m).__name__ for m in layers} == set(model._no_split_modules)


@pytest.mark.parametrize("family", list(MODELS))
def test_auto_wrap_policy_wraps_exactly_the_no_split_module_classes(family):
    model = MODELS[family]()
    policy = DecoderLayerPolicy()
    wrapped = _fsdp1_wrapped(policy, model)
    assert wrapped == decoder_layers(model)  # e.g. GPTNeoXLayer wrapped; no MixtralSparseMoeBlock inside a layer
    assert {type(m).__name__ for m in wrapped} == set(model._no_split_modules)
    if family == "mixtral":  # the MoE blocks exist, inside the wrapped layers, and are not wrapped themselves
        moe_blocks = [m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
        assert len(moe_blocks) == 2 and not any(b in wrapped for b in moe_blocks)


def test_auto_wrap_policy_always_descends_and_wraps_nothing_it_was_not_told_about():
    policy = DecoderLayerPolicy()
    assert not policy(nn.Linear(2, 2), recurse=False, nonwrapped_numel=0)  # no names collected yet
    assert policy(nn.Linear(2, 2), recurse=True, nonwrapped_numel=0)  # always descend
    model = tiny_lm("llama", vocab_size=64, hidden_size=16)
    assert policy(model, recurse=True, nonwrapped_numel=0)
    assert not policy(nn.Linear(2, 2), recurse=False, nonwrapped_numel=0)
    assert not policy(model.model.layers, recurse=False, nonwrapped_numel=0)  # the ModuleList is not a layer
