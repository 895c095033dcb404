"""The step benchmark's epoch rows: one whole training epoch of WRN-16-1 <- WRN-16-2 AT+KD, the
authors' loop re-created beside ``atx-train``'s own epoch on the same cached data, and where each
epoch's time goes (data / step / eval / logging / checkpoint / other)."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from atx.data import cifar
from benchlib import authors
from benchlib.report import md_table
from benchlib.rows import BY_NAME

PARTS = ("data", "step", "eval", "logging", "checkpoint", "other")
CIFAR_MEAN, CIFAR_STD = torch.tensor(cifar.CIFAR_MEAN), torch.tensor(cifar.CIFAR_STD)


def now() -> float:
    """Wall time after the GPU's queued work (a part ends when its kernels do). On a GPU each
    mark is a synchronisation: the parts are for the CPU rows (gpu_check times the authors'
    loop, which synchronises at every step's ``.item()`` anyway, and atx from metrics.json)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class PartClock:
    """Charges the wall time between marks to named parts. Timers wrapped by :meth:`timed`
    charge their own part and are taken out of the interval that contains them; a timed call
    inside another (a logger's ``log_metrics`` calling its ``save``) counts once, in the outer."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.mark = now()
        self.nested = 0.0
        self.depth = 0

    def charge(self, part: str) -> None:
        t = now()
        self.parts[part] += t - self.mark - self.nested
        self.mark, self.nested = t, 0.0

    def timed(self, part: str | None, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as ``part``; ``None``: outside the epoch (taken out, charged nowhere)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            t0, self.depth = now(), 1
            try:
                return fn(*args, **kwargs)
            finally:
                d, self.depth = now() - t0, 0
                if part is not None:
                    self.parts[part] += d
                self.nested += d

        return wrapper

    def total(self) -> dict[str, float]:
        return {**self.parts, "epoch": sum(self.parts.values())}


# -- the authors' loop -------------------------------------------------------------------------
def normalise(x: Tensor) -> Tensor:
    """A uint8 batch as float, normalised with the authors' CIFAR mean and std."""
    mean, std = CIFAR_MEAN.to(x.device)[:, None, None], CIFAR_STD.to(x.device)[:, None, None]
    return (x.float() / 255 - mean) / std


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """A uint8 batch normalised, reflect-padded by 4 (torch's reflect, atx's too), cropped back
    to 32x32 at a random offset per image and flipped with p = 0.5 per image: their pad, crop
    and flip, done on the whole batch."""
    n = x.shape[0]
    x = F.pad(normalise(x), (4, 4, 4, 4), mode="reflect")
    dy, dx = (torch.randint(0, 9, (n,), generator=g).to(x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(32, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32, device=x.device))[:, None, None, :]
    x = x[torch.arange(n, device=x.device)[:, None, None, None],
          torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


class AuthorsLoop:
    """The authors' ``cifar.py`` epoch over cached uint8 tensors: shuffled batches augmented per
    batch (:func:`augment`), their AT+KD step (``steps.AuthorsRunner``), a test pass (their
    ``h`` under ``no_grad`` in eval mode: student, teacher, group losses, accuracy), then their
    ``log()``: ``torch.save`` of the parameters and optimiser state and a JSON line."""

    def __init__(self, data: dict[str, Tensor], batch_size: int, out: Path, device: str) -> None:
        from benchlib.steps import AuthorsRunner, build_pair

        row = BY_NAME["AT+KD authors"]
        student, teacher = (m.to(device) for m in build_pair(row))
        self.runner = AuthorsRunner(row, student, teacher, [])
        self.data = {k: v.to(device) for k, v in data.items()}
        self.batch_size, self.out, self.device = batch_size, out, device
        self.g = torch.Generator().manual_seed(0)
        if device == "cuda":  # their cifar.py sets it (atx's trainer=gpu too)
            torch.backends.cudnn.benchmark = True
        out.mkdir(parents=True, exist_ok=True)

    def epoch(self, index: int) -> dict[str, float]:
        clock, r, bs = PartClock(), self.runner, self.batch_size
        x_train, y_train = self.data["x_train"], self.data["y_train"]
        order = torch.randperm(len(x_train), generator=self.g).to(self.device)
        meter = []
        for i in range(0, len(order), bs):  # torchnet's loader drops no batch, nor does atx's
            idx = order[i:i + bs]
            x, y = augment(x_train[idx], self.g), y_train[idx]
            clock.charge("data")
            r.step(x, y)
            meter.append(sum(r.meters))  # their meters: every group loss .item()'d each step
            clock.charge("step")
        correct = 0
        x_test, y_test = self.data["x_test"], self.data["y_test"]
        with torch.no_grad():
            for i in range(0, len(x_test), bs):
                x, y = normalise(x_test[i:i + bs]), y_test[i:i + bs]
                y_s, g_s = authors.wrn(r.ps, x, False)
                y_t, g_t = authors.wrn(r.pt, x, False)
                losses = [authors.at_loss(a, b).item() for a, b in zip(g_s, g_t, strict=True)]
                authors.distillation(y_s, y_t, y, 4.0, 0.9).item()
                correct += int((y_s.argmax(1) == y).sum())
        clock.charge("eval")
        torch.save({"params": {k: v.data for k, v in r.ps.items()},
                    "optimizer": r.opt.state_dict(), "epoch": index}, self.out / "model.pt7")
        clock.charge("checkpoint")
        with open(self.out / "log.txt", "a") as f:
            f.write(json.dumps({"epoch": index, "train_at_loss": statistics.fmean(meter),
                                "test_acc": correct / len(x_test), "at_losses": losses}) + "\n")
        clock.charge("logging")
        return clock.total()


# -- atx-train's epoch -------------------------------------------------------------------------
class EpochParts(L.Callback):
    """Where each training epoch of a real ``atx-train`` fit goes: data (fetch, transfer, batch
    augmentation), step (``on_train_batch_start`` -> ``on_train_batch_end``), eval (the
    validation loop), logging (the loggers' calls), checkpoint (``trainer.save_checkpoint``),
    other (the loop and the remaining callbacks). An epoch ends where the next one starts."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.clock: PartClock | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.save_checkpoint = self._timed("checkpoint", trainer.save_checkpoint)
        for logger in trainer.loggers:
            for name in ("log_metrics", "save", "log_hyperparams"):
                setattr(logger, name, self._timed("logging", getattr(logger, name)))

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.clock is None:
                return fn(*args, **kwargs)
            return self.clock.timed(part, fn)(*args, **kwargs)

        return wrapper

    def _close(self) -> None:
        if self.clock is not None:
            self.clock.charge("other")
            self.epochs.append(self.clock.total())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self.clock = PartClock()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.charge("data")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.charge("step")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.clock and not trainer.sanity_checking:
            self.clock.charge("other")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.clock and not trainer.sanity_checking:
            self.clock.charge("eval")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self.clock = None


class Interleaved(L.Callback):
    """One epoch of the authors' loop at the start of each atx epoch, outside that epoch's
    clock: the two alternate epoch by epoch, so the machine's drift hits both alike."""

    def __init__(self, loop: AuthorsLoop, parts: EpochParts) -> None:
        self.loop, self.parts = loop, parts
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.parts.clock is not None, "EpochParts must come first"
        epoch = self.parts.clock.timed(None, self.loop.epoch)(trainer.current_epoch)
        self.epochs.append(epoch)


@contextlib.contextmanager
def with_epoch_parts(
    loop: AuthorsLoop | None = None,
) -> Iterator[tuple[EpochParts, Interleaved | None]]:
    """``atx.train.train`` with an :class:`EpochParts` after its own callbacks (and the
    authors' ``loop`` interleaved after it)."""
    import atx.train

    parts, original = EpochParts(), atx.train.run_callbacks
    beside = Interleaved(loop, parts) if loop is not None else None
    atx.train.run_callbacks = lambda *a: [*original(*a), parts, *([beside] if beside else [])]
    try:
        yield parts, beside
    finally:
        atx.train.run_callbacks = original


# -- the rows ----------------------------------------------------------------------------------
AUTHORS = "authors' loop"
ATX_PATHS = {"atx float32": [], "atx speed=fast": ["speed=fast"]}


def atx_epochs(root: Path, teacher: Path, extra: list[str], args: argparse.Namespace,
               run_dir: Path, loop: AuthorsLoop | None = None) -> tuple[list[dict], list[dict]]:
    """One real ``atx-train`` fit of ``args.epochs`` epochs: the parts of each of its epochs,
    and of each epoch of the authors' ``loop`` run between them (none without a loop)."""
    import torch._dynamo

    from atx.train import compose_config, train
    from benchlib.epochs import fit_overrides

    cfg = compose_config([*fit_overrides(args, root, teacher), *extra])
    try:
        with with_epoch_parts(loop) as (parts, beside):
            train(cfg, run_dir)
    finally:
        torch._dynamo.reset()  # compiled runs share no caches or recompile limits
    return parts.epochs, beside.epochs if beside else []


def bench_epoch_rows(args: argparse.Namespace, work: Path) -> list[dict[str, dict]]:
    """``args.epoch_rounds`` rounds, each one real ``atx-train`` fit per atx path (odd rounds
    in reverse order) of ``args.epochs`` epochs, an epoch of the authors' loop (a fresh one per
    fit) before each of its epochs, on the same data; every epoch but each side's first
    (warm-up, compilation). Per round: ``{path: {"atx": [...], "authors": [...]}}``."""
    from atx.data import CIFAR10DataModule
    from benchlib.loaders import write_synthetic_cifar10
    from benchlib.steps import write_random_teacher

    root = write_synthetic_cifar10(work / "cifar10", args.epoch_images, args.epoch_test)
    dm = CIFAR10DataModule(root=str(root), batch_size=args.batch_size)
    dm.setup("fit")
    data = {"x_train": dm.x_train, "y_train": dm.y_train, "x_test": dm.x_val, "y_test": dm.y_val}
    teacher = write_random_teacher(work / "teacher.pt")
    paths = [k for k, v in ATX_PATHS.items() if not (args.no_compile and "speed=fast" in v)]
    rounds: list[dict[str, dict]] = []
    for rnd in range(args.epoch_rounds):
        timed: dict[str, dict] = {}
        for label in paths if rnd % 2 == 0 else paths[::-1]:
            name = f"{label.replace(' ', '_')}{rnd}"
            (work / name).mkdir()
            loop = AuthorsLoop(data, args.batch_size, work / f"{name}_authors", args.device)
            atx, authors = atx_epochs(root, teacher, ATX_PATHS[label], args, work / name, loop)
            timed[label] = {"atx": atx[1:], "authors": authors[1:]}
        rounds.append({k: timed[k] for k in paths})
        print(f"epoch round {rnd + 1}/{args.epoch_rounds}: " + ", ".join(
            f"{k} {statistics.median(e['epoch'] for e in v['atx']):.2f} s (authors' loop beside"
            f" it {statistics.median(e['epoch'] for e in v['authors']):.2f} s)"
            for k, v in timed.items()), flush=True)
    return rounds


def epoch_rows_table(rounds: list[dict[str, dict]], images: int) -> str:
    """Median seconds of each part over all timed epochs (the authors' loop: its epochs beside
    every atx path), then each atx path's speed-up over the authors' epoch run just before it,
    paired epoch by epoch (median and range)."""
    paths = list(rounds[0])
    epochs = {AUTHORS: [e for r in rounds for k in paths for e in r[k]["authors"]],
              **{k: [e for r in rounds for e in r[k]["atx"]] for k in paths}}
    med = {k: {p: statistics.median(e[p] for e in v) for p in (*PARTS, "epoch")}
           for k, v in epochs.items()}
    lines = md_table(
        ("path", "epoch (s)", "images/s", *PARTS, "epochs"),
        ((k, f"{m['epoch']:.2f}", f"{images / m['epoch']:,.0f}", *(f"{m[p]:.2f}" for p in PARTS),
          str(len(epochs[k]))) for k, m in med.items()),
    )
    lines.append("")
    for k in paths:
        paired = sorted(a["epoch"] / x["epoch"] for r in rounds
                        for a, x in zip(r[k]["authors"], r[k]["atx"], strict=True))
        target = 1.5 if "fast" in k else 1.0
        lines.append(f"{k} epoch vs the authors' loop: {statistics.median(paired):.2f}x faster"
                     f" (paired epoch by epoch, {len(paired)} pairs: {paired[0]:.2f}-"
                     f"{paired[-1]:.2f}; target >= {target})")
    return "\n".join(lines)
