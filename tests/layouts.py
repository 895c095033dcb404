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
             "t10k-labels-idx1-ubyte")
    for stem, a in zip(stems, arrays, strict=True):
        write_idx(root / (stem + (".gz" if gz else "")), a)
    return arrays


# --- large-image datasets in their official layouts (ImageNet, CUB-200-2011, MIT Indoor 67) ----
# Every image of class k is filled with PALETTE[k] (plus a little noise), so a test can read the
# class back from the pixels; CUB images are BACKGROUND outside their bounding box.
PALETTE = [(220, 30, 30), (30, 200, 30), (230, 200, 20), (200, 30, 200), (30, 200, 200)]
BACKGROUND = (0, 0, 255)


def write_jpeg(
    path: Path,
    colour: tuple[int, int, int],
    size: tuple[int, int] = (64, 48),
    box: tuple[int, int, int, int] | None = None,
    seed: int = 0,
) -> None:
    """A ``size`` (w, h) JPEG of ``colour``; with ``box`` (x, y, w, h) only inside the box."""
    w, h = size
    rng = np.random.default_rng(seed)
    a = np.empty((h, w, 3), dtype=np.int16)
    a[:] = colour if box is None else BACKGROUND
    if box is not None:
        x, y, bw, bh = box
        a[y : y + bh, x : x + bw] = colour
    a += rng.integers(-4, 5, a.shape, dtype=np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=95)


def write_imagenet(
    root: Path,
    classes: tuple[str, ...] = ("n01440764", "n01443537", "n01484850"),
    n_train: int = 3,
    n_val: int = 2,
) -> dict[str, list[Path]]:
    """``root/{train,val}/<wnid>/<wnid>_<i>.JPEG``; returns the files per split."""
    files: dict[str, list[Path]] = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for k, wnid in enumerate(classes):
            for i in range(n):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{k}{i:04d}.JPEG"
                path = root / split / wnid / name
                write_jpeg(path, PALETTE[k], seed=k * 100 + i)
                files[split].append(path)
    return files


CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


def write_cub(
    root: Path, n_train: int = 2, n_test: int = 1, size: tuple[int, int] = (64, 48)
) -> list[dict]:
    """The extracted ``CUB_200_2011/`` folder at ``root``: ``images/<class>/*.jpg`` and the five
    official list files (ids interleave train and test, boxes are floats). Each image is
    BACKGROUND except for its box of the class colour. Returns one dict per image id."""
    records = []
    image_id = 0
    for k, cls in enumerate(CUB_CLASSES):
        for i in range(n_train + n_test):
            image_id += 1
            box = (10 + 2 * i, 8 + i, 30 + k, 24)
            rel = f"{cls}/{cls.split('.', 1)[1]}_{i:04d}_{image_id}.jpg"
            write_jpeg(root / "images" / rel, PALETTE[k], size, box, seed=image_id)
            records.append(
                {"id": image_id, "path": rel, "label": k, "train": i < n_train, "box": box}
            )
    lines = {
        "images.txt": [f"{r['id']} {r['path']}" for r in records],
        "image_class_labels.txt": [f"{r['id']} {r['label'] + 1}" for r in records],
        "train_test_split.txt": [f"{r['id']} {int(r['train'])}" for r in records],
        "bounding_boxes.txt": [
            f"{r['id']} " + " ".join(f"{float(v):.1f}" for v in r["box"]) for r in records
        ],
        "classes.txt": [f"{k + 1} {cls}" for k, cls in enumerate(CUB_CLASSES)],
    }
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return records


SCENES_CLASSES = ("bedroom", "kitchen", "office")


def write_scenes(root: Path, n_train: int = 2, n_test: int = 1) -> dict[str, list[str]]:
    """MIT Indoor 67: ``root/Images/<class>/*.jpg`` + ``TrainImages.txt`` / ``TestImages.txt``
    (lines ``<class>/<file>`` relative to Images/). Returns the listed lines per split."""
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for k, cls in enumerate(SCENES_CLASSES):
        for i in range(n_train + n_test):
            rel = f"{cls}/int{k}{i:03d}.jpg"
            write_jpeg(root / "Images" / rel, PALETTE[k], seed=k * 10 + i)
            lists["train" if i < n_train else "test"].append(rel)
    (root / "TrainImages.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "TestImages.txt").write_text("\n".join(lists["test"]) + "\n")
    return lists
