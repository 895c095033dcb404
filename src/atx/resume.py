"""Exact resume: atomic checkpoint files, the state Lightning leaves out, choosing a checkpoint.

Lightning restores weights, optimiser, lr scheduler and loop progress (epoch and batch) from a
checkpoint; the beta schedules are functions of the epoch (``atx.losses.Schedule``), so they
follow. What it does not restore, :class:`ResumeState` adds to every checkpoint under ``"atx"``:

- the global RNG states (torch, CUDA, numpy, python): augmentation draws from them;
- the interrupted epoch's sampler seed and the number of batches already trained, so a run
  resumed mid-epoch serves the same permutation from the next untrained batch
  (:class:`atx.data.sampler.ResumableRandomSampler`; Lightning alone would restart the epoch's
  data order and only warn);
- the running sums of that epoch's ``train/*`` values (``atx.train_log``), so its ``*_epoch``
  values cover the whole epoch, not only the steps after the resume;
- the teacher's checkpoint path and SHA-256 (the teacher's weights are not in the checkpoint).

Files are written to a temporary name, flushed and renamed over the old one
(:class:`AtomicCheckpointIO`), so a crash while writing never leaves a truncated checkpoint as
the only copy; :func:`newest_checkpoint` still skips unreadable ones, newest first, and
:func:`set_aside` moves them to ``checkpoints/unreadable/``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from atx.checkpoints import resolve_weights_path
from atx.data.sampler import ResumableRandomSampler
from atx.errors import AtxError, reason
from atx.files import replace_atomically

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable"  # checkpoints/unreadable/: files no resume could read
INTERRUPTED = "interrupted.ckpt"  # written when SIGTERM stops a run


class Interrupted(AtxError):
    """SIGTERM stopped the run after a checkpoint was saved; ``atx-train`` exits 143."""

    exit_code = 143


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp<pid>``, fsync, then ``os.replace`` over ``<name>``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda f: torch.save(checkpoint, f))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_identity(checkpoint: str | Path) -> dict[str, str]:
    """The teacher's weights file (a run dir means its ``student.pt``) and its SHA-256."""
    path = resolve_weights_path(checkpoint).resolve()
    return {"path": str(path), "sha256": sha256_file(path)}


def configured_teacher(cfg: DictConfig) -> dict[str, str] | None:
    """:func:`teacher_identity` of ``teacher.checkpoint``, None when no teacher file is set."""
    t = cfg.get("teacher")
    if not t or OmegaConf.is_missing(t, "checkpoint") or not t.get("checkpoint"):
        return None
    return teacher_identity(t.checkpoint)


def check_teacher(saved: dict[str, str] | None, current: dict[str, str] | None, ckpt: Path) -> None:
    """A resumed run must learn from the very teacher it started with (same file contents)."""
    if (saved is None) != (current is None):
        had = "a teacher" if saved else "no teacher"
        raise AtxError(f"checkpoint '{ckpt}' was trained with {had}, this config differs")
    if saved and current and saved["sha256"] != current["sha256"]:
        raise AtxError(
            f"teacher.checkpoint '{current['path']}' (sha256 {current['sha256'][:12]}) is not the"
            f" teacher checkpoint '{ckpt}' was trained with ('{saved['path']}', sha256"
            f" {saved['sha256'][:12]}): give that teacher file to resume"
        )


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _train_sampler(trainer: L.Trainer) -> ResumableRandomSampler | None:
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, ResumableRandomSampler) else None


