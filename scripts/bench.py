"""Training-step throughput and memory of atx against a bare loop and the authors' step.

    .venv/bin/python scripts/bench.py            # the full run (<= 8 min on a quiet 2-core box)
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
  the same global batch split in two; workers in subprocesses, gated block by block).

Then fresh subprocesses ("probes") run one row each to measure what a shared process cannot:
peak memory (the RSS high-water mark, reset before the first step) and page faults per step
(``ru_minflt``) under glibc's default allocator, atx's ``mallopt`` and the ``MALLOC_*_`` env vars.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import json
import logging
import os
import platform
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

# Before torch loads oneDNN: room for every row's convolution primitives (default 1024). With ~20
# model pairs in one process the default LRU cache thrashes, and rows re-create kernels each
# block; a real run has one pair. Worker and probe processes inherit it.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from atx import build
from atx.attention import at_loss
from atx.config import register
from atx.gradient_attention import input_gradient
from atx.losses import kd_loss
from atx.models import build_model
from atx.module import DistillModule, freeze
from atx.optim import OptimConf
from atx.speed import MALLOC_ENV, SpeedConf, configure_allocator

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DISTILL = {
    "student": "none",
    "KD": "kd",
    "AT": "at",
    "AT+KD": "at_kd",
    "F-ActT": "fact",
    "grad-AT": "grad_at",
    "symmetry": "symmetry",
    "min-l2": "min_l2",
}
NOISY = 1.3  # p90 / p10 above this flags a row as noisy
GROUPS = ("group1", "group2", "group3")
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Row:
    """One timed configuration: a method on a path, with speed options."""

    method: str  # student | KD | AT | AT+KD | F-ActT | grad-AT | ... | teacher forward | ...
    path: str  # atx | raw | authors | forward
    options: str = ""  # label of the speed options ("" = float32, NCHW, eager)
    channels_last: bool = False
    precision: str = "32-true"  # the Trainer's precision (raw: bf16 autocast when bf16-mixed)
    teacher_precision: str = "same"
    inference_mode: bool = False
    compile: bool = False
    processes: int = 1  # > 1: DDP over that many CPU processes (gloo), threads split evenly
    allocator: str = "mallopt"  # "default": glibc as shipped, in a process of its own

    @property
    def own_process(self) -> bool:
        """Runs in worker subprocesses (``WorkerRunner``), not in the benchmark's process."""
        return self.processes > 1 or self.allocator != "mallopt"

    @property
    def name(self) -> str:
        if self.path == "forward":
            return self.method
        return f"{self.method} {self.path}" + (f" {self.options}" if self.options else "")

    @property
    def speed(self) -> SpeedConf:
        return SpeedConf(
            channels_last=self.channels_last,
            compile=self.compile,
            teacher_precision=self.teacher_precision,
            teacher_inference_mode=self.inference_mode,
        )


