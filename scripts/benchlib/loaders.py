"""The data benchmark's loaders: the per-image PIL path everyone starts from and atx's
batch-wise pipelines, fed over the same CIFAR-10-sized data."""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from atx.data import CIFAR10DataModule
from atx.data.cifar import CIFAR10_CLASSES, CIFAR_MEAN, CIFAR_STD
from benchlib.report import md_table
from benchlib.rounds import round_robin

NOISY_SPREAD, NOISY_LOAD = 1.3, 0.3  # rounds' max / min, other load (cores): flag as noisy


# --- data -------------------------------------------------------------------------------------
def write_synthetic_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000) -> Path:
    """Random images in torchvision's CIFAR-10 layout (``root/cifar-10-batches-py``)."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for i in range(1, 6):
        batch = {
            "data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per).tolist(),
        }
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {
        "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        "labels": rng.integers(0, 10, n_test).tolist(),
    }
    (base / "test_batch").write_bytes(pickle.dumps(test))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES}))
    return root


class PerImageCIFAR(Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: HWC uint8 -> PIL -> transform."""

    def __init__(self, x_nchw: Tensor, y: Tensor, transform: Callable[[Image.Image], Tensor]):
        self.data = x_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def per_image_transform(pad: int = 4) -> Callable[[Image.Image], Tensor]:
    from torchvision import transforms  # only this baseline needs torchvision

    return transforms.Compose([
        transforms.RandomCrop(32, padding=pad, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])


def per_image_loader(x: Tensor, y: Tensor, batch_size: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        PerImageCIFAR(x, y, per_image_transform()),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- loader benchmark -------------------------------------------------------------------------
class Feed:
    """One loader path: a call feeds one epoch of batches, as the training step gets them, and
    returns (images, images/s)."""

    def __init__(
        self, name: str, loader: DataLoader, hook: Callable[[Any], Any], device: torch.device
    ) -> None:
        self.name, self.loader, self.hook, self.device = name, loader, hook, device

    def __call__(self, rnd: int) -> tuple[int, float]:
        t = time.perf_counter()
        n = 0
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            x, y = self.hook((x, y))
            n += len(x)
        sync(self.device)
        return n, n / (time.perf_counter() - t)


def make_feeds(root: Path, args: argparse.Namespace, device: torch.device) -> list[Feed]:
    pin = device.type == "cuda"
    feeds = []
    host = CIFAR10DataModule(str(root), batch_size=args.batch_size, train_subset=args.images,
                             device_resident=False, pin_memory=pin, seed=1)
    host.setup()
    host.trainer = SimpleNamespace(training=True)
    x, y = host.x_train, host.y_train
    for w in args.workers:
        loader = per_image_loader(x, y, args.batch_size, w, pin)
        feeds.append(Feed(f"pil w{w}", loader, lambda b: b, device))
    feeds.append(Feed("atx host", host.train_dataloader(),
                      lambda b: host.on_after_batch_transfer(b, 0), device))
    resident = CIFAR10DataModule(str(root), batch_size=args.batch_size, train_subset=args.images,
                                 device_resident=True, seed=1)
    resident.setup()
    resident.place(device)
    resident.trainer = SimpleNamespace(training=True)
    feeds.append(Feed("atx device", resident.train_dataloader(),
                      lambda b: resident.on_after_batch_transfer(b, 0), device))
    return feeds


def bench_loaders(root: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    feeds = make_feeds(root, args, device)
    rates: dict[str, list[float]] = {f.name: [] for f in feeds}
    loads: dict[str, list[float]] = {f.name: [] for f in feeds}
    images: dict[str, int] = {}
    # round 0: warm-up (workers start, caches fill)
    for r, blocks in round_robin({f.name: f for f in feeds}, range(args.rounds + 1)):
        if r == 0:
            continue
        for b in blocks:
            n, rate = b.value
            images[b.name] = n
            rates[b.name].append(rate)
            if b.load is not None:
                loads[b.name].append(b.load)
        done = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
        print(f"  round {r}/{args.rounds}: images/s {done}", flush=True)
    return [
        {
            "path": name,
            "images": images[name],
            "images_per_s": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
            "other_load": statistics.median(loads[name]) if loads[name] else None,
        }
        for name, xs in rates.items()
    ]


def loader_table(rows: Sequence[dict]) -> tuple[str, bool]:
    """Markdown table with ratios to the PIL loaders, and whether the run looks noisy."""
    pil = [r for r in rows if r["path"].startswith("pil")]
    w0 = pil[0]["images_per_s"] if pil else float("nan")
    best = max((r["images_per_s"] for r in pil), default=float("nan"))
    header = ("path", "images/s (median)", "min - max", "x pil w0", "x best pil", "other load")
    cells = []
    noisy = False
    for r in rows:
        load = r["other_load"]
        noisy |= r["max"] / r["min"] > NOISY_SPREAD or (load is not None and load > NOISY_LOAD)
        cells.append((
            r["path"], f"{r['images_per_s']:,.0f}", f"{r['min']:,.0f} - {r['max']:,.0f}",
            f"{r['images_per_s'] / w0:.1f}", f"{r['images_per_s'] / best:.1f}",
            f"{load:.2f} cores" if load is not None else "n/a",
        ))
    return "\n".join(md_table(header, cells)), noisy
