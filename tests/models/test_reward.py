"""Reward models: the score is read at the last real token, whatever the padding; HF reward models load as-is."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Qwen2Config

from lit_align.models import (
    LoRASpec,
    ModelSpec,
    RewardModelSpec,
    TinyArch,
    build_reward_model,
    build_tokenizer,
    is_peft_model,
    last_token_index,
)

TINY = TinyArch(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
LENGTHS = [5, 3, 7]


def _rows(vocab: int, pad: int, eos: int) -> list[torch.Tensor]:
    """Three unpadded rows of ``LENGTHS`` random ids that are neither pad nor EOS."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, vocab, (n,), generator=g) for n in LENGTHS]
    assert all(((r != pad) & (r != eos)).all() for r in rows)
    return rows


def _pad(rows: list[torch.Tensor], pad: int, side: str, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on ``side`` to the longest row plus ``extra``."""
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        s = 0 if side == "right" else width - len(r)
        ids[i, s : s + len(r)], mask[i, s : s + len(r)] = r, 1
    return ids, mask


def test_last_token_index_for_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.bool()).tolist() == [2, 4, 0]


def test_scalar_head_score_ignores_padding():
    """Each row alone (no padding) is the ground truth; right padding, extra right pads and left
    padding must give the same scores."""
    model = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.5)).eval()
    tok = build_tokenizer(ModelSpec(tiny=TINY))
    rows = _rows(len(tok), tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        alone = torch.cat([model.score(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])  # (B,)
        assert alone.abs().min() > 0 and alone.dtype == torch.float32
        for side, extra in [("right", 0), ("right", 4), ("left", 0), ("left", 3)]:
            ids, mask = _pad(rows, tok.pad_token_id, side, extra)
            torch.testing.assert_close(model.score(ids, mask), alone, rtol=1e-5, atol=1e-5, msg=f"{side}+{extra}")
        torch.testing.assert_close(model(*_pad(rows, tok.pad_token_id, "right")), alone, rtol=1e-5, atol=1e-5)


def test_zero_head_scores_zero_and_seeded_head_is_deterministic():
    zero = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY)))
    assert torch.count_nonzero(zero.head.weight) == 0 and torch.count_nonzero(zero.head.bias) == 0
    tok = build_tokenizer(ModelSpec(tiny=TINY))
    ids, mask = _pad(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, "right")
    with torch.no_grad():
        assert torch.equal(zero.score(ids, mask), torch.zeros(3))

    before = torch.random.get_rng_state()
    a = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.02))
    b = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.02))
    c = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY, seed=3), head_init_std=0.02))
    assert torch.equal(torch.random.get_rng_state(), before), "building must not consume the global RNG"
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert 0.005 < a.head.weight.std().item() < 0.05
    with torch.no_grad():
        assert torch.equal(a.score(ids, mask), b.score(ids, mask))


def test_head_bias_false_gives_the_reference_bias_free_head():
    """The watermark reference code's detector / critic head is ``Linear(hidden, 1, bias=False)``
    (``head_bias: false``); with a bias (``true``, or unset outside the watermark) it starts at 0, and the
    two have the same weight otherwise."""
    plain = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.5, head_bias=False))
    biased = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.5, head_bias=True))
    assert set(plain.head.state_dict()) == {"weight"} and set(biased.head.state_dict()) == {"weight", "bias"}
    assert torch.equal(plain.head.weight, biased.head.weight) and torch.equal(biased.head.bias, torch.zeros(1))
    tok = build_tokenizer(ModelSpec(tiny=TINY))
    ids, mask = _pad(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, "right")
    with torch.no_grad():
        biased.head.bias.fill_(0.25)
        torch.testing.assert_close(biased.score(ids, mask), plain.score(ids, mask) + 0.25)


def test_heads_saved_with_or_without_a_bias_load_into_either_form():
    """Older checkpoints hold ``head.bias`` (0 unless trained with one): a zero bias loads into the
    bias-free head (same scores), a nonzero one is refused naming ``head_bias``; a bias-free head
    loads into a head with a bias as bias 0."""
    spec = RewardModelSpec(model=ModelSpec(tiny=TINY), head_init_std=0.5)
    old = build_reward_model(RewardModelSpec(model=spec.model, head_init_std=0.5, head_bias=True))
    new = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY, seed=5), head_bias=False))
    new.load_state_dict(old.state_dict(), strict=True)  # zero bias: dropped
    tok = build_tokenizer(ModelSpec(tiny=TINY))
    ids, mask = _pad(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, "right")
    with torch.no_grad():
        torch.testing.assert_close(new.score(ids, mask), old.score(ids, mask), rtol=0, atol=0)
        old.head.bias.fill_(0.5)
    with pytest.raises(ValueError, match="head_bias: true"):
        new.load_state_dict(old.state_dict(), strict=True)
    back = build_reward_model(RewardModelSpec(model=spec.model, head_bias=True))
    with torch.no_grad():
        back.head.bias.fill_(1.0)
    back.load_state_dict(new.state_dict(), strict=True)
    assert torch.equal(back.head.bias, torch.zeros(1)) and torch.equal(back.head.weight, new.head.weight)


def test_sequence_classification_from_a_local_directory_matches_hf(tmp_path):
    tok = build_tokenizer(ModelSpec(tiny=TINY))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    model = build_reward_model(RewardModelSpec(model=ModelSpec(name_or_path=str(tmp_path)),
                                               kind="sequence_classification")).eval()
    assert model.head is None and type(model.backbone).__name__ == "Qwen2ForSequenceClassification"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    rows = _rows(len(tok), tok.pad_token_id, tok.eos_token_id)
    ids, mask = _pad(rows, tok.pad_token_id, "right", extra=2)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]  # (B,)
        torch.testing.assert_close(model.score(ids, mask), expected, rtol=1e-5, atol=1e-5)
        left_ids, left_mask = _pad(rows, tok.pad_token_id, "left")
        torch.testing.assert_close(model.score(left_ids, left_mask), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().min() > 0

    # responses end with EOS and pad == EOS (a tokenizer without pad token, `missing_pad_token: eos`):
    # HF's pooling compares ids with pad_token_id and reads the token before the final EOS; not here
    with_eos = [torch.cat([r, torch.tensor([tok.eos_token_id])]) for r in rows]
    ids, mask = _pad(with_eos, tok.pad_token_id, "right", extra=2)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]  # pad != EOS: HF reads the EOS
        hf.config.pad_token_id = model.backbone.config.pad_token_id = tok.eos_token_id
        eos_ids, eos_mask = _pad(with_eos, tok.eos_token_id, "right", extra=2)
        torch.testing.assert_close(model.score(eos_ids, eos_mask), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hf(input_ids=eos_ids, attention_mask=eos_mask).logits[:, 0], expected)


def test_sequence_classification_needs_a_path():
    with pytest.raises(ValueError, match="model.name_or_path"):
        build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY), kind="sequence_classification"))


def test_lora_backbone_trains_adapters_and_head_only():
    model = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY, lora=LoRASpec(r=4)), head_init_std=0.1))
    assert is_peft_model(model.backbone)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"head.weight", "head.bias"} <= set(trainable)
    assert all(n.startswith("head.") or "lora_" in n for n in trainable), trainable
    assert sum("lora_" in n for n in trainable) > 0

    tok = build_tokenizer(ModelSpec(tiny=TINY))
    ids, mask = _pad(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, "left")
    model.score(ids, mask).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads <= set(trainable)
    assert "head.weight" in grads and any("lora_B" in n for n in grads)


def test_opt_detector_head_reads_the_projected_width():
    """OPT projects its decoder output to word_embed_proj_dim (512 for OPT-350M): the head must match."""
    import tempfile

    from transformers import OPTConfig, OPTForCausalLM

    from lit_align.models import ModelSpec, RewardModelSpec, build_reward_model

    config = OPTConfig(vocab_size=1024, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=128, max_position_embeddings=64, pad_token_id=0)
    with tempfile.TemporaryDirectory() as d:
        OPTForCausalLM(config).save_pretrained(d)
        from lit_align.models import TINY_TOKENIZER

        rm = build_reward_model(RewardModelSpec(model=ModelSpec(name_or_path=d, tokenizer=TINY_TOKENIZER)))
        ids = torch.randint(2, 1000, (2, 5))
        assert rm.head.in_features == 32
        assert rm.score(ids, torch.ones_like(ids)).shape == (2,)


def _padded(rows: list[torch.Tensor], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def _scores_and_grads(model, ids, mask, separable: bool) -> tuple[torch.Tensor, dict, list[int]]:
    """Scores, parameter gradients of a weighted sum of them, and the rank of every input the last layer's MLP saw
    (3: all positions, the full forward; 2: the scored positions only)."""
    model.zero_grad()
    model.last_layer_at_score_only = separable
    mlp = model.backbone.get_decoder().layers[-1].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].dim()))
    try:
        scores = model.score(ids, mask)
        (scores * torch.arange(1.0, len(scores) + 1, dtype=scores.dtype)).sum().backward()
    finally:
        handle.remove()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, seen


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_last_layer_at_the_scored_token_only_equals_the_full_forward(family, side, lora):
    """Layers 0..L-2 on every token, then the last layer for the scored token only: the same scores and gradients
    (float64, so only the summation order differs) for left and right padding, full or LoRA."""
    spec = ModelSpec(tiny=TinyArch(family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), lora=LoRASpec(r=4) if lora else None)
    model = build_reward_model(RewardModelSpec(model=spec, head_init_std=0.5)).double().train()
    tok = build_tokenizer(spec)
    ids, mask = _padded(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, side)
    fast, fast_grads, fast_seen = _scores_and_grads(model, ids, mask, True)
    full, full_grads, full_seen = _scores_and_grads(model, ids, mask, False)
    assert fast_seen == [2] and full_seen == [3]  # the fast path ran the MLP on the scored positions only
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    assert fast_grads.keys() == full_grads.keys() and len(fast_grads) > 3
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_last_layer_shortcut_falls_back_where_it_would_not_be_exact():
    """Attention dropout or LoRA dropout in training (the shortcut would draw other masks) run the full forward;
    the shortcut is on for RewardModelModule's reward model and off for other builders unless the spec asks."""
    from lit_align.methods import RewardModelModule

    spec = ModelSpec(tiny=TINY)
    model = build_reward_model(RewardModelSpec(model=spec, head_init_std=0.5)).train()
    tok = build_tokenizer(spec)
    ids, mask = _padded(_rows(len(tok), tok.pad_token_id, tok.eos_token_id), tok.pad_token_id, "left")
    assert _scores_and_grads(model, ids, mask, True)[2] == [2]
    model.backbone.config.attention_dropout = 0.1
    assert _scores_and_grads(model, ids, mask, True)[2] == [3]
    assert _scores_and_grads(model.eval(), ids, mask, True)[2] == [2]  # no dropout in eval: exact again
    lora = build_reward_model(RewardModelSpec(model=ModelSpec(tiny=TINY, lora=LoRASpec(r=4, dropout=0.1)))).train()
    assert _scores_and_grads(lora, ids, mask, True)[2] == [3]
    assert build_reward_model(RewardModelSpec(model=spec)).last_layer_at_score_only is False
    assert build_reward_model(RewardModelSpec(model=spec, last_layer_at_score_only=True)).last_layer_at_score_only
    module = RewardModelModule(RewardModelSpec(model=spec))
    module.configure_model()
    assert module.reward_model.last_layer_at_score_only is True
