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

A step is student forward + teacher forward (no_grad) + objective + backward + SGD step (lr 0.1,
momentum 0.9, wd 5e-4). Two paths time it:

* ``trainer``: a real ``lightning.Trainer`` fits the module on pre-generated batches; a Callback
  times ``on_train_batch_start`` -> ``on_train_batch_end`` (what Lightning runs per step,
  ``self.log`` included). The Trainer is re-created for each block of steps.
* ``manual``: ``module.training_step`` + ``loss.backward()`` + ``opt.step()`` +
  ``opt.zero_grad(set_to_none=True)`` in a plain loop (``self.log`` returns at once here).

Configurations are interleaved in round-robin blocks of steps, so machine noise hits all of them
alike; each runner's first ``--warmup`` steps are discarded. Ratios compare a distillation step
with its lower bound, student step + teacher forward.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import subprocess
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
from atx.gradient_attention import input_gradient
from atx.models import build_model
from atx.module import DistillModule, freeze

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TEACHER = "teacher forward"
TEACHER_GRAD = "teacher fwd+bwd"  # teacher forward + backward to its input (what grad-AT needs)
STUDENT = "student"
# benchmark name -> conf/distill preset
DISTILL = {STUDENT: "none", "KD": "kd", "AT": "at", "AT+KD": "at_kd", "F-ActT": "fact",
           "grad-AT": "grad_at", "symmetry": "symmetry", "min-l2": "min_l2"}  # fmt: skip
CONFIGS = (TEACHER, TEACHER_GRAD, *DISTILL)
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
    uses_teacher = build.needs_teacher(cfg.distill, plan)
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
    """``training_step`` + backward + SGD step + ``zero_grad`` in a plain loop. Without a
    Trainer, ``self.log`` returns at once (with a warning, silenced here)."""

    def __init__(self, module: DistillModule, batches: Sequence[Batch]) -> None:
        self.module, self.batches = module, list(batches)
        self.module.train()
        self.opt = module.configure_optimizers()["optimizer"]
        self.i = 0

    def __call__(self, steps: int) -> list[float]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            return self._run(steps)

    def _run(self, steps: int) -> list[float]:
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
    """The teacher alone: eval mode, ``torch.no_grad()``; with ``input_grad``, forward and
    backward to the input instead (J_t of grad-AT, Eq. 3)."""

    def __init__(self, teacher: nn.Module, batches: Sequence[Batch], input_grad: bool = False):
        self.teacher, self.batches = freeze(teacher), list(batches)
        self.input_grad = input_grad
        self.i = 0

    def __call__(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            t0 = time.perf_counter()
            if self.input_grad:
                x = x.detach().requires_grad_(True)
                input_gradient(self.teacher(x), y, x)
            else:
                with torch.no_grad():
                    self.teacher(x)
            times.append(time.perf_counter() - t0)
            self.i += 1
        return times


# -- machine load ------------------------------------------------------------------------------
class LoadProbe:
    """CPU time other processes used while a block ran, in cores (0 = we had the machine).

    Busy + steal time of the whole machine (``/proc/stat``) minus this process's CPU time,
    over the wall time. ``None`` where ``/proc/stat`` is unreadable.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, float, float] | None = None

    def _machine_busy_s(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        return (sum(fields[:8]) - fields[3] - fields[4]) / self.tick

    def start(self) -> None:
        t = os.times()
        busy = self._machine_busy_s()
        self._start = None if busy is None else (time.perf_counter(), busy, t.user + t.system)

    def stop(self) -> float | None:
        busy = self._machine_busy_s()
        if self._start is None or busy is None:
            return None
        t = os.times()
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        foreign = (busy - busy0) - (t.user + t.system - own0)
        return max(foreign, 0.0) / wall if wall > 0 else None


# -- the benchmark ----------------------------------------------------------------------------
@dataclass
class Block:
    """One block of one runner: its kept step times (seconds) and the machine's other load."""

    config: str
    path: str
    round: int
    times: list[float]
    load: float | None  # cores used by other processes meanwhile


@dataclass
class Result:
    blocks: list[Block] = field(default_factory=list)
    batch_size: int = 128
    threads: int = 2
    wall_s: float = 0.0
    stopped_early: bool = False

    def times(self, quiet: float | None = None) -> dict[tuple[str, str], list[float]]:
        """Kept step times per (config, path); ``quiet``: only blocks with load below it."""
        out: dict[tuple[str, str], list[float]] = {}
        for b in self.blocks:
            if quiet is None or (b.load is not None and b.load < quiet):
                out.setdefault((b.config, b.path), []).extend(b.times)
        return out


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
        if name in (TEACHER, TEACHER_GRAD):
            runners[(name, "forward")] = TeacherForward(
                copy.deepcopy(teacher), batches, input_grad=name == TEACHER_GRAD
            )
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
    steps: int = 42,
    warmup: int = 3,
    block: int = 3,
    batch_size: int = 128,
    threads: int = 2,
    budget_s: float = float("inf"),
    log: Callable[[str], None] | None = None,
) -> Result:
    """Round-robin over all runners, ``block`` steps each, until each kept ``steps`` steps or
    the next round would end past ``budget_s``; each runner's first ``warmup`` steps are
    discarded. (The first step of a block, a fresh Trainer's first or the first after another
    model ran, measured within 2% of the block's other steps here, so it is kept.)"""
    if block < 1 or steps < 1 or warmup < 0:
        raise ValueError("need block >= 1, steps >= 1, warmup >= 0")
    torch.set_num_threads(threads)
    runners = make_runners(configs, paths, batch_size)
    result = Result(batch_size=batch_size, threads=threads)
    kept = dict.fromkeys(runners, 0)
    seen = dict.fromkeys(runners, 0)
    probe = LoadProbe()
    t_start = time.perf_counter()
    last_round = 0.0
    rnd = 0
    while any(n < steps for n in kept.values()):
        elapsed = time.perf_counter() - t_start
        if rnd > 0 and elapsed + last_round > budget_s and min(kept.values()) > 0:
            result.stopped_early = True
            break
        rnd += 1
        for key, runner in runners.items():
            if kept[key] >= steps:
                continue
            probe.start()
            times = runner(block)
            load = probe.stop()
            keep = []
            for t in times:
                if seen[key] >= warmup and kept[key] + len(keep) < steps:
                    keep.append(t)
                seen[key] += 1
            kept[key] += len(keep)
            if keep:
                result.blocks.append(Block(key[0], key[1], rnd, keep, load))
        last_round = time.perf_counter() - t_start - elapsed
        if log:
            loads = [b.load for b in result.blocks if b.round == rnd and b.load is not None]
            load_s = f", other load {statistics.median(loads):.2f} cores" if loads else ""
            log(
                f"round {rnd}: {min(kept.values())}/{steps} kept steps per runner,"
                f" {time.perf_counter() - t_start:.0f} s{load_s}"
            )
    result.wall_s = time.perf_counter() - t_start
    return result


