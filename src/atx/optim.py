"""SGD with step decay, in two recipes (``optim.recipe``).

* ``standard``: torch's ``MultiStepLR``; the lr of 0-based epoch k is ``lr * gamma^#{m <= k}``,
  so milestone 60 gives 60 epochs at the first lr, and the momentum is kept across drops.
* ``authors``: the authors' ``cifar.py``, which drops the lr at the *start* of each 1-based epoch
  listed in ``--epoch_step`` and re-creates the SGD optimiser there, so the momentum restarts at
  zero. Milestones [60, 120, 160] over 200 epochs give 59, 60, 40 and 41 epochs per lr.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from atx.options import Choice


class Recipe(Choice):
    """``standard``: torch's MultiStepLR, momentum kept; ``authors``: their cifar.py."""

    standard = "standard"
    authors = "authors"


@dataclass
class OptimConf:
    """SGD with step decay; the defaults are the paper's CIFAR values (authors' cifar.py)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    recipe: Recipe = Recipe.standard


def authors_lr(lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """The lr of 1-based ``epoch`` in the authors' ``cifar.py``: one factor ``gamma`` for every
    milestone m with ``epoch >= m`` (their ``if epoch in epoch_step`` runs before the epoch)."""
    return lr * gamma ** sum(epoch >= m for m in milestones)


def restart_momentum(optimizer: Optimizer) -> None:
    """Zero every SGD momentum buffer: the next step then equals that of a freshly created SGD
    (with dampening 0, ``0 * momentum + grad`` is the ``clone(grad)`` a new buffer starts as)."""
    for state in optimizer.state.values():
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            buffer.zero_()


class AuthorsStepLR(LRScheduler):
    """``authors_lr`` per epoch, with the momentum restarted at each drop.

    Lightning steps it after every epoch, so ``last_epoch`` is the 0-based epoch about to run
    (1-based ``last_epoch + 1``). The restart happens inside ``step``, the moment the lr drops,
    so a run resumed from a checkpoint taken before that step restarts it at the same point.
    """

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float,
                 last_epoch: int = -1) -> None:
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        epoch = self.last_epoch + 1
        return [authors_lr(base, epoch, self.milestones, self.gamma) for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.last_epoch + 1 in self.milestones:
            restart_momentum(self.optimizer)


def sgd_step_decay(params: Iterable[nn.Parameter], o: OptimConf) -> dict[str, Any]:
    """The optimiser and per-epoch scheduler of ``optim`` for ``configure_optimizers``."""
    optimizer = SGD(
        params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    scheduler: LRScheduler
    if Recipe(o.recipe) is Recipe.authors:
        scheduler = AuthorsStepLR(optimizer, o.milestones, o.gamma)
    else:
        scheduler = MultiStepLR(optimizer, list(o.milestones), o.gamma)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