TEACHER = Row("teacher forward", "forward")
TEACHER_GRAD = Row("teacher fwd+bwd", "forward")
ATKD = Row("AT+KD", "atx")
# the fastest correct options on our 2-core CPUs (bf16 is slower than float32 there, see
# docs/benchmarks.md); on a GPU also try precision="bf16-mixed" / "16-mixed"
FASTEST = dict(channels_last=True, inference_mode=True, compile=True)
ROWS = (
    TEACHER,
    TEACHER_GRAD,
    *(Row(m, "atx") for m in ("student", "KD", "AT", "AT+KD", "F-ActT", "grad-AT")),
    *(Row(m, "raw") for m in ("student", "KD", "AT", "AT+KD")),
    *(Row(m, "authors") for m in ("student", "KD", "AT", "AT+KD")),
    # the authors' step as they ship it: glibc's default allocator (a process of its own)
    Row("AT+KD", "authors", "glibc malloc", allocator="default"),
    replace(ATKD, options="channels_last", channels_last=True),
    replace(ATKD, options="bf16-mixed", precision="bf16-mixed"),
    replace(ATKD, options="teacher bf16+inference", teacher_precision="bf16", inference_mode=True),
    replace(ATKD, options="compile", compile=True),
    replace(ATKD, options="fastest", **FASTEST),
    Row("AT+KD", "raw", "fastest", channels_last=True, compile=True),  # no_grad teacher
    # the same global batch over 2 DDP processes of half the threads each (BN statistics per
    # process: 64 images each at batch 128, as any DDP run without SyncBatchNorm)
    replace(ATKD, options="fastest, ddp 2 processes", processes=2, **FASTEST),
)
EXTRA_ROWS = (
    Row("symmetry", "atx"),  # by --rows only: slow steps
    Row("min-l2", "atx"),
    replace(ATKD, options="ddp 2 processes", processes=2),  # the test's DDP row: no compile
)
BY_NAME = {r.name: r for r in (*ROWS, *EXTRA_ROWS)}
# probes: (row, allocator) in fresh processes; "default" = glibc as shipped (ATX_MALLOC=0)
PROBES = (
    (TEACHER.name, "default"),
    (TEACHER.name, "mallopt"),
    (TEACHER.name, "env"),
    ("student atx", "mallopt"),
    ("AT atx", "mallopt"),
    ("AT+KD atx", "default"),
    ("AT+KD atx", "mallopt"),
    ("AT+KD authors", "default"),
)
QUICK_PROBES = ((TEACHER.name, "default"), (TEACHER.name, "mallopt"))


# -- building the atx modules ------------------------------------------------------------------
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


def build_module(row: Row, student: nn.Module, teacher: nn.Module) -> DistillModule:
    """DistillModule for one row, built by atx's own builder (the teacher's weights are
    random: the checkpoint changes no timing)."""
    cfg = compose_distill(DISTILL[row.method])
    cfg.speed = OmegaConf.structured(row.speed)
    shape = SimpleNamespace(num_classes=10, in_channels=3, image_size=32)
    uses_teacher = build.needs_teacher(cfg.distill)
    module, _ = build.build_module(cfg, student, teacher if uses_teacher else None, shape,
                                   load_teacher_weights=False)
    return module


def make_batches(n: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """``n`` distinct random CIFAR-shaped float32 batches."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


# -- runners: each call times `steps` steps and returns seconds per step -----------------------
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


class InProcessRunner:
    """A row run in the benchmark's own process: its CPU time is the process's, and there is
    nothing to shut down (``WorkerRunner`` has the same two methods for its subprocesses)."""

    def cpu_s(self) -> float:
        """CPU seconds of helper processes: none."""
        return 0.0

    def close(self) -> None:
        """Nothing to release."""


class AtxRunner(InProcessRunner):
    """Fit the module with a fresh ``lightning.Trainer`` for each block of steps."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        self.module, self.batches, self.precision = (
            build_module(row, student, teacher),
            batches,
            row.precision,
        )

    def __call__(self, steps: int) -> list[float]:
        timer = StepTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=self.precision,
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


