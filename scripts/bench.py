"""Training-step throughput and memory of atx against a bare loop and the authors' step.

    .venv/bin/python scripts/bench.py            # the full run (docs/benchmarks.md)
    .venv/bin/python scripts/bench.py --quick    # seconds: tiny batches, every row, 2 probes

WRN-16-1 student, WRN-16-2 teacher, batches of 128 random 3x32x32 images, CPU. One process
times, in round-robin blocks (machine noise hits every row alike), one training step of:

* ``atx``: the real path, ``atx.module.DistillModule`` built by ``atx.build`` from the repo's
  presets (``distill=none|kd|at|at_kd|fact|grad_at``), fitted by a ``lightning.Trainer``; a
  callback times ``on_train_batch_start`` -> ``on_train_batch_end``;
* ``raw``: a bare PyTorch loop over the same modules, loss functions (``atx.losses.kd_loss``,
  ``atx.attention.at_loss``, forward hooks for the groups) and SGD: our own baseline;
* ``authors``: the step of the authors' released code (szagoruyko/attention-transfer,
  ``cifar.py``): functional WRN on a dict of tensors, their ``at``/``at_loss``/``distillation``
  from ``utils.py``, ``.item()`` of every group loss, SGD;
* ``forward``: the teacher alone under ``no_grad`` (and forward + backward to its input,
  what grad-AT needs), the lower bounds of the ratios;
* speed options of ``atx`` AT+KD: ``channels_last``, ``bf16-mixed``, a bf16 teacher under
  ``inference_mode``, ``torch.compile``, and the fastest correct ones together ("fastest" =
  ``speed=fast``: channels_last + compile + teacher inference_mode; bf16 is slower on our CPUs),
  and the fastest options over 2 DDP processes of half the threads each (``trainer=cpu_ddp``,
  the same global batch split in two; workers in subprocesses, gated block by block);
* a vision-transformer student on the ``atx`` path: ViT-Ti/4 (timm ``vit_tiny_patch16_224`` on
  32x32, 4x4 patches) from the same teacher, KD and AT+KD (AT on its 4 preset blocks, paired
  with group3 by ``distill.at.student_layers=auto``): what AT on ViT features costs.

Then the epoch rows (``benchlib.epoch_rows``): whole epochs of AT+KD on the same cached uint8
data (synthetic, CIFAR-shaped): the authors' loop re-created (per-batch crop/flip, their step,
their per-epoch test pass, their checkpoint and log line) beside real ``atx-train`` fits in
float32 and with ``speed=fast``, each epoch split into data / step / eval / logging / checkpoint.

Then fresh subprocesses ("probes") run one row each to measure what a shared process cannot:
peak memory (the RSS high-water mark, reset before the first step) and page faults per step
(``ru_minflt``) under glibc's default allocator, atx's ``mallopt`` and the ``MALLOC_*_`` env vars.
The parts live in ``scripts/benchlib``: rows and ratios, runners, workers, probes, report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# Before torch loads oneDNN: room for every row's convolution primitives (default 1024). With
# every row's model pair in one process the default LRU cache thrashes, and rows re-create
# kernels each block; a real run has one pair. Worker and probe processes inherit it.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import lightning as L
import torch
from benchlib import workers
from benchlib.epoch_rows import bench_epoch_rows, epoch_rows_table
from benchlib.probes import probe_report, probe_row, run_probe
from benchlib.report import revision, utc_now
from benchlib.results import Result, report
from benchlib.rounds import round_robin
from benchlib.rows import BY_NAME, NOISY, PROBES, QUICK_PROBES, ROWS, Row
from benchlib.steps import InProcessRunner, make_batches
from benchlib.workers import WorkerRunner, make_runner

from atx.speed import configure_allocator


class Turns:
    """A row's turns in the round-robin: its first ``warmup`` steps run and are dropped
    (compilation happens there), then ``block`` steps a turn until ``steps`` are kept."""

    def __init__(
        self, runner: InProcessRunner | WorkerRunner, steps: int, warmup: int, block: int
    ) -> None:
        self.runner, self.steps, self.warmup, self.block = runner, steps, warmup, block
        self.seen = self.kept = 0

    def __call__(self, rnd: int) -> list[float] | None:
        """The kept step times of this turn; ``None`` when done or nothing was kept."""
        if self.kept >= self.steps:
            return None
        n = self.block if self.seen >= self.warmup else self.warmup - self.seen + self.block
        times = self.runner(n)
        keep = [t for i, t in enumerate(times) if self.seen + i >= self.warmup]
        keep = keep[: self.steps - self.kept]
        self.seen += n
        self.kept += len(keep)
        return keep or None


def next_round_s(result: Result, turns: dict[str, Turns], block: int) -> float:
    """The next round's expected seconds from the kept step times (warm-up and compilation
    excluded), plus 5% for the Trainer set-up."""
    times = result.times()
    todo = [name for name, t in turns.items() if t.kept < t.steps]
    return 1.05 * sum(statistics.median(times[n]) * block for n in todo if n in times)


def run_benchmark(
    rows: Sequence[Row],
    steps: int,
    warmup: int,
    block: int,
    batch_size: int,
    budget_s: float = float("inf"),
    log: Callable[[str], None] | None = None,
) -> Result:
    """Round-robin over the rows, ``block`` steps each, until each kept ``steps`` steps or the
    next round would end past ``budget_s``; each row's first ``warmup`` steps are discarded."""
    if block < 1 or steps < 1 or warmup < 0:
        raise ValueError("need block >= 1, steps >= 1, warmup >= 0")
    batches = make_batches(4, batch_size)
    turns = {r.name: Turns(make_runner(r, batches), steps, warmup, block) for r in rows}
    result = Result(batch_size=batch_size)
    t_start = time.perf_counter()

    def rounds() -> Iterator[int]:
        for rnd in itertools.count(1):
            if all(t.kept >= steps for t in turns.values()):
                return
            elapsed = time.perf_counter() - t_start
            if rnd > 1 and elapsed + next_round_s(result, turns, block) > budget_s:
                result.stopped_early = True
                return
            yield rnd

    for rnd, blocks in round_robin(turns, rounds()):
        result.blocks += blocks
        if log:
            loads = [b.load for b in blocks if b.load is not None]
            load_s = f", other load {statistics.median(loads):.2f} cores" if loads else ""
            log(
                f"round {rnd}: {min(t.kept for t in turns.values())}/{steps} kept steps per row,"
                f" {time.perf_counter() - t_start:.0f} s{load_s}"
            )
    result.wall_s = time.perf_counter() - t_start
    for t in turns.values():
        t.runner.close()
    return result


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 4, 2 steps, 1 thread, no compiled rows, 2 probes",
    )
    p.add_argument("--steps", type=int, default=14, help="kept steps per row")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each row discarded")
    p.add_argument("--block", type=int, default=2, help="steps per row per round-robin turn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds: start no round that would end later (then report what ran)",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.2,
        help="a block is quiet when other processes used fewer cores than this",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help=f"subset of rows (default: all): {'; '.join(BY_NAME)}",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="skip the compiled rows (compile, both fastest)"
    )
    p.add_argument("--probe-steps", type=int, default=6, help="timed steps per probe")
    p.add_argument("--epochs", type=int, default=3,
                   help="epoch rows: epochs per run (each run's first is a warm-up)")
    p.add_argument("--epoch-images", type=int, default=2048, help="epoch rows: training images")
    p.add_argument("--epoch-test", type=int, default=1024, help="epoch rows: test images")
    p.add_argument("--epoch-rounds", type=int, default=3, help="epoch rows: runs of each path")
    p.add_argument("--no-epochs", action="store_true", help="skip the epoch rows")
    p.add_argument("--epochs-only", action="store_true", help="only the epoch rows")
    p.add_argument("--no-probes", action="store_true", help="skip the subprocess probes")
    p.add_argument("--probes-only", action="store_true", help="only the subprocess probes")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run one probe and print JSON
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a row's own process
    p.add_argument("--gate", help=argparse.SUPPRESS)
    p.add_argument("--n-batches", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument(
        "--allocator",
        default="mallopt",
        choices=("default", "mallopt", "env"),
        help=argparse.SUPPRESS,
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.block, args.batch_size, args.threads = 2, 1, 1, 4, 1
        args.probe_steps, args.no_compile = 2, True
        args.epochs, args.epoch_images, args.epoch_test, args.epoch_rounds = 2, 16, 8, 1
    args.device = "cpu"
    if unknown := [n for n in args.rows or [] if n not in BY_NAME]:
        p.error(f"unknown row {unknown[0]!r}; rows: {'; '.join(BY_NAME)}")
    rows = [BY_NAME[n] for n in args.rows] if args.rows else list(ROWS)
    unsplit = [r.name for r in rows if args.threads % r.processes]
    if args.rows and unsplit:
        p.error(f"row {unsplit[0]!r} needs --threads divisible by its processes")
    args.row_list = [
        r for r in rows if not (args.no_compile and r.compile) and r.name not in unsplit
    ]
    return args


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", ".*self.log.*")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    if args.worker:  # a row's own process, started by workers.WorkerRunner
        workers.serve(args)
        return 0
    if args.probe:  # a fresh process for one row, started by probes.run_probe
        configure_allocator(args.allocator == "mallopt")
        row = BY_NAME[args.probe]
        print(json.dumps(probe_row(row, args.probe_steps, args.warmup, args.batch_size)))
        return 0
    allocator = configure_allocator(True)  # as atx-train: every row of this process uses it
    print(
        f"# atx benchmark, {utc_now()}: torch"
        f" {torch.__version__}, lightning {L.__version__}, {os.cpu_count()} CPUs"
        f" ({platform.machine()}), threads {args.threads}, batch {args.batch_size};"
        f" {args.steps} kept steps per row (warm-up {args.warmup}, blocks of {args.block});"
        f" allocator {allocator}; atx {revision()}",
        flush=True,
    )
    if not (args.probes_only or args.epochs_only):
        in_process(args)
    if not (args.no_epochs or args.probes_only):
        with tempfile.TemporaryDirectory(prefix="atx-bench-epochs-") as work:
            rounds = bench_epoch_rows(args, Path(work))
        print("\n" + epoch_rows_table(rounds, args.epoch_images) + "\n", flush=True)
    if not (args.no_probes or args.epochs_only):
        names = {r.name for r in args.row_list}
        probes = {}
        for name, alloc in QUICK_PROBES if args.quick else PROBES:
            if name in names:
                probes[(name, alloc)] = run_probe(name, alloc, args)
                print(f"probe {name} ({alloc}): {probes[(name, alloc)]['ms']:.1f} ms", flush=True)
        print("\n" + probe_report(probes))
    return 0


def in_process(args: argparse.Namespace) -> None:
    """The round-robin run of every row in this process, and its report."""
    result = run_benchmark(
        args.row_list,
        args.steps,
        args.warmup,
        args.block,
        args.batch_size,
        args.budget,
        log=lambda s: print(s, flush=True),
    )
    table, noisy = report(result, args.quiet_load)
    print("\n" + table + "\n")
    loads = [b.load for b in result.blocks if b.load is not None]
    load = f"; other load median {statistics.median(loads):.2f} cores" if loads else ""
    print(
        f"in-process wall {result.wall_s:.0f} s{load}"
        + ("; stopped early at --budget" if result.stopped_early else "")
        + (
            f"; NOISY: p90/p10 > {NOISY} for some row, prefer the quiet / paired columns"
            if noisy
            else f"; spread ok (p90/p10 <= {NOISY} everywhere)"
        ),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
