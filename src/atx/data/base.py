"""In-memory uint8 image datasets with batched augmentation after the device transfer.

A dataset is decoded once into a uint8 tensor ``(N, C, H, W)`` (slow decodes are cached on
disk, :mod:`atx.data.cache`); the dataloaders only index it, and crop/flip/normalise run on
whole batches in :meth:`on_after_batch_transfer` (on the GPU when training on one). With
``device_resident`` the tensors live on the training device and batches are gathered there, so
no images cross from host to device per step. Per-image PIL decoding and collation would be the
bottleneck instead (docs/benchmarks.md, data pipeline).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from atx.data import cache as disk_cache
from atx.data.augment import PAD_MODES, random_crop_flip
from atx.data.core import ImageDataModule
from atx.data.decode import decode_fixed as _decode  # a module global: tests count decodes
from atx.data.listing import IMAGE_EXTENSIONS, list_image_folder
from atx.data.sampler import ResumableRandomSampler
from atx.errors import AtxError

__all__ = [  # IMAGE_EXTENSIONS: importable from here as before the listing moved out
    "IMAGE_EXTENSIONS",
    "TensorImageDataModule",
    "TensorPairDataset",
    "collate_pairs",
    "load_image_folder",
]


class _Batch:
    """A batch already gathered by :meth:`TensorPairDataset.__getitems__`."""

    __slots__ = ("x", "y")

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


class TensorPairDataset(Dataset):
    """``(x[i], y[i])`` pairs; a whole batch of indices is served by one indexing operation.

    The DataLoader's fetcher calls ``__getitems__`` with the sampler's batch of indices, and
    :func:`collate_pairs` unwraps the result, so no per-sample Python work or stacking happens
    (docs/benchmarks.md compares it with ``TensorDataset`` + default collation).
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        assert len(x) == len(y)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[_Batch]:
        idx = torch.as_tensor(indices, dtype=torch.long)  # for index_select, faster than x[idx]
        if self.x.device.type == "cuda":  # device-resident: only the indices cross, async
            idx = idx.pin_memory().to(self.x.device, non_blocking=True)
        elif self.x.device != idx.device:
            idx = idx.to(self.x.device)
        return [_Batch(self.x.index_select(0, idx), self.y.index_select(0, idx))]


def collate_pairs(items: list[Any]) -> Any:
    """Collate for :class:`TensorPairDataset`: unwrap a pre-gathered batch, else default."""
    if len(items) == 1 and isinstance(items[0], _Batch):
        return items[0].x, items[0].y
    return default_collate(items)


