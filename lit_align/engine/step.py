"""One optimiser step of one player under manual optimisation, with one rule for its LR scheduler, and the
overlap of a step's gradient collective with the next player's work under DDP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import lightning as L
from torch import Tensor
from torch.optim import Optimizer

from lit_align.engine.distributed import start_gradient_average, take_over_ddp_sync

__all__ = ["optimizer_step", "overlapped_steps", "settle_steps"]

#: The steps started and not finished in the open :func:`overlapped_steps` block (``None``: no block).
_STARTED: ContextVar[list[tuple[Optimizer, Callable[[], None]]] | None] = ContextVar("lit_align_started_steps",
                                                                                     default=None)


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
    (:mod:`lit_align.engine.distributed`); under FSDP2 the backward reduce-scatters them itself. Inside an
    :func:`overlapped_steps` block under DDP the step stops after the backward with the collective started; the
    rest (the wait, clip, step, scheduler) runs after the next step's backward or when the block settles.
    """
    started = _STARTED.get()
    if started and any(_same(opt, optimizer) for opt, _ in started):
        settle_steps()  # this optimiser's own started step ends before its gradients are cleared
    optimizer.zero_grad(set_to_none=True)
    ddp = take_over_ddp_sync(module)
    module.manual_backward(loss)
    settle_steps()  # the step started before this one ends (its collective ran during this backward)

    def finish() -> None:
        if clip:
            module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    if not ddp:
        finish()
        return
    average = start_gradient_average(p for group in optimizer.param_groups for p in group["params"])
    if started is None:
        average.wait()
        finish()
    else:
        started.append((optimizer, lambda: (average.wait(), finish())))


def _same(a: Optimizer, b: Optimizer) -> bool:
    """Whether two optimisers, each perhaps in a Lightning wrapper, are one."""
    return getattr(a, "optimizer", a) is getattr(b, "optimizer", b)


@contextmanager
def overlapped_steps() -> Iterator[None]:
    """Let each player's gradient collective run while the next player computes (DDP; elsewhere a no-op).

    Under DDP a player's step waits for the average of its gradients over the ranks, a collective that on
    small models costs as much as a forward. Inside this block :func:`optimizer_step` only starts that
    collective; the step ends (wait, clip, optimiser step, scheduler) after the next player's backward, at
    :func:`settle_steps`, or when the block ends, in the order the steps started (a player stepping again first
    ends its own started step). Every number is the same as without the block: only the wait moves.

    The rule for code inside the block: **nothing reads a player's parameters between its step and the next
    step or** :func:`settle_steps`. Another player's forward and backward may run there (the point of the
    block), provided they do not touch this player's trainable parameters, as the separate critics (the
    watermark's, the game's, PPO's) and the watermark's detector do not touch the policy's. :func:`lit_align.engine.ppo_update`
    settles before each minibatch's forward. On an error the started steps are dropped.
    """
    started: list[tuple[Optimizer, Callable[[], None]]] = []
    token = _STARTED.set(started)
    try:
        yield
        settle_steps()
    finally:
        started.clear()
        _STARTED.reset(token)


def settle_steps() -> None:
    """End every step the open :func:`overlapped_steps` block started (no-op outside one)."""
    started = _STARTED.get()
    while started:
        started.pop(0)[1]()
