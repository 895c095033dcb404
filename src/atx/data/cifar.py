"""CIFAR-10 / CIFAR-100 from torchvision's download directory or from image folders.

Layouts recognised under ``root`` (checked in this order):

(a) torchvision's: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
    ``root/cifar-100-python/{train,test,meta}`` (``root`` may also be that folder itself); the
    official pickles are read directly (no md5 check), torchvision is used only to download
    (``download=True``).
(b) image folders: ``root/train/<class>/*.png|jpg|jpeg`` and ``root/test/<class>/*``; each image
    is decoded once (32x32 RGB), classes are the sorted folder names. The decoded tensors are
    cached in ``root/.atx-cache/`` (``data.cache``, :mod:`atx.data.cache`).

Normalisation: both datasets use the CIFAR-10 statistics of the paper's code
(mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255), as the authors' ``cifar.py`` did.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from atx.data.base import TensorImageDataModule, load_image_folder
from atx.data.listing import IMAGE_EXTENSIONS
from atx.errors import AtxError

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm
""".split()


def _str(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one official CIFAR pickle; keys come back as ``str`` whatever way it was written."""
    if not path.is_file():
        raise AtxError(
            f"CIFAR file '{path}' is missing; restore it (or delete '{path.parent}' and set "
            f"data.download=true)"
        )
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
        if not isinstance(obj, dict):
            raise TypeError(f"unpickled a {type(obj).__name__}, not a dict")
    except Exception as err:  # any unpickling failure means a corrupt file
        raise AtxError(
            f"CIFAR file '{path}' is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
            f"replace it (or delete '{path.parent}' and set data.download=true)"
        ) from err
    return {_str(k): v for k, v in obj.items()}


def _field(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise AtxError(
            f"CIFAR file '{path}' has no '{key}' entry (keys: {sorted(d)}); it is not the "
            f"expected CIFAR pickle, replace it"
        )
    return d[key]


def _read_batches(paths: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for path in paths:
        d = _unpickle(path)
        data = np.asarray(_field(d, "data", path), dtype=np.uint8)
        labels = np.asarray(_field(d, label_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise AtxError(
                f"CIFAR file '{path}' holds data {data.shape} and {len(labels)} labels, expected "
                f"(N, 3072) and N labels; replace it"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


class _CIFARDataModule(TensorImageDataModule):
    """Shared CIFAR logic; subclasses give the file names of torchvision's layout."""

    folder: ClassVar[str]
    train_files: ClassVar[list[str]]
    test_files: ClassVar[list[str]]
    meta_file: ClassVar[str]
    label_key: ClassVar[str]
    names_key: ClassVar[str]
    in_channels = 3
    image_size = 32
    mean = CIFAR_MEAN
    std = CIFAR_STD

    def __init__(self, root: str, download: bool = False, **kwargs: Any) -> None:
        """``download``: fetch torchvision's copy into ``root`` when it is missing (needs
        internet); other arguments: see the base class."""
        super().__init__(root, **kwargs)
        self.download = download

    def _torchvision_dataset(self, train: bool) -> Any:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100
        return cls(self.root, train=train, download=self.download)

    def _layout(self) -> tuple[str, Path] | None:
        """``("pickle", batches_dir)``, ``("folder", root)`` or None when nothing is there."""
        root = Path(self.root)
        if (root / self.meta_file).is_file():
            return "pickle", root
        if (root / self.folder).is_dir():
            return "pickle", root / self.folder
        if (root / "train").is_dir():
            return "folder", root
        return None

    def prepare_data(self) -> None:
        """Download with torchvision when ``download=True`` and no copy is there yet."""
        if not self.download or self._layout() is not None:
            return
        try:
            self._torchvision_dataset(train=True)
            self._torchvision_dataset(train=False)
        except Exception as err:  # network/disk problems of any kind
            raise AtxError(
                f"downloading {self.name} into '{self.root}' failed ({type(err).__name__}: "
                f"{err}); put a copy in '{Path(self.root) / self.folder}' by hand and set "
                f"data.download=false"
            ) from err

    def _cache_sources(self) -> list[Path] | None:
        """The image files of the folder layout (slow to decode); None for the pickles."""
        layout = self._layout()
        if layout is None or layout[0] != "folder":
            return None
        root = Path(self.root)
        files = [*root.glob("train/*/*"), *root.glob("test/*/*")]
        return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.prepare_data()  # no-op unless download=True and nothing is there (e.g. no Trainer)
        root = Path(self.root)
        layout = self._layout()
        if layout is None:
            raise AtxError(
                f"{self.name} not found under '{root}': expected '{root / self.folder}' "
                f"(torchvision layout) or '{root}/train/<class>/' image folders; set "
                f"data.root=... or data.download=true"
            )
        kind, base = layout
        if kind == "folder":
            self.classes, [(x_train, y_train), (x_test, y_test)] = load_image_folder(
                root, ("train", "test"), self.image_size, self.in_channels, self.num_classes,
                self.name,
            )
            return x_train, y_train, x_test, y_test
        meta = _unpickle(base / self.meta_file)
        self.classes = [_str(c) for c in _field(meta, self.names_key, base / self.meta_file)]
        if len(self.classes) != self.num_classes:
            raise AtxError(
                f"'{base / self.meta_file}' lists {len(self.classes)} classes, {self.name} "
                f"has {self.num_classes}; point data.root at a {self.name} copy"
            )
        x_train, y_train = _read_batches([base / f for f in self.train_files], self.label_key)
        x_test, y_test = _read_batches([base / f for f in self.test_files], self.label_key)
        return x_train, y_train, x_test, y_test


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50k train / 10k test 32x32 RGB images, 10 classes."""

    name = "CIFAR-10"
    num_classes = 10
    classes = CIFAR10_CLASSES
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels): 50k train / 10k test 32x32 RGB images, 100 classes."""

    name = "CIFAR-100"
    num_classes = 100
    classes = CIFAR100_CLASSES
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