class LoopRunner(InProcessRunner):
    """Base of the bare loops: one ``step(x, y)`` per batch, timed end to end."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.i = batches, 0

    def step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def __call__(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            t0 = time.perf_counter()
            self.step(x, y)
            times.append(time.perf_counter() - t0)
            self.i += 1
        return times


def sgd(params) -> torch.optim.SGD:
    o = OptimConf()
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class RawRunner(LoopRunner):
    """Bare PyTorch: the same nn.Modules and loss functions as atx, hooks on the groups, SGD;
    CE + alpha KD (0.9, T 4) + beta/2-free code-reduction AT (beta 1e3), as the presets."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        super().__init__(batches)
        fmt = torch.channels_last if row.channels_last else torch.contiguous_format
        self.student, self.teacher = (
            student.to(memory_format=fmt),
            freeze(teacher).to(memory_format=fmt),
        )
        self.student.train()
        if row.compile:
            self.student.compile()
            self.teacher.compile()
        self.kd, self.at = row.method in ("KD", "AT+KD"), row.method in ("AT", "AT+KD")
        self.channels_last, self.bf16 = row.channels_last, row.precision == "bf16-mixed"
        self.feats: dict[tuple[str, str], Tensor] = {}
        if self.at:
            for who, net in (("s", self.student), ("t", self.teacher)):
                for g in GROUPS:
                    net.get_submodule(g).register_forward_hook(
                        lambda _m, _i, out, k=(who, g): self.feats.__setitem__(k, out)
                    )
        self.opt = sgd(self.student.parameters())

    def step(self, x: Tensor, y: Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.student(x)
            if self.kd or self.at:
                with torch.no_grad():
                    t_logits = self.teacher(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = 0.1 * ce + 0.9 * kd_loss(logits, t_logits) if self.kd else ce
            if self.at:
                loss = loss + 1000.0 * sum(
                    at_loss(self.feats["s", g], self.feats["t", g]) for g in GROUPS
                )
                self.feats.clear()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def authors_wrn(params: dict[str, Tensor], x: Tensor, training: bool):
    """The authors' functional WRN (``cifar.py: resnet().f``) over our state-dict names:
    logits and the three group outputs."""

    def bn_relu(o: Tensor, base: str) -> Tensor:  # utils.batch_norm + F.relu
        return F.relu(
            F.batch_norm(
                o,
                params[base + ".running_mean"],
                params[base + ".running_var"],
                params[base + ".weight"],
                params[base + ".bias"],
                training,
            )
        )

    def block(o: Tensor, base: str, stride: int) -> Tensor:
        o1 = bn_relu(o, base + ".bn0")
        y = F.conv2d(o1, params[base + ".conv0.weight"], stride=stride, padding=1)
        z = F.conv2d(bn_relu(y, base + ".bn1"), params[base + ".conv1.weight"], padding=1)
        if base + ".convdim.weight" in params:
            return z + F.conv2d(o1, params[base + ".convdim.weight"], stride=stride)
        return z + o

    o = F.conv2d(x, params["conv0.weight"], padding=1)
    groups = []
    for g, stride in zip(GROUPS, (1, 2, 2), strict=True):
        n = len({k.split(".")[1] for k in params if k.startswith(g + ".")})
        for i in range(n):
            o = block(o, f"{g}.{i}", stride if i == 0 else 1)
        groups.append(o)
    o = F.avg_pool2d(bn_relu(o, "bn"), 8, 1, 0).view(o.size(0), -1)
    return F.linear(o, params["fc.weight"], params["fc.bias"]), groups


def authors_at(x: Tensor) -> Tensor:  # utils.at
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def authors_at_loss(x: Tensor, y: Tensor) -> Tensor:  # utils.at_loss
    return (authors_at(x) - authors_at(y)).pow(2).mean()


def authors_distillation(
    y: Tensor, teacher_scores: Tensor, labels: Tensor, T: float, alpha: float
) -> Tensor:
    """``utils.distillation`` (``batchmean`` for the deprecated ``mean``: same cost)."""
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    kl = F.kl_div(p, q, reduction="batchmean")
    return kl * (T * T * 2.0 * alpha) + F.cross_entropy(y, labels) * (1.0 - alpha)


class AuthorsRunner(LoopRunner):
    """The authors' ``h(sample)`` + torchnet's SGD step: student forward, teacher forward under
    ``no_grad``, ``at_loss`` per group (``.item()`` logged), distillation + beta/2 * sum."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        super().__init__(batches)
        self.ps = {
            k: v.detach()
            .clone()
            .requires_grad_(v.is_floating_point() and "running" not in k and "num_batches" not in k)
            for k, v in student.state_dict().items()
        }
        self.pt = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        self.kd, self.at = row.method in ("KD", "AT+KD"), row.method in ("AT", "AT+KD")
        self.opt = sgd([v for v in self.ps.values() if v.requires_grad])
        self.meters: list[float] = []

    def step(self, x: Tensor, y: Tensor) -> None:
        y_s, g_s = authors_wrn(self.ps, x, True)
        if self.kd or self.at:
            with torch.no_grad():
                y_t, g_t = authors_wrn(self.pt, x, False)
        if self.at:
            loss_groups = [authors_at_loss(a, b) for a, b in zip(g_s, g_t, strict=True)]
            self.meters = [v.item() for v in loss_groups]
        alpha = 0.9 if self.kd else 0.0
        loss = authors_distillation(y_s, y_t, y, 4.0, alpha) if self.kd else F.cross_entropy(y_s, y)
        if self.at:
            loss = loss + 1000.0 / 2 * sum(loss_groups)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class TeacherRunner(LoopRunner):
    """The teacher alone: eval mode under ``no_grad``; or forward + backward to its input
    (J_t of grad-AT, Eq. 3)."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        super().__init__(batches)
        self.teacher, self.input_grad = freeze(teacher), row == TEACHER_GRAD

    def step(self, x: Tensor, y: Tensor) -> None:
        if self.input_grad:
            x = x.detach().requires_grad_(True)
            input_gradient(self.teacher(x), y, x)
        else:
            with torch.no_grad():
                self.teacher(x)


class WorkerRunner:
    """A row in worker subprocesses (``--worker``) that stay alive for the whole run: a loop
    row with its own allocator in one process, or an ``atx`` row fitted by DDP over
    ``row.processes`` CPU processes (gloo), each with ``threads // processes`` threads and its
    slice of the same global batches (one long epoch). Named pipes gate them without
    polling: before each block every rank blocks on reading its step count from
    ``ctl-<rank>``, and rank 0 writes the block's step times (``on_train_batch_start`` ->
    ``on_train_batch_end``, the gradient all-reduce included) as a JSON line to ``times``."""

    def __init__(self, row: Row, batches: list[Batch], threads: int) -> None:
        if threads % row.processes:
            raise SystemExit(f"{row.name}: --threads {threads} does not split over"
                             f" {row.processes} processes")
        self.gate = Path(tempfile.mkdtemp(prefix="atx-bench-worker-"))
        for name in (*(f"ctl-{r}" for r in range(row.processes)), "times"):
            os.mkfifo(self.gate / name)
        # O_RDWR: opening a FIFO so never blocks, and the pipes stay open whoever comes first
        self.ctl = [os.open(self.gate / f"ctl-{r}", os.O_RDWR) for r in range(row.processes)]
        self.times = os.fdopen(os.open(self.gate / "times", os.O_RDWR), "r")
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(row.processes), "NODE_RANK": "0"}
        self.procs = []
        for rank in range(row.processes):
            log = open(self.gate / f"rank{rank}.log", "w")  # noqa: SIM115 (closed by the OS)
            cmd = [sys.executable, __file__, "--worker", row.name, "--gate", str(self.gate),
                   "--threads", str(threads // row.processes), "--batch-size",
                   str(batches[0][0].shape[0]), "--n-batches", str(len(batches))]
            self.procs.append(subprocess.Popen(
                cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log, stderr=subprocess.STDOUT))
        atexit.register(self.close)
        # start-up (imports, process group) before other rows run, so it is no row's load
        self._wait(lambda: all((self.gate / f"ready-{r}").exists() for r in range(row.processes)))

    def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if any(p.poll() is not None for p in self.procs):
                log = (self.gate / "rank0.log").read_text()[-3000:]
                raise RuntimeError(f"a bench worker of this row died:\n{log}")
            select.select([self.times], [], [], 0.5)

    def cpu_s(self) -> float:
        """User + system CPU seconds the workers used so far (``/proc/<pid>/stat``)."""
        total = 0.0
        for p in self.procs:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

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


class Forever(torch.utils.data.IterableDataset):
    """This rank's slice of each global batch, cycled without end."""

    def __init__(self, batches: list[Batch], rank: int, world: int) -> None:
        n = batches[0][0].shape[0] // world
        self.batches = [(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
                        for x, y in batches]

    def __iter__(self):
        while True:
            yield from self.batches


def worker(args: argparse.Namespace) -> None:
    """A ``WorkerRunner``'s process: a loop row serving blocks, or one DDP rank."""
    row = BY_NAME[args.worker]
    configure_allocator(row.allocator == "mallopt")
    rank = int(os.environ.get("RANK", 0))
    gate = WorkerGate(Path(args.gate), rank)
    if row.processes == 1:
        batches = make_batches(args.n_batches, args.batch_size)
        runner = RUNNERS[row.path](row, *build_pair(), batches)  # the loop, in this process
        gate.ready()
        while (steps := gate.next_block()) > 0:
            gate.report(runner(steps))
        return
    ddp_worker(row, args, gate)


def ddp_worker(row: Row, args: argparse.Namespace, gate: WorkerGate) -> None:
    """One rank of a DDP row (started with the torch.distributed env vars set, so Lightning
    joins them instead of launching processes)."""
    module = build_module(row, *build_pair())
    world = int(os.environ["WORLD_SIZE"])
    data = Forever(make_batches(args.n_batches, args.batch_size), gate.rank, world)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp", precision=row.precision,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[GatedTimer(gate)],
    )
    trainer.fit(module, DataLoader(data, batch_size=None))


RUNNERS = {"atx": AtxRunner, "raw": RawRunner, "authors": AuthorsRunner, "forward": TeacherRunner}


def make_runner(
    row: Row, batches: list[Batch], threads: int | None = None
) -> InProcessRunner | WorkerRunner:
    """A runner with its own student and teacher, built from the same seed for every row."""
    if row.own_process:
        return WorkerRunner(row, batches, threads or torch.get_num_threads())
    return RUNNERS[row.path](row, *build_pair(), batches)


def build_pair() -> tuple[nn.Module, nn.Module]:
    """WRN-16-1 student and frozen WRN-16-2 teacher, from seed 0 (the same for every row)."""
    torch.manual_seed(0)
    student = build_model("wrn", depth=16, width=1, num_classes=10)
    return student, freeze(build_model("wrn", depth=16, width=2, num_classes=10))


# -- machine load ------------------------------------------------------------------------------
class LoadProbe:
    """CPU time other processes used while a block ran, in cores (0 = we had the machine):
    busy + steal time of the whole machine (``/proc/stat``) minus this process's CPU time,
    over the wall time. ``None`` where ``/proc/stat`` is unreadable."""

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

    def start(self, helpers_s: float = 0.0) -> None:
        """``helpers_s``: CPU seconds our helper processes (row workers) used so far."""
        t = os.times()
        busy = self._machine_busy_s()
        own = t.user + t.system + helpers_s
        self._start = None if busy is None else (time.perf_counter(), busy, own)

    def stop(self, children: bool = False, helpers_s: float = 0.0) -> float | None:
        """``children``: also count finished child processes as ours (the probes);
        ``helpers_s``: as in ``start``, now."""
        busy = self._machine_busy_s()
        if self._start is None or busy is None:
            return None
        t = os.times()
        own = t.user + t.system + helpers_s
        own += (t.children_user + t.children_system) if children else 0.0
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        foreign = (busy - busy0) - (own - own0)
        return max(foreign, 0.0) / wall if wall > 0 else None


# -- the round-robin run ----
@dataclass
class Block:
    """One block of one row: its kept step times (seconds) and the machine's other load."""

    row: str
    round: int
    times: list[float]
    load: float | None  # cores used by other processes meanwhile


@dataclass
class Result:
    blocks: list[Block] = field(default_factory=list)
    batch_size: int = 128
    wall_s: float = 0.0
    stopped_early: bool = False

    def times(self, quiet: float | None = None) -> dict[str, list[float]]:
        """Kept step times per row; ``quiet``: only blocks with other load below it."""
        out: dict[str, list[float]] = {}
        for b in self.blocks:
            if quiet is None or (b.load is not None and b.load < quiet):
                out.setdefault(b.row, []).extend(b.times)
        return out


def next_round_s(result: Result, kept: dict[str, int], steps: int, block: int) -> float:
    """The next round's expected seconds from the kept step times (warm-up and compilation
    excluded), plus 5% for the Trainer set-up."""
    times = result.times()
    todo = [name for name, n in kept.items() if n < steps]
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
    next round would end past ``budget_s``; each row's first ``warmup`` steps are discarded
    (compilation happens there)."""
    if block < 1 or steps < 1 or warmup < 0:
        raise ValueError("need block >= 1, steps >= 1, warmup >= 0")
    batches = make_batches(4, batch_size)
    runners = {r.name: make_runner(r, batches) for r in rows}
    result = Result(batch_size=batch_size)
    kept, seen = dict.fromkeys(runners, 0), dict.fromkeys(runners, 0)
    probe = LoadProbe()
    t_start, rnd = time.perf_counter(), 0
    while any(n < steps for n in kept.values()):
        elapsed = time.perf_counter() - t_start
        if rnd > 0 and elapsed + next_round_s(result, kept, steps, block) > budget_s:
            result.stopped_early = True
            break
        rnd += 1
        for name, runner in runners.items():
            if kept[name] >= steps:
                continue
            n = block if seen[name] >= warmup else warmup - seen[name] + block
            probe.start(runner.cpu_s())
            times = runner(n)
            load = probe.stop(helpers_s=runner.cpu_s())
            keep = [t for i, t in enumerate(times) if seen[name] + i >= warmup]
            keep = keep[: steps - kept[name]]
            seen[name] += n
            kept[name] += len(keep)
            if keep:
                result.blocks.append(Block(name, rnd, keep, load))
        if log:
            loads = [b.load for b in result.blocks if b.round == rnd and b.load is not None]
            load_s = f", other load {statistics.median(loads):.2f} cores" if loads else ""
            log(
                f"round {rnd}: {min(kept.values())}/{steps} kept steps per row,"
                f" {time.perf_counter() - t_start:.0f} s{load_s}"
            )
    result.wall_s = time.perf_counter() - t_start
    for runner in runners.values():
        runner.close()
    return result


# -- probes: one row in a fresh process --------------------------------------------------------
def rss_mb() -> tuple[float, float]:
    """(resident, high-water) MiB of this process (``/proc/self/status``; else ru_maxrss)."""
    try:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def reset_peak_rss() -> None:
    """Restart the high-water mark at the current RSS (Linux: ``clear_refs`` 5), so imports and
    building do not hide the steps' peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def probe_row(row: Row, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    """In this (fresh) process: ms/step and page faults per step after the warm-up, and the
    peak RSS of all steps (warm-up included) above the built state (modules, batches)."""
    runner = make_runner(row, make_batches(2, batch_size))
    gc.collect()
    reset_peak_rss()
    rss0, _ = rss_mb()
    runner(warmup)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = runner(steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    _, peak = rss_mb()
    return {
        "ms": statistics.median(times) * 1e3,
        "faults": faults / steps,
        "peak_mb": peak - rss0,
        "rss_mb": peak,
    }


def run_probe(name: str, allocator: str, args: argparse.Namespace) -> dict[str, float]:
    """``probe_row`` in a subprocess with glibc's default allocator, atx's mallopt or the
    ``MALLOC_*_`` env vars; the machine's other load while it ran is added."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "ATX_MALLOC"}
    if allocator == "env":
        env.update({k: str(v) for k, v in MALLOC_ENV.items()})
    cmd = [
        sys.executable,
        __file__,
        "--probe",
        name,
        "--allocator",
        allocator,
        "--probe-steps",
        str(args.probe_steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    load = LoadProbe()
    load.start()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"probe {name} ({allocator}) failed:\n{out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load.stop(children=True)}


# -- statistics and the report -----------------------------------------------------------------
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


# (label, numerator rows, denominator rows): a ratio of summed median step times
RATIOS = (
    ("atx / raw: student", ("student atx",), ("student raw",)),
    ("atx / raw: KD", ("KD atx",), ("KD raw",)),
    ("atx / raw: AT", ("AT atx",), ("AT raw",)),
    ("atx / raw: AT+KD", ("AT+KD atx",), ("AT+KD raw",)),
    ("atx / raw: AT+KD fastest", ("AT+KD atx fastest",), ("AT+KD raw fastest",)),
    ("AT / (student + teacher forward), atx", ("AT atx",), ("student atx", TEACHER.name)),
    ("AT / (student + teacher forward), raw", ("AT raw",), ("student raw", TEACHER.name)),
    (
        "AT / (student + teacher forward), authors",
        ("AT authors",),
        ("student authors", TEACHER.name),
    ),
    ("AT+KD / (student + teacher forward), atx", ("AT+KD atx",), ("student atx", TEACHER.name)),
    ("KD / (student + teacher forward), atx", ("KD atx",), ("student atx", TEACHER.name)),
    ("F-ActT / (student + teacher forward), atx", ("F-ActT atx",), ("student atx", TEACHER.name)),
    (
        "grad-AT / (student + teacher fwd+bwd), atx",
        ("grad-AT atx",),
        ("student atx", TEACHER_GRAD.name),
    ),
    ("symmetry / student, atx", ("symmetry atx",), ("student atx",)),
    ("min-l2 / student, atx", ("min-l2 atx",), ("student atx",)),
    ("speed-up vs authors: AT+KD float32 NCHW (target >= 1.0)", ("AT+KD authors",), ("AT+KD atx",)),
    (
        "speed-up vs authors: AT+KD fastest (target >= 1.5)",
        ("AT+KD authors",),
        ("AT+KD atx fastest",),
    ),
    (
        "speed-up vs authors: AT+KD fastest, ddp 2 processes (target >= 1.5)",
        ("AT+KD authors",),
        ("AT+KD atx fastest, ddp 2 processes",),
    ),
    *(
        (
            f"speed-up vs authors as released (glibc malloc): AT+KD {label}",
            ("AT+KD authors glibc malloc",),
            (name,),
        )
        for label, name in (
            ("float32 NCHW (target >= 1.0)", "AT+KD atx"),
            ("fastest (target >= 1.5)", "AT+KD atx fastest"),
            ("fastest, ddp 2 processes (target >= 1.5)", "AT+KD atx fastest, ddp 2 processes"),
        )
    ),
    *(
        (f"speed-up of {r.options}: AT+KD", ("AT+KD atx",), (r.name,))
        for r in ROWS
        if r.method == "AT+KD" and r.path == "atx" and r.options
    ),
)


def ratios(med: dict[str, float]) -> dict[str, float]:
    """Every ratio of RATIOS whose rows were measured."""
    return {
        label: sum(med[n] for n in num) / sum(med[d] for d in den)
        for label, num, den in RATIOS
        if all(r in med for r in (*num, *den))
    }


def paired_ratios(result: Result, quiet: float | None = None) -> dict[str, list[float]]:
    """Each ratio computed within every round (block medians), so slow drifts of the
    machine's load cancel; ``quiet``: skip rounds in which any block had that much load."""
    out: dict[str, list[float]] = {}
    for rnd in sorted({b.round for b in result.blocks}):
        blocks = [b for b in result.blocks if b.round == rnd]
        if quiet is not None and any(b.load is not None and b.load >= quiet for b in blocks):
            continue
        for k, v in ratios({b.row: statistics.median(b.times) for b in blocks}).items():
            out.setdefault(k, []).append(v)
    return out


def spread_text(xs: Sequence[float]) -> str:
    """``median (p10-p90, n)`` of ``xs``, or ``-``."""
    if not xs:
        return "-"
    return (
        f"{statistics.median(xs):.3f} ({quantile(xs, 0.1):.3f}-{quantile(xs, 0.9):.3f}, {len(xs)})"
    )


def report(result: Result, quiet_load: float = 0.2) -> tuple[str, bool]:
    """Markdown: per-row step times, then the ratios from medians of all steps, of quiet
    blocks only and paired per quiet round. Second value: some row is noisy."""
    all_times, quiet_times = result.times(), result.times(quiet_load)
    lines = [
        "| row | path | options | median ms/step | p10-p90 ms | p90/p10 | images/s | steps"
        " | quiet median ms (steps) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    noisy = False
    for name, times in all_times.items():
        row, s = BY_NAME[name], summarize(times, result.batch_size)
        noisy |= s["spread"] > NOISY
        q = quiet_times.get(name, [])
        q_s = f"{statistics.median(q) * 1e3:.1f} ({len(q)})" if q else "- (0)"
        lines.append(
            f"| {row.method} | {row.path} | {row.options or '-'} | {s['median_ms']:.1f}"
            f" | {s['p10_ms']:.1f}-{s['p90_ms']:.1f} | {s['spread']:.2f}"
            f" | {s['img_s']:.0f} | {s['n']} | {q_s} |"
        )
    med = {k: statistics.median(v) for k, v in all_times.items()}
    q_med = {k: statistics.median(v) for k, v in quiet_times.items()}
    paired = paired_ratios(result, quiet_load)
    lines += [
        "",
        "| ratio | medians, all steps | medians, quiet blocks"
        " | paired per quiet round: median (p10-p90, rounds) |",
        "|---|---:|---:|---:|",
    ]
    r_quiet = ratios(q_med)
    for k, v in ratios(med).items():
        q = f"{r_quiet[k]:.3f}" if k in r_quiet else "-"
        lines.append(f"| {k} | {v:.3f} | {q} | {spread_text(paired.get(k, []))} |")
    return "\n".join(lines), noisy


def probe_report(probes: dict[tuple[str, str], dict[str, float]]) -> str:
    """Markdown: the probes, then the memory bound and the allocator's effect."""
    lines = [
        "| row | allocator | median ms/step | page faults/step | peak RSS rise MB"
        " | RSS high-water MB | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, alloc), p in probes.items():
        load = "-" if p.get("load") is None else f"{p['load']:.2f}"
        lines.append(
            f"| {name} | {alloc} | {p['ms']:.1f} | {p['faults']:.0f}"
            f" | {p['peak_mb']:.1f} | {p['rss_mb']:.0f} | {load} |"
        )
    get = probes.get
    extra = []
    s, t, a = (
        get(("student atx", "mallopt")),
        get((TEACHER.name, "mallopt")),
        get(("AT atx", "mallopt")),
    )
    if s and t and a:
        bound = 1.1 * (s["peak_mb"] + t["peak_mb"])
        extra.append(
            f"peak memory: AT step {a['peak_mb']:.1f} MB vs (student step + teacher"
            f" forward) x 1.1 = {bound:.1f} MB: {'ok' if a['peak_mb'] <= bound else 'OVER'}"
        )
    for name in (TEACHER.name, "AT+KD atx"):
        d, m = get((name, "default")), get((name, "mallopt"))
        if d and m:
            extra.append(
                f"allocator, {name}: default / mallopt time {d['ms'] / m['ms']:.2f}x,"
                f" page faults {d['faults']:.0f} -> {m['faults']:.0f} per step"
            )
    au, at = get(("AT+KD authors", "default")), get(("AT+KD atx", "mallopt"))
    if au and at:
        extra.append(
            "AT+KD float32 NCHW, each with its own allocator (authors: glibc default, atx:"
            f" mallopt), speed-up of atx: {au['ms'] / at['ms']:.2f}x"
        )
    return "\n".join(lines + [""] + [f"- {e}" for e in extra])


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
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
        default=300.0,
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
    warnings.filterwarnings("ignore", ".*self.log.*")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    if args.probe:  # a fresh process for one row
        configure_allocator(args.allocator == "mallopt")
        print(
            json.dumps(
                probe_row(BY_NAME[args.probe], args.probe_steps, args.warmup, args.batch_size)
            )
        )
        return 0
    allocator = configure_allocator(True)  # as atx-train: every row of this process uses it
    print(
        f"# atx benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: torch"
        f" {torch.__version__}, lightning {L.__version__}, {os.cpu_count()} CPUs"
        f" ({platform.machine()}), threads {args.threads}, batch {args.batch_size};"
        f" {args.steps} kept steps per row (warm-up {args.warmup}, blocks of {args.block});"
        f" allocator {allocator}; atx {source_revision()}",
        flush=True,
    )
    if not args.probes_only:
        in_process(args)
    if not args.no_probes:
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
