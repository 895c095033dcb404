"""Training-step throughput of the real atx path: WRN-16-1 student, WRN-16-2 teacher.

    .venv/bin/python scripts/bench_step.py                      # Trainer and manual loop
    .venv/bin/python scripts/bench_step.py --trainer --steps 40 # Trainer path only

Times, in one process, one training step of ``atx.module.DistillModule`` for each objective
(built from the repo's Hydra presets by ``atx.build``, exactly as ``atx-train`` builds it):

* ``teacher forward``: the teacher alone, eval mode, under ``torch.no_grad()``;
* ``student``: distill=none (CE only), no teacher;
* ``KD`` (alpha 0.9, T 4), ``AT`` (beta 1e3, F^2_sum, group1..group3 of both),
  ``AT+KD``, ``F-ActT`` (1x1 conv adapters, the teacher is twice as wide): distill=kd, at,
  at_kd, fact.

A step is teacher forward (no_grad) + student forward + objective + backward + SGD step (lr 0.1,
momentum 0.9, wd 5e-4). Two paths time it:

* ``trainer``: a real ``lightning.Trainer`` fits the module on pre-generated batches; a Callback
  times ``on_train_batch_start`` -> ``on_train_batch_end`` (what Lightning runs per step,
  ``self.log`` included). The Trainer is re-created for each block of steps.
* ``manual``: ``module.training_step`` + ``loss.backward()`` + ``opt.step()`` +
  ``opt.zero_grad(set_to_none=True)`` in a plain loop (``self.log`` returns at once here).

Configurations are interleaved in round-robin blocks of steps, so machine noise hits all of them
alike; each runner's first ``--warmup`` steps and the first step of every block are discarded.
Ratios compare a distillation step with its lower bound, student step + teacher forward.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from atx import build
from atx.config import OptimConf, register
from atx.models import build_model
from atx.module import DistillModule, freeze

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TEACHER = "teacher forward"
STUDENT = "student"
# benchmark name -> conf/distill preset
DISTILL = {STUDENT: "none", "KD": "kd", "AT": "at", "AT+KD": "at_kd", "F-ActT": "fact"}
CONFIGS = (TEACHER, *DISTILL)
PATHS = ("trainer", "manual")
NOISY = 1.3  # p90 / p10 above this flags the run as noisy

Batch = tuple[Tensor, Tensor]


# -- building the modules -------------------------------------------------------------------
def compose_distill(preset: str, model: str = "wrn_16_1", teacher: str = "wrn_16_2"):
    """The composed train config for ``distill=<preset>`` (what ``atx-train`` would see)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"model={model}",
                f"teacher={teacher}",
                f"distill={preset}",
                "data=cifar10",
                "logger=csv",
            ],
        )


def build_module(
    preset: str,
    student: nn.Module,
    teacher: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
) -> DistillModule:
    """DistillModule for one distill preset, built like ``atx.train.train`` builds it
    (teacher weights are random: the checkpoint changes no timing)."""
    cfg = compose_distill(preset)
    plan = build.plan_layers(cfg)
    uses_teacher = cfg.distill.kd.alpha > 0 or bool(plan.at or plan.fact)
    fact_channels: list[tuple[int, int]] = []
    if plan.student_layers:
        s_shapes = build.probe_shapes(student, plan.student_layers, image_shape, "student")
        t_shapes = build.probe_shapes(teacher, plan.teacher_layers, image_shape, "teacher")
        fact_channels = build.check_pair_shapes(
            plan, s_shapes, t_shapes, cfg.distill.at.interpolate
        )
    objective = build.build_objective(cfg.distill, plan, fact_channels, max_epochs=1)
    return DistillModule(
        student,
        objective,
        num_classes,
        OptimConf(),
        teacher if uses_teacher else None,
        plan.student_layers,
        plan.teacher_layers,
    )


def make_batches(n: int, batch_size: int, num_classes: int = 10, seed: int = 0) -> list[Batch]:
    """``n`` distinct random CIFAR-shaped float32 batches."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=g),
            torch.randint(0, num_classes, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


# -- runners: each times `steps` steps and returns seconds per step -----------------------
class StepTimer(Callback):
    """Seconds from ``on_train_batch_start`` to ``on_train_batch_end`` of every step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None and teacher.training:
            raise RuntimeError("the teacher left eval mode during fit")


