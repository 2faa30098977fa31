"""token_stats (vocabulary-mean log-probs, argmax hits) and token_kl against a naive full-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gloo_group, tiny_lm
from test_logps import PAD, VOCAB, _batch  # the same three rows: (3, 4), (5, 2), (2, 0)

import lit_align.rollout.logps as logps_mod
from lit_align.rollout import token_kl, token_logps, token_stats
from lit_align.rollout.logps import position_ids_from_mask

GRAD_PARAMS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_lm("qwen2", vocab_size=VOCAB, hidden_size=32, seed=seed, max_position_embeddings=64,
                   tie_word_embeddings=False)


def _naive_logits(model, ids, attn):
    """(B, T-1, V) float logits of the positions that predict tokens 1..T-1."""
    return model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[:, :-1].float()


def _naive_stats(model, ids, attn, lmask):
    """(B, T-1) logps, mean_logps, correct and mask from the full (B, T, V) log-softmax."""
    logits = _naive_logits(model, ids, attn)
    logp = logits.log_softmax(-1)  # (B, T-1, V)
    mask = (lmask[:, 1:] * attn[:, 1:] * attn[:, :-1]).float()  # the first real token is never scored
    target = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    mean = logp.mean(-1) * mask
    correct = (logits.argmax(-1) == ids[:, 1:]) & mask.bool()
    return target, mean, correct, mask


def _naive_kl(policy, reference, ids, attn, lmask):
    """(B, T-1) KL(p_ref || p_theta), cross-entropy, reference entropy and mask."""
    logq = _naive_logits(policy, ids, attn).log_softmax(-1)
    with torch.no_grad():
        logp = _naive_logits(reference, ids, attn).log_softmax(-1)
    mask = (lmask[:, 1:] * attn[:, 1:] * attn[:, :-1]).float()  # the first real token is never scored
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    ce = -(logp.exp() * logq).sum(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return kl, ce, entropy, mask


def _grads(model, names=GRAD_PARAMS):
    params = dict(model.named_parameters())
    out = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, None])
def test_token_stats_match_naive(padding_side, chunk_tokens, checkpointed, monkeypatch):
    """logps, mean_logps and correct equal the full-logits computation; so do gradients through logps and mean_logps."""
    if checkpointed:
        monkeypatch.setattr(logps_mod, "_CHECKPOINT_MIN_ELEMENTS", 0)
    model = _tiny_model()
    ids, attn, lmask = _batch(padding_side)
    target, mean, correct, mask = _naive_stats(model, ids, attn, lmask)
    (target.sum() + 0.5 * mean.sum()).backward()
    naive_grads = _grads(model)

    out = token_stats(model, ids, attn, lmask, mean_logps=True, correct=True, chunk_tokens=chunk_tokens)
    assert out.logps.shape == out.mean_logps.shape == out.correct.shape == out.mask.shape == ids.shape
    assert out.correct.dtype == torch.bool
    torch.testing.assert_close(out.logps[:, 1:], target, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean_logps[:, 1:], mean, atol=1e-5, rtol=0)
    assert torch.equal(out.correct[:, 1:], correct)
    torch.testing.assert_close(out.mask[:, 1:], mask)
    assert out.mask[:, 0].sum() == 0 and out.mean_logps[:, 0].abs().sum() == 0 and not out.correct[:, 0].any()
    (out.logps.sum() + 0.5 * out.mean_logps.sum()).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_token_stats_defaults_equal_token_logps_and_sum_mean():
    model = _tiny_model()
    ids, attn, lmask = _batch("left")
    stats = token_stats(model, ids, attn, lmask, chunk_tokens=2)
    assert stats.mean_logps is None and stats.correct is None
    plain = token_logps(model, ids, attn, lmask)
    torch.testing.assert_close(stats.logps, plain.logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.sum(), plain.sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.mean(), plain.mean(), atol=1e-6, rtol=0)
    only_correct = token_stats(model, ids, attn, lmask, correct=True)
    assert only_correct.mean_logps is None and only_correct.correct is not None


def test_token_stats_with_logit_softcap():
    """The model's own post-head transform (Gemma-2 soft-cap) is applied before the vocabulary mean."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, head_dim=8,
                          final_logit_softcapping=2.0, tie_word_embeddings=False, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # the cap changes the logits a lot
        ids, attn, lmask = _batch("left")
        target, mean, correct, _ = _naive_stats(model, ids, attn, lmask)
        out = token_stats(model, ids, attn, lmask, mean_logps=True, correct=True, chunk_tokens=3)
    torch.testing.assert_close(out.mean_logps[:, 1:], mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logps[:, 1:], target, atol=1e-5, rtol=0)
    assert torch.equal(out.correct[:, 1:], correct)


