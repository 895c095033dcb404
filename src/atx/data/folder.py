"""Image datasets too big for memory, read file by file in DataLoader workers (paper §4.2).

:class:`ImageFileDataModule` holds, per split, a list of ``(path, label[, box])`` samples as
numpy arrays (no per-sample Python objects: forked workers do not copy them on read) and serves
them through a :class:`ImageFileDataset`:

* **decoding** in the workers: ``torchvision.io.decode_image`` by default (JPEG incl. grey and
  CMYK, PNG, WebP, GIF), falling back to PIL for other formats; ``decoder="pil"`` uses PIL only.
  Measured on a 2-core CPU (500x375 JPEGs, RandomResizedCrop(224) + flip, one process):
  ~380 images/s with ``decode_image`` against ~270 with PIL (PIL's decode is as fast, its
  image-to-tensor copy is not). ``decode_image`` is deprecated since torchvision 0.29 (moving
  to TorchCodec): its warning is silenced around the call and PIL takes over where it is
  gone. The header is read first and images above ``max_pixels`` are refused (a
  decompression-bomb guard covering both decoders); ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
  is never enabled: truncated files are errors.
* **augmentation** in the workers with ``torchvision.transforms.v2`` on uint8 tensors: training
  ``RandomResizedCrop(224)`` + flip (ImageNet, as the authors' ``imagenet.py``) or
  ``Resize(256)`` + ``RandomCrop(224)`` + flip (``train_crop="random"``: CUB and Scenes, §4.2),
  evaluation ``Resize(256)`` + ``CenterCrop(224)``; an optional per-sample box (CUB) is cropped
  first.
* **normalisation** after the device transfer: workers return **uint8** crops (4x less to pin
  and copy than float32) and :meth:`ImageFileDataModule.on_after_batch_transfer` normalises the
  batch with the ImageNet mean/std on the device, as :class:`~atx.data.base.TensorImageDataModule`
  does, so ``train.py`` and ``visualize.py`` see the same interface.
* **unreadable images**: ``on_corrupt="error"`` (default) stops with an :class:`AtxError` naming
  the file (the official releases decode cleanly, so a bad file means a damaged copy);
  ``on_corrupt="skip"`` warns with the file name, serves the next readable sample of the split
  instead (with *its* label: never a wrong label) and counts the skips
  (:attr:`ImageFileDataModule.skipped_images`, reported again at ``teardown``).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; still the fastest here
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without image io: PIL decodes everything
    decode_image = None  # type: ignore[assignment]

from atx.data.augment import denormalize, normalize
from atx.data.base import IMAGE_EXTENSIONS
from atx.data.split import check_split, check_subsets, eval_sampler, hold_out, subset_index
from atx.data.spread import spread_over_classes
from atx.errors import AtxError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Our own decompression-bomb limit, checked from the header for both decoders: 2**26 px (67 MP,
# ~200 MB as uint8 RGB) is far above any image of ImageNet, CUB or Scenes. PIL's process-wide
# ``Image.MAX_IMAGE_PIXELS`` is left as it is (other libraries share it); its bomb warning is
# superseded by this check.
MAX_IMAGE_PIXELS = 2**26
DECODERS = ("torchvision", "pil")
TRAIN_CROPS = ("random_resized", "random")
ON_CORRUPT = ("error", "skip")
MAX_SKIPS = 16  # consecutive unreadable files before even on_corrupt="skip" gives up
TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class CorruptImageError(AtxError):
    """An image file that cannot be read or decoded; the message names the file.

    Raised inside a DataLoader worker, PyTorch re-raises it in the main process as
    ``CorruptImageError("Caught CorruptImageError in DataLoader worker ...<traceback>")``;
    the constructor keeps only the original one-line message, so the user sees one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__} "):
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def read_image(
    path: str, decoder: str = "torchvision", max_pixels: int = MAX_IMAGE_PIXELS
) -> Tensor:
    """Decode ``path`` to a uint8 RGB tensor ``(3, H, W)``; :class:`CorruptImageError` if not.

    The header is parsed by PIL first (no pixel decoding) to refuse images above
    ``max_pixels``; then ``decoder`` decodes ("torchvision": ``decode_image``, PIL as fallback
    for formats it lacks or when torchvision has no image io; "pil": PIL only). Truncated files
    are errors with either decoder (PIL's ``LOAD_TRUNCATED_IMAGES`` is never enabled).
    """
    fix = "replace or delete the file (or set data.on_corrupt=skip)"
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as err:
        raise CorruptImageError(
            f"cannot read image '{path}' ({err.strerror or err}); {fix}"
        ) from None
    with warnings.catch_warnings():
        # our max_pixels check supersedes PIL's bomb warning; torchvision 0.29 deprecates its
        # image io in favour of TorchCodec but it still works (and PIL takes over once it is gone)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        try:
            header = Image.open(io.BytesIO(data))
            width, height = header.size
        except Image.DecompressionBombError as err:
            raise CorruptImageError(f"image '{path}' is too large ({err}); {fix}") from None
        except Exception as err:  # UnidentifiedImageError, SyntaxError, ValueError, ...
            raise CorruptImageError(
                f"cannot decode image '{path}' ({type(err).__name__}: {err}); {fix}"
            ) from None
        if width * height > max_pixels:
            raise CorruptImageError(
                f"image '{path}' is {width}x{height} = {width * height} pixels, above the limit "
                f"of {max_pixels} (data.max_pixels); shrink the file or raise data.max_pixels"
            )
        error: Exception | None = None
        if decoder == "torchvision" and decode_image is not None:
            try:
                x = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
                return x[0] if x.dim() == 4 else x  # animated GIF: first frame
            except RuntimeError as err:  # a format torchvision lacks, or a damaged file
                error = err
        try:
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise OSError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; cannot trust PIL")
            with header:
                return v2.functional.pil_to_tensor(header.convert("RGB"))
        except Exception as err:
            first = error or err
            reason = (str(first).strip().splitlines() or [""])[-1]
            reason = re.sub(r"^[\w.]+, \S+:\d+, ", "", reason)  # torchvision's C++ location
            raise CorruptImageError(
                f"cannot decode image '{path}' ({type(first).__name__}: {reason}); {fix}"
            ) from None


