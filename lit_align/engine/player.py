"""A player's optimisation: its optimiser, LR scheduler and gradient clip, one ``step(loss)``.

A multi-player method names its players (``defender``, ``attacker``, ``critic``...) and gives each a
default :class:`Optimization`; the user's ``model.optimization`` block overrides them player by player::

    model:
      optimization:
        defender: {lr: 5.0e-7}
        attacker:
          optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.0e-6, betas: [0.9, 0.95]}}
          scheduler: {class_path: lit_align.schedulers.WarmupInverseSqrtLR, init_args: {warmup_steps: 100}}
          gradient_clip: 1.0

:func:`configure_players` builds every optimiser and scheduler for ``configure_optimizers``;
:meth:`Player.step` is :func:`~lit_align.engine.step.optimizer_step` with the player's own optimiser, clip
and scheduler (which advances once per step of that player).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_align.engine.step import optimizer_step
from lit_align.errors import ConfigError

__all__ = ["Optimization", "Player", "configure_players", "resolve_optimization"]


@dataclass
class Optimization:
    """How one player learns."""

    optimizer: OptimizerCallable | None = None
    """Optimiser factory over the player's trainable parameters; ``None``: the method's default optimiser
    (see the method) at :attr:`lr`."""
    scheduler: LRSchedulerCallable | None = None
    """LR scheduler factory, advanced once per optimiser step of this player; ``None``: constant rate."""
    lr: float | None = None
    """Learning rate of the method's default optimiser (ignored when :attr:`optimizer` is given); ``None``:
    the method's default rate for this player."""
    gradient_clip: float | None = 1.0
    """Global-norm clip of this player's gradients; ``None``: off."""

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"optimization.lr must be positive or null (the method's default), got {self.lr}")
        if self.gradient_clip is not None and not self.gradient_clip > 0:
            raise ConfigError(f"optimization.gradient_clip must be positive or null (off), got {self.gradient_clip}")


def resolve_optimization(given: Mapping[str, Optimization] | None, defaults: Mapping[str, Optimization],
                         key: str = "model.optimization") -> dict[str, Optimization]:
    """Each player's :class:`Optimization`: ``defaults`` when ``given`` is ``None``; otherwise ``given`` must
    hold one block per player (its unset ``lr`` taken from the default), and an error names the missing or
    unknown block."""
    if given is None:
        return dict(defaults)
    missing = [p for p in defaults if p not in given]
    unknown = [p for p in given if p not in defaults]
    if missing or unknown:
        parts = ([f"no block for {', '.join(f'{key}.{p}' for p in missing)}"] if missing else []) + (
            [f"unknown player(s) {', '.join(unknown)}"] if unknown else [])
        raise ConfigError(f"{key}: {'; '.join(parts)}. Give one block per player ({', '.join(defaults)}); "
                          "an empty block {} takes the method's defaults")
    out = {}
    for player, default in defaults.items():
        block = given[player]
        if isinstance(block, Mapping):
            block = Optimization(**block)
        if not isinstance(block, Optimization):
            raise ConfigError(f"{key}.{player} must be a block of optimizer / scheduler / lr / gradient_clip, "
                              f"got {type(block).__name__}")
        out[player] = replace(block, lr=default.lr if block.lr is None else block.lr)
    return out


@dataclass
class Player:
    """One trainable party of a method: its name, optimisation and (after :func:`configure_players`) the
    positions of its optimiser and scheduler in what ``configure_optimizers`` returned."""

    name: str
    optimization: Optimization
    default_optimizer: Callable[[float], OptimizerCallable] = field(repr=False, default=None)
    """``lr -> factory``: the method's optimiser when :attr:`Optimization.optimizer` is unset."""
    optimizer_index: int | None = None
    scheduler_index: int | None = None

    def build(self, params: Sequence[nn.Parameter]) -> tuple[torch.optim.Optimizer, object | None]:
        opt = self.optimization
        factory = opt.optimizer
        if factory is None:
            if self.default_optimizer is None or opt.lr is None:
                raise ConfigError(f"model.optimization.{self.name}: no optimizer and no lr; give one of them")
            factory = self.default_optimizer(opt.lr)
        optimizer = factory(list(params))
        return optimizer, (opt.scheduler(optimizer) if opt.scheduler is not None else None)

    def step(self, module: L.LightningModule, loss: Tensor) -> None:
        """Backward ``loss``, average gradients over ranks (DDP), clip, step, zero, advance the scheduler."""
        if self.optimizer_index is None:
            raise RuntimeError(f"player {self.name!r} has no optimiser yet: configure_players runs first")
        optimizers = module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        scheduler = None
        if self.scheduler_index is not None:
            schedulers = module.lr_schedulers()
            scheduler = (schedulers if isinstance(schedulers, list) else [schedulers])[self.scheduler_index]
        optimizer_step(module, optimizers[self.optimizer_index], loss, clip=self.optimization.gradient_clip,
                       scheduler=scheduler)


def configure_players(players: Sequence[Player], params: Mapping[str, Sequence[nn.Parameter]]):
    """Every player's optimiser and scheduler, as ``configure_optimizers`` returns them; records their
    positions on the players. ``params``: player name -> its trainable parameters."""
    optimizers, schedulers = [], []
    for player in players:
        trainable = [p for p in params[player.name] if p.requires_grad]
        if not trainable:
            raise ConfigError(f"the {player.name} has no trainable parameters (check its lora.target_modules)")
        optimizer, scheduler = player.build(trainable)
        player.optimizer_index = len(optimizers)
        optimizers.append(optimizer)
        player.scheduler_index = None
        if scheduler is not None:
            player.scheduler_index = len(schedulers)
            schedulers.append(scheduler)  # manual optimisation: stepped by Player.step
    return optimizers, schedulers


# blocks are saved with a method's hyperparameters in every checkpoint; allow them in weights-only loads
torch.serialization.add_safe_globals([Optimization])
