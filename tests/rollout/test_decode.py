"""The sampler's lean decoding step (``lit_align.rollout.decode``) against the model's own forward."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from conftest import tiny_lm

from lit_align.rollout.decode import LeanDecoder
from lit_align.rollout.sampler import SamplingConfig, _cache_kwarg, left_pad, sample

VOCAB = 512
PAD = 0
PROMPTS = [[5, 17, 301, 44, 9, 12, 60, 71], [88, 23, 7], [400, 19], [3, 150, 99, 250, 81]] * 2  # 8 rows
EARLY_EOS = list(range(1, 60))  # about 12% of the vocabulary ends a row: rows stop at different steps


def _qwen3(**config) -> transformers.PreTrainedModel:
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=128, vocab_size=VOCAB, **config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


MODELS = {
    "qwen2": lambda: tiny_lm("qwen2", vocab_size=VOCAB),
    "llama": lambda: tiny_lm("llama", vocab_size=VOCAB),
    "llama_biases_tied": lambda: tiny_lm("llama", vocab_size=VOCAB, attention_bias=True, mlp_bias=True,
                                         tie_word_embeddings=True),
    "llama_rope_scaling": lambda: tiny_lm("llama", vocab_size=VOCAB, max_position_embeddings=64,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3": _qwen3,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> transformers.PreTrainedModel:
    return MODELS[request.param]()


def _sample(model, prompts, lean: bool, **config):
    ids, mask = left_pad(prompts, PAD)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    return sample(model, ids, mask, SamplingConfig(max_new_tokens=20, lean_decode=lean, **config),
                  eos_token_id=EARLY_EOS, pad_token_id=PAD, generator=gens)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_lean_decoding_equals_the_models_forward(model, padded):
    """Bit for bit the tokens, masks and log-probs of decoding through ``model(...)`` at every step, with rows that
    stop at different steps, on padded and unpadded prompts."""
    assert LeanDecoder.supports(model)
    prompts = PROMPTS if padded else [p[:2] for p in PROMPTS]
    lean, plain = _sample(model, prompts, True), _sample(model, prompts, False)
    lengths = lean.response_lengths
    assert lengths.min() < lengths.max()
    assert torch.equal(lean.response_ids, plain.response_ids)
    assert torch.equal(lean.response_mask, plain.response_mask)
    assert torch.equal(lean.logps, plain.logps)


def test_lean_step_logits_equal_the_forward_in_bfloat16():
    """Each step's logits equal the model's forward on the same cache, bit for bit, in bfloat16 too."""
    from transformers import DynamicCache

    model = tiny_lm("qwen2", vocab_size=VOCAB).to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, PAD)
    b, p = ids.shape
    full = torch.ones(b, p + 6, dtype=torch.bool)
    full[:, :p] = mask.bool()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        kw = {_cache_kwarg(model): cache}  # the keyword differs across transformers versions
        model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw, use_cache=True)
        decoder = LeanDecoder.from_prefill(model, cache, p + 6)
        tokens = torch.arange(b)[:, None] + 7
        for t in range(5):
            step_pos = mask.sum(-1, keepdim=True) + t
            step_mask = full[:, None, None, : p + t + 1]
            lean = decoder.step(tokens, step_pos, step_mask)
            ref = model(input_ids=tokens, attention_mask=step_mask, position_ids=step_pos, **kw, use_cache=True).logits
            assert lean.dtype == torch.bfloat16 and torch.equal(lean, ref)
            tokens = ref[:, -1].float().argmax(-1, keepdim=True)


def test_only_plain_supported_models_take_the_lean_path():
    """Anything whose forward the lean step would not reproduce is decoded through that forward."""
    from peft import LoraConfig, get_peft_model

    qwen = tiny_lm("qwen2", vocab_size=VOCAB)
    assert LeanDecoder.supports(qwen)
    handle = qwen.model.layers[1].mlp.register_forward_hook(lambda *a: None)  # a hook must still run
    assert not LeanDecoder.supports(qwen)
    handle.remove()
    eager = tiny_lm("qwen2", vocab_size=VOCAB, attn_implementation="eager")
    sliding = tiny_lm("qwen2", vocab_size=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    lora = get_peft_model(tiny_lm("qwen2", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    for other in (eager, sliding, lora, lora.get_base_model(), gpt2):
        assert not LeanDecoder.supports(other)


def test_the_sampler_calls_the_forward_only_for_the_prefill():
    """With the lean path on, ``model(...)`` runs once (the prefill); with it off, once per token."""
    qwen = tiny_lm("qwen2", vocab_size=VOCAB)
    calls = {"n": 0}
    forward = qwen.forward

    @functools.wraps(forward)  # keeps the signature the sampler reads its cache keyword from
    def counting(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    qwen.forward = counting  # an instance attribute, not a hook: the lean path stays eligible
    ids, mask = left_pad(PROMPTS, PAD)
    for lean, expected in ((True, 1), (False, 6)):
        calls["n"] = 0
        sample(qwen, ids, mask, SamplingConfig(max_new_tokens=6, lean_decode=lean), eos_token_id=VOCAB + 1,
               pad_token_id=PAD)
        assert calls["n"] == expected


def test_lean_decode_must_be_a_bool():
    with pytest.raises(ValueError, match="lean_decode"):
        SamplingConfig(lean_decode="yes")
