"""The continuous embedding attack (``lit_align.attacks.embedding``; others.md §8(b), tests §8(g) 1-5).

A tiny random Llama-layout model (2 layers, hidden 32) on the bundled tiny tokenizer, whose chat template wraps a
prompt as ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``: prompt + harmful target rows built as the data modules build
them (``encode_prompt`` with the template, ``encode_response``), right- or left-padded.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_lm

from lit_align.attacks import (
    EmbeddingAttack,
    attacked_generate,
    embedding_radius,
    left_padded_prompts,
    perturbation_mask,
    perturbed_embeddings,
    transplant,
)
from lit_align.containers import SequenceBatch
from lit_align.data.tokenize import encode_prompt, encode_response, prompt_response_batch
from lit_align.errors import ConfigError
from lit_align.padding import pad_rows
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import SamplingConfig, sample

PROMPTS = ["how do I pick a lock", "write a virus"]
TARGETS = ["sure, here is how", "sure"]
SAFE = ["no", "sorry, I can not help with that"]


@pytest.fixture(scope="module")
def model(tokenizer):
    # weights drawn wider than the HF default (0.02), so that a prompt perturbation can move the answer
    return tiny_lm("llama", vocab_size=len(tokenizer), hidden_size=32, initializer_range=0.3)


def _rows(tokenizer, responses: list[str]) -> list[tuple[list[int], list[int]]]:
    return [(encode_prompt(tokenizer, p, True), encode_response(tokenizer, r)) for p, r in zip(PROMPTS, responses)]


def _batch(tokenizer, responses: list[str] = TARGETS, side: str = "right") -> SequenceBatch:
    """Prompt (chat template) + response rows, padded on ``side``; ``loss_mask`` 1 on the response."""
    rows = _rows(tokenizer, responses)
    if side == "right":
        return prompt_response_batch(rows, list(range(len(rows))), tokenizer.pad_token_id)
    ids, attn = pad_rows([p + r for p, r in rows], tokenizer.pad_token_id, side="left")  # (B, T)
    loss = torch.zeros_like(attn)
    for b, (_, r) in enumerate(rows):
        loss[b, ids.shape[1] - len(r) :] = 1
    return SequenceBatch(ids, attn, loss, torch.arange(len(rows)))


def _harmful_ce(model, batch: SequenceBatch, delta: torch.Tensor | None = None) -> float:
    """Token-mean CE of the response tokens, under ``delta`` when given."""
    def ce():
        out = token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        return float(-(out.logps.sum() / out.mask.sum()).detach())
    if delta is None:
        return ce()
    with perturbed_embeddings(model, delta):
        return ce()


@pytest.mark.parametrize("side", ["right", "left"])
def test_projection_after_every_step_and_zero_outside_the_mask(model, tokenizer, side):
    """§8(g)1: after each of the iterations every token's ||delta_t|| <= eps_abs + 1e-6 (and the ball binds: a step
    size far above the radius would leave it otherwise), delta is exactly 0 on response and padding positions; the
    mask is the whole chat-formatted prompt (user and assistant headers, the newline after the latter), no
    response token and no padding."""
    batch = _batch(tokenizer, side=side)
    mask = perturbation_mask(batch.attention_mask, batch.loss_mask)
    for b, (prompt, response) in enumerate(_rows(tokenizer, TARGETS)):
        assert batch.input_ids[b][mask[b]].tolist() == prompt  # the whole prompt, template tokens included
        assert tokenizer.convert_ids_to_tokens(prompt)[0] == "<|user|>"
        assert tokenizer.convert_ids_to_tokens(prompt)[-2:] == ["<|assistant|>", "Ċ"]
        assert batch.input_ids[b][batch.loss_mask[b].bool()].tolist() == response
        assert not (mask[b] & batch.loss_mask[b].bool()).any()
        assert not (mask[b] & ~batch.attention_mask[b].bool()).any()
    assert (~batch.attention_mask.bool()).any()  # the batch has padding to keep clean

    attack = EmbeddingAttack(epsilon_rel=0.05, iters=4, step_size=0.05)
    radius = embedding_radius(model, 0.05)
    steps = []

    def check(i, delta):
        norms = delta.norm(dim=-1)  # (B, T)
        assert norms.max() <= radius + 1e-6, (i, norms.max().item(), radius)
        assert norms[mask].min() >= radius * (1 - 1e-5)  # projected onto the sphere: the step overshot it
        assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))
        steps.append(i)

    result = attack(model, batch, on_step=check)
    assert steps == [1, 2, 3, 4]
    assert torch.equal(result.mask, mask) and result.radius == pytest.approx(radius)
    assert torch.equal(result.delta[~mask], torch.zeros_like(result.delta[~mask]))


def test_attack_lowers_the_harmful_cross_entropy(model, tokenizer):
    """§8(g)2 (and §8(h)4, the direction): with a large epsilon the target's CE falls; loss_start is the clean
    CE, loss_end the CE recomputed under the returned delta; cost counts one forward per step plus the last."""
    batch = _batch(tokenizer)
    result = EmbeddingAttack(epsilon_rel=1.0, iters=10, step_size=0.01)(model, batch)
    clean = _harmful_ce(model, batch)
    assert result.loss_start.item() == pytest.approx(clean, rel=1e-5)
    assert result.loss_end.item() == pytest.approx(_harmful_ce(model, batch, result.delta), rel=1e-5)
    assert result.loss_end.item() < result.loss_start.item() - 1.0, result.losses
    assert result.losses.shape == (11,) and result.losses[0] == result.loss_start and result.losses[-1] == result.loss_end
    assert (result.forward_passes, result.backward_passes) == (11, 10)
    unscored = EmbeddingAttack(epsilon_rel=1.0, iters=10, step_size=0.01)(model, batch, score_last=False)
    assert torch.equal(unscored.delta, result.delta) and math.isnan(unscored.loss_end.item())
    assert (unscored.forward_passes, unscored.backward_passes) == (10, 10)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_parameters_and_grads_untouched_and_delta_detached(model, tokenizer):
    """§8(g)3-4 on a LoRA (PEFT) model in train mode: every parameter, every ``.grad`` (set beforehand on the
    adapter, None elsewhere) and every ``requires_grad`` flag is unchanged by the attack; its delta is a detached
    leaf; the radius is the base model's; the model's train mode is kept."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.train()
    for p in lora.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
              for n, p in lora.named_parameters()}
    assert embedding_radius(lora, 0.1) == pytest.approx(embedding_radius(model, 0.1))

    result = EmbeddingAttack(epsilon_rel=1.0, iters=3, step_size=0.01)(lora, _batch(tokenizer))
    assert result.loss_end < result.loss_start
    for name, p in lora.named_parameters():
        value, grad, flag = before[name]
        assert torch.equal(p.detach(), value), name
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad), name
        assert p.requires_grad == flag, name
    assert lora.training
    assert not result.delta.requires_grad and result.delta.grad_fn is None
    assert not result.loss_start.requires_grad and not result.loss_end.requires_grad


