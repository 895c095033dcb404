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

    python scripts/bench_data.py                       # loaders on the CPU (~1 min on 2 cores)
    python scripts/bench_data.py --device cuda --workers 0 4 8 --epoch
    python scripts/bench_data.py --epoch --train-subset 2048 --workers 0 2
    python scripts/bench_data.py --epoch-only --train-subset 2048 --options channels_last compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
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

REPO = Path(__file__).resolve().parents[1]


# --- data -------------------------------------------------------------------------------------
def write_synthetic_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000) -> Path:
    """Random images in torchvision's CIFAR-10 layout (``root/cifar-10-batches-py``)."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per).tolist()}
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n_test).tolist()}
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
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomCrop(32, padding=pad, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])


def per_image_loader(x: Tensor, y: Tensor, batch_size: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        PerImageCIFAR(x, y, per_image_transform()), batch_size=batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=pin,
    )


# --- timing helpers ---------------------------------------------------------------------------
def _jiffies(pid: int | str) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


class OtherLoad:
    """CPU cores used by everything except this process and its children over an interval."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self._start: tuple[float, int, int] | None = None

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            busy = sum(int(v) for v in cpu) - int(cpu[3]) - int(cpu[4])  # minus idle, iowait
            mine = 0
            for pid in (os.getpid(), *_descendants(os.getpid())):
                try:
                    mine += _jiffies(pid)
                except OSError:
                    pass
            t = os.times()
            mine += round((t.children_user + t.children_system) * self.hz)
        except OSError:
            return None
        return time.perf_counter(), busy, mine

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(other, 0) / self.hz / wall if wall > 0 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- loader benchmark -------------------------------------------------------------------------
class Feed:
    """One loader path: ``run()`` feeds one epoch of batches, as the training step gets them."""

    def __init__(self, name: str, loader: DataLoader, hook: Callable[[Any], Any], device):
        self.name, self.loader, self.hook, self.device = name, loader, hook, device

    def run(self) -> int:
        n = 0
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            x, y = self.hook((x, y))
            n += len(x)
        sync(self.device)
        return n


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
    meter = OtherLoad()
    for r in range(args.rounds + 1):  # round 0: warm-up (workers start, caches fill)
        for feed in feeds:
            meter.start()
            t = time.perf_counter()
            n = feed.run()
            elapsed = time.perf_counter() - t
            load = meter.stop()
            if r == 0:
                continue
            images[feed.name] = n
            rates[feed.name].append(n / elapsed)
            if load is not None:
                loads[feed.name].append(load)
        if r:
            done = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
            print(f"  round {r}/{args.rounds}: images/s {done}", flush=True)
    rows = []
    for name, xs in rates.items():
        rows.append({
            "path": name,
            "images": images[name],
            "images_per_s": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
            "other_load": statistics.median(loads[name]) if loads[name] else None,
        })
    return rows


def loader_table(rows: Sequence[dict]) -> tuple[str, bool]:
    """Markdown table with ratios to the PIL loaders, and whether the run looks noisy."""
    pil = [r for r in rows if r["path"].startswith("pil")]
    w0 = pil[0]["images_per_s"] if pil else float("nan")
    best = max((r["images_per_s"] for r in pil), default=float("nan"))
    lines = ["| path | images/s (median) | min - max | x pil w0 | x best pil | other load |",
             "|---|---:|---:|---:|---:|---:|"]
    noisy = False
    for r in rows:
        spread = r["max"] / r["min"]
        load = r["other_load"]
        noisy |= spread > 1.3 or (load is not None and load > 0.3)
        load_s = f"{load:.2f} cores" if load is not None else "n/a"
        lines.append(
            f"| {r['path']} | {r['images_per_s']:,.0f} | {r['min']:,.0f} - {r['max']:,.0f} | "
            f"{r['images_per_s'] / w0:.1f} | {r['images_per_s'] / best:.1f} | {load_s} |"
        )
    return "\n".join(lines), noisy


# --- epoch benchmark --------------------------------------------------------------------------
EPOCH_LOG: dict[str, list[float]] = {}


class _EpochClock:
    """Mixin for a CIFAR data module: stamps the first training batch of every epoch and the
    first validation batch after it (the end of that epoch's training steps)."""

    clock_name = "epoch"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer  # type: ignore[attr-defined]
        log = EPOCH_LOG.setdefault(self.clock_name, [])
        if trainer.training and len(log) % 2 == 0:
            sync(batch[0].device)
            log.append(time.perf_counter())
        elif trainer.validating and not trainer.sanity_checking and len(log) % 2 == 1:
            sync(batch[0].device)
            log.append(time.perf_counter())
        return self._transfer(batch, dataloader_idx)

    def _transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]


class TimedCIFAR10(_EpochClock, CIFAR10DataModule):
    """atx's pipeline (device-resident when ``data.device_resident=true``), timed."""

    clock_name = "atx"


class TimedPerImageCIFAR10(_EpochClock, CIFAR10DataModule):
    """The per-image PIL DataLoader for training (``data.num_workers`` workers), timed."""

    clock_name = "per-image"

    def train_dataloader(self) -> DataLoader:
        assert self.x_train is not None and self.y_train is not None
        cuda = getattr(self.trainer, "strategy", None) is not None and \
            self.trainer.strategy.root_device.type == "cuda"
        return per_image_loader(self.x_train, self.y_train, self.batch_size, self.num_workers, cuda)

    def _transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.training:  # already cropped, flipped and normalised per image
            return batch
        return super()._transfer(batch, dataloader_idx)


