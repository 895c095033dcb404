"""Data-pipeline benchmark: images/s fed to the training step, per-image PIL path vs atx.

Loaders (default mode), all over the same CIFAR-10-sized data, measured in one run, interleaved
round by round so load from other processes hits every path alike:

* ``pil w<N>``: the per-image path everyone starts from: a ``torchvision.datasets.CIFAR10``-style
  dataset (uint8 HWC array in memory, ``Image.fromarray`` per item) with ``RandomCrop(32,
  padding=4, padding_mode="reflect")``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``,
  default collation, ``num_workers=N`` (persistent), pinned memory on CUDA;
* ``atx host``: atx's uint8 tensors on the host, one ``index_select`` per batch, the batch copied
  to the device, then crop/flip/normalise for the whole batch there (``on_after_batch_transfer``);
* ``atx device``: the same with the uint8 tensors resident on the device (``data.device_resident``;
  on the CPU this is the host path again).

A round is one pass over ``--images`` shuffled images per loader; the first round is a warm-up.
Reported: median images/s over rounds, the spread, and the other load on the machine (CPU time
of processes other than this one and its workers, in cores; from ``/proc/stat``).

``--epoch`` times one training epoch of WRN-16-1 <- WRN-16-2 AT+KD through the real ``atx-train``
path (composed config, DistillModule, Trainer) with the device-resident pipeline and with the
per-image DataLoader (``data.num_workers`` from ``--workers``); the window runs from the first
training batch of the last epoch to the end of its last step (loader start-up, warm-up epochs and
validation excluded). ``--train-subset`` shortens the epoch for a quick check on the CPU.
``--options`` adds an atx epoch per speed switch (``channels_last``, ``compile``,
``teacher-inference``, ``bf16-mixed``, ``16-mixed``, ``cudnn-benchmark``, ``fastest`` =
``speed=fast``, ``fastest+16-mixed``), each reported as a speed-up of the plain atx epoch; on
``--device cuda`` all of them run unless ``--options`` names some (or none).

Without ``--root`` a synthetic CIFAR-10-sized copy (50k + 10k random images) is written in
torchvision's pickle layout into a temporary folder; ``--root`` takes a real copy (either layout).
The loaders and the epoch runs live in ``scripts/benchlib`` (``loaders``, ``epochs``).

    python scripts/bench_data.py                       # loaders on the CPU
    python scripts/bench_data.py --device cuda --workers 0 4 8 --epoch
    python scripts/bench_data.py --epoch --train-subset 2048 --workers 0 2
    python scripts/bench_data.py --epoch-only --train-subset 2048 --options channels_last compile
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from benchlib.epochs import EPOCH_OPTIONS, GPU_ONLY_OPTIONS, bench_epoch, epoch_table
from benchlib.loaders import (
    NOISY_LOAD,
    NOISY_SPREAD,
    bench_loaders,
    loader_table,
    write_synthetic_cifar10,
)
from benchlib.report import revision, utc_now, write_json


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--root", type=Path, help="a real CIFAR-10 copy (default: synthetic)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=10_240, help="images per round and loader")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="PIL loader workers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--epoch", action="store_true", help="also time WRN-16-1 <- 16-2 AT+KD epochs")
    p.add_argument("--epoch-only", action="store_true", help="only the epoch benchmark")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    p.add_argument("--train-subset", type=int, default=None, help="epoch mode: images per epoch")
    p.add_argument("--val-subset", type=int, default=500, help="epoch mode: validation images")
    p.add_argument(
        "--override", nargs="*", default=[], help="epoch mode: more atx-train overrides"
    )
    p.add_argument("--options", nargs="*", default=None, choices=list(EPOCH_OPTIONS),
                   help="epoch mode: also time the atx epoch with each speed option (default:"
                        " all on cuda, none on cpu)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.options is None:
        args.options = list(EPOCH_OPTIONS) if args.device == "cuda" else []
    if args.device != "cuda" and (gpu := [o for o in args.options if o in GPU_ONLY_OPTIONS]):
        p.error(f"--options {' '.join(gpu)} need --device cuda (on the CPU Lightning runs"
                " 16-mixed as bf16-mixed and cudnn has nothing to tune)")
    if args.quick:
        args.images, args.rounds, args.workers = 512, 2, [0]
        args.train_subset, args.val_subset, args.epochs = 64, 32, 1
        args.override = [*args.override, "model.depth=10", "teacher.depth=10"]
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_data: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    command = "python scripts/bench_data.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {
        "date": utc_now(),
        "command": command.strip(), "machine": machine(), "revision": revision(),
        "device": str(device),
    }
    print(f"{result['date']}  {result['machine']}  atx {result['revision']}")
    with tempfile.TemporaryDirectory(prefix="atx-bench-data-") as tmp:
        work = Path(tmp)
        if args.root is None:
            t = time.perf_counter()
            small = (4 * args.images, 1000) if args.quick else (50_000, 10_000)
            root = write_synthetic_cifar10(work / "cifar10", *small)
            print(f"synthetic CIFAR-10 ({small[0]} + {small[1]} images) written in "
                  f"{time.perf_counter() - t:.1f} s")
        else:
            root = args.root
        if not args.epoch_only:
            print(f"loaders: {args.rounds} rounds of {args.images} images, batch "
                  f"{args.batch_size}, device {device}")
            rows = bench_loaders(root, args, device)
            table, noisy = loader_table(rows)
            result["loaders"], result["noisy"] = rows, noisy
            print(table)
            pil_best = max(r["images_per_s"] for r in rows if r["path"].startswith("pil"))
            for r in rows:
                if r["path"].startswith("atx"):
                    print(f"{r['path']} feeds {r['images_per_s'] / pil_best:.1f}x the PIL loader "
                          f"(best of workers {args.workers})")
            if noisy:
                print(f"NOISY: rounds spread > {NOISY_SPREAD}x or other load > {NOISY_LOAD}"
                      " cores; rerun when quiet")
        if args.epoch or args.epoch_only or args.quick:
            rows = bench_epoch(root, args, work)
            result["epoch"] = rows
            print(epoch_table(rows))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
