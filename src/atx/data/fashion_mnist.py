"""Fashion-MNIST from its IDX files (gzip'd or not): the small real dataset of the default run.

Default ``root`` is where the Debian package ``dataset-fashion-mnist`` installs the four files;
torchvision's ``root/FashionMNIST/raw/`` layout is found too.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atx.data.base import TensorImageDataModule
from atx.errors import AtxError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) into a uint8 array of its shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise AtxError(
            f"cannot read '{path}' ({type(err).__name__}: {err}); the file is damaged, "
            f"re-download it or reinstall the package"
        ) from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise AtxError(
            f"'{path}' is not an unsigned-byte IDX file (bad magic number); replace it with the "
            f"original file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AtxError(f"'{path}' is truncated inside its IDX header; re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "too long"
        raise AtxError(
            f"'{path}' is {state}: its IDX header announces shape {shape} ({expected} bytes), "
            f"it holds {len(raw) - header}; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(shape).copy()


class FashionMNISTDataModule(TensorImageDataModule):
    """Fashion-MNIST: 60k train / 10k test 28x28 grey images, 10 classes; pad 2 by default."""

    name = "Fashion-MNIST"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.2860,)
    std = (0.3530,)
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = DEBIAN_ROOT, pad: int = 2, **kwargs: Any) -> None:
        """Defaults: Debian's install path, pad 2 for 28x28 images; see the base class."""
        super().__init__(root, pad=pad, **kwargs)

    def _find(self, stem: str) -> Path:
        root = Path(self.root)
        for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
            for name in (f"{stem}.gz", stem):
                if (folder / name).is_file():
                    return folder / name
        if not root.is_dir():
            raise AtxError(
                f"Fashion-MNIST not found: '{root}' does not exist; install the Debian package "
                f"dataset-fashion-mnist (files in {DEBIAN_ROOT}) or set data.root=..."
            )
        raise AtxError(
            f"Fashion-MNIST file '{root / stem}.gz' (or '{stem}') is missing; put the four IDX "
            f"files in '{root}' or set data.root=..."
        )

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        paths = {key: self._find(stem) for key, stem in FILES.items()}
        arrays = {key: read_idx(path) for key, path in paths.items()}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise AtxError(
                    f"'{paths[f'x_{split}']}' {x.shape} and '{paths[f'y_{split}']}' {y.shape} "
                    f"do not form an image/label pair; replace them with the original files"
                )
        return (
            torch.from_numpy(arrays["x_train"]).unsqueeze(1),
            torch.from_numpy(arrays["y_train"]).long(),
            torch.from_numpy(arrays["x_test"]).unsqueeze(1),
            torch.from_numpy(arrays["y_test"]).long(),
        )
