"""The continuous embedding attack of C-AdvUL / C-AdvIPO (Xhonneux et al. 2024, arXiv:2405.15589, §3).

A perturbation ``delta`` is added to the input embeddings of every attended position that is not a response
token (the prompt, BOS, a system prompt and the chat template up to and including the assistant header) and
optimised by signed gradient descent to make the harmful target likely::

    eps_abs = epsilon_rel * mean_v ||E_v||_2          (E: the input-embedding matrix, one row per token)
    delta_0 = 0                                       (B, T, H)
    A(delta) = token-mean CE of the response tokens under the embeddings e + m * delta
    delta_{i+1} = Proj_eps_abs(m * (delta_i - step_size * sign(grad_delta A(delta_i))))

``m`` is the (B, T) perturbation mask and ``Proj`` rescales every token's row of norm above ``eps_abs``
onto the L2 ball. The attacker LOWERS the harmful cross-entropy. Gradients are taken with
``torch.autograd.grad`` with respect to ``delta`` alone: the model's parameters and their ``.grad`` are left
as they were. The last ``delta`` is returned, detached.

The perturbation enters through a forward hook on the input-embedding module (:func:`perturbed_embeddings`),
so :func:`lit_align.rollout.logps.token_logps` and :func:`lit_align.rollout.sampler.sample` run unchanged
under it, FSDP2 included: the hook sits on a submodule of the root unit, whose own forward (or registered
forward method) gathers the weights before the embedding runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_align.containers import SequenceBatch
from lit_align.errors import check_int, check_number
from lit_align.losses.sft import nll_loss
from lit_align.modes import eval_mode
from lit_align.padding import pad_rows
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import Generators, Rollout, SamplingConfig, sample

__all__ = [
    "AttackResult",
    "EmbeddingAttack",
    "attacked_generate",
    "embedding_radius",
    "left_padded_prompts",
    "perturbation_mask",
    "perturbed_embeddings",
    "transplant",
]

#: Config path of the attack's settings, named by its errors.
_KEY = "model.attack"


def perturbation_mask(attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """(B, T) bool: the positions the attack perturbs, attended AND not a response token.

    That is the prompt with every BOS, system and chat-template token up to and including the assistant
    header (the completion-only labels are -100 there, §8(h)2/10); never a response token, never padding.
    Position-wise, so left and right padding both work.
    """
    if attention_mask.shape != loss_mask.shape:
        raise ValueError(f"perturbation_mask: attention_mask {tuple(attention_mask.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same (B, T) shape")
    return attention_mask.bool() & ~loss_mask.bool()


def embedding_radius(model: nn.Module, epsilon_rel: float) -> float:
    """The absolute radius ``epsilon_rel * mean_v ||E_v||_2`` of the per-token L2 ball (§8(b), §8(h)1).

    ``E`` is ``model.get_input_embeddings().weight`` (a PEFT wrapper forwards the call to its base model),
    norms taken in float32. Under FSDP2 the weight is a DTensor sharded by rows: the row norms are computed
    on each rank's shard and summed with one all-reduce (DTensor's ``full_tensor`` of a partial sum), so every
    rank gets the same value without gathering the matrix. When the root unit happens to be unsharded (a plain
    full tensor) the norms come from it directly, with the same value on every rank.
    """
    weight = model.get_input_embeddings().weight  # (V, H), possibly a DTensor sharded on V
    with torch.no_grad():
        total = torch.linalg.vector_norm(weight.float(), dim=-1).sum()  # sum_v ||E_v||: a Partial DTensor if sharded
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()  # one all-reduce over the mesh
    return float(epsilon_rel) * float(total) / weight.shape[0]


@contextmanager
def perturbed_embeddings(model: nn.Module, delta: Tensor, *, max_calls: int | None = None) -> Iterator[None]:
    """Add ``delta`` (B, T, H) to the output of ``model``'s input-embedding module for the block.

    Every call whose output is (B, T, ...) with ``delta``'s B and T gets ``output + delta`` (``delta`` cast to
    the output's dtype, so a float32 perturbation of a bf16 model keeps its own precision and still receives
    gradients); other calls pass unchanged, e.g. the (B, 1, H) decoding steps of the KV-cache sampler after a
    (B, T) prefill. ``max_calls`` perturbs at most that many matching calls (``attacked_generate`` uses 1, the
    prefill, which also covers one-token prompts whose decode steps have the same shape). The hook is removed
    on exit, also when the block raises. It lives on the embedding MODULE: a LoRA model's base with the adapter
    disabled shares it, so a reference computed that way inside the block is perturbed too (compute it outside).
    """
    module = model.get_input_embeddings()
    applied = 0

    def add(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        nonlocal applied
        if output.shape[:2] != delta.shape[:2] or (max_calls is not None and applied >= max_calls):
            return None
        if output.shape[-1] != delta.shape[-1]:
            raise ValueError(f"perturbed_embeddings: delta has {delta.shape[-1]} features but the embeddings have "
                             f"{output.shape[-1]}")
        applied += 1
        return output + delta.to(device=output.device, dtype=output.dtype)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def transplant(delta: Tensor, source_mask: Tensor, target_mask: Tensor) -> Tensor:
    """Move a perturbation onto other sequences with the same prompts (§8(h)3).

    The k-th True position of ``source_mask[b]`` goes to the k-th True position of ``target_mask[b]``: mask
    ORDER, not absolute index, so padding on either side and responses of other lengths do not matter.

    Args:
        delta: (B, T_s, H) perturbation, non-zero only on ``source_mask``.
        source_mask: (B, T_s) bool, the perturbed positions of the source sequences.
        target_mask: (B, T_t) bool, the positions to write to (the perturbation mask of the targets).

    Returns:
        (B, T_t, H), zero outside ``target_mask``.

    Raises:
        ValueError: naming the row and both counts, when a row's masks differ in size (the two sequences'
            prompts were tokenised differently).
    """
    source, target = source_mask.bool(), target_mask.bool()
    if delta.shape[:2] != source.shape or source.shape[0] != target.shape[0]:
        raise ValueError(f"transplant: delta {tuple(delta.shape)}, source_mask {tuple(source.shape)} and target_mask "
                         f"{tuple(target.shape)} must share B, and delta's (B, T) must be source_mask's")
    counts_s, counts_t = source.sum(-1), target.sum(-1)  # (B,)
    differ = (counts_s != counts_t).nonzero().flatten().tolist()
    if differ:
        b = differ[0]
        raise ValueError(f"transplant: row {b} has {int(counts_s[b])} perturbed positions in the source sequence but "
                         f"{int(counts_t[b])} in the target; the two must share the prompt tokenisation "
                         "(same prompt, same chat template)")
    out = delta.new_zeros(target.shape[0], target.shape[1], delta.shape[-1])  # (B, T_t, H)
    out[target] = delta[source]  # row-major: the k-th True of each row to the k-th True of the same row
    return out


def left_padded_prompts(batch: SequenceBatch, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """The prompts of ``batch`` (the attended tokens before the response: its perturbation mask) left-padded for
    :func:`lit_align.rollout.sampler.sample`: ``(ids, mask)``, both (B, P) long on the batch's device."""
    rows = perturbation_mask(batch.attention_mask, batch.loss_mask)  # (B, T)
    ids, mask = pad_rows([ids[m].tolist() for ids, m in zip(batch.input_ids, rows)], pad_token_id, side="left")
    return ids.to(batch.input_ids.device), mask.to(batch.input_ids.device)