class ResumeState(L.Callback):
    """Puts RNG, sampler and teacher state into every checkpoint and restores it on resume;
    on SIGTERM saves ``checkpoints/interrupted.ckpt`` before the run stops."""

    def __init__(self, run_dir: Path, teacher: dict[str, str] | None) -> None:
        self.run_dir, self.teacher = Path(run_dir), teacher
        self._mid_epoch: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        sampler = _train_sampler(trainer)
        checkpoint["atx"] = {
            "rng": rng_state(),
            "teacher": self.teacher,
            "sampler_seed": sampler.epoch_seed if sampler is not None else None,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "epoch_sums": module.train_sums.state_dict(),  # type: ignore[attr-defined]
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("atx")
        if state is None:
            return
        # before the first train iterator is made: an epoch-end resume draws the next epoch's
        # order from the same RNG state as the uninterrupted run did
        set_rng_state(state["rng"])
        self._mid_epoch = state if state["batches_done"] > 0 else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state, self._mid_epoch = self._mid_epoch, None
        if state is None or state["batches_done"] >= trainer.num_training_batches:
            return
        sampler = _train_sampler(trainer)
        if sampler is None or state["sampler_seed"] is None:
            return  # e.g. a DistributedSampler: Lightning restarts the epoch's order (it warns)
        skip = state["batches_done"] * trainer.train_dataloader.batch_size
        sampler.resume_point = (state["sampler_seed"], skip)
        # making the iterator drew from the RNG; the first batch must see the saved state
        set_rng_state(state["rng"])
        warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
        if state.get("epoch_sums"):  # the epoch's train/* means cover the steps before too
            module.train_sums.load_state_dict(  # type: ignore[attr-defined]
                state["epoch_sums"], module.device)

    def on_exception(
        self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning raises this at a step boundary once SIGTERM arrived (every rank in DDP)
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.run_dir / CHECKPOINT_DIR / INTERRUPTED)


class PreemptionHandover:
    """A launcher's preemption signal waits for ``interrupted.ckpt``.

    submitit (``hydra/launcher=slurm``) handles ``SUBMITIT_PREEMPT_SIGNAL`` (USR2), which Slurm
    sends ``signal_delay_s`` before the time limit or on preemption, by requeueing the job and
    exiting at once, mid-step. While a run fits, that signal is deferred: it is turned into a
    SIGTERM for Lightning, which stops at the end of the current step, where
    :class:`ResumeState` saves ``interrupted.ckpt``; then :meth:`hand_over` passes the signal to
    the launcher's own handler, which requeues. With no handler installed (no launcher), the
    signal is left alone.
    """

    def __init__(self) -> None:
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signum = getattr(signal, f"SIG{name}", signal.SIGUSR2)
        self.original = signal.getsignal(self.signum)
        self.received: tuple[int, Any] | None = None
        if callable(self.original):
            signal.signal(self.signum, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        self.received = (signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning: stop at the step boundary and save

    def hand_over(self) -> None:
        """Give a deferred signal to the handler it was meant for (it may exit the process)."""
        self.restore()
        if self.received is not None and callable(self.original):
            self.original(*self.received)

    def restore(self) -> None:
        if callable(self.original):
            signal.signal(self.signum, self.original)


def checkpoint_callbacks(run_dir: Path, every_n_steps: int, keep_last: int,
                         teacher: dict[str, str] | None) -> list[Callback]:
    """``step-<S>.ckpt`` every ``every_n_steps`` steps (the newest ``keep_last`` kept) and the
    :class:`ResumeState` that makes every checkpoint resumable exactly."""
    callbacks: list[Callback] = [ResumeState(run_dir, teacher)]
    if every_n_steps > 0 and keep_last > 0:
        callbacks.append(ModelCheckpoint(
            dirpath=Path(run_dir) / CHECKPOINT_DIR, filename="step-{step}", monitor="step",
            mode="max", save_top_k=keep_last, every_n_train_steps=every_n_steps,
            auto_insert_metric_name=False, save_on_train_epoch_end=False,
        ))
    return callbacks


def with_atomic_io(plugins: Any) -> list[Any]:
    """The Trainer's ``plugins`` plus :class:`AtomicCheckpointIO`."""
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [p for p in [plugins] if p]
    return [*plugins, AtomicCheckpointIO()]


def interrupted(trainer: L.Trainer, run_dir: Path) -> Interrupted:
    return Interrupted(
        f"interrupted by SIGTERM at step {trainer.global_step}; saved"
        f" {Path(run_dir) / CHECKPOINT_DIR / INTERRUPTED}; resume with: atx-train"
        f" resume={run_dir}"
    )


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run, newest first (step, epoch, SIGTERM and Slurm ``hpc_ckpt``)."""
    files = [*(run_dir / CHECKPOINT_DIR).glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def newest_checkpoint(
    run_dir: Path, unreadable: list[tuple[Path, str]] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint and its content. Unreadable ones are skipped, newest
    first: named on stderr, or collected in ``unreadable`` as ``(file, why)``."""
    for path in checkpoint_files(run_dir):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "loops" not in ckpt or "state_dict" not in ckpt:
                raise ValueError("not a Lightning training checkpoint")
        except Exception as e:
            if unreadable is None:
                print(f"atx: skipping unreadable checkpoint '{path}' ({reason(e)});"
                      " trying the previous one", file=sys.stderr)
            else:
                unreadable.append((path, reason(e)))
            continue
        return path, ckpt
    return None


def set_aside(run_dir: Path, unreadable: list[tuple[Path, str]]) -> None:
    """Move unreadable checkpoints to ``checkpoints/unreadable/``, saying so: kept for the
    user, and out of Lightning's way (beside a bad ``last.ckpt`` it would write
    ``last-v1.ckpt``)."""
    folder = Path(run_dir) / CHECKPOINT_DIR / UNREADABLE_DIR
    for path, why in unreadable:
        target, n = folder / path.name, 1
        while target.exists():  # set aside before: keep both
            target, n = folder / f"{path.stem}.{n}{path.suffix}", n + 1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.replace(target)
            moved = f"moved to '{target}'"
        except OSError as e:  # another rank moved it first, or a read-only dir
            moved = f"left in place ({reason(e)})"
        print(f"atx: skipping unreadable checkpoint '{path}' ({why}); {moved}", file=sys.stderr)