# -- statistics and the report -------------------------------------------------------------
def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, q in [0, 1]."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median, p10, p90 (ms), images/s at the median, p90/p10 and the step count."""
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


RATIOS = (
    ("AT", (STUDENT, TEACHER)),
    ("KD", (STUDENT, TEACHER)),
    ("AT+KD", (STUDENT, TEACHER)),
    ("F-ActT", (STUDENT, TEACHER)),
    ("AT", ("KD",)),
    ("grad-AT", (STUDENT, TEACHER_GRAD)),
    ("symmetry", (STUDENT,)),
    ("min-l2", (STUDENT,)),
)


def ratios(med: dict[str, float]) -> dict[str, float]:
    """``AT / (student + teacher forward)`` etc., and ``AT / KD``, from per-config times."""
    out = {}
    for num, den in RATIOS:
        if num in med and all(d in med for d in den):
            out[f"{num} / ({' + '.join(den)})" if len(den) > 1 else f"{num} / {den[0]}"] = med[
                num
            ] / sum(med[d] for d in den)
    return out


def path_medians(times: dict[tuple[str, str], list[float]], path: str) -> dict[str, float]:
    """Median step time per config of ``path``, plus the teacher forward."""
    return {c: statistics.median(t) for (c, p), t in times.items() if p == path or p == "forward"}


