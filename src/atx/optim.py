"""The optimiser and its per-epoch lr schedule (``optim``), for ``configure_optimizers``.

The paper's recipe is SGD with step decay, in two variants (``optim.recipe``):

* ``standard``: torch's ``MultiStepLR``; the lr of 0-based epoch k is ``lr * gamma^#{m <= k}``,
  so milestone 60 gives 60 epochs at the first lr, and the momentum is kept across drops.
* ``authors``: the authors' ``cifar.py``, which drops the lr at the *start* of each 1-based epoch
  listed in ``--epoch_step`` and re-creates the SGD optimiser there, so the momentum restarts at
  zero. Milestones [60, 120, 160] over 200 epochs give 59, 60, 40 and 41 epochs per lr.

For vision transformers atx adds (its own choice of recipe, not the paper's): AdamW
(``optim.name``), a cosine schedule (``optim.schedule``, down to ``optim.min_lr`` at the end of
training) and a linear warm-up (``optim.warmup_epochs``); the lr of 0-based epoch k is then
:func:`scheduled_lr`. With the defaults (SGD, step, no warm-up) the schedulers are the two above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from atx.options import Choice


class Recipe(Choice):
    """``standard``: torch's MultiStepLR, momentum kept; ``authors``: their cifar.py."""

    standard = "standard"
    authors = "authors"


class OptimName(Choice):
    """``sgd``: the paper's; ``adamw``: torch's AdamW (atx's choice for ViTs)."""

    sgd = "sgd"
    adamw = "adamw"


class LRSchedule(Choice):
    """``step``: x gamma at each milestone (the paper's); ``cosine``: to min_lr at the end."""

    step = "step"
    cosine = "cosine"


@dataclass
class OptimConf:
    """The defaults are the paper's CIFAR values (authors' cifar.py); the keys from ``name`` on
    are atx's ViT recipe (AdamW, cosine, warm-up), not from the paper, and off by default."""

    lr: float = 0.1
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # SGD's L2 term; AdamW's decoupled decay
    nesterov: bool = False  # SGD only
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])  # step: 0-based epochs
    gamma: float = 0.2  # step
    recipe: Recipe = Recipe.standard  # sgd + step without warm-up only
    name: OptimName = OptimName.sgd
    beta1: float = 0.9  # AdamW's betas and eps (torch's defaults)
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: LRSchedule = LRSchedule.step
    min_lr: float = 0.0  # cosine: the lr it reaches at trainer.max_epochs
    warmup_epochs: int = 0  # linear warm-up over these first epochs, then the schedule
    warmup_start_factor: float = 0.01  # warm-up's first epoch runs at lr * this


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


def scheduled_lr(lr: float, epoch: int, o: OptimConf | EpochLR, max_epochs: int | None) -> float:
    """The lr of 0-based ``epoch`` under warm-up and schedule (``o``: the conf, or the
    scheduler's copy of its values).

    Warm-up (W = ``warmup_epochs``): epoch k < W runs at ``f + (1 - f) k / W`` times the
    schedule's lr (f = ``warmup_start_factor``), epoch W at the full one. ``step``: ``lr *
    gamma^#{m <= k}``, milestones counted from epoch 0 as without warm-up. ``cosine``: ``lr``
    until W, then ``min_lr + (lr - min_lr) (1 + cos(pi (k - W) / (max_epochs - W))) / 2``, which
    is torch's CosineAnnealingLR with T_max = max_epochs - W started at epoch W.
    """
    w = o.warmup_epochs
    if LRSchedule(o.schedule) is LRSchedule.cosine:
        if max_epochs is None or max_epochs <= w:
            raise ValueError(f"a cosine needs max_epochs > warmup_epochs, got {max_epochs}")
        t = max(epoch - w, 0) / (max_epochs - w)
        base = o.min_lr + (lr - o.min_lr) * (1 + math.cos(math.pi * t)) / 2
    else:
        base = lr * o.gamma ** sum(epoch >= m for m in o.milestones)
    if epoch < w:
        return base * (o.warmup_start_factor + (1 - o.warmup_start_factor) * epoch / w)
    return base


class EpochLR(LRScheduler):
    """:func:`scheduled_lr` of ``last_epoch`` (closed form: a resumed run gets the same lrs).

    It keeps a copy of the conf's values as plain numbers and strings, since Lightning saves a
    scheduler's ``__dict__`` in checkpoints, which are read back with ``weights_only=True``.
    """

    def __init__(self, optimizer: Optimizer, o: OptimConf, max_epochs: int | None,
                 last_epoch: int = -1) -> None:
        self.schedule = LRSchedule(o.schedule).value
        self.milestones = [int(m) for m in o.milestones]
        self.gamma, self.min_lr = float(o.gamma), float(o.min_lr)
        self.warmup_epochs = int(o.warmup_epochs)
        self.warmup_start_factor = float(o.warmup_start_factor)
        self.max_epochs = max_epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [scheduled_lr(b, self.last_epoch, self, self.max_epochs) for b in self.base_lrs]


def build_optimizer(params: Iterable[nn.Parameter], o: OptimConf) -> Optimizer:
    if OptimName(o.name) is OptimName.adamw:
        return AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                     weight_decay=o.weight_decay)
    return SGD(
        params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )


def configure_optimizers(
    params: Iterable[nn.Parameter], o: OptimConf, max_epochs: int | None = None
) -> dict[str, Any]:
    """The optimiser and per-epoch scheduler of ``optim`` (``max_epochs``: the cosine's end)."""
    optimizer = build_optimizer(params, o)
    scheduler: LRScheduler
    if LRSchedule(o.schedule) is LRSchedule.step and o.warmup_epochs == 0:
        # the paper's step decay: today's schedulers, so existing runs and checkpoints are as
        # they were (MultiStepLR multiplies the lr in place, which the closed form would not)
        if Recipe(o.recipe) is Recipe.authors:
            scheduler = AuthorsStepLR(optimizer, o.milestones, o.gamma)
        else:
            scheduler = MultiStepLR(optimizer, list(o.milestones), o.gamma)
    else:
        scheduler = EpochLR(optimizer, o, max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
