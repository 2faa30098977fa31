"""One optimiser step of one player under manual optimisation, with one rule for its LR scheduler."""

from __future__ import annotations

import lightning as L
from torch import Tensor
from torch.optim import Optimizer

from lit_align.engine.distributed import average_gradients, take_over_ddp_sync

__all__ = ["optimizer_step"]


def optimizer_step(module: L.LightningModule, optimizer: Optimizer, loss: Tensor, *, clip: float | None = None,
                   scheduler=None) -> None:
    """Zero the optimiser's gradients, backward ``loss``, clip them to norm ``clip``, step, free them, and
    advance ``scheduler``.

    The scheduler rule, the same for every player of every manual-optimisation method: **a player's LR
    scheduler advances once per optimiser step of that player** (Lightning's ``interval: step``), so a
    warm-up of N steps is N updates of that player whatever the others do and however many minibatches a batch
    has. Gradients are cleared before the backward and after the step: nothing another player's backward left
    on shared modules enters this step, and none of this step's gradients stay in memory.

    Under DDP the optimiser's gradients are averaged over the ranks here, in one collective, before the clip
    (:mod:`lit_align.engine.distributed`); under FSDP2 the backward reduce-scatters them itself.
    """
    optimizer.zero_grad(set_to_none=True)
    ddp = take_over_ddp_sync(module)
    module.manual_backward(loss)
    if ddp:
        average_gradients(p for group in optimizer.param_groups for p in group["params"])
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
