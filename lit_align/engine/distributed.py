"""Data parallelism for manual-optimisation methods: what N ranks must agree on to equal one process.

Every multi-player method under DDP or FSDP2 keeps its experience on its rank and makes each decision that
changes the *number* of collective operations (whether a player updates, how many minibatches it runs,
whether PPO stops early, whether a debate's DPO stops) from globally reduced numbers, identically on every
rank: a rank that skipped a forward or a backward the others run would hang them.

* **Gradients.** Under FSDP2 (``ModelParallelStrategy``) each backward reduce-scatters its gradients
  itself. Under DDP, Lightning's reducer expects one backward over every trainable parameter per step; a
  multi-player step runs several backwards, each over one player's parameters. :func:`take_over_ddp_sync`
  switches the reducer off and :func:`average_gradients` averages one optimiser's gradients across ranks in
  one collective just before it steps (called by :func:`lit_align.engine.optimizer_step`): any number of
  backwards per step, any subset of players, and nothing for a player that does not update. Inside
  :func:`lit_align.engine.overlapped_steps` the collective is started (:func:`start_gradient_average`) and
  waited for only when the next player steps, so it runs while that player computes.
* **Token means.** A loss that averages over tokens is scaled by ``W * local_tokens / global_tokens``
  (:func:`global_share`), so the rank-averaged gradient is the gradient of the mean over all ranks' tokens:
  N ranks equal one process on the global batch, however the tokens fall between the ranks.
* **Statistics.** :func:`sum_over_ranks` is the reduction handed to whitening
  (:func:`lit_align.losses.ppo.whiten`) and reward normalisation, so they use global moments.
* **One collective for a step's numbers.** :func:`sums_over_ranks` and :func:`means_over_ranks` reduce several
  tensors in one all-reduce: each collective is a point where every rank waits for the slowest, so a step's
  counts and logged means go together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_align.errors import ConfigError

__all__ = [
    "GradientAverage", "all_gather_objects", "any_rank", "average_gradients", "check_divides", "decided_by_rank_zero",
    "global_share", "is_distributed", "max_over_ranks", "mean_over_ranks", "means_over_ranks", "rank_and_world",
    "refuse_fsdp1", "start_gradient_average", "sum_over_ranks", "sums_over_ranks", "take_over_ddp_sync",
]

Reduce = Callable[[Tensor], Tensor]


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself without a process group)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sums_over_ranks(*tensors: Tensor) -> list[Tensor]:
    """The sum over all ranks of each tensor, in **one** collective (``tensors`` themselves without a process
    group): each comes back with its shape, dtype and device. They travel as float64, exact for counts and for
    the sum of two float32 values."""
    if not is_distributed():
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(_device(), torch.float64) for t in tensors])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape).to(t.device, t.dtype) for part, t in zip(parts, tensors)]


def means_over_ranks(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Name -> the ``weight``-weighted mean of ``values`` over every rank's elements, for each ``name:
    (values, weight)`` (0 without weight), all in one collective; float32 scalars."""
    sums = [torch.stack([(v.detach().double() * w).sum(), w.double().sum()]) for v, w in pairs.values()]
    return {name: (pair[0] / pair[1].clamp(min=1e-12)).float() for name, pair in zip(pairs, sums_over_ranks(*sums))}


def mean_over_ranks(values: Tensor, weight: Tensor) -> Tensor:
    """The ``weight``-weighted mean of ``values`` (same shape) over every rank's elements (0 without weight)."""
    return means_over_ranks({"mean": (values, weight)})["mean"]


