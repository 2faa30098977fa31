"""Model builders: tiny models are deterministic, specs are honoured, local directories load like hub ids."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_modules
from transformers import AutoTokenizer

from lit_align.models import (
    TINY_TOKENIZER,
    LoRASpec,
    ModelSpec,
    TinyArch,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    is_peft_model,
)

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _spec(family: str = "qwen2", **kwargs) -> ModelSpec:
    return ModelSpec(tiny=TinyArch(family=family, **TINY), **kwargs)


def _build(spec: ModelSpec) -> torch.nn.Module:
    return build_causal_lm(spec, build_tokenizer(spec))


def _checkpointing(model) -> bool:
    """``is_activation_checkpointing`` (transformers >= 5.x) or the older ``is_gradient_checkpointing``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]])  # (1, T)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_is_deterministic_in_its_seed(family):
    before = torch.random.get_rng_state()
    a, b, c = _build(_spec(family)), _build(_spec(family)), _build(_spec(family, seed=1))
    assert torch.equal(torch.random.get_rng_state(), before), "building must not consume the global RNG"
    assert type(a).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert any(not torch.equal(sa[n], sc[n]) for n in sa if sa[n].is_floating_point() and sa[n].dim() > 1)


def test_vocab_comes_from_the_tokenizer():
    spec = _spec()
    tokenizer = build_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_dtype_attention_and_checkpointing_are_honoured():
    plain = _build(_spec())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert not _checkpointing(plain)
    assert plain.config.use_cache is False

    model = _build(_spec(dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config._attn_implementation == "eager"
    assert _checkpointing(model)
    model.train()
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()  # checkpointed backward runs
    assert model.get_input_embeddings().weight.grad is not None


def test_lora_leaves_only_adapters_trainable():
    base = _build(_spec())
    n_base = sum(p.numel() for p in base.parameters())
    policy = apply_lora(base, LoRASpec(r=4, alpha=8))
    assert is_peft_model(policy) and not is_peft_model(base.model)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # "all-linear" adapts every projection of every layer but not the LM head
    assert not any("lm_head" in n for n in trainable)
    assert sum("q_proj" in n for n in trainable) == 2 * TINY["num_layers"]
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert frozen == n_base
    assert apply_lora(base, None) is base


def test_local_directory_loads_like_a_hub_id(tmp_path):
    spec = _spec(attn_implementation="eager")
    tokenizer = build_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    local = ModelSpec(name_or_path=str(tmp_path), attn_implementation="eager")
    tok2 = build_tokenizer(local)
    loaded = build_causal_lm(local, tok2).eval()
    assert tok2.get_vocab() == tokenizer.get_vocab() and tok2.pad_token_id == tokenizer.pad_token_id
    assert loaded.config._attn_implementation == "eager"
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_local_directory_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        build_tokenizer(ModelSpec(name_or_path=str(tmp_path / "nope")))


_CONFIG_CODE = """
from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "lit_align_remote_test"
"""

_MODEL_CODE = """
from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def test_trust_remote_code_is_off_by_default_and_passed_through(tmp_path, monkeypatch):
    """A local model whose config points at its own Python code (``auto_map``) loads only when
    ``trust_remote_code`` is set; the default refuses to run the repository's code."""
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = _spec()
    tokenizer = build_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer)
    repo = tmp_path / "remote"
    model.save_pretrained(repo)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(repo)
    (repo / "configuration_remote.py").write_text(_CONFIG_CODE)
    (repo / "modeling_remote.py").write_text(_MODEL_CODE)
    config = json.loads((repo / "config.json").read_text())
    config.update(
        model_type="lit_align_remote_test",
        architectures=["RemoteForCausalLM"],
        auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                  "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"},
    )
    (repo / "config.json").write_text(json.dumps(config))

    untrusted = ModelSpec(name_or_path=str(repo))
    assert untrusted.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_causal_lm(untrusted, build_tokenizer(untrusted))

    trusted = ModelSpec(name_or_path=str(repo), trust_remote_code=True)
    loaded = build_causal_lm(trusted, build_tokenizer(trusted))
    assert type(loaded).__name__ == "RemoteForCausalLM"
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_spec_validation_names_the_key():
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec()
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(name_or_path="org/name", tiny=TinyArch())
    with pytest.raises(ValueError, match="model.tiny"):
        TinyArch(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="model.lora.r"):
        LoRASpec(r=0)


def test_gradient_checkpointing_with_lora_gives_the_same_gradients():
    """Recomputing decoder activations in backward must not change values or gradients (LoRA too)."""
    from lit_align.models import LoRASpec, apply_lora
    from lit_align.rollout import sequence_logps

    grads = []
    for checkpointing in (False, True):
        spec = ModelSpec(tiny=TinyArch(), gradient_checkpointing=checkpointing, lora=LoRASpec(r=4))
        tok = build_tokenizer(spec)
        model = apply_lora(build_causal_lm(spec, tok), spec.lora, seed=3)  # seeded: same adapters in both runs
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # B starts at 0: make the adapter matter
        model.train()
        ids = torch.randint(3, len(tok), (2, 12))
        mask = torch.ones_like(ids)
        loss_mask = torch.zeros_like(ids)
        loss_mask[:, 6:] = 1
        sequence_logps(model, ids, mask, loss_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