def test_token_stats_nothing_scored_and_shape_errors():
    model = _tiny_model()
    ids, attn, lmask = _batch("right")
    out = token_stats(model, ids, attn, torch.zeros_like(lmask), mean_logps=True, correct=True)
    assert out.logps.abs().sum() == 0 and out.mean_logps.abs().sum() == 0 and not out.correct.any()
    assert torch.equal(out.mean(), torch.zeros(3))
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        token_stats(model, ids, attn[:, :-1], lmask)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        token_kl(model, model, ids, attn, lmask[:2])


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
def test_token_kl_matches_naive(padding_side, chunk_tokens, checkpointed, monkeypatch):
    """KL(p_ref || p_theta) and -sum p_ref log p_theta per position, values and policy gradients; the reference
    gets no gradient."""
    if checkpointed:
        monkeypatch.setattr(logps_mod, "_CHECKPOINT_MIN_ELEMENTS", 0)
    policy, reference = _tiny_model(seed=0), _tiny_model(seed=5).requires_grad_(False)
    ids, attn, lmask = _batch(padding_side)
    kl, ce, entropy, mask = _naive_kl(policy, reference, ids, attn, lmask)
    (kl.sum() + 0.3 * ce.sum()).backward()
    naive_grads = _grads(policy)

    out = token_kl(policy, reference, ids, attn, lmask, chunk_tokens=chunk_tokens)
    assert out.kl.shape == out.cross_entropy.shape == out.mask.shape == ids.shape
    torch.testing.assert_close(out.kl[:, 1:], kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cross_entropy[:, 1:], ce, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.reference_entropy[:, 1:], entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mask[:, 1:], mask)
    assert (out.kl >= -1e-6).all()  # a KL divergence
    (out.kl.sum() + 0.3 * out.cross_entropy.sum()).backward()
    for name, grad in _grads(policy).items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in reference.parameters())


def test_token_kl_all_positions():
    """``loss_mask = attention_mask`` scores every real token but the first."""
    policy, reference = _tiny_model(seed=0), _tiny_model(seed=5)
    ids, attn, _ = _batch("left")
    with torch.no_grad():
        out = token_kl(policy, reference, ids, attn, attn, chunk_tokens=5)
        kl, _, _, mask = _naive_kl(policy, reference, ids, attn, attn)
    assert out.mask.sum() == attn.sum() - attn.shape[0]
    torch.testing.assert_close(out.kl[:, 1:], kl, atol=1e-5, rtol=0)


