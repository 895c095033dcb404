"""Which images a run trains and evaluates on, for every data module: the held-out split
(``data.val_split``), then the seeded subsets (``data.train_subset`` / ``val_subset``), and
each DDP rank's share of an evaluation set.

The paper evaluates the test set after every epoch and reports the last epoch; picking the
*best* epoch on it would tune on the test set. ``val_split=N`` holds out N training images
for model selection instead: stratified by class (each class contributes in proportion to its
share of the training set, largest remainders first, exactly N in total) and drawn with
``split_seed`` alone, so every run seed of an experiment holds out the same images. Order:
hold out first, then take ``train_subset`` from the rest (so the held-out set does not change
with the subset size either).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

from atx.errors import AtxError

HELDOUT = "heldout"  # metric prefix of the held-out split: heldout/error, heldout/loss, ...


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_subsets(train_subset: int | None, val_subset: int | None) -> None:
    """``data.train_subset`` / ``data.val_subset``: a positive count or null."""
    for key, value in (("train_subset", train_subset), ("val_subset", val_subset)):
        if value is not None and value < 1:
            raise AtxError(f"data.{key} must be a positive count or null, got {value}")


def check_split(
    val_split: int, split_seed: int, num_classes: int | None = None, name: str = ""
) -> None:
    """``data.val_split`` / ``data.split_seed``: whole numbers, the count not negative and, when
    the class count is known before any data is read, at least one image per class."""
    if not _is_int(val_split) or val_split < 0:
        raise AtxError(
            f"data.val_split={val_split!r} must be a whole number of training images to hold "
            f"out, at least 0; use 0 to turn the held-out split off"
        )
    if not _is_int(split_seed):
        raise AtxError(f"data.split_seed={split_seed!r} must be a whole number, e.g. 0")
    if num_classes is not None and 0 < val_split < num_classes:
        raise AtxError(
            f"data.val_split={val_split} is below the {num_classes} classes of {name}: a "
            f"stratified held-out set needs at least one image per class; set data.val_split>="
            f"{num_classes} (or 0 to turn the held-out split off)"
        )


def stratified_counts(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, how many to hold out of each)``: proportional shares of ``n``, the rounding
    remainder going to the largest fractional parts (ties: the lower label)."""
    classes, counts = np.unique(labels, return_counts=True)
    share = n * counts.astype(np.int64)  # integer arithmetic: no float rounding ties
    take = share // len(labels)
    order = np.argsort(-(share % len(labels)), kind="stable")
    take[order[: n - int(take.sum())]] += 1
    return classes, take


def hold_out(
    labels: np.ndarray, n: int, seed: int, num_classes: int, name: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(kept, held_out)``: sorted positions into the training split; None when ``n`` is 0.

    The draw depends on the labels, ``n`` and ``seed`` only (never on the global RNG), so it
    is the same on every DDP rank and for every run seed.
    """
    if n == 0:
        return None
    total = len(labels)
    if n >= total:
        raise AtxError(
            f"data.val_split={n} would hold out every training image: {name} has {total}; "
            f"set data.val_split below {total} (or 0 to turn the held-out split off)"
        )
    check_split(n, seed, num_classes, name)
    labels = np.asarray(labels)
    classes, take = stratified_counts(labels, n)
    by_class = np.argsort(labels, kind="stable")  # positions grouped by class, each in order
    starts = np.searchsorted(labels[by_class], classes)
    ends = np.append(starts[1:], total)
    generator = torch.Generator().manual_seed(seed)
    held = np.zeros(total, dtype=bool)
    for start, end, k in zip(starts, ends, take, strict=True):
        members = by_class[start:end]
        pick = torch.randperm(len(members), generator=generator)[: int(k)].numpy()
        held[members[pick]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def subset_index(
    size: int, n: int | None, seed: int, salt: int, key: str, where: str, held_out: int = 0
) -> np.ndarray | None:
    """Positions of a seeded random subset of ``n`` of ``size`` items (``data.train_subset``,
    ``data.val_subset``); None (all of them) when ``n`` is None. ``where`` names the data in
    the error message; ``held_out`` is how many training images ``val_split`` took first."""
    if n is None:
        return None
    if n > size:
        after = f" after data.val_split={held_out} held out" if held_out else ""
        raise AtxError(
            f"data.{key}={n} exceeds the {size} images available in {where}{after}; set "
            f"data.{key}<={size} or null"
        )
    gen = torch.Generator().manual_seed(seed * 2 + salt)
    return torch.randperm(size, generator=gen)[:n].numpy()


def eval_sampler(data: L.LightningDataModule, dataset: Dataset) -> Sampler | None:
    """Under DDP, every rank evaluates a disjoint share of ``dataset`` and no image twice.

    Lightning's default ``DistributedSampler`` pads the last share with repeated images, so
    test error over N ranks would count some images twice; this sampler leaves the shares one
    image apart instead. ``None`` (the plain sequential order) on one process.
    """
    trainer = data.trainer
    if trainer is None or trainer.world_size < 2:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
