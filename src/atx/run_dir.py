"""Which run owns a run directory: fresh start, resume, skip a finished run, or refuse.

A run dir is owned by the config recorded in ``<run>/.atx/config.yaml`` when the run started
(with a copy of Hydra's ``.hydra/`` files). Launching into that dir again, by
``atx-train resume=<run dir>`` or by re-running the same command with a pinned
``hydra.run.dir`` / ``hydra.sweep.dir``:

- same config, unfinished: continue from the newest readable checkpoint (or start over when
  none was written yet, or none can be read: unreadable ones are moved to
  ``checkpoints/unreadable/``);
- same config, finished (``metrics.json`` for ``trainer.max_epochs`` epochs): skipped, the
  recorded metrics are returned; a larger ``trainer.max_epochs`` continues training instead;
- another config, or files not written by atx: refused with one line, and Hydra's ``.hydra/``
  files, which Hydra rewrote before atx ran, are put back as they were.

Only keys in :data:`MAY_CHANGE` may differ between the launches of one run. A lock on
``<run>/.atx/lock``, held while training, refuses a second live process in the same dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from atx.errors import AtxError
from atx.files import replace_atomically, try_lock
from atx.resume import (
    CHECKPOINT_DIR,
    check_teacher,
    checkpoint_files,
    configured_teacher,
    newest_checkpoint,
    set_aside,
)

STATE_DIR = ".atx"
WANDB_ID_FILE = "wandb_id.txt"
HYDRA_DIR = ".hydra"
EXPANDED_ENV = "ATX_RESUME_EXPANDED"  # set once resume= is expanded (DDP ranks inherit it)
MAY_CHANGE = (
    "resume", "debug", "trainer.max_epochs", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "logger", "checkpoint",
    "data.root", "data.num_workers", "data.pin_memory", "teacher.checkpoint",
    "figure_images", "figure_every_n_epochs", "speed.allocator", "speed.teacher_eval_cache_mib",
)
_held_locks: list[Any] = []  # open lock files, kept for the life of the process


@dataclass
class Claim:
    """What to do in a run dir: fit from ``checkpoint`` (None: from scratch) or, if
    ``finished`` holds recorded metrics, nothing."""

    wandb_id: str
    checkpoint: Path | None = None
    teacher: dict[str, str] | None = None
    finished: dict[str, Any] | None = None


def is_rank_zero() -> bool:
    """Rank 0 of this run, also for ranks a scheduler started (submitit sets no RANK)."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().global_rank == 0
    return rank_zero_only.rank == 0


def _write(path: Path, text: str) -> None:
    """Whole or not at all: ranks started at once may read it while rank 0 writes."""
    replace_atomically(path, lambda f: f.write(text.encode()))


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def expand_resume_argv(argv: list[str]) -> list[str]:
    """``resume=<dir> [k=v ...]`` -> the run's recorded overrides, then ``k=v`` (later wins),
    ``resume=<dir>`` and ``hydra.run.dir=<dir>``: the run is recomposed into its own dir."""
    given = [a for a in argv if a.startswith("resume=")]
    if not given or os.environ.get(EXPANDED_ENV) or given[-1] in ("resume=null", "resume="):
        return argv
    run = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    recorded = run / STATE_DIR / HYDRA_DIR / "overrides.yaml"
    if not recorded.is_file():
        print(f"atx: error: resume={run}: not an atx run dir (no {recorded.relative_to(run)});"
              " give the run dir printed by the interrupted run", file=sys.stderr)
        sys.exit(2)
    if any(a in ("-m", "--multirun") for a in argv):
        print("atx: error: resume= continues one run: drop -m (a sweep resumes by re-running"
              " it with the same hydra.sweep.dir)", file=sys.stderr)
        sys.exit(2)
    merged: dict[str, str] = {}
    for o in [*(yaml.safe_load(recorded.read_text()) or []), *argv]:
        if not o.startswith("-") and _key(o) not in ("resume", "hydra.run.dir"):
            merged[_key(o)] = o
    flags = [a for a in argv if a.startswith("-")]
    os.environ[EXPANDED_ENV] = str(run)
    return [*flags, *merged.values(), f"resume={run}", f"hydra.run.dir={run}"]


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs and may not change."""
    if any(prefix[:-1] == k or prefix.startswith(k + ".") for k in MAY_CHANGE):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in dict.fromkeys([*old, *new]):
            if k in old:  # a key an older atx did not record: its default is the old behaviour
                out += differences(old[k], new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix[:-1], old, new)]


def _restore_hydra_files(run_dir: Path) -> None:
    """Put back the ``.hydra/`` files of the run that owns ``run_dir`` (Hydra rewrote them)."""
    saved = run_dir / STATE_DIR / HYDRA_DIR
    if saved.is_dir() and (run_dir / HYDRA_DIR).is_dir():
        for f in saved.iterdir():
            shutil.copy2(f, run_dir / HYDRA_DIR / f.name)


def _record(run_dir: Path, config: dict[str, Any]) -> None:
    """Save the owning config and a copy of Hydra's files; ``resume=`` is not an override of
    the run itself (``atx-report`` groups runs by their overrides)."""
    state = run_dir / STATE_DIR
    (state / HYDRA_DIR).mkdir(parents=True, exist_ok=True)
    overrides = run_dir / HYDRA_DIR / "overrides.yaml"
    if overrides.is_file():
        kept = [o for o in yaml.safe_load(overrides.read_text()) or [] if _key(o) != "resume"]
        _write(overrides, yaml.safe_dump(kept))
    if (run_dir / HYDRA_DIR).is_dir():
        for f in (run_dir / HYDRA_DIR).iterdir():
            shutil.copy2(f, state / HYDRA_DIR / f.name)
    _write(state / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def _lock(run_dir: Path) -> None:
    path = run_dir / STATE_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = try_lock(path)
    if f is None:
        raise AtxError(
            f"run dir '{run_dir}' is in use by another atx-train (pid"
            f" {path.read_text().strip() or '?'}); wait for it or pick another hydra.run.dir"
        )
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _held_locks.append(f)


def _finished(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The recorded metrics if the run trained all of ``trainer.max_epochs``."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except ValueError:  # cut short while being written: the run's end is redone
        return None
    wanted = cfg.trainer.get("max_epochs")
    more = isinstance(wanted, int) and wanted > 0 and metrics.get("epochs", 0) < wanted
    return None if more else metrics


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> Claim:
    """Decide fresh / resume / skip for ``run_dir`` (module docstring); rank 0 records the
    config, the W&B run id and holds the lock, other ranks only read. A refusal leaves the
    owning run's ``.hydra/`` files as they were before this launch."""
    run_dir = Path(run_dir)
    try:
        return _claim(cfg, run_dir)
    except AtxError:
        if is_rank_zero():
            _restore_hydra_files(run_dir)
        raise


