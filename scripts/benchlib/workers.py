"""Rows in processes of their own: a loop row under another allocator, or an ``atx`` row fitted
by DDP over several CPU processes. The workers start once, stay alive for the whole run and
step only when told, block by block, so they take their turns in the round-robin like the
in-process rows (the load meter counts them as ours: they are this process's children)."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from atx.speed import MALLOC_ENV, configure_allocator
from benchlib.rows import BY_NAME, SCRIPT, Row
from benchlib.steps import (
    Batch,
    InProcessRunner,
    StepTimer,
    build_module,
    build_pair,
    in_process_runner,
    make_batches,
    timing_trainer,
)


class WorkerRunner:
    """A row in worker subprocesses (``bench.py --worker``): one process for a loop row with
    its own allocator, or ``row.processes`` DDP ranks (gloo), each with
    ``threads // processes`` threads and its slice of the same global batches (one long
    epoch). Named pipes gate them without polling: before each block every rank blocks on
    reading its step count from ``ctl-<rank>``, and rank 0 writes the block's step times
    (``on_train_batch_start`` -> ``on_train_batch_end``, the gradient all-reduce included) as
    a JSON line to ``times``."""

    def __init__(self, row: Row, batches: list[Batch], threads: int) -> None:
        if threads % row.processes:
            raise SystemExit(
                f"{row.name}: --threads {threads} does not split over {row.processes} processes"
            )
        self.gate = Path(tempfile.mkdtemp(prefix="atx-bench-worker-"))
        for name in (*(f"ctl-{r}" for r in range(row.processes)), "times"):
            os.mkfifo(self.gate / name)
        # O_RDWR: opening a FIFO so never blocks, and the pipes stay open whoever comes first
        self.ctl = [os.open(self.gate / f"ctl-{r}", os.O_RDWR) for r in range(row.processes)]
        self.times = os.fdopen(os.open(self.gate / "times", os.O_RDWR), "r")
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env |= {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(row.processes),
            "NODE_RANK": "0",
        }
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--worker",
            row.name,
            "--gate",
            str(self.gate),
            "--threads",
            str(threads // row.processes),
            "--batch-size",
            str(batches[0][0].shape[0]),
            "--n-batches",
            str(len(batches)),
        ]
        self.procs = []
        for rank in range(row.processes):
            log = open(self.gate / f"rank{rank}.log", "w")  # noqa: SIM115 (closed by the OS)
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        atexit.register(self.close)
        # start-up (imports, process group) before other rows run, so it is no row's load
        self._wait(lambda: all((self.gate / f"ready-{r}").exists() for r in range(row.processes)))

    def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if any(p.poll() is not None for p in self.procs):
                log = (self.gate / "rank0.log").read_text()[-3000:]
                raise RuntimeError(f"a bench worker of this row died:\n{log}")
            select.select([self.times], [], [], 0.5)

    def __call__(self, steps: int) -> list[float]:
        for fd in self.ctl:
            os.write(fd, f"{steps}\n".encode())
        self._wait(lambda: bool(select.select([self.times], [], [], 0)[0]))
        return json.loads(self.times.readline())

    def close(self) -> None:
        for fd in self.ctl:
            os.write(fd, b"0\n")  # the workers exit
            os.close(fd)
        self.ctl = []
        self.times.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        shutil.rmtree(self.gate, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runner(
    row: Row, batches: list[Batch], threads: int | None = None
) -> InProcessRunner | WorkerRunner:
    """A runner with its own student and teacher, built from the same seed for every row."""
    if row.own_process:
        return WorkerRunner(row, batches, threads or torch.get_num_threads())
    return in_process_runner(row, batches)


# -- the worker's side -------------------------------------------------------------------------
class WorkerGate:
    """A worker's end of a ``WorkerRunner``'s pipes: step counts in, rank 0's step times out."""

    def __init__(self, gate: Path, rank: int) -> None:
        self.gate, self.rank = gate, rank
        self.ctl = open(gate / f"ctl-{rank}")  # noqa: SIM115 (the process's lifetime)
        self.out = open(gate / "times", "w") if rank == 0 else None  # noqa: SIM115

    def ready(self) -> None:
        """Set up: the parent may go on with the other rows."""
        (self.gate / f"ready-{self.rank}").touch()

    def next_block(self) -> int:
        """Block until the parent sends the next block's step count (0: stop; "" = it is gone)."""
        return int(self.ctl.readline() or 0)

    def report(self, times: list[float]) -> None:
        if self.out is not None:
            self.out.write(json.dumps(times) + "\n")
            self.out.flush()


class GatedTimer(StepTimer):
    """In a DDP worker: wait for each block's step count before its first step, report the
    block's step times after its last; a block of 0 steps ends the process."""

    def __init__(self, gate: WorkerGate) -> None:
        super().__init__()
        self.gate, self.left = gate, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.gate.ready()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.left == 0:
            self.left = self.gate.next_block()
            if self.left == 0:
                os._exit(0)  # every rank reads its own 0: none waits for another
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.left -= 1
        if self.left == 0:
            self.gate.report(self.times)
            self.times = []


class Forever(IterableDataset):
    """This rank's slice of each global batch, cycled without end."""

    def __init__(self, batches: list[Batch], rank: int, world: int) -> None:
        n = batches[0][0].shape[0] // world
        self.batches = [
            (x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]) for x, y in batches
        ]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self.batches


def serve(args: argparse.Namespace) -> None:
    """A ``WorkerRunner``'s process (``bench.py --worker``): a loop row serving blocks, or one
    DDP rank."""
    row = BY_NAME[args.worker]
    configure_allocator(row.allocator == "mallopt")
    rank = int(os.environ.get("RANK", 0))
    gate = WorkerGate(Path(args.gate), rank)
    if row.processes == 1:
        runner = in_process_runner(row, make_batches(args.n_batches, args.batch_size))
        gate.ready()
        while (steps := gate.next_block()) > 0:
            gate.report(runner(steps))
        return
    ddp_rank(row, args, gate)


def ddp_rank(row: Row, args: argparse.Namespace, gate: WorkerGate) -> None:
    """One rank of a DDP row (started with the torch.distributed env vars set, so Lightning
    joins them instead of launching processes)."""
    module = build_module(row, *build_pair(row))
    world = int(os.environ["WORLD_SIZE"])
    data = Forever(make_batches(args.n_batches, args.batch_size), gate.rank, world)
    trainer = timing_trainer(row.precision, [GatedTimer(gate)], devices=world, strategy="ddp",
                             use_distributed_sampler=False)
    trainer.fit(module, DataLoader(data, batch_size=None))
