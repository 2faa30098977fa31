"""``token_logps`` / ``sequence_logps`` equal the naive full-logits computation, values and gradients."""

import copy

import pytest
import torch
from conftest import tiny_lm

from lit_align.rollout.logit_transforms import logit_transform
from lit_align.rollout.logps import position_ids_from_mask, sequence_logps, token_logps

VOCAB = 97
PAD = 0


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_lm("qwen2", vocab_size=VOCAB, hidden_size=32, seed=seed, max_position_embeddings=64,
                   tie_word_embeddings=False)


def _batch(padding_side: str, seed: int = 1):
    """Three rows (prompt_len, response_len) = (3, 4), (5, 2), (2, 0): the last row scores nothing.

    Returns input_ids, attention_mask, loss_mask (1 on response tokens), each (B, T).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 4), (5, 2), (2, 0)]
    T = max(p + r for p, r in lengths)
    ids = torch.full((len(lengths), T), PAD)
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    loss_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (p, r) in enumerate(lengths):
        n = p + r
        s = 0 if padding_side == "right" else T - n
        ids[b, s : s + n] = torch.randint(1, VOCAB, (n,), generator=g)
        attn[b, s : s + n] = 1
        loss_mask[b, s + p : s + n] = 1
    return ids, attn, loss_mask


def _naive_token_logps(model, input_ids, attention_mask, loss_mask):
    """Full (B, T, V) logits -> log_softmax -> gather the next token -> mask; (B, T-1) logps and mask."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).logits  # (B, T, V)
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = (loss_mask[:, 1:] * attention_mask[:, 1:]).float()  # (B, T-1)
    return logps * mask, mask


def _grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


GRAD_PARAMS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, None])
def test_matches_naive_values_and_gradients(padding_side, chunk_tokens):
    model = _tiny_model()
    ids, attn, lmask = _batch(padding_side)

    naive_logps, naive_mask = _naive_token_logps(model, ids, attn, lmask)
    naive_sum = naive_logps.sum(-1)  # (B,)
    naive_mean = naive_sum / naive_mask.sum(-1).clamp(min=1)
    (naive_sum.sum() + naive_mean.sum()).backward()
    naive_grads = _grads(model, GRAD_PARAMS)
    model.zero_grad(set_to_none=True)

    out = token_logps(model, ids, attn, lmask, chunk_tokens=chunk_tokens)
    assert out.logps.shape == out.mask.shape == ids.shape
    torch.testing.assert_close(out.logps[:, 1:], naive_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mask[:, 1:], naive_mask)
    assert out.logps[:, 0].abs().sum() == 0 and out.mask[:, 0].sum() == 0

    seq_sum = sequence_logps(model, ids, attn, lmask, chunk_tokens=chunk_tokens)
    seq_mean = sequence_logps(model, ids, attn, lmask, reduction="mean", chunk_tokens=chunk_tokens)
    torch.testing.assert_close(seq_sum, naive_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq_mean, naive_mean, atol=1e-5, rtol=0)
    (seq_sum.sum() + seq_mean.sum()).backward()
    for name, grad in _grads(model, GRAD_PARAMS).items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_side_does_not_change_values():
    """Positions come from the attention mask: each row scores the same left- or right-padded, and alone."""
    model = _tiny_model()
    left = sequence_logps(model, *_batch("left"))
    right = sequence_logps(model, *_batch("right"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    ids, attn, lmask = _batch("right")
    for b in range(ids.shape[0]):
        n = int(attn[b].sum())
        alone = sequence_logps(model, ids[b : b + 1, :n], attn[b : b + 1, :n], lmask[b : b + 1, :n])
        torch.testing.assert_close(alone, right[b : b + 1], atol=1e-5, rtol=0)


def test_row_without_scored_tokens_is_zero():
    """Row 2 of the batch has an empty response: sum 0, mean 0 (not NaN), all-zero mask; and an all-zero loss_mask."""
    model = _tiny_model()
    ids, attn, lmask = _batch("left")
    assert lmask[2].sum() == 0
    out = token_logps(model, ids, attn, lmask)
    assert out.mask[2].sum() == 0 and out.logps[2].abs().sum() == 0
    assert out.sum()[2].item() == 0.0 and out.mean()[2].item() == 0.0
    assert sequence_logps(model, ids, attn, lmask, reduction="mean")[2].item() == 0.0

    none = sequence_logps(model, ids, attn, torch.zeros_like(lmask))
    assert torch.equal(none, torch.zeros(3))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_peft_lora_model_matches_naive():
    """LoRA on q_proj / v_proj (non-zero init so the adapter changes outputs): values and LoRA grads match."""
    from peft import LoraConfig, get_peft_model

    base = _tiny_model()
    torch.manual_seed(3)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids, attn, lmask = _batch("left")

    naive_logps, _ = _naive_token_logps(model, ids, attn, lmask)
    naive = naive_logps.sum(-1)
    naive.sum().backward()
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    naive_grads = _grads(model, lora_names)
    model.zero_grad(set_to_none=True)

    ours = sequence_logps(model, ids, attn, lmask, chunk_tokens=3)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=0)
    assert (ours - sequence_logps(base, ids, attn, lmask)).abs().max() > 1e-3  # the adapter is active
    ours.sum().backward()
    for name, grad in _grads(model, lora_names).items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_mode():
    model = _tiny_model()
    ids, attn, lmask = _batch("right")
    with torch.no_grad():
        out = sequence_logps(model, ids, attn, lmask, chunk_tokens=2)
    assert not out.requires_grad
    torch.testing.assert_close(out, _naive_token_logps(model, ids, attn, lmask)[0].sum(-1).detach(), atol=1e-5, rtol=0)


def test_shape_mismatch_and_bad_reduction_raise():
    model = _tiny_model()
    ids, attn, lmask = _batch("right")
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        token_logps(model, ids, attn[:, :-1], lmask)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        sequence_logps(model, ids, attn, lmask[:2])
    with pytest.raises(ValueError, match="reduction"):
        sequence_logps(model, ids, attn, lmask, reduction="max")


def test_position_ids_from_mask():
    """Left padding [0, 0, 1, 1, 1] -> positions [0, 0, 0, 1, 2]; right padding [1, 1, 1, 0, 0] -> [0, 1, 2, 2, 2]."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# --- logit transforms applied by the model's own forward after the LM head ---------------------------------


def _arch_model(family: str) -> torch.nn.Module:
    """Tiny causal LMs whose forward transforms the logits (Gemma-2 soft-cap, Cohere scale, Granite divide), or not."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    if family == "llama":
        return tiny_lm("llama", vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64, tie_word_embeddings=False)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD)
    config = {
        "gemma2": lambda: Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **common),
        "cohere": lambda: CohereConfig(logit_scale=0.5, **common),
        "granite": lambda: GraniteConfig(logits_scaling=4.0, **common),
    }[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "gemma2":  # large logits, so the soft-cap at 2.0 changes them a lot
        with torch.no_grad():
            model.lm_head.weight.mul_(50.0)
    return model


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "llama"])
def test_logit_transforms_match_naive(family, checkpointed, monkeypatch):
    """Values and gradients equal ``model(...).logits -> log_softmax -> gather``, with the head checkpointed or not."""
    import lit_align.rollout.logps as logps_mod

    model = _arch_model(family)
    ids, attn, lmask = _batch("left")
    if family != "llama":
        assert logit_transform(model) is not None
    else:
        assert logit_transform(model) is None
    if checkpointed:
        monkeypatch.setattr(logps_mod, "_CHECKPOINT_MIN_ELEMENTS", 0)

    naive_logps, naive_mask = _naive_token_logps(model, ids, attn, lmask)
    naive_sum = naive_logps.sum(-1)  # (B,)
    naive_sum.sum().backward()
    naive_grads = _grads(model, GRAD_PARAMS)
    model.zero_grad(set_to_none=True)

    out = token_logps(model, ids, attn, lmask, chunk_tokens=3)
    torch.testing.assert_close(out.logps[:, 1:], naive_logps, atol=1e-5, rtol=0)
    seq = sequence_logps(model, ids, attn, lmask, chunk_tokens=3)
    torch.testing.assert_close(seq, naive_sum, atol=1e-5, rtol=0)
    seq.sum().backward()
    for name, grad in _grads(model, GRAD_PARAMS).items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    if family != "llama":  # the transform matters: leaving it out gives other values
        monkeypatch.setattr(logps_mod, "logit_transform", lambda base: None)
        with torch.no_grad():
            assert (sequence_logps(model, ids, attn, lmask) - naive_sum).abs().max() > 1e-2