def test_token_kl_at_init_is_zero_and_both_forms_share_gradients():
    """theta == theta_o: KL == 0, the cross-entropy form == the reference's entropy, identical gradients (others §1(g)3)."""
    policy = _tiny_model()
    reference = copy.deepcopy(policy).requires_grad_(False)
    ids, attn, lmask = _batch("right")
    out = token_kl(policy, reference, ids, attn, lmask, chunk_tokens=3)
    assert out.kl.abs().max() < 1e-6
    _, _, entropy, _ = _naive_kl(policy, reference, ids, attn, lmask)
    torch.testing.assert_close(out.cross_entropy[:, 1:].detach(), entropy, atol=1e-5, rtol=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    g_kl = torch.autograd.grad(out.kl.sum(), params, retain_graph=True)
    g_ce = torch.autograd.grad(out.cross_entropy.sum(), params)
    for a, b in zip(g_kl, g_ce, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_token_kl_adapter_mode(checkpointed, monkeypatch):
    """A LoRA policy against itself with adapters disabled == against a frozen copy of the base weights."""
    from peft import LoraConfig, get_peft_model

    if checkpointed:
        monkeypatch.setattr(logps_mod, "_CHECKPOINT_MIN_ELEMENTS", 0)
    base = _tiny_model()
    frozen = copy.deepcopy(base).requires_grad_(False)
    torch.manual_seed(3)
    policy = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids, attn, lmask = _batch("left")
    lora = [p for n, p in policy.named_parameters() if p.requires_grad]
    assert lora

    adapter = token_kl(policy, policy, ids, attn, lmask, reference_context=lambda: policy.disable_adapter(),
                       chunk_tokens=3)
    g_adapter = torch.autograd.grad(adapter.kl.sum(), lora)
    copied = token_kl(policy, frozen, ids, attn, lmask, chunk_tokens=3)
    g_copy = torch.autograd.grad(copied.kl.sum(), lora)
    assert adapter.kl.detach().max() > 1e-4  # the adapter moves the policy away from the base
    torch.testing.assert_close(adapter.kl.detach(), copied.kl.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.cross_entropy.detach(), copied.cross_entropy.detach(), atol=1e-6, rtol=0)
    for a, b in zip(g_adapter, g_copy, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with policy.disable_adapter(), torch.no_grad():  # with no adapter the policy is the reference
        same = token_kl(policy, frozen, ids, attn, lmask)
    assert same.kl.abs().max() < 1e-6


def test_token_kl_vocabulary_mismatch_raises():
    policy = _tiny_model()
    other = tiny_lm("qwen2", vocab_size=VOCAB + 3, hidden_size=32, max_position_embeddings=64, tie_word_embeddings=False)
    ids, attn, lmask = _batch("right")
    with pytest.raises(ValueError, match="same vocabulary"):
        token_kl(policy, other, ids, attn, lmask)


# -- FSDP2: two gloo processes (sharded policy and sharded frozen reference) give one-process values/gradients --
def _stats_and_kl(policy, reference, reference_context=None):
    """token_stats and token_kl values on the shared batch, and the policy gradient of their sum."""
    ids, attn, lmask = _batch("left")
    stats = token_stats(policy, ids, attn, lmask, mean_logps=True, correct=True, chunk_tokens=3)
    kl = token_kl(policy, reference, ids, attn, attn, reference_context=reference_context, chunk_tokens=4)
    (stats.logps.sum() + stats.mean_logps.sum() + kl.kl.sum() + kl.cross_entropy.sum()).backward()
    values = {"logps": stats.logps, "mean_logps": stats.mean_logps, "correct": stats.correct, "kl": kl.kl,
              "cross_entropy": kl.cross_entropy}
    return {k: v.detach() for k, v in values.items()}


def _fsdp2_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import os

    from torch.distributed.device_mesh import init_device_mesh

    from lit_align.models.fsdp import fsdp2_parallelize

    logps_mod._CHECKPOINT_MIN_ELEMENTS = 0  # the checkpointed head path: both heads recomputed in backward
    with gloo_group(rank, world, init):
        mesh = init_device_mesh("cpu", (world,))
        policy, reference = _tiny_model(seed=0), _tiny_model(seed=5)
        fsdp2_parallelize(policy, mesh)
        fsdp2_parallelize(reference, mesh, trainable=False)
        values = _stats_and_kl(policy, reference)  # every rank the same batch: FSDP's average == one process
        grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if n in GRAD_PARAMS}
        lora = _lora_policy()  # adapter mode: the reference is the sharded policy itself, adapters off
        fsdp2_parallelize(lora, mesh)
        lora_values = _stats_and_kl(lora, lora, reference_context=lambda: lora.disable_adapter())
        lora_grads = {n: p.grad.full_tensor() for n, p in lora.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({"values": values, "grads": grads, "lora_values": lora_values, "lora_grads": lora_grads},
                       os.path.join(out_dir, "out.pt"))


def _lora_policy():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(_tiny_model(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_fsdp2_token_stats_and_kl_match_one_process(tmp_path, monkeypatch):
    """Copy mode (separately sharded frozen reference) and adapter mode (LoRA policy, adapters off), with the
    checkpointed head path, whose backward recomputes the reference's head inside the policy's backward."""
    import torch.multiprocessing as mp

    # spawn, not fork: after a backward pass a CUDA build of torch has autograd device threads, and forked
    # children cannot use autograd ("Unable to handle autograd's threading ... fork-based multiprocessing")
    mp.start_processes(_fsdp2_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    monkeypatch.setattr(logps_mod, "_CHECKPOINT_MIN_ELEMENTS", 0)
    policy, reference = _tiny_model(seed=0), _tiny_model(seed=5).requires_grad_(False)
    values = _stats_and_kl(policy, reference)
    for name, value in values.items():
        torch.testing.assert_close(out["values"][name], value, atol=1e-5, rtol=0, msg=name)
    for name, grad in _grads(policy).items():
        torch.testing.assert_close(out["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    lora = _lora_policy()
    values = _stats_and_kl(lora, lora, reference_context=lambda: lora.disable_adapter())
    assert values["kl"].max() > 1e-4
    for name, value in values.items():
        torch.testing.assert_close(out["lora_values"][name], value, atol=1e-5, rtol=0, msg=f"lora {name}")
    lora_grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert lora_grads.keys() == out["lora_grads"].keys()
    for name, grad in lora_grads.items():
        torch.testing.assert_close(out["lora_grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