class TensorImageDataModule(ImageDataModule):
    """Base class: subclasses set the class attributes below and implement :meth:`_load`.

    ``num_classes``, ``in_channels``, ``image_size`` are known right after ``__init__`` (models
    are built from them before any data is read). ``classes`` starts as the canonical class
    names and is replaced by the names found on disk once :meth:`setup` has run.
    Batches are ``(x_uint8, y_int64)`` out of the dataloaders and ``(x_float32, y)`` after
    :meth:`on_after_batch_transfer` (normalised; randomly cropped/flipped while training).
    Validation and held-out loaders: :class:`~atx.data.core.ImageDataModule`.
    """

    num_classes: int = 0
    image_size: int = 0
    classes: list[str] = []

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        pad: int = 4,
        flip: bool = True,
        train_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        pad_mode: str = "reflect",
        cache: bool = True,
        device_resident: bool = True,
        val_split: int = 0,
        split_seed: int = 0,
    ) -> None:
        """``cache``: keep slowly decoded layouts (image folders) as a uint8 cache file beside
        the data. ``device_resident``: hold the uint8 tensors on the training device (a no-op
        on the CPU) and gather batches there; the DataLoader then runs in the main process.
        ``val_split`` / ``split_seed``: training images held out for model selection
        (:mod:`atx.data.split`)."""
        super().__init__(
            root, batch_size=batch_size, num_workers=num_workers, flip=flip,
            train_subset=train_subset, val_subset=val_subset, seed=seed,
            pin_memory=pin_memory, val_split=val_split, split_seed=split_seed,
            checks=self._option_checks(pad, pad_mode), known_classes=self.num_classes,
        )
        self.pad, self.pad_mode = pad, pad_mode
        self.cache, self.device_resident = cache, device_resident
        self.cache_file: Path | None = None  # the cache file read or written by setup()
        self.classes = list(type(self).classes)
        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_val: Tensor | None = None
        self.y_val: Tensor | None = None
        self.x_heldout: Tensor | None = None  # val_split > 0: the held-out training images
        self.y_heldout: Tensor | None = None

    def _option_checks(self, pad: int, pad_mode: str) -> Iterator[tuple[bool, str]]:
        yield 0 <= pad < self.image_size, (
            f"data.pad={pad} is out of range for {self.image_size}x{self.image_size} "
            f"{self.name} images; set data.pad between 0 and {self.image_size - 1}"
        )
        yield pad_mode in PAD_MODES, (
            f"data.pad_mode={pad_mode!r} is unknown; use one of {PAD_MODES}"
        )

    # --- to implement -------------------------------------------------------------------------
    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Read the dataset: ``x_train, y_train, x_val, y_val`` as uint8 (N,C,H,W) / int64 (N,).

        May set ``self.classes`` to the class names found on disk.
        """
        raise NotImplementedError

    def _cache_sources(self) -> list[Path] | None:
        """The files :meth:`_load` decodes one by one, whose listing keys the disk cache; None
        (the default) when the layout reads fast enough not to need a cache."""
        return None

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the data once (later calls only re-place it), hold out ``val_split`` training
        images, then take the seeded subsets.

        With ``device_resident`` the tensors are then moved to the trainer's device.
        """
        if self.x_train is None:
            x_train, y_train, x_val, y_val = self._load_cached() if self.cache else self._load()
            self._check(x_train, y_train, "train")
            self._check(x_val, y_val, "test")
            split = self._hold_out(y_train.numpy())
            if split is not None:
                keep, held = (torch.from_numpy(i) for i in split)
                self.heldout_index = held
                self.x_heldout, self.y_heldout = x_train[held], y_train[held]
                x_train, y_train = x_train[keep], y_train[keep]
            x_train, y_train = self._subset(x_train, y_train, self.train_subset, "train_subset", 0)
            x_val, y_val = self._subset(x_val, y_val, self.val_subset, "val_subset", 1)
            self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val
        strategy = getattr(self.trainer, "strategy", None)
        if self.device_resident and strategy is not None:
            self.place(strategy.root_device)

    def place(self, device: torch.device | str) -> None:
        """Keep the uint8 train/val tensors on ``device``; batches are then gathered there."""
        assert self.x_train is not None and self.y_train is not None, "call setup() first"
        assert self.x_val is not None and self.y_val is not None
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.x_val, self.y_val = self.x_val.to(device), self.y_val.to(device)
        if self.x_heldout is not None and self.y_heldout is not None:
            self.x_heldout, self.y_heldout = self.x_heldout.to(device), self.y_heldout.to(device)

    def train_dataloader(self) -> DataLoader:
        assert self.x_train is not None and self.y_train is not None, "call setup() first"
        dataset = TensorPairDataset(self.x_train, self.y_train)
        # RandomSampler's order, restartable mid-epoch (atx.resume)
        return self._loader(dataset, sampler=ResumableRandomSampler(dataset))

    # --- hooks of ImageDataModule -------------------------------------------------------------
    def _eval_set(self, split: str) -> TensorPairDataset | None:
        x, y = (self.x_val, self.y_val) if split == "test" else (self.x_heldout, self.y_heldout)
        return None if x is None or y is None else TensorPairDataset(x, y)

    def _loader_kwargs(self, dataset: Dataset) -> dict[str, Any]:
        assert isinstance(dataset, TensorPairDataset)
        on_host = dataset.x.device.type == "cpu"  # device-resident: gather in the main process
        return {
            "num_workers": self.num_workers if on_host else 0,
            "pin_memory": self.pin_memory and on_host,
            "collate_fn": collate_pairs,
        }

    def _augment(self, x: Tensor) -> Tensor:
        """Random crop + flip of the whole batch while training."""
        if self.trainer is not None and self.trainer.training and (self.pad > 0 or self.flip):
            x = random_crop_flip(x, self.pad, self.flip, mode=self.pad_mode)
        return x

    def _val_labels(self) -> Tensor:
        assert self.x_val is not None and self.y_val is not None
        return self.y_val

    def _val_images_at(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        assert self.x_val is not None and self.y_val is not None
        at = torch.tensor(idx, dtype=torch.long).to(self.x_val.device)  # gather there, copy these
        return self.x_val[at].cpu().clone(), self.y_val[at].cpu().clone()

    # --- internals ----------------------------------------------------------------------------
    def _load_cached(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_load` through the disk cache when the layout has one (:meth:`_cache_sources`)."""
        sources = self._cache_sources()
        if sources is None:
            return self._load()
        root = Path(self.root)
        key = disk_cache.fingerprint(root, sources, self.name, self.in_channels, self.image_size)
        name = disk_cache.cache_name(self.name, key)
        for path in disk_cache.candidates(root, name):
            data = disk_cache.read(path) if path.is_file() else None
            if data is not None:
                self.cache_file, self.classes = path, data["classes"]
                return data["x_train"], data["y_train"], data["x_val"], data["y_val"]
        x_train, y_train, x_val, y_val = self._load()
        data = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
        data["classes"] = list(self.classes)
        self.cache_file = disk_cache.write(data, root, name)
        return x_train, y_train, x_val, y_val

    def _check(self, x: Tensor, y: Tensor, split: str) -> None:
        shape = (self.in_channels, self.image_size, self.image_size)
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise AtxError(
                f"{self.name} {split} images under '{self.root}' are {x.dtype} "
                f"{tuple(x.shape)}, expected uint8 (N, {', '.join(map(str, shape))}); "
                f"check data.root"
            )
        if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise AtxError(
                f"{self.name} {split} labels under '{self.root}' are {y.dtype} "
                f"{tuple(y.shape)}, expected int64 ({x.shape[0]},); check data.root"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise AtxError(
                f"{self.name} {split} labels under '{self.root}' span "
                f"{int(y.min())}..{int(y.max())}, expected 0..{self.num_classes - 1}; "
                f"check that data.root holds {self.name}"
            )

    def _subset(
        self, x: Tensor, y: Tensor, n: int | None, key: str, salt: int
    ) -> tuple[Tensor, Tensor]:
        idx = self._subset_index(len(x), n, key, salt)
        return (x, y) if idx is None else (x[idx].contiguous(), y[idx].contiguous())


def load_image_folder(
    root: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "test"),
    size: int = 32,
    channels: int = 3,
    num_classes: int | None = None,
    name: str = "dataset",
) -> tuple[list[str], list[tuple[Tensor, Tensor]]]:
    """Decode ``root/<split>/<class>/*.png|jpg|jpeg`` once into uint8 tensors.

    Class order is the sorted folder names, which must be identical in every split
    (:func:`atx.data.listing.list_image_folder`).
    Returns ``(classes, [(x_uint8 (N,C,H,W), y_int64 (N,)) per split])``.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    classes, listings = list_image_folder(root, splits, num_classes, name)
    out: list[tuple[Tensor, Tensor]] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for files in listings:
            arrays = list(pool.map(lambda f: _decode(f[0], size, mode), files))
            x = torch.from_numpy(np.stack(arrays))
            x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
            y = torch.tensor([label for _, label in files], dtype=torch.int64)
            out.append((x.contiguous(), y))
    return classes, out