def _softcap(x, cap):
    return torch.tanh(x / cap) * cap


def _muse_case(cls):
    muse = cls()
    mult, cap = muse.text_config.output_multiplier, muse.text_config.final_logit_softcapping
    return muse, lambda x: _softcap(x * mult, cap)


#: (id, transformers config class name, builder: class -> (config, expected transform or None)).
_TRANSFORM_CASES = [
    # multimodal: read from the text sub-config
    ("paligemma", "PaliGemmaConfig",
     lambda cls: (cls(text_config={"model_type": "gemma2", "final_logit_softcapping": 2.0}), lambda x: _softcap(x, 2.0))),
    ("granite_docling", "GraniteDoclingConfig", lambda cls: (cls(), lambda x: x / 4.0)),
    ("muse_spark", "MuseSparkConfig", _muse_case),
    # HyperCLOVA X multiplies by logits_scaling where Granite divides
    ("hyperclovax", "HyperCLOVAXConfig", lambda cls: (cls(logits_scaling=2.0), lambda x: x * 2.0)),
    # their forward does not apply the text sub-config's soft-cap / logit_scale
    ("gemma3", "Gemma3Config", lambda cls: (cls(text_config={"final_logit_softcapping": 2.0}), None)),
    ("aya_vision", "AyaVisionConfig", lambda cls: (cls(), None)),
]


@pytest.mark.parametrize(("name", "build"), [c[1:] for c in _TRANSFORM_CASES], ids=[c[0] for c in _TRANSFORM_CASES])
def test_logit_transform_table(name, build):
    """Each case runs only where the installed transformers has its config class (pyproject allows >=4.57)."""
    from types import SimpleNamespace

    import transformers

    from lit_align.rollout.logit_transforms import logit_transform

    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config, expected = build(cls)
    x = torch.randn(4, 11) * 30
    transform = logit_transform(SimpleNamespace(config=config))
    if expected is None:
        assert transform is None, config.model_type
    else:
        torch.testing.assert_close(transform(x), expected(x), msg=config.model_type)


def test_unknown_logit_attribute_raises():
    """A config of a type the module does not know, setting a logit-transform attribute: refuse, do not guess."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from lit_align.rollout.logit_transforms import logit_transform

    config = LlamaConfig(vocab_size=VOCAB)
    assert logit_transform(SimpleNamespace(config=config)) is None
    config.logits_scaling = 1.0  # a no-op either way: fine
    assert logit_transform(SimpleNamespace(config=config)) is None
    config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        logit_transform(SimpleNamespace(config=config))
    model = tiny_lm("llama", vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64)
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="logit_scale"):
        sequence_logps(model, *_batch("right"))