def _claim(cfg: DictConfig, run_dir: Path) -> Claim:
    rank0 = is_rank_zero()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved = run_dir / STATE_DIR / "config.yaml"
    resume = cfg.get("resume")
    teacher = configured_teacher(cfg)
    id_file = run_dir / WANDB_ID_FILE

    if not saved.is_file():
        if resume:
            raise AtxError(f"resume={resume}: not an atx run dir (no {STATE_DIR}/config.yaml)")
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name != WANDB_ID_FILE
                         and not p.name.startswith(".") and p.suffix != ".log")
        if foreign:
            raise AtxError(
                f"run dir '{run_dir}' already holds files not written by an atx run"
                f" ({', '.join(foreign[:3])}); pick an empty hydra.run.dir / hydra.sweep.dir"
            )
        if rank0:
            _lock(run_dir)
            _record(run_dir, config)
            _write(id_file, secrets.token_hex(4))
        return Claim(id_file.read_text().strip() if id_file.is_file() else "", teacher=teacher)

    diffs = differences(yaml.safe_load(saved.read_text()), config)
    if diffs and not checkpoint_files(run_dir) and not (run_dir / "metrics.json").is_file():
        diffs = []  # an earlier launch that never trained (a config error): nothing to keep
    if diffs:
        key, old, new = diffs[0]
        if resume:
            raise AtxError(
                f"resume={run_dir}: {key}={new} differs from the run's {key}={old}; when"
                f" resuming only {', '.join(MAY_CHANGE[1:])} may change"
            )
        raise AtxError(
            f"run dir '{run_dir}' belongs to another run ({key}={old} there, {new} here): pick"
            f" another hydra.run.dir / hydra.sweep.dir, or continue that run with"
            f" atx-train resume={run_dir}"
        )
    wandb_id = id_file.read_text().strip() if id_file.is_file() else ""
    finished = _finished(run_dir, cfg)
    if finished is not None:
        if rank0:
            _restore_hydra_files(run_dir)  # Hydra rewrote them for this launch
        return Claim(wandb_id, finished=finished)
    unreadable: list[tuple[Path, str]] = []
    found = newest_checkpoint(run_dir, unreadable)
    if found is not None and "atx" in found[1]:
        check_teacher(found[1]["atx"]["teacher"], teacher, found[0])
    if rank0:
        _lock(run_dir)
        for stale in (run_dir / CHECKPOINT_DIR).glob(".*.tmp*"):  # a writer killed mid-write
            stale.unlink()
        set_aside(run_dir, unreadable)
        if unreadable and found is None:
            print(f"atx: no readable checkpoint in '{run_dir / CHECKPOINT_DIR}': starting from"
                  " scratch", file=sys.stderr)
        _record(run_dir, config)
        if not wandb_id:
            wandb_id = secrets.token_hex(4)
            _write(id_file, wandb_id)
    if found is not None and rank0:
        print(f"atx: resuming '{run_dir}' from {found[0].name} (epoch {found[1].get('epoch')},"
              f" step {found[1].get('global_step')})", file=sys.stderr)
    return Claim(wandb_id, found[0] if found else None, teacher)