def max_over_ranks(value: int | float) -> float:
    """The largest ``value`` over all ranks."""
    if not is_distributed():
        return value
    out = torch.tensor(float(value), dtype=torch.float64, device=_device())
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(max_over_ranks(float(bool(flag))))


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group). Picklable objects only."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decided_by_rank_zero(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 alone and its result sent to every rank (``decide()`` itself without a process
    group): a decision every rank must share (which generated pairs a pool keeps) does not then rest on every rank
    computing float-identical numbers. ``decide`` must not run a collective; its result must be picklable."""
    if not is_distributed():
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_share(count: Tensor | float, total: Tensor | float | None = None) -> Tensor:
    """``W * count / sum_over_ranks(count)``: the factor that turns a mean over this rank's ``count`` items
    into its share of the mean over every rank's items once gradients are averaged over the ``W`` ranks
    (1 in one process; 0 where no rank has any item). ``total``: that sum, when the caller already reduced
    it (no collective then)."""
    count = torch.as_tensor(count, dtype=torch.float64, device=_device())
    _, world = rank_and_world()
    total = sum_over_ranks(count) if total is None else torch.as_tensor(total, dtype=torch.float64, device=_device())
    return torch.where(total > 0, world * count / total.clamp(min=1e-12), torch.zeros_like(total)).float()


def check_divides(global_batch: int, key: str) -> None:
    """Refuse a global batch that the world size does not divide (``key``: the config key that sets it)."""
    _, world = rank_and_world()
    if global_batch % world:
        raise ConfigError(f"{key}={global_batch} is not divisible by the world size {world}: every rank takes an "
                          f"equal share; use a multiple of {world}")


def refuse_fsdp1(strategy, method: str) -> None:
    """Refuse Lightning's ``FSDPStrategy`` (FSDP1, ``callbacks/fsdp.yaml``) for a multi-player method: it wraps
    the whole module once, so players' LoRA adapters on one base, their separate optimisers and the
    per-player backward passes do not fit it. FSDP2 does (``callbacks/fsdp2_cpu.yaml``, on GPUs with
    ``trainer.accelerator: gpu``), and so does DDP (``callbacks/ddp_cpu.yaml``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(f"trainer.strategy: {method} does not run under FSDPStrategy (FSDP1, callbacks/fsdp.yaml): "
                          "its players (LoRA adapters on one base, each with its own optimiser and backward) need "
                          "FSDP2; use trainer.strategy: ModelParallelStrategy (callbacks/fsdp2_cpu.yaml, with "
                          "trainer.accelerator: gpu on GPUs) or ddp (callbacks/ddp_cpu.yaml)")


# -- gradients under DDP -------------------------------------------------------------------------------
def _ddp(module) -> nn.parallel.DistributedDataParallel | None:
    trainer = getattr(module, "_trainer", None)
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None) if trainer is not None else None
    return wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None


def take_over_ddp_sync(module) -> bool:
    """Switch off the DDP reducer of a Lightning module's wrapper (its gradients are then averaged per
    optimiser step by :func:`average_gradients`); False when the module is not under DDP."""
    ddp = _ddp(module)
    if ddp is None:
        return False
    ddp.require_backward_grad_sync = False  # Lightning's manual backward then never prepares the reducer
    return True


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average the gradients of ``params`` over all ranks in one flat collective (a missing gradient counts
    as zeros and is filled in), so every rank takes the same optimiser step."""
    start_gradient_average(params).wait()


class GradientAverage:
    """An average of gradients over the ranks in flight (:func:`start_gradient_average`): the collective runs on
    the process group's own thread while this one goes on computing; :meth:`wait` writes the averages into
    ``.grad``. Nothing may change the gradients in between (they are copied out at the start)."""

    def __init__(self, params: list[Tensor], flat: Tensor | None = None, work=None) -> None:
        self.params, self.flat, self.work = params, flat, work

    def wait(self) -> None:
        """Wait for the collective and set each parameter's ``.grad`` to its average (no-op without one)."""
        if self.work is None:
            return
        self.work.wait()
        self.flat /= dist.get_world_size()
        for p, g in zip(self.params, self.flat.split([p.numel() for p in self.params])):
            p.grad = g.view_as(p).to(p.dtype)
        self.work = None


def start_gradient_average(params: Iterable[Tensor]) -> GradientAverage:
    """Start :func:`average_gradients` without waiting for it (nothing to do without a process group)."""
    params = [p for p in params if p.requires_grad]
    if not params or not is_distributed():
        return GradientAverage([])
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    return GradientAverage(params, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))


def _device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