def crop_box(x: Tensor, box: Sequence[float]) -> Tensor:
    """Crop ``x (C, H, W)`` to the box ``(x, y, w, h)`` in pixels (floats, outward-rounded,
    clamped to the image, at least one pixel): CUB's bounding boxes (§4.2)."""
    h, w = x.shape[-2:]
    bx, by, bw, bh = (float(v) for v in box)
    x0 = min(max(int(math.floor(bx)), 0), w - 1)
    y0 = min(max(int(math.floor(by)), 0), h - 1)
    x1 = max(min(int(math.ceil(bx + bw)), w), x0 + 1)
    y1 = max(min(int(math.ceil(by + bh)), h), y0 + 1)
    return x[..., y0:y1, x0:x1]


@dataclass
class SampleList:
    """The samples of one split: paths (bytes, relative to ``base``), labels, optional boxes.

    numpy arrays rather than lists of tuples: 1.28M ImageNet paths take ~40 MB in one block,
    and forked DataLoader workers do not touch per-object refcounts (no copy-on-read growth).
    """

    base: str
    paths: np.ndarray  # dtype "S": os.fsencode'd paths relative to base
    labels: np.ndarray  # int64
    boxes: np.ndarray | None = None  # float32 (N, 4): x, y, w, h in pixels

    @classmethod
    def build(
        cls,
        base: str | os.PathLike[str],
        rel_paths: Sequence[str],
        labels: Sequence[int],
        boxes: Sequence[Sequence[float]] | None = None,
    ) -> SampleList:
        return cls(
            str(base),
            np.array([os.fsencode(p) for p in rel_paths], dtype=np.bytes_),
            np.asarray(labels, dtype=np.int64).reshape(-1),
            None if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.base, os.fsdecode(self.paths[i]))

    def take(self, idx: np.ndarray) -> SampleList:
        boxes = None if self.boxes is None else self.boxes[idx]
        return SampleList(self.base, self.paths[idx], self.labels[idx], boxes)