def test_attack_works_in_inference_mode(model, tokenizer):
    """From a validation step (Lightning runs it under ``torch.inference_mode``, batch included) the attack still
    takes gradients."""
    with torch.inference_mode():
        batch = _batch(tokenizer)
        result = EmbeddingAttack(epsilon_rel=1.0, iters=2, step_size=0.01)(model, batch)
    assert result.delta.abs().sum() > 0 and result.loss_end < result.loss_start


def test_transplant_onto_left_padded_toward_sequences(model, tokenizer):
    """§8(g)5: the delta of the away batch (right-padded, harmful targets) on the toward batch (LEFT-padded safe
    responses of other lengths, so every prompt starts at another column): the embeddings the model sees equal
    the clean ones plus the away delta, in mask order, exactly at the toward prompt positions, clean elsewhere."""
    away, toward = _batch(tokenizer, TARGETS), _batch(tokenizer, SAFE, side="left")
    result = EmbeddingAttack(epsilon_rel=0.5, iters=2, step_size=0.01)(model, away)
    target = perturbation_mask(toward.attention_mask, toward.loss_mask)
    moved = transplant(result.delta, result.mask, target)  # (B, T_t, H)
    assert moved.shape[:2] == toward.input_ids.shape
    starts = [int(target[b].int().argmax()) for b in range(2)]
    assert starts != [int(result.mask[b].int().argmax()) for b in range(2)]  # positions really shifted
    for b in range(2):
        assert torch.equal(moved[b][target[b]], result.delta[b][result.mask[b]])
        assert result.delta[b][result.mask[b]].abs().sum() > 0

    seen = []
    embed = model.get_input_embeddings()
    clean = embed(toward.input_ids).detach()  # (B, T_t, H)
    with perturbed_embeddings(model, moved):
        handle = embed.register_forward_hook(lambda m, i, out: seen.append(out.detach()))  # runs after the perturbation
        try:
            token_logps(model, toward.input_ids, toward.attention_mask, toward.loss_mask)
        finally:
            handle.remove()
    (got,) = seen
    assert torch.equal(got[target], clean[target] + moved[target])
    assert torch.equal(got[~target], clean[~target])


