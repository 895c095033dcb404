"""The data benchmark's epoch mode: one training epoch of WRN-16-1 <- WRN-16-2 AT+KD through
the real ``atx-train`` path, per data pipeline and per speed option."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from atx.data import CIFAR10DataModule
from benchlib.load import LoadMeter
from benchlib.loaders import per_image_loader, sync
from benchlib.report import md_table

EPOCH_LOG: dict[str, list[float]] = {}

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
        strategy = getattr(self.trainer, "strategy", None)
        cuda = strategy is not None and strategy.root_device.type == "cuda"
        x, y = self.x_train, self.y_train
        return per_image_loader(x, y, self.batch_size, self.num_workers, cuda)

    def _transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.training:  # already cropped, flipped and normalised per image
            return batch
        return super()._transfer(batch, dataloader_idx)


def fit_overrides(args: argparse.Namespace, root: Path, teacher: Path) -> list[str]:
    """A quiet ``atx-train`` fit of WRN-16-1 <- WRN-16-2 AT+KD on CIFAR-10 at ``root``, for
    ``args.epochs`` epochs of ``args.batch_size`` on ``args.device`` (the end-of-run figure,
    not part of an epoch, left out): what every epoch benchmark trains."""
    accel = "gpu" if args.device == "cuda" else "cpu"
    return [
        "data=cifar10", f"data.root={root}", f"data.batch_size={args.batch_size}",
        "model=wrn_16_1", "teacher=wrn_16_2", f"teacher.checkpoint={teacher}", "distill=at_kd",
        f"trainer.accelerator={accel}", f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
        "figure_images=0",
    ]


def epoch_overrides(args: argparse.Namespace, root: Path, teacher: Path) -> list[str]:
    out = [*fit_overrides(args, root, teacher), "trainer.num_sanity_val_steps=0",
           f"data.val_subset={args.val_subset}"]
    if args.train_subset:
        out.append(f"data.train_subset={args.train_subset}")
    return out + list(args.override)


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
    # the training stack loads only in epoch mode
    import torch._dynamo

    from atx.train import compose_config, train
    from benchlib.steps import write_random_teacher

    teacher = work / "teacher.pt"  # random weights of the configured teacher, written below
    rows = []
    for label, cls, extra in epoch_paths(args):
        overrides = epoch_overrides(args, root, teacher) + extra
        overrides.append(f"data._target_={__name__}.{cls}")
        cfg = compose_config(overrides)
        if not teacher.exists():
            write_random_teacher(teacher, cfg.teacher)
        run_dir = work / label.replace(" ", "_")
        run_dir.mkdir()
        clock = "atx" if cls == "TimedCIFAR10" else "per-image"
        EPOCH_LOG[clock] = []
        print(f"  epoch run: {label} ...", flush=True)
        cudnn_benchmark = torch.backends.cudnn.benchmark  # the Trainer sets it: one run only
        meter = LoadMeter()
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
    header = ("path", "epoch (s)", "images/s", "epoch / atx epoch", "other load")
    lines = md_table(header, (
        (r["path"], f"{r['epoch_s']:.2f}", f"{r['images_per_s']:,.0f}",
         f"{r['epoch_s'] / atx:.2f}",
         f"{r['other_load']:.2f} cores" if r["other_load"] is not None else "n/a")
        for r in rows
    ))
    per_image = [r for r in rows if r["path"].startswith("per-image")]
    if per_image:
        best = min(per_image, key=lambda r: r["epoch_s"])
        lines.append(f"\natx pipeline epoch vs the fastest per-image epoch ({best['path']}): "
                     f"{best['epoch_s'] / atx:.2f}x faster (GPU target >= 3x)")
    for r in rows[1:]:
        if r["path"].startswith("atx "):
            lines.append(f"speed-up of {r['path'][4:]}: {atx / r['epoch_s']:.2f}x")
    return "\n".join(lines)
