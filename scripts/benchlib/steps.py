"""The step benchmark's in-process runners: each call times ``steps`` training steps of one
row and returns their seconds."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from atx import build
from atx.attention import at_loss
from atx.config import register
from atx.gradient_attention import input_gradient
from atx.losses import kd_loss
from atx.module import DistillModule, freeze
from atx.optim import OptimConf
from benchlib import authors
from benchlib.rows import DISTILL, GROUPS, STUDENTS, TEACHER_GRAD, Row


def timing_trainer(precision: str, callbacks: list[Callback], **options: object) -> L.Trainer:
    """A CPU Trainer that only trains: one epoch, no logger, checkpoints, bars or validation."""
    return L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **options,
    )

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
Batch = tuple[Tensor, Tensor]
SHAPE = SimpleNamespace(num_classes=10, in_channels=3, image_size=32)  # CIFAR-shaped batches


# -- what every row starts from ----------------------------------------------------------------
@functools.cache
def _composed(preset: str, student: str, teacher: str) -> DictConfig:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *STUDENTS[student],
                f"teacher={teacher}",
                f"distill={preset}",
                "data=cifar10",
                "logger=csv",
            ],
        )


def compose_distill(preset: str, student: str = "", teacher: str = "wrn_16_2") -> DictConfig:
    """The composed train config for ``distill=<preset>`` and a student of ``STUDENTS`` (what
    ``atx-train`` would see); a copy, free to change (Hydra composes each once)."""
    return copy.deepcopy(_composed(preset, student, teacher))


def write_random_teacher(path: Path, teacher: DictConfig | None = None) -> Path:
    """A teacher (its config; default the WRN-16-2 preset) with random weights from seed 0
    (weights change no timing)."""
    torch.manual_seed(0)
    net = build.build_network(teacher or compose_distill("none").teacher, "teacher",
                              SHAPE.num_classes, SHAPE.in_channels)
    torch.save(net.state_dict(), path)
    return path


def build_module(row: Row, student: nn.Module, teacher: nn.Module) -> DistillModule:
    """DistillModule for one row, built by atx's own builder (the teacher's weights are
    random: the checkpoint changes no timing)."""
    cfg = compose_distill(DISTILL[row.method], row.student)
    cfg.speed = OmegaConf.structured(row.speed)
    uses_teacher = build.needs_teacher(cfg.distill)
    module, _ = build.build_module(
        cfg, student, teacher if uses_teacher else None, SHAPE, load_teacher_weights=False
    )
    return module


def build_pair(row: Row) -> tuple[nn.Module, nn.Module]:
    """The row's student (its model preset) and the frozen WRN-16-2 teacher, built by atx's
    model builder from seed 0 (the same weights for every row with the same student)."""
    cfg = compose_distill("none", row.student)  # the models do not depend on the method
    torch.manual_seed(0)
    nets = (build.build_network(cfg[k], k, SHAPE.num_classes, SHAPE.in_channels)
            for k in ("model", "teacher"))
    return next(nets), freeze(next(nets))


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


def sgd(params: Iterable[Tensor]) -> torch.optim.SGD:
    o = OptimConf()
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


# -- the runners -------------------------------------------------------------------------------
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
    """A row run in the benchmark's own process: nothing to shut down (``WorkerRunner`` has
    the same ``close`` for its subprocesses)."""

    def close(self) -> None:
        """Nothing to release."""


class AtxRunner(InProcessRunner):
    """Fit the module with a fresh ``lightning.Trainer`` for each block of steps."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        self.module, self.batches = build_module(row, student, teacher), batches
        self.precision = row.precision

    def __call__(self, steps: int) -> list[float]:
        timer = StepTimer()
        trainer = timing_trainer(self.precision, [timer], devices=1, max_steps=steps)
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


class RawRunner(LoopRunner):
    """Bare PyTorch: the same nn.Modules and loss functions as atx, hooks on the groups, SGD;
    CE + alpha KD (0.9, T 4) + beta/2-free code-reduction AT (beta 1e3), as the presets."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        super().__init__(batches)
        fmt = torch.channels_last if row.channels_last else torch.contiguous_format
        self.student = student.to(memory_format=fmt)
        self.teacher = freeze(teacher).to(memory_format=fmt)
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


class AuthorsRunner(LoopRunner):
    """The authors' ``h(sample)`` + torchnet's SGD step: student forward, teacher forward under
    ``no_grad``, ``at_loss`` per group (``.item()`` logged), distillation + beta/2 * sum."""

    def __init__(self, row: Row, student: nn.Module, teacher: nn.Module, batches: list[Batch]):
        super().__init__(batches)
        def learnt(k: str, v: Tensor) -> bool:  # weights, not BN statistics
            return v.is_floating_point() and "running" not in k and "num_batches" not in k

        self.ps = {
            k: v.detach().clone().requires_grad_(learnt(k, v))
            for k, v in student.state_dict().items()
        }
        self.pt = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        self.kd, self.at = row.method in ("KD", "AT+KD"), row.method in ("AT", "AT+KD")
        self.opt = sgd([v for v in self.ps.values() if v.requires_grad])
        self.meters: list[float] = []

    def step(self, x: Tensor, y: Tensor) -> None:
        y_s, g_s = authors.wrn(self.ps, x, True)
        if self.kd or self.at:
            with torch.no_grad():
                y_t, g_t = authors.wrn(self.pt, x, False)
        if self.at:
            loss_groups = [authors.at_loss(a, b) for a, b in zip(g_s, g_t, strict=True)]
            self.meters = [v.item() for v in loss_groups]
        alpha = 0.9 if self.kd else 0.0
        if self.kd:
            loss = authors.distillation(y_s, y_t, y, 4.0, alpha)
        else:
            loss = F.cross_entropy(y_s, y)
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


RUNNERS: dict[str, Callable[[Row, nn.Module, nn.Module, list[Batch]], InProcessRunner]] = {
    "atx": AtxRunner,
    "raw": RawRunner,
    "authors": AuthorsRunner,
    "forward": TeacherRunner,
}


def in_process_runner(row: Row, batches: list[Batch]) -> InProcessRunner:
    """The row's runner in this process, with its own student and teacher from seed 0."""
    return RUNNERS[row.path](row, *build_pair(row), batches)