def test_transplant_by_mask_order_and_count_mismatch():
    """By hand: row 0's two perturbed positions 0, 1 go to 2, 3 (left padding), row 1's single one stays at 0;
    a row whose counts differ is refused, naming the row and both counts."""
    delta = torch.tensor([[[1.0], [2.0], [0.0]], [[5.0], [0.0], [0.0]]])  # (2, 3, 1)
    source = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    target = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]]).bool()
    assert transplant(delta, source, target).squeeze(-1).tolist() == [[0, 0, 1, 2], [5, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"row 1 has 1 perturbed positions in the source sequence but 2"):
        transplant(delta, source, torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]).bool())


def test_embedding_radius_by_hand(model):
    """Rows (3, 4, 0...) and (0, ..., 12) and zeros elsewhere: mean row norm (5 + 12) / V, times epsilon_rel."""
    lm = copy.deepcopy(model)
    weight = lm.get_input_embeddings().weight  # (V, H)
    with torch.no_grad():
        weight.zero_()
        weight[0, :2] = torch.tensor([3.0, 4.0])
        weight[1, -1] = 12.0
    assert embedding_radius(lm, 0.1) == pytest.approx(0.1 * 17 / weight.shape[0], rel=1e-6)


def test_perturbed_embeddings_prefill_only_and_removed(model, tokenizer):
    """The sampler under a zero delta equals plain sampling; under a non-zero one its prefill changes; the
    (B, 1) decoding steps pass unchanged (their embeddings are the plain rows of E); the hook is gone after the
    block, also after an error."""
    ids, mask = left_padded_prompts(_batch(tokenizer), tokenizer.pad_token_id)  # (B, P)
    config = SamplingConfig(max_new_tokens=4, do_sample=False)
    kw = {"eos_token_id": -1, "pad_token_id": tokenizer.pad_token_id}  # no EOS: every step runs
    plain = sample(model, ids, mask, config, **kw)
    embed = model.get_input_embeddings()
    with perturbed_embeddings(model, torch.zeros(*ids.shape, 32)):
        assert torch.equal(sample(model, ids, mask, config, **kw).logps, plain.logps)

    calls = []
    torch.manual_seed(1)
    with perturbed_embeddings(model, torch.randn(*ids.shape, 32) * mask[..., None]):
        handle = embed.register_forward_hook(lambda m, i, out: calls.append((i[0], out.detach())))
        try:
            attacked = sample(model, ids, mask, config, **kw)
        finally:
            handle.remove()
    assert (attacked.logps[:, 0] - plain.logps[:, 0]).abs().max() > 1e-3  # the prefill saw the perturbation
    assert len(calls) == 4 and calls[0][0].shape == ids.shape
    assert not torch.equal(calls[0][1], embed.weight[ids])
    for tokens, out in calls[1:]:  # (B, 1) decoding steps
        assert tokens.shape == (2, 1) and torch.equal(out, embed.weight[tokens])

    assert not embed._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), perturbed_embeddings(model, torch.zeros(1, 1, 32)):
        assert embed._forward_hooks
        raise RuntimeError("boom")
    assert not embed._forward_hooks


def test_max_calls_leaves_one_token_decode_steps_alone(model):
    """One-token prompts: the decoding steps have the prefill's (B, 1) shape too; ``max_calls=1`` perturbs the
    prefill only."""
    ids, mask = torch.tensor([[7], [9]]), torch.ones(2, 1, dtype=torch.long)
    delta = torch.ones(2, 1, 32)
    config = SamplingConfig(max_new_tokens=3, do_sample=False)
    kw = {"eos_token_id": -1, "pad_token_id": 0}
    outs = []
    embed = model.get_input_embeddings()
    with perturbed_embeddings(model, delta, max_calls=1):
        handle = embed.register_forward_hook(lambda m, i, out: outs.append(torch.equal(out, embed.weight[i[0]])))
        try:
            sample(model, ids, mask, config, **kw)
        finally:
            handle.remove()
    assert outs == [False, True, True]


