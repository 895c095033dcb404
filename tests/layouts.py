"""Tiny copies of the official dataset layouts, written by tests into ``tmp_path``."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from atx.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES


def dump_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, ...]:
    """torchvision layout, keys as bytes (how the official Python-2 pickles load by default)."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    x_tr = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    y_tr = rng.integers(0, 10, n_train)
    x_te = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    y_te = rng.integers(0, 10, n_test)
    per = n_train // 5
    for i in range(5):
        sl = slice(i * per, (i + 1) * per)
        dump_pickle(
            base / f"data_batch_{i + 1}",
            {b"batch_label": b"training batch", b"data": x_tr[sl], b"labels": y_tr[sl].tolist()},
        )
    dump_pickle(base / "test_batch", {b"data": x_te, b"labels": y_te.tolist()})
    dump_pickle(base / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES]})
    return x_tr, y_tr, x_te, y_te


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, ...]:
    """torchvision layout, keys as str (how torchvision itself unpickles them)."""
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    x_tr = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    y_tr = rng.integers(0, 100, n_train)
    x_te = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    y_te = rng.integers(0, 100, n_test)
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        dump_pickle(
            base / name,
            {"data": x, "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()},
        )
    dump_pickle(
        base / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": ["x"] * 20}
    )
    return x_tr, y_tr, x_te, y_te


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> dict:
    """``root/<split>/<class>/<i>.png`` with random 32x32 RGB images; returns the arrays."""
    rng = np.random.default_rng(seed)
    images: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, n in per_class.items():
        images[split] = {}
        for cls in CIFAR10_CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            images[split][cls] = []
            for i in range(n):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{i:03d}.png")
                images[split][cls].append(a)
    return images


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_fashion(root: Path, gz: bool = True, n_train: int = 12, n_test: int = 6) -> tuple:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.uint8),
    )
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")  # fmt: skip
    for stem, a in zip(stems, arrays, strict=True):
        write_idx(root / (stem + (".gz" if gz else "")), a)
    return arrays
