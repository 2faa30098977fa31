"""WAGLE weight attribution: which weights matter for forgetting, given that retaining must hold.

Jia et al., "WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in Large
Language Models", NeurIPS 2024 (arXiv 2410.17509). Each weight ``i`` of the starting model
``theta_o`` gets the score

    S_i = | (theta_o[i] - g_r[i] / gamma) * g_f[i] |

where ``g_f`` and ``g_r`` are the gradients at ``theta_o`` of the forget loss and of the retain
loss, each **summed** over its set (not averaged: the scale of ``g_r / gamma`` against ``theta``
depends on the set size, so only summed gradients let the reference configs' ``gamma`` carry over).

**The convention for gamma.** ``gamma`` is the scalar diagonal-Hessian approximation of the retain
loss, ``grad^2 l_r ~= gamma * I``; the retain gradient enters divided by it. The reference code
calls the same number ``mu`` (every reference config: ``mu = 1e-6``; its command-line default 1e-3)
and uses it the same way, so ``gamma = mu``: take the config's value as is. Small ``gamma`` lets the
retain/forget gradient coupling dominate; ``gamma -> inf`` leaves SNIP's ``|theta * g_f|``.

Baselines of the paper (``method``): ``random`` (uniform scores, seeded), ``magnitude`` ``|theta|``,
``gradient`` ``|g_f|`` and ``snip`` ``|theta * g_f|``.

Distributed: under DDP every rank holds full weights; call :func:`accumulate_gradients` with the
plain (unwrapped) policy on each rank's share of the data, and the gradients are summed over ranks
(``all_reduce(SUM)``). Under FSDP2 (parameters and gradients are ``DTensor`` shards) FSDP's
reduce-scatter averages over the data-parallel ranks; the result is multiplied back by the mesh size,
so every rank holds its shard of the global sum. Scores stay sharded like the parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_align.data.batches import SequenceBatch
from lit_align.modes import eval_mode
from lit_align.rollout.logps import token_logps
from lit_align.unlearning.masks import is_dtensor

__all__ = ["METHODS", "AttributionMethod", "accumulate_gradients", "attribution_scores"]

AttributionMethod = Literal["wagle", "random", "magnitude", "gradient", "snip"]
METHODS: tuple[str, ...] = ("wagle", "random", "magnitude", "gradient", "snip")


def _to_device(batch: SequenceBatch, device: torch.device) -> SequenceBatch:
    return SequenceBatch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[tuple[SequenceBatch, Tensor]],
    *,
    chunk_tokens: int | None = None,
    sync: bool = True,
) -> dict[str, Tensor]:
    """Gradient of ``sum_examples weight * mean-token NLL of the answer`` at the current weights.

    The per-example loss is the mean over its scored tokens (``loss_mask``) of ``-log p``, the
    reference code's NLL at batch size 1; it is multiplied by the example's weight (0 for padding
    rows, so every rank can run the same number of batches) and summed over the whole set.

    Dropout is off (``model.eval()``) during the pass and each submodule's mode is restored after.
    Gradients start from zero; on return the model's ``.grad`` are cleared again.

    Args:
        model: the causal LM (plain, or FSDP2-sharded; under DDP pass the unwrapped module).
        batches: ``(batch, weights)`` pairs, ``weights`` of shape (B,).
        chunk_tokens: LM-head chunk size of :func:`~lit_align.rollout.logps.token_logps` (memory only).
        sync: sum over ranks when a process group is initialised (see module docstring).

    Returns:
        ``{parameter name: gradient}`` for every parameter that requires grad (a ``DTensor`` shard
        under FSDP2), in the model's parameter order, fp32 or the parameter dtype.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to attribute")
    device = params[0][1].device
    for _, p in params:
        p.grad = None
    seen = 0
    with eval_mode(model):
        for batch, weights in batches:
            batch = _to_device(batch, device)
            weights = weights.to(device=device, dtype=torch.float32)  # (B,)
            stats = token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_tokens=chunk_tokens)
            loss = -(stats.mean().float() * weights).sum()  # sum_b w_b * mean-token NLL_b
            loss.backward()
            seen += 1
    grads: dict[str, Tensor] = {}
    for name, p in params:
        g = p.grad
        grads[name] = torch.zeros_like(p) if g is None else g.detach().clone()
        p.grad = None
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads.values():
            if is_dtensor(g):  # FSDP2 averaged the shards over the data-parallel mesh: undo it
                g.to_local().mul_(g.device_mesh.size())
            else:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
    return grads


def _random_scores(params: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Uniform [0, 1) scores, the same for a parameter whether it is sharded or not."""
    out = {}
    for i, (name, p) in enumerate(params.items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        full = torch.rand(tuple(p.shape), generator=gen, dtype=torch.float32)
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            out[name] = distribute_tensor(full.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
        else:
            out[name] = full.to(p.device)
    return out


@torch.no_grad()
def attribution_scores(
    model: nn.Module,
    g_forget: dict[str, Tensor] | None = None,
    g_retain: dict[str, Tensor] | None = None,
    *,
    method: AttributionMethod = "wagle",
    gamma: float = 1e-6,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-weight scores (float32, non-negative, larger = more influential) of every trainable parameter.

    Args:
        model: the model at the starting weights ``theta_o``.
        g_forget: summed forget-loss gradients (``wagle``, ``gradient``, ``snip``).
        g_retain: summed retain-loss gradients (``wagle``).
        method: ``wagle`` ``|(theta - g_r/gamma) g_f|``; ``random``; ``magnitude`` ``|theta|``;
            ``gradient`` ``|g_f|``; ``snip`` ``|theta g_f|``.
        gamma: the diagonal-Hessian scalar (the reference configs' ``mu``; see module docstring).
        seed: for ``random``.

    Returns:
        ``{name: scores}`` shaped (and, under FSDP2, sharded) like each parameter.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if method == "random":
        return _random_scores(params, seed)
    if method == "magnitude":
        return {n: p.float().abs() for n, p in params.items()}
    needs = {"wagle": (g_forget, g_retain), "gradient": (g_forget,), "snip": (g_forget,)}[method]
    if any(g is None for g in needs):
        raise ValueError(f"method {method!r} needs " + ("g_forget and g_retain" if method == "wagle" else "g_forget"))
    if method == "wagle" and not gamma > 0:
        raise ValueError(f"gamma must be > 0 (the retain-loss Hessian scale), got {gamma}")
    out = {}
    for name, p in params.items():
        if name not in g_forget or (method == "wagle" and name not in g_retain):
            raise KeyError(f"no gradient for parameter {name!r}: gradients and model do not match")
        gf = g_forget[name].float()
        if method == "gradient":
            out[name] = gf.abs()
        elif method == "snip":
            out[name] = (p.float() * gf).abs()
        else:
            out[name] = ((p.float() - g_retain[name].float() / gamma) * gf).abs()
    return out