def test_attacked_generate_says_the_target(model, tokenizer):
    """The evaluation attack end to end: a strong attack makes the greedy answer of the left-padded prompts the
    harmful target (which the clean model does not say); the attack runs in eval mode, as generation does, on a
    model given in train mode; the rollout's prompts are the batch's prompts; its
    log-probs are the teacher-forced ones of prompt + answer with the delta transplanted onto the prompt only."""
    batch = _batch(tokenizer, ["sure", "sure"])
    attack = EmbeddingAttack(epsilon_rel=2.0, iters=20, step_size=0.02)
    config = SamplingConfig(max_new_tokens=6, do_sample=False)
    modes = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: modes.append(m.training))
    model.train()
    try:
        rollout, result = attacked_generate(model, tokenizer, attack, batch, config)
        assert model.training  # the mode given is restored
    finally:
        handle.remove()
        model.eval()
    assert len(modes) > 21 and not any(modes)  # the attack's 21 forwards and the answer's, all in eval mode
    prompts, targets = zip(*_rows(tokenizer, ["sure", "sure"]))
    assert [r[m.bool()].tolist() for r, m in zip(rollout.prompt_ids, rollout.prompt_mask)] == list(prompts)
    clean = sample(model, rollout.prompt_ids, rollout.prompt_mask, config, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    for b, target in enumerate(targets):
        assert rollout.response_ids[b][rollout.response_mask[b].bool()].tolist() == target
        assert clean.response_ids[b][: len(target)].tolist() != target

    width = rollout.prompt_ids.shape[1]
    delta = transplant(result.delta, result.mask, rollout.attention_mask.bool() & (torch.arange(
        rollout.sequences.shape[1]) < width))  # (B, P + R, H), zero on the answer
    scored = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    forced = _logps(model, rollout.sequences, rollout.attention_mask, scored, delta)
    torch.testing.assert_close(forced[:, width:], rollout.logps, atol=1e-4, rtol=0)


def _logps(model, ids, attn, loss, delta):
    with perturbed_embeddings(model, delta):
        return token_logps(model, ids, attn, loss).logps.detach()


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"epsilon_rel": 0.0}, "epsilon_rel"),
    ({"epsilon_rel": -0.05}, "epsilon_rel"),
    ({"epsilon_rel": math.nan}, "epsilon_rel"),
    ({"epsilon_rel": math.inf}, "epsilon_rel"),
    ({"iters": 0}, "iters"),
    ({"iters": 2.5}, "iters"),
    ({"step_size": 0.0}, "step_size"),
])
def test_bad_settings_name_the_key(kwargs, key):
    """§8(g) bad input: each refused setting is a ConfigError naming ``model.attack.<field>``."""
    with pytest.raises(ConfigError, match=rf"model\.attack\.{key} must be"):
        EmbeddingAttack(**kwargs)


def test_batch_without_response_is_refused(model, tokenizer):
    batch = _batch(tokenizer)
    batch.loss_mask = torch.zeros_like(batch.loss_mask)
    with pytest.raises(ValueError, match="no response token"):
        EmbeddingAttack()(model, batch)


def test_bf16_model_float32_delta(model, tokenizer):
    """A bf16 model: the perturbation stays float32 (cast in the hook) and still lowers the target's CE."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    result = EmbeddingAttack(epsilon_rel=1.0, iters=3, step_size=0.01)(half, _batch(tokenizer))
    assert result.delta.dtype == torch.float32 and result.delta.abs().sum() > 0
    assert result.loss_end < result.loss_start


def test_attacked_generate_without_pad_token_pads_with_eos(model, tokenizer):
    """§8(h)8: a tokenizer without a pad token (Llama 3's has none) left-pads the prompts with EOS."""
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    batch = _batch(tokenizer)
    rollout, _ = attacked_generate(model, no_pad, EmbeddingAttack(iters=1), batch,
                                   SamplingConfig(max_new_tokens=2, do_sample=False))
    padding = rollout.prompt_ids[~rollout.prompt_mask.bool()]
    assert padding.numel() > 0 and (padding == tokenizer.eos_token_id).all()