def _list_images(folder: str) -> list[str]:
    """Sorted image file names in ``folder`` (one ``os.scandir``, no stat, no PIL)."""
    with os.scandir(folder) as it:
        return sorted(
            e.name
            for e in it
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )


def scan_class_folders(
    split_dir: str | os.PathLike[str], classes: Sequence[str], threads: int = 16
) -> SampleList:
    """``split_dir/<class>/*.jpg|jpeg|png`` for the given ``classes`` (label = list position).

    One ``os.scandir`` per class folder, in a thread pool (helps on network file systems);
    file names are sorted within a class. A class folder without images is an AtxError.
    """
    split_dir = Path(split_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(classes)))) as pool:
        listings = list(pool.map(lambda c: _list_images(str(split_dir / c)), classes))
    rel: list[str] = []
    labels: list[int] = []
    for label, (cls, names) in enumerate(zip(classes, listings, strict=True)):
        if not names:
            raise AtxError(
                f"class folder '{split_dir / cls}' has no images (.jpg/.jpeg/.png); add its "
                f"images or remove the folder (from every split)"
            )
        rel += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    return SampleList.build(split_dir, rel, labels)


def class_folders(split_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (hidden ones ignored)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def check_same_classes(
    first: Sequence[str], other: Sequence[str], first_dir: Path, other_dir: Path
) -> None:
    """AtxError naming the folders that are only in one of two splits."""
    if list(first) == list(other):
        return
    only_first = sorted(set(first) - set(other))
    only_other = sorted(set(other) - set(first))
    raise AtxError(
        f"class folders differ between '{first_dir}' and '{other_dir}': only in "
        f"{first_dir.name}: {only_first[:5]}{'...' if len(only_first) > 5 else ''}, only in "
        f"{other_dir.name}: {only_other[:5]}{'...' if len(only_other) > 5 else ''}; make the "
        f"two splits hold the same class folders"
    )


class ImageFileDataset(Dataset):
    """``(uint8 (3, S, S) crop, label)`` per sample: read, decode, box-crop, transform.

    ``on_corrupt="skip"`` replaces an unreadable sample by the next readable one of the list
    and counts it in ``skipped`` (shared memory, one slot per worker, so counts from all
    DataLoader workers reach the main process).
    """

    def __init__(
        self,
        samples: SampleList,
        transform: Callable[[Tensor], Tensor],
        decoder: str = "torchvision",
        on_corrupt: str = "error",
        max_pixels: int = MAX_IMAGE_PIXELS,
        num_workers: int = 0,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.decoder = decoder
        self.on_corrupt = on_corrupt
        self.max_pixels = max_pixels
        self.skipped = torch.zeros(num_workers + 1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Tensor:
        """Sample ``i`` decoded (and box-cropped), before the transform: uint8 (3, H, W)."""
        x = read_image(self.samples.path(i), self.decoder, self.max_pixels)
        if self.samples.boxes is not None:
            x = crop_box(x, self.samples.boxes[i])
        return x

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        for k in range(MAX_SKIPS + 1):
            j = (i + k) % n
            try:
                x = self.load(j)
            except CorruptImageError as err:
                if self.on_corrupt != "skip":
                    raise
                if k == MAX_SKIPS:
                    raise CorruptImageError(
                        f"{MAX_SKIPS + 1} unreadable images in a row from "
                        f"'{self.samples.path(i)}' on; the copy under '{self.samples.base}' "
                        f"is damaged, restore it"
                    ) from None
                slots, info = len(self.skipped), get_worker_info()
                self.skipped[0 if info is None or slots == 1 else 1 + info.id % (slots - 1)] += 1
                warnings.warn(f"skipped: {err}", stacklevel=2)
                continue
            return self.transform(x).contiguous(), int(self.samples.labels[j])
        raise AssertionError("unreachable")


class ImageFileDataModule(L.LightningDataModule):
    """Base for datasets read from image files (ImageNet, CUB, Scenes; paper §4.2).

    Subclasses implement :meth:`_find_classes` (cheap: folder names or a list file) and
    :meth:`_find_samples` (both splits). ``classes`` / ``num_classes`` are read from disk on
    first access, before :meth:`setup` (models are built from them before any image is read);
    ``in_channels`` (3) and ``image_size`` (the crop, 224) are fixed by the constructor.
    Batches are ``(x_uint8 (B, 3, S, S), y_int64)`` out of the dataloaders and normalised
    float32 after :meth:`on_after_batch_transfer`. Validation and test both serve the test
    split (with ``val_split``, validation serves ``[test, held-out]``). Training drops the
    last incomplete batch (a batch of one breaks BatchNorm).
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
        """
        Args:
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
            decoder: "torchvision" (``decode_image``, faster) or "pil".
            on_corrupt: "error" (stop, naming the file) or "skip" (warn, count, serve the next).
            max_pixels: refuse larger images (decompression-bomb guard).
            val_split / split_seed: training images held out for model selection
                (:mod:`atx.data.split`; evaluated with the eval transform).
        """
        super().__init__()
        train_crop = self.default_train_crop if train_crop is None else train_crop
        checks = (
            (batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}"),
            (num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}"),
            (prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {prefetch_factor}"),
            (image_size >= 1, f"data.image_size must be >= 1, got {image_size}"),
            (
                resize_size >= image_size,
                f"data.resize_size={resize_size} is below data.image_size={image_size}; the "
                f"centre crop needs resize_size >= image_size (the paper: 256 and 224)",
            ),
            (decoder in DECODERS, f"data.decoder={decoder!r} is unknown; use one of {DECODERS}"),
            (
                train_crop in TRAIN_CROPS,
                f"data.train_crop={train_crop!r} is unknown; use one of {TRAIN_CROPS}",
            ),
            (
                on_corrupt in ON_CORRUPT,
                f"data.on_corrupt={on_corrupt!r} is unknown; use one of {ON_CORRUPT}",
            ),
            (max_pixels >= 1, f"data.max_pixels must be >= 1, got {max_pixels}"),
        )
        for ok, message in checks:
            if not ok:
                raise AtxError(message)
        check_subsets(train_subset, val_subset)
        check_split(val_split, split_seed)
        self.root = str(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = resize_size
        self.train_crop = train_crop
        self.flip = flip
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.seed = seed
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.decoder = decoder
        self.on_corrupt = on_corrupt
        self.max_pixels = max_pixels
        self.val_split, self.split_seed = val_split, split_seed
        self.heldout_set: ImageFileDataset | None = None
        self.heldout_index: np.ndarray | None = None  # positions in the training list
        self._classes: list[str] | None = None
        self.train_set: ImageFileDataset | None = None
        self.val_set: ImageFileDataset | None = None
        self._stats_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

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
    def num_classes(self) -> int:
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
        split = hold_out(train.labels, self.val_split, self.split_seed, self.num_classes, self.name)
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

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test split; with ``val_split``, ``[test, held-out]`` (dataloader_idx 0, 1)."""
        test = self.test_dataloader()
        return test if self.heldout_set is None else [test, self._eval_loader(self.heldout_set)]

    def test_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._eval_loader(self.val_set)

    def _eval_loader(self, dataset: ImageFileDataset) -> DataLoader:
        sampler = eval_sampler(self, dataset)
        return self._loader(dataset, shuffle=False, drop_last=False, sampler=sampler)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """uint8 crops -> float32 normalised with the ImageNet mean/std, on the device."""
        x, y = batch
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        return x, y

    def teardown(self, stage: str | None = None) -> None:
        if self.skipped_images:
            warnings.warn(
                f"{self.skipped_images} unreadable {self.name} images were skipped so far "
                f"(data.on_corrupt=skip); the warnings above name them",
                stacklevel=2,
            )

    # --- public helpers -----------------------------------------------------------------------
    @property
    def skipped_images(self) -> int:
        """How many unreadable images ``on_corrupt="skip"`` replaced (all workers, all splits)."""
        sets = (self.train_set, self.val_set, self.heldout_set)
        return sum(int(s.skipped.sum()) for s in sets if s is not None)

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images -> float32 normalised with the ImageNet mean/std."""
        if x.device not in self._stats_cache:
            self._stats_cache[x.device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=x.device),
                torch.tensor(self.std, dtype=torch.float32, device=x.device),
            )
        return normalize(x, *self._stats_cache[x.device])

    def denormalize(self, x: Tensor, as_uint8: bool = True) -> Tensor:
        """Normalised float images -> uint8 (or float in [0, 1]) for display."""
        return denormalize(x, self.mean, self.std, as_uint8=as_uint8)

    def val_images(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` validation images after the eval resize + crop (uint8) and labels, spread over
        the classes (:func:`atx.data.spread.spread_over_classes`)."""
        self.setup()
        assert self.val_set is not None
        items = [self.val_set[i] for i in spread_over_classes(self.val_set.samples.labels, n)]
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

    def _loader(
        self,
        dataset: ImageFileDataset,
        shuffle: bool,
        drop_last: bool,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def _subset(self, samples: SampleList, n: int | None, key: str, salt: int) -> SampleList:
        held_out = self.val_split if key == "train_subset" else 0
        where = f"{self.name} under '{self.root}'"
        idx = subset_index(len(samples), n, self.seed, salt, key, where, held_out)
        return samples if idx is None else samples.take(idx)


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-blank lines of a list file.

    A missing file is an AtxError naming it.
    """
    if not path.is_file():
        raise AtxError(
            f"{what} list file '{path}' is missing; put the official file there or fix data.root"
        )
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def read_list_file(path: Path, columns: int, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` rows of a whitespace-separated list file, ``columns`` fields
    each; an AtxError names the file when it is missing and the line when a row is malformed."""
    rows = []
    for n, line in read_lines(path, what):
        fields = line.split()
        if len(fields) != columns:
            raise AtxError(
                f"'{path}' line {n} has {len(fields)} fields, expected {columns}: "
                f"{line[:80]!r}; restore the official file"
            )
        rows.append((n, fields))
    return rows


def existing_files(images_dir: Path, folders: Sequence[str], threads: int = 16) -> set[str]:
    """``"<folder>/<name>"`` of every file in the given sub-folders of ``images_dir``
    (one ``os.scandir`` each; a missing folder contributes nothing)."""

    def names(folder: str) -> list[str]:
        try:
            with os.scandir(images_dir / folder) as it:
                return [f"{folder}/{e.name}" for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders)))) as pool:
        return {p for listing in pool.map(names, folders) for p in listing}


def missing_file_error(list_file: Path, line: int, rel: str, images_dir: Path) -> AtxError:
    """The error for a list-file line naming an image that is not there."""
    return AtxError(
        f"'{list_file}' line {line} names '{rel}', which does not exist in '{images_dir}'; "
        f"restore the image or use the list file of this copy"
    )


def require_images(images_dir: Path, classes: Sequence[str], fix: str) -> set[str]:
    """The files under ``images_dir``'s class folders (``existing_files``); every class
    folder must hold at least one image."""
    files = existing_files(images_dir, classes)
    with_images = {p.split("/", 1)[0] for p in files if p.lower().endswith(IMAGE_EXTENSIONS)}
    for cls in classes:
        if cls not in with_images:
            raise AtxError(
                f"class folder '{images_dir / cls}' has no images (.jpg/.jpeg/.png); {fix}"
            )
    return files
