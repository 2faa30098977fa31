"""The FSDP1 auto-wrap policy and the decoder-layer discovery behind the FSDP2 plan."""

from __future__ import annotations

from conftest import tiny_lm
from torch import nn

from lit_align.models.fsdp import DecoderLayerPolicy, decoder_layers


def test_decoder_layers_are_found_for_llama_and_qwen2():
    for family in ("llama", "qwen2"):
        model = tiny_lm(family, vocab_size=64, hidden_size=16)
        layers = decoder_layers(model)
        assert len(layers) == 2 and all(type(m).__name__.endswith("DecoderLayer") for m in layers)


def test_auto_wrap_policy_wraps_exactly_the_decoder_layers():
    model = tiny_lm("llama", vocab_size=64, hidden_size=16)
    policy = DecoderLayerPolicy()
    wrapped = [m for m in model.modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == decoder_layers(model)
    assert policy(model, recurse=True, nonwrapped_numel=0)  # always descend
    assert not policy(nn.Linear(2, 2), recurse=False, nonwrapped_numel=0)