@dataclass
class AttackResult:
    """What one run of :class:`EmbeddingAttack` returns.

    Attributes:
        delta: (B, T, H) float32 perturbation after the last step, detached; exactly 0 outside ``mask``.
        mask: (B, T) bool perturbation mask (:func:`perturbation_mask` of the batch).
        radius: the absolute radius eps_abs of each token's L2 ball.
        loss_start: () harmful-target CE (token mean over the batch's response tokens) at delta = 0, detached.
        loss_end: () the same CE at the returned ``delta`` (one extra forward after the last step), detached;
            NaN when the call said ``score_last=False`` (a caller that scores the perturbed batch itself).
        forward_passes: forward passes per example (``iters + 1``, or ``iters`` without the last score).
        backward_passes: backward passes per example (``iters``), with respect to ``delta`` only.
        losses: (iters + 1,) the CE at every iterate delta_0 .. delta_iters (``loss_start`` first, ``loss_end``
            last), detached; kept on the device (no host sync).
    """

    delta: Tensor
    mask: Tensor
    radius: float
    loss_start: Tensor
    loss_end: Tensor
    forward_passes: int
    backward_passes: int
    losses: Tensor


@dataclass
class EmbeddingAttack:
    """Signed-gradient embedding attack (Xhonneux et al. 2024, ``EmbeddingSpaceAttack`` of the released code).

    ``attack(model, batch)`` perturbs the embeddings of the perturbation-mask positions of a
    :class:`~lit_align.containers.SequenceBatch` (prompt + harmful target; ``loss_mask`` on the target) to lower
    the target's token-mean cross-entropy; see the module docstring for the update. The model's train/eval mode
    is kept as given (the training module decides; dropout makes the attack stochastic in train mode). Runs
    under ``torch.enable_grad()`` outside inference mode, so it works from validation and prediction too.
    Example::

        result = EmbeddingAttack(epsilon_rel=0.05, iters=10)(policy, batch)
        with perturbed_embeddings(policy, result.delta):
            logps = token_logps(policy, batch.input_ids, batch.attention_mask, batch.loss_mask)
    """

    epsilon_rel: float = 0.05
    """Radius of each token's L2 ball relative to the mean input-embedding row norm (§8(d): 0.05 for Llama and
    Mistral, 0.075 for Zephyr, 0.1 for Gemma and Phi). A finite number > 0."""

    iters: int = 10
    """Signed gradient steps per attack (>= 1); each costs one forward and one backward pass."""

    step_size: float = 1e-4
    """Step of the signed gradient descent in embedding units per coordinate (released config: 1e-4). > 0."""

    def __post_init__(self) -> None:
        for name in ("epsilon_rel", "step_size"):
            check_number(f"{_KEY}.{name}", getattr(self, name), positive=True)
        check_int(f"{_KEY}.iters", self.iters, 1)

    def __call__(self, model: nn.Module, batch: SequenceBatch, *,
                 on_step: Callable[[int, Tensor], None] | None = None, score_last: bool = True) -> AttackResult:
        """Attack ``model`` on ``batch``; ``on_step(i, delta_i)`` (optional) sees each iterate i = 1..iters
        after its projection (detached; for tests and diagnostics). ``score_last=False`` skips the forward that
        scores the returned delta (``loss_end`` NaN): for a caller that runs the perturbed batch anyway (training
        does: its away loss is that CE), one forward fewer per step, as the released code does."""
        with torch.inference_mode(False), torch.enable_grad():
            # tensors made in inference mode (a validation batch) cannot be saved for backward: use copies
            ids, attn, resp = (t.clone() for t in (batch.input_ids, batch.attention_mask, batch.loss_mask))
            return self._run(model, ids, attn, resp, on_step, score_last)

    def _run(self, model: nn.Module, ids: Tensor, attn: Tensor, resp: Tensor,
             on_step: Callable[[int, Tensor], None] | None, score_last: bool) -> AttackResult:
        mask = perturbation_mask(attn, resp)  # (B, T)
        scored = resp.bool() & attn.bool()
        if not bool(scored[:, 1:].any()):
            raise ValueError("EmbeddingAttack: the batch has no response token (loss_mask) to attack; each row "
                             "needs the harmful target after its prompt")
        radius = embedding_radius(model, self.epsilon_rel)
        hidden = model.get_input_embeddings().weight.shape[-1]
        keep = mask.unsqueeze(-1).float()  # (B, T, 1)

        def harmful_ce(delta: Tensor) -> Tensor:
            with perturbed_embeddings(model, delta * keep):
                stats = token_logps(model, ids, attn, resp)
            return nll_loss(stats.logps, stats.mask)[0]  # () token-mean CE of the target

        delta = torch.zeros(*ids.shape, hidden, device=ids.device, dtype=torch.float32)  # (B, T, H)
        losses = []
        for i in range(1, self.iters + 1):
            delta.requires_grad_(True)
            loss = harmful_ce(delta)
            (grad,) = torch.autograd.grad(loss, delta)  # w.r.t. delta only: parameters' .grad untouched
            losses.append(loss.detach())
            with torch.no_grad():
                delta = _project((delta - self.step_size * grad.sign()) * keep, radius)  # attacker descends
            if on_step is not None:
                on_step(i, delta)
        with torch.no_grad():
            losses.append(harmful_ce(delta) if score_last else torch.full_like(losses[0], math.nan))
        trace = torch.stack(losses).float()  # (iters + 1,)
        return AttackResult(delta=delta, mask=mask, radius=radius, loss_start=trace[0], loss_end=trace[-1],
                            forward_passes=self.iters + int(score_last), backward_passes=self.iters, losses=trace)


