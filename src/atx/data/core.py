"""The part every DataModule shares: options, held-out split and subsets, dataloaders,
normalisation on the device and the images of the figures.

Two kinds build on :class:`ImageDataModule`: :class:`~atx.data.base.TensorImageDataModule`
(decoded once into uint8 tensors, augmented batch-wise after the device transfer: CIFAR,
Fashion-MNIST) and :class:`~atx.data.folder.ImageFileDataModule` (image files decoded and
augmented in DataLoader workers: ImageNet, CUB, Scenes). Both serve ``(x_uint8, y_int64)``
batches and normalise them in :meth:`ImageDataModule.on_after_batch_transfer` (uint8 crosses
to the device: 4x less to pin and copy than float32), so ``train.py`` and ``visualize.py`` see
one interface. Validation and test both serve the test split, as in the paper; with
``val_split`` the validation dataloaders are ``[test, held-out]`` (:mod:`atx.data.split`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from atx.data.augment import denormalize, normalize
from atx.data.split import check_split, check_subsets, eval_sampler, hold_out, subset_index
from atx.data.spread import spread_over_classes
from atx.errors import AtxError

Checks = Iterable[tuple[bool, str]]


def check_options(checks: Checks) -> None:
    """AtxError with the message of the first ``(ok, message)`` that is not ok; a generator
    of checks is evaluated only up to it, as a chain of ``if``s would be."""
    for ok, message in checks:
        if not ok:
            raise AtxError(message)


def loader_checks(batch_size: int, num_workers: int) -> Iterator[tuple[bool, str]]:
    yield batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}"
    yield num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}"


class ImageDataModule(L.LightningDataModule):
    """Base of both kinds; subclasses provide the datasets through the hooks below."""

    name: ClassVar[str] = "dataset"
    in_channels: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    num_classes: int  # a class attribute, or a property read from disk

    def __init__(
        self,
        root: str,
        *,
        batch_size: int,
        num_workers: int,
        flip: bool,
        train_subset: int | None,
        val_subset: int | None,
        seed: int,
        pin_memory: bool,
        val_split: int,
        split_seed: int,
        checks: Checks = (),
        known_classes: int | None = None,
    ) -> None:
        """The options both kinds share; ``checks``: the subclass's own option checks, run
        after the loader's and before the split's. ``known_classes``: the class count when it
        is known before any data is read (then ``val_split`` must cover every class)."""
        super().__init__()
        check_options(loader_checks(batch_size, num_workers))
        check_options(checks)
        check_subsets(train_subset, val_subset)
        check_split(val_split, split_seed, known_classes, self.name)
        self.root = str(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.seed = seed
        self.pin_memory = pin_memory
        self.val_split, self.split_seed = val_split, split_seed
        # val_split > 0: positions of the held-out images in the training split
        self.heldout_index: Tensor | np.ndarray | None = None
        self._stats_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # --- to implement -------------------------------------------------------------------------
    def _eval_set(self, split: str) -> Dataset | None:
        """The dataset of ``"test"`` (None before :meth:`setup`) or ``"heldout"`` (None
        without ``val_split``)."""
        raise NotImplementedError

    def _loader_kwargs(self, dataset: Dataset) -> dict[str, Any]:
        """``num_workers``, ``pin_memory`` and other DataLoader arguments for ``dataset``."""
        raise NotImplementedError

    def _val_labels(self) -> Tensor | np.ndarray:
        """The labels of the test split, in order (after :meth:`setup`)."""
        raise NotImplementedError

    def _val_images_at(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        """uint8 images (on the CPU) and labels of the test split at ``idx``."""
        raise NotImplementedError

    def _augment(self, x: Tensor) -> Tensor:
        """Batch-wise augmentation after the device transfer (none by default)."""
        return x

    # --- Lightning hooks ----------------------------------------------------------------------
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test split; with ``val_split``, ``[test, held-out]`` (dataloader_idx 0, 1)."""
        test = self.test_dataloader()
        heldout = self._eval_set("heldout")
        return test if heldout is None else [test, self._eval_loader(heldout)]

    def test_dataloader(self) -> DataLoader:
        test = self._eval_set("test")
        assert test is not None, "call setup() first"
        return self._eval_loader(test)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """uint8 batch -> float32 normalised with this dataset's mean/std, on the device."""
        x, y = batch
        x = self._augment(x)
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        return x, y

    # --- public helpers -----------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images -> float32 normalised with this dataset's mean/std."""
        if x.device not in self._stats_cache:  # one copy per device, not one per batch
            self._stats_cache[x.device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=x.device),
                torch.tensor(self.std, dtype=torch.float32, device=x.device),
            )
        return normalize(x, *self._stats_cache[x.device])

    def denormalize(self, x: Tensor, as_uint8: bool = True) -> Tensor:
        """Normalised float images -> uint8 (or float in [0, 1]) for display."""
        return denormalize(x, self.mean, self.std, as_uint8=as_uint8)

    def val_images(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` validation images (uint8, as the eval loader serves them) and labels spread
        over the classes: a fixed set for figures (:func:`atx.data.spread.spread_over_classes`)."""
        self.setup()
        return self._val_images_at(spread_over_classes(self._val_labels(), n))

    # --- shared internals ---------------------------------------------------------------------
    def _hold_out(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(kept, held_out)`` positions of the training split, None without ``val_split``."""
        return hold_out(labels, self.val_split, self.split_seed, self.num_classes, self.name)

    def _subset_index(self, size: int, n: int | None, key: str, salt: int) -> np.ndarray | None:
        """The seeded ``data.train_subset`` (salt 0) / ``data.val_subset`` (salt 1) positions."""
        held_out = self.val_split if key == "train_subset" else 0
        where = f"{self.name} under '{self.root}'"
        return subset_index(size, n, self.seed, salt, key, where, held_out)

    def _loader(
        self,
        dataset: Dataset,
        sampler: Sampler | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> DataLoader:
        kwargs = self._loader_kwargs(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,  # None: shuffled or the sequential order
            drop_last=drop_last,
            persistent_workers=kwargs["num_workers"] > 0,
            **kwargs,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return self._loader(dataset, sampler=eval_sampler(self, dataset))
