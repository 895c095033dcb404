"""Image datasets too big for memory, read file by file in DataLoader workers (paper §4.2).

:class:`ImageFileDataModule` holds, per split, a list of ``(path, label[, box])`` samples
(:class:`~atx.data.listing.SampleList`: numpy arrays, no per-sample Python objects, so forked
workers do not copy them on read) and serves them through an
:class:`~atx.data.decode.ImageFileDataset`:

* **decoding** in the workers (:func:`~atx.data.decode.read_image`): ``torchvision.io.
  decode_image`` by default, PIL as fallback or with ``decoder="pil"``; images above
  ``max_pixels`` are refused from the header, truncated files are errors.
* **augmentation** in the workers with ``torchvision.transforms.v2`` on uint8 tensors: training
  ``RandomResizedCrop(224)`` + flip (ImageNet, as the authors' ``imagenet.py``) or
  ``Resize(256)`` + ``RandomCrop(224)`` + flip (``train_crop="random"``: CUB and Scenes, §4.2),
  evaluation ``Resize(256)`` + ``CenterCrop(224)``; an optional per-sample box (CUB) is cropped
  first.
* **normalisation** after the device transfer: workers return **uint8** crops and
  :class:`~atx.data.core.ImageDataModule` normalises the batch with the ImageNet mean/std on
  the device, as for the in-memory datasets.
* **unreadable images**: ``on_corrupt="error"`` (default) stops with an :class:`AtxError` naming
  the file (the official releases decode cleanly, so a bad file means a damaged copy);
  ``on_corrupt="skip"`` warns with the file name, serves the next readable sample of the split
  instead (with *its* label: never a wrong label) and counts the skips
  (:attr:`ImageFileDataModule.skipped_images`, reported again at ``teardown``).

The decoding and listing helpers live in :mod:`atx.data.decode` and :mod:`atx.data.listing`;
their names stay importable from here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import ImageFile
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from atx.data.core import ImageDataModule
from atx.data.decode import (
    MAX_IMAGE_PIXELS,
    MAX_SKIPS,
    CorruptImageError,
    ImageFileDataset,
    crop_box,
    read_image,
)
from atx.data.listing import (
    SampleList,
    check_same_classes,
    class_folders,
    existing_files,
    missing_file_error,
    read_lines,
    read_list_file,
    require_images,
    scan_class_folders,
)
from atx.errors import AtxError

__all__ = [
    "DECODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "MAX_SKIPS",
    "ON_CORRUPT",
    "TRAIN_CROPS",
    "CorruptImageError",
    "ImageFileDataModule",
    "ImageFileDataset",
    "SampleList",
    "check_same_classes",
    "class_folders",
    "crop_box",
    "existing_files",
    "missing_file_error",
    "read_image",
    "read_lines",
    "read_list_file",
    "require_images",
    "scan_class_folders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = ("torchvision", "pil")
TRAIN_CROPS = ("random_resized", "random")
ON_CORRUPT = ("error", "skip")


class ImageFileDataModule(ImageDataModule):
    """Base for datasets read from image files (ImageNet, CUB, Scenes; paper §4.2).

    Subclasses implement :meth:`_find_classes` (cheap: folder names or a list file) and
    :meth:`_find_samples` (both splits). ``classes`` / ``num_classes`` are read from disk on
    first access, before :meth:`setup` (models are built from them before any image is read);
    ``in_channels`` (3) and ``image_size`` (the crop, 224) are fixed by the constructor.
    Batches are ``(x_uint8 (B, 3, S, S), y_int64)`` out of the dataloaders and normalised
    float32 after :meth:`on_after_batch_transfer`. Validation and test both serve the test
    split (with ``val_split``, validation serves ``[test, held-out]``). Training drops the
    last incomplete batch (a batch of one breaks BatchNorm).

    Options:
        root: the dataset folder as extracted from the official release.
        batch_size: images per batch *per device*.
        num_workers: DataLoader worker processes decoding images (0: in the main process).
        image_size: side of the square crop fed to the network (224 in the paper).
        resize_size: shorter side after the evaluation resize (256; centre crop follows).
        train_crop: "random_resized" (RandomResizedCrop(image_size)) or "random"
            (Resize(resize_size) + RandomCrop(image_size)); None: the dataset's default.
        flip: random horizontal flips while training.
        train_subset / val_subset: use a seeded random subset of that many images.
        seed: seed of the subsets.
        pin_memory: pin batches for faster copies to the GPU (ignored without CUDA).
        prefetch_factor: batches each worker prepares in advance.
        decoder: "torchvision" (``decode_image``, the faster) or "pil".
        on_corrupt: "error" (stop, naming the file) or "skip" (warn, count, serve the next).
        max_pixels: refuse larger images (decompression-bomb guard).
        val_split / split_seed: training images held out for model selection
            (:mod:`atx.data.split`; evaluated with the eval transform).
    """

    name: ClassVar[str] = "image files"
    in_channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    default_train_crop: ClassVar[str] = "random_resized"

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 224,
        resize_size: int = 256,
        train_crop: str | None = None,
        flip: bool = True,
        train_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        decoder: str = "torchvision",
        on_corrupt: str = "error",
        max_pixels: int = MAX_IMAGE_PIXELS,
        val_split: int = 0,
        split_seed: int = 0,
    ) -> None:
        """The options: see the class docstring."""
        train_crop = self.default_train_crop if train_crop is None else train_crop
        super().__init__(
            root, batch_size=batch_size, num_workers=num_workers, flip=flip,
            train_subset=train_subset, val_subset=val_subset, seed=seed,
            pin_memory=pin_memory, val_split=val_split, split_seed=split_seed,
            checks=self._option_checks(
                prefetch_factor, image_size, resize_size, decoder, train_crop, on_corrupt,
                max_pixels,
            ),
        )
        self.image_size, self.resize_size, self.train_crop = image_size, resize_size, train_crop
        self.prefetch_factor = prefetch_factor
        self.decoder, self.on_corrupt, self.max_pixels = decoder, on_corrupt, max_pixels
        self._classes: list[str] | None = None
        self.train_set: ImageFileDataset | None = None
        self.val_set: ImageFileDataset | None = None
        self.heldout_set: ImageFileDataset | None = None

    @staticmethod
    def _option_checks(
        prefetch_factor: int,
        image_size: int,
        resize_size: int,
        decoder: str,
        train_crop: str,
        on_corrupt: str,
        max_pixels: int,
    ) -> Iterator[tuple[bool, str]]:
        yield prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {prefetch_factor}"
        yield image_size >= 1, f"data.image_size must be >= 1, got {image_size}"
        yield resize_size >= image_size, (
            f"data.resize_size={resize_size} is below data.image_size={image_size}; the "
            f"centre crop needs resize_size >= image_size (the paper: 256 and 224)"
        )
        yield decoder in DECODERS, f"data.decoder={decoder!r} is unknown; use one of {DECODERS}"
        yield train_crop in TRAIN_CROPS, (
            f"data.train_crop={train_crop!r} is unknown; use one of {TRAIN_CROPS}"
        )
        yield on_corrupt in ON_CORRUPT, (
            f"data.on_corrupt={on_corrupt!r} is unknown; use one of {ON_CORRUPT}"
        )
        yield max_pixels >= 1, f"data.max_pixels must be >= 1, got {max_pixels}"

    # --- to implement -------------------------------------------------------------------------
    def _find_classes(self) -> list[str]:
        """The class names in label order, read cheaply from disk (no image is opened)."""
        raise NotImplementedError

    def _find_samples(self) -> tuple[SampleList, SampleList]:
        """The ``(train, val)`` samples; every listed file must exist."""
        raise NotImplementedError

    # --- classes ------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names in label order (read from disk on first access)."""
        if self._classes is None:
            self._require_root()
            self._classes = self._find_classes()
            if not self._classes:
                raise AtxError(
                    f"no classes found for {self.name} under '{self.root}'; fix data.root"
                )
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    # --- transforms ---------------------------------------------------------------------------
    def train_transform(self) -> v2.Transform:
        """RandomResizedCrop(S) or Resize(R) + RandomCrop(S); then a random flip (uint8)."""
        if self.train_crop == "random_resized":
            ops: list[v2.Transform] = [v2.RandomResizedCrop(self.image_size, antialias=True)]
        else:
            ops = [
                v2.Resize(self.resize_size, antialias=True),
                v2.RandomCrop(self.image_size),
            ]
        if self.flip:
            ops.append(v2.RandomHorizontalFlip())
        return v2.Compose(ops)

    def eval_transform(self) -> v2.Transform:
        """Resize(R) on the shorter side + CenterCrop(S) (uint8)."""
        return v2.Compose(
            [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        )

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Scan the file lists once (later calls do nothing), hold out ``val_split`` training
        images, then take the seeded subsets."""
        if self.train_set is not None:
            return
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            warnings.warn(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was enabled by other code; atx decodes "
                "with torchvision and refuses PIL's truncated images anyway",
                stacklevel=2,
            )
        self._require_root()
        self.classes  # noqa: B018  (read the class list first: its errors come first)
        train, val = self._find_samples()
        split = self._hold_out(train.labels)
        if split is not None:
            self.heldout_index = split[1]
            self.heldout_set = self._dataset(train.take(split[1]), self.eval_transform())
            train = train.take(split[0])
        train = self._subset(train, self.train_subset, "train_subset", 0)
        val = self._subset(val, self.val_subset, "val_subset", 1)
        self.train_set = self._dataset(train, self.train_transform())
        self.val_set = self._dataset(val, self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        drop_last = len(self.train_set) > self.batch_size
        return self._loader(self.train_set, shuffle=True, drop_last=drop_last)

    def teardown(self, stage: str | None = None) -> None:
        if self.skipped_images:
            warnings.warn(
                f"{self.skipped_images} unreadable {self.name} images were skipped so far "
                f"(data.on_corrupt=skip); the warnings above name them",
                stacklevel=2,
            )

    @property
    def skipped_images(self) -> int:
        """How many unreadable images ``on_corrupt="skip"`` replaced (all workers, all splits)."""
        sets = (self.train_set, self.val_set, self.heldout_set)
        return sum(int(s.skipped.sum()) for s in sets if s is not None)

    # --- hooks of ImageDataModule -------------------------------------------------------------
    def _eval_set(self, split: str) -> ImageFileDataset | None:
        return self.val_set if split == "test" else self.heldout_set

    def _loader_kwargs(self, dataset: Dataset) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "prefetch_factor": self.prefetch_factor if workers > 0 else None,
        }

    def _val_labels(self) -> np.ndarray:
        assert self.val_set is not None
        return self.val_set.samples.labels

    def _val_images_at(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        """After the eval resize + crop."""
        assert self.val_set is not None
        items = [self.val_set[i] for i in idx]
        if not items:
            shape = (0, 3, self.image_size, self.image_size)
            return torch.zeros(shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    # --- internals ----------------------------------------------------------------------------
    def _require_root(self) -> None:
        if not os.path.isdir(self.root):
            raise AtxError(
                f"{self.name} not found: '{self.root}' does not exist or is not a folder; "
                f"extract the official release there or set data.root=... (or ATX_DATA)"
            )

    def _dataset(self, samples: SampleList, transform: v2.Transform) -> ImageFileDataset:
        return ImageFileDataset(
            samples, transform, self.decoder, self.on_corrupt, self.max_pixels, self.num_workers
        )

    def _subset(self, samples: SampleList, n: int | None, key: str, salt: int) -> SampleList:
        idx = self._subset_index(len(samples), n, key, salt)
        return samples if idx is None else samples.take(idx)