def _project(delta: Tensor, radius: float) -> Tensor:
    """Rescale every token row of ``delta`` (B, T, H) whose L2 norm exceeds ``radius`` onto the ball."""
    norms = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)  # (B, T, 1)
    return delta * (radius / norms.clamp(min=torch.finfo(delta.dtype).tiny)).clamp(max=1.0)


def attacked_generate(model: nn.Module, tokenizer, attack: EmbeddingAttack, batch: SequenceBatch,
                      config: SamplingConfig, generator: Generators = None) -> tuple[Rollout, AttackResult]:
    """The evaluation attack: what ``model`` says to each prompt of ``batch`` under the embedding attack.

    ``attack`` runs on ``batch`` (prompt + harmful target, as in training) with the model in eval mode (the mode
    generation runs in, so the attack targets the function that answers); its ``delta`` is transplanted onto the
    left-padded prompts (:func:`left_padded_prompts`, by mask order) and added to the prefill of
    :func:`lit_align.rollout.sampler.sample` (``eos_token_id`` and ``pad_token_id`` from ``tokenizer``; a tokenizer
    without a pad token pads with EOS, §8(h)8: padding is masked out, its id never read).

    Returns:
        ``(rollout, result)``: the attacked responses and the attack's :class:`AttackResult`.
    """
    with eval_mode(model):
        result = attack(model, batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_padded_prompts(batch, pad)  # (B, P) each
    delta = transplant(result.delta, result.mask, prompt_mask.bool())  # (B, P, H)
    with perturbed_embeddings(model, delta, max_calls=1):
        rollout = sample(model, prompt_ids, prompt_mask, config, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad, generator=generator)
    return rollout, result