def epoch_overrides(args: argparse.Namespace, root: Path, teacher: Path) -> list[str]:
    accel = "gpu" if args.device == "cuda" else "cpu"
    out = [
        "data=cifar10", f"data.root={root}", f"data.batch_size={args.batch_size}",
        "model=wrn_16_1", "teacher=wrn_16_2", f"teacher.checkpoint={teacher}", "distill=at_kd",
        f"trainer.accelerator={accel}", f"trainer.max_epochs={args.epochs}",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "figure_images=0",
        f"data.val_subset={args.val_subset}",
    ]
    if args.train_subset:
        out.append(f"data.train_subset={args.train_subset}")
    return out + list(args.override)


# Speed switches timed as extra epochs of the atx path (``--options``): name -> overrides.
EPOCH_OPTIONS: dict[str, list[str]] = {
    "channels_last": ["speed.channels_last=true"],
    "compile": ["speed.compile=true"],
    "teacher-inference": ["speed.teacher_inference_mode=true"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "16-mixed": ["trainer.precision=16-mixed"],
    "cudnn-benchmark": ["trainer.benchmark=true"],
    "fastest": ["speed=fast"],
    "fastest+16-mixed": ["speed=fast", "trainer.precision=16-mixed", "trainer.benchmark=true"],
}
GPU_ONLY_OPTIONS = ("16-mixed", "cudnn-benchmark", "fastest+16-mixed")  # no-ops / bf16 on the CPU


def epoch_paths(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(label, data module class, overrides) of every timed epoch run: the atx pipeline first
    (the reference of the ratios), then the per-image loaders, then atx with each option."""
    paths = [("atx", "TimedCIFAR10", ["data.device_resident=true"])]
    paths += [(f"per-image w{w}", "TimedPerImageCIFAR10",
               ["data.device_resident=false", f"data.num_workers={w}"]) for w in args.workers]
    paths += [(f"atx {name}", "TimedCIFAR10", ["data.device_resident=true", *EPOCH_OPTIONS[name]])
              for name in args.options]
    return paths


def bench_epoch(root: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    import torch._dynamo
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from atx.build import build_network
    from atx.train import CONF_DIR, train

    teacher = work / "teacher.pt"  # random weights of the configured teacher, written below
    rows = []
    for label, cls, extra in epoch_paths(args):
        overrides = epoch_overrides(args, root, teacher) + extra
        overrides.append(f"data._target_={__name__}.{cls}")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        if not teacher.exists():
            torch.manual_seed(0)
            torch.save(build_network(cfg.teacher, "teacher", 10, 3).state_dict(), teacher)
        run_dir = work / label.replace(" ", "_")
        run_dir.mkdir()
        clock = "atx" if cls == "TimedCIFAR10" else "per-image"
        EPOCH_LOG[clock] = []
        print(f"  epoch run: {label} ...", flush=True)
        cudnn_benchmark = torch.backends.cudnn.benchmark  # the Trainer sets it: one run only
        meter = OtherLoad()
        meter.start()
        try:
            train(cfg, run_dir)
        finally:
            torch.backends.cudnn.benchmark = cudnn_benchmark
            torch._dynamo.reset()  # compiled runs do not share caches or recompile limits
        load = meter.stop()
        stamps = EPOCH_LOG[clock]
        assert len(stamps) >= 2, f"no complete epoch was timed for {label}"
        start, end = stamps[-2], stamps[-1]
        n = args.train_subset or 50_000
        rows.append({"path": label, "overrides": extra, "epoch_s": end - start,
                     "images_per_s": n / (end - start), "images": n,
                     "other_load": load})
        print(f"    {label}: last epoch {end - start:.2f} s, {n / (end - start):,.0f} img/s")
    return rows


def epoch_table(rows: Sequence[dict]) -> str:
    """Markdown table of the epoch runs, then the ratios the issue asks for: the atx pipeline
    against the fastest per-image loader, and each option's speed-up of the atx epoch."""
    atx = rows[0]["epoch_s"]
    lines = ["| path | epoch (s) | images/s | epoch / atx epoch | other load |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        load = f"{r['other_load']:.2f} cores" if r["other_load"] is not None else "n/a"
        lines.append(f"| {r['path']} | {r['epoch_s']:.2f} | {r['images_per_s']:,.0f} | "
                     f"{r['epoch_s'] / atx:.2f} | {load} |")
    per_image = [r for r in rows if r["path"].startswith("per-image")]
    if per_image:
        best = min(per_image, key=lambda r: r["epoch_s"])
        lines.append(f"\natx pipeline epoch vs the fastest per-image epoch ({best['path']}): "
                     f"{best['epoch_s'] / atx:.2f}x faster (GPU target >= 3x)")
    for r in rows[1:]:
        if r["path"].startswith("atx "):
            lines.append(f"speed-up of {r['path'][4:]}: {atx / r['epoch_s']:.2f}x")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------
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


def revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=REPO, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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
    p.add_argument("--override", nargs="*", default=[], help="epoch mode: more atx-train overrides")
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
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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
                print("NOISY: rounds spread > 1.3x or other load > 0.3 cores; rerun when quiet")
        if args.epoch or args.epoch_only or args.quick:
            rows = bench_epoch(root, args, work)
            result["epoch"] = rows
            print(epoch_table(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