def paired_ratios(result: Result, path: str, quiet: float | None = None) -> dict[str, list[float]]:
    """Each ratio computed within every round (block medians), so slow drifts of the machine's
    load cancel; returns the per-round values. ``quiet``: skip rounds in which any block ran
    while other processes used ``quiet`` cores or more."""
    out: dict[str, list[float]] = {}
    for rnd in sorted({b.round for b in result.blocks}):
        blocks = [
            b for b in result.blocks if b.round == rnd and (b.path == path or b.path == "forward")
        ]
        if quiet is not None and any(b.load is not None and b.load >= quiet for b in blocks):
            continue
        med = {b.config: statistics.median(b.times) for b in blocks}
        for k, v in ratios(med).items():
            out.setdefault(k, []).append(v)
    return out


def spread_text(xs: Sequence[float]) -> str:
    """``median (p10-p90, n)`` of ``xs``, or ``-``."""
    if not xs:
        return "-"
    return (
        f"{statistics.median(xs):.3f} ({quantile(xs, 0.1):.3f}-{quantile(xs, 0.9):.3f}, {len(xs)})"
    )


def report(result: Result, quiet_load: float = 0.2, min_quiet: int = 8) -> tuple[str, bool]:
    """Markdown: per-config step times, then per path the ratios from medians of all steps,
    from quiet blocks only (other load < ``quiet_load`` cores) and paired per quiet round.
    Second value: the run is noisy (p90/p10 > NOISY for any config)."""
    all_times = result.times()
    quiet_times = result.times(quiet_load)
    lines = [
        "| config | path | median ms/step | p10-p90 ms | p90/p10 | images/s | steps"
        " | quiet median ms (steps) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    noisy = False
    for (name, path), times in all_times.items():
        s = summarize(times, result.batch_size)
        noisy |= s["spread"] > NOISY
        q = quiet_times.get((name, path), [])
        q_s = f"{statistics.median(q) * 1e3:.1f} ({len(q)})" if q else "- (0)"
        lines.append(
            f"| {name} | {path} | {s['median_ms']:.1f} | {s['p10_ms']:.1f}-"
            f"{s['p90_ms']:.1f} | {s['spread']:.2f} | {s['img_s']:.0f} | {s['n']}"
            f" | {q_s} |"
        )
    for path in PATHS:
        r_all = ratios(path_medians(all_times, path))
        if not r_all:
            continue
        enough = all(
            len(quiet_times.get(k, [])) >= min_quiet for k in all_times if k[1] in (path, "forward")
        )
        r_quiet = ratios(path_medians(quiet_times, path)) if enough else {}
        paired = paired_ratios(result, path, quiet_load)
        lines += [
            "",
            f"| ratio, {path} path | medians, all steps | medians, quiet blocks"
            " | paired per quiet round: median (p10-p90, rounds) |",
            "|---|---:|---:|---:|",
        ]
        for k, v in r_all.items():
            q = f"{r_quiet[k]:.3f}" if k in r_quiet else "-"
            lines.append(f"| {k} | {v:.3f} | {q} | {spread_text(paired.get(k, []))} |")
    return "\n".join(lines), noisy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=42, help="kept steps per config and path")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each runner discarded")
    p.add_argument("--block", type=int, default=3, help="steps per runner per round-robin turn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--budget",
        type=float,
        default=320.0,
        help="seconds: start no round that would end later (then report what ran)",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.2,
        help="a block is quiet when other processes used fewer cores than this",
    )
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


def source_revision() -> str:
    """``git describe --always --dirty`` of the checkout, or ``?``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(CONF_DIR.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    print(
        f"# atx step benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}: torch"
        f" {torch.__version__}, lightning {L.__version__}, {os.cpu_count()} CPUs"
        f" ({platform.machine()}), threads {args.threads}, batch {args.batch_size}, float32;"
        f" {args.steps} kept steps per runner (warm-up {args.warmup}, blocks of {args.block}),"
        f" paths {'+'.join(args.paths)}; atx {source_revision()}",
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
        args.budget,
        log=lambda s: print(s, flush=True),
    )
    table, noisy = report(result, args.quiet_load)
    print()
    print(table)
    print()
    loads = [b.load for b in result.blocks if b.load is not None]
    load = f"; other load median {statistics.median(loads):.2f} cores" if loads else ""
    print(
        f"wall {result.wall_s:.0f} s{load}"
        + ("; stopped early at --budget" if result.stopped_early else "")
        + (
            f"; NOISY: p90/p10 > {NOISY} for some config, prefer the quiet / paired columns"
            if noisy
            else f"; spread ok (p90/p10 <= {NOISY} everywhere)"
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