class TrainerRunner:
    """Fit ``module`` with a fresh ``lightning.Trainer`` for each block of ``steps`` steps."""

    def __init__(self, module: DistillModule, batches: Sequence[Batch]) -> None:
        self.module, self.batches = module, list(batches)

    def __call__(self, steps: int) -> list[float]:
        timer = StepTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        data = [self.batches[i % len(self.batches)] for i in range(steps)]
        trainer.fit(self.module, DataLoader(data, batch_size=None, shuffle=False))
        if len(timer.times) != steps:
            raise RuntimeError(f"Trainer ran {len(timer.times)} steps, expected {steps}")
        return timer.times


class ManualRunner:
    """``training_step`` + backward + SGD step + ``zero_grad`` in a plain loop."""

    def __init__(self, module: DistillModule, batches: Sequence[Batch]) -> None:
        self.module, self.batches = module, list(batches)
        self.module.train()
        self.opt = module.configure_optimizers()["optimizer"]
        self.i = 0

    def __call__(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            t0 = time.perf_counter()
            loss = self.module.training_step(batch, self.i)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            self.i += 1
        return times


class TeacherForward:
    """The teacher alone: eval mode, ``torch.no_grad()``."""

    def __init__(self, teacher: nn.Module, batches: Sequence[Batch]) -> None:
        self.teacher, self.batches = freeze(teacher), list(batches)
        self.i = 0

    def __call__(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            x = self.batches[self.i % len(self.batches)][0]
            t0 = time.perf_counter()
            with torch.no_grad():
                self.teacher(x)
            times.append(time.perf_counter() - t0)
            self.i += 1
        return times


# -- the benchmark ----------------------------------------------------------------------------
@dataclass
class Result:
    """Kept step times (seconds) per (config, path)."""

    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    batch_size: int = 128
    threads: int = 2
    wall_s: float = 0.0


def make_runners(
    configs: Sequence[str], paths: Sequence[str], batch_size: int, n_batches: int = 4
) -> dict[tuple[str, str], Callable[[int], list[float]]]:
    """One runner per (config, path); every module has its own student and teacher copies
    (same initial weights), so no hook or optimiser state is shared."""
    torch.manual_seed(0)
    student = build_model("wrn", depth=16, width=1, num_classes=10)
    teacher = freeze(build_model("wrn", depth=16, width=2, num_classes=10))
    batches = make_batches(n_batches, batch_size)
    runners: dict[tuple[str, str], Callable[[int], list[float]]] = {}
    for name in configs:
        if name == TEACHER:
            runners[(name, "manual")] = TeacherForward(copy.deepcopy(teacher), batches)
            continue
        for path in paths:
            module = build_module(
                DISTILL[name], copy.deepcopy(student), copy.deepcopy(teacher), 10, (3, 32, 32)
            )
            runner = TrainerRunner if path == "trainer" else ManualRunner
            runners[(name, path)] = runner(module, batches)
    return runners


def run_benchmark(
    configs: Sequence[str] = CONFIGS,
    paths: Sequence[str] = PATHS,
    steps: int = 40,
    warmup: int = 3,
    block: int = 5,
    batch_size: int = 128,
    threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> Result:
    """Round-robin over all runners, ``block`` steps at a time, until each has ``steps`` kept
    steps. Discarded: each runner's first ``warmup`` steps and the first step of every block
    (a new Trainer's first step, or the first after another model ran)."""
    if block < 2:
        raise ValueError("--block must be >= 2 (the first step of each block is discarded)")
    torch.set_num_threads(threads)
    runners = make_runners(configs, paths, batch_size)
    kept: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    seen = dict.fromkeys(runners, 0)
    t_start = time.perf_counter()
    rnd = 0
    while any(len(v) < steps for v in kept.values()):
        rnd += 1
        for key, runner in runners.items():
            if len(kept[key]) >= steps:
                continue
            times = runner(block)
            for t in times[1:]:
                if seen[key] >= warmup and len(kept[key]) < steps:
                    kept[key].append(t)
                seen[key] += 1
            seen[key] += 1
        if log:
            done = min(len(v) for v in kept.values())
            log(
                f"round {rnd}: {done}/{steps} kept steps per config,"
                f" {time.perf_counter() - t_start:.0f} s"
            )
    return Result(kept, batch_size, threads, time.perf_counter() - t_start)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: Sequence[float], batch_size: int) -> dict[str, float]:
    med = statistics.median(times)
    p10, p90 = quantile(times, 0.1), quantile(times, 0.9)
    return {
        "median_ms": med * 1e3,
        "p10_ms": p10 * 1e3,
        "p90_ms": p90 * 1e3,
        "img_s": batch_size / med,
        "spread": p90 / p10,
        "n": len(times),
    }


def ratios(med: dict[str, float]) -> dict[str, float]:
    """Distillation step / (student step + teacher forward), and AT / KD."""
    out: dict[str, float] = {}
    if STUDENT in med and TEACHER in med:
        base = med[STUDENT] + med[TEACHER]
        for name in ("KD", "AT", "AT+KD", "F-ActT"):
            if name in med:
                out[f"{name} / (student + teacher forward)"] = med[name] / base
    if "AT" in med and "KD" in med:
        out["AT / KD"] = med["AT"] / med["KD"]
    return out


def report(result: Result) -> tuple[str, bool]:
    """The markdown tables, and whether the run was noisy (p90/p10 > NOISY anywhere)."""
    lines = [
        "| config | path | median ms/step | p10-p90 ms | p90/p10 | images/s | steps |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    noisy = False
    meds: dict[str, dict[str, float]] = {}
    for (name, path), times in result.times.items():
        s = summarize(times, result.batch_size)
        noisy |= s["spread"] > NOISY
        label = "no_grad forward" if name == TEACHER else path
        lines.append(
            f"| {name} | {label} | {s['median_ms']:.1f} | {s['p10_ms']:.1f}-"
            f"{s['p90_ms']:.1f} | {s['spread']:.2f} | {s['img_s']:.0f} | {s['n']} |"
        )
        meds.setdefault(path, {})[name] = s["median_ms"]
    for path in PATHS:
        if path not in meds:
            continue
        r = ratios({**meds.get("manual", {}), **meds[path]} if path == "trainer" else meds[path])
        if not r:
            continue
        lines += ["", f"| ratio ({path} path) | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r.items()]
    return "\n".join(lines), noisy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40, help="kept steps per config and path")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each runner discarded")
    p.add_argument(
        "--block",
        type=int,
        default=5,
        help="steps per round-robin block (its first step is discarded)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=CONFIGS,
        metavar="CONFIG",
        help=f"subset of: {', '.join(CONFIGS)}",
    )
    p.add_argument("--trainer", action="store_true", help="time the lightning.Trainer path")
    p.add_argument("--manual", action="store_true", help="time the manual loop")
    args = p.parse_args(argv)
    chosen = [path for path in PATHS if getattr(args, path)]
    args.paths = chosen or list(PATHS)  # neither flag: both
    return args


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    print(
        f"# atx step benchmark {datetime.datetime.now():%Y-%m-%d %H:%M}: torch"
        f" {torch.__version__}, lightning {L.__version__}, {platform.processor() or '?'},"
        f" threads {args.threads}, batch {args.batch_size}, float32 CPU; {args.steps} kept steps"
        f" per config (warm-up {args.warmup}, blocks of {args.block}), paths"
        f" {'+'.join(args.paths)}",
        flush=True,
    )
    result = run_benchmark(
        args.configs,
        args.paths,
        args.steps,
        args.warmup,
        args.block,
        args.batch_size,
        args.threads,
        log=lambda s: print(s, flush=True),
    )
    table, noisy = report(result)
    print()
    print(table)
    print()
    print(
        f"wall {result.wall_s:.0f} s;"
        + (
            f" NOISY: p90/p10 > {NOISY} for some config, rerun on a quieter machine"
            if noisy
            else f" spread ok (p90/p10 <= {NOISY} everywhere)"
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
