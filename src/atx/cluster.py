"""Where the ranks of a run come from: Slurm / submitit jobs, sweeps with several devices per
job, which GPU a local job gets, and SyncBatchNorm for the student.

Lightning's own ``ddp`` re-runs the command line for every extra rank, which breaks under a Hydra
sweep: every rank runs its own copy of the sweep, and a swept ``trainer.devices`` silently
keeps the first job's world size. Under the submitit launcher the ranks are created by the scheduler
instead (``tasks_per_node = trainer.devices``, conf/hydra/launcher/slurm.yaml) and Lightning
only joins them: on Slurm it detects ``SLURMEnvironment`` itself; submitit's local executor
sets no Slurm variables, so :class:`SubmititEnvironment` tells Lightning about its ranks
(without it, submitit's ranks plus Lightning's own re-launch fail at start-up).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from omegaconf import DictConfig, open_dict

from atx.errors import AtxError
from atx.files import try_lock


class SubmititEnvironment(ClusterEnvironment):
    """The ranks of a submitit job (local executor: ``SUBMITIT_EXECUTOR=local``)."""

    def __init__(self) -> None:
        import submitit

        self._env = submitit.JobEnvironment()

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._env.hostnames[0] if self._env.num_nodes > 1 else "127.0.0.1"

    @property
    def main_port(self) -> int:
        digits = re.sub(r"\D", "", str(self._env.job_id))[-4:]
        return 20000 + int(digits or 0)

    @staticmethod
    def detect() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "local"

    def world_size(self) -> int:
        return self._env.num_tasks

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return self._env.global_rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self._env.local_rank

    def node_rank(self) -> int:
        return self._env.node


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the environment this process runs in.

    * submitit local executor: :class:`SubmititEnvironment`.
    * Slurm through submitit: ``SLURMEnvironment(auto_requeue=False)``: submitit owns the
      requeue (``max_num_timeout``), Lightning must not requeue the same job a second time
      (both would otherwise react to the same preemption signal).
    * anything else (a plain Slurm ``srun``, a workstation): Lightning's own detection.
    """
    if SubmititEnvironment.detect():
        return [SubmititEnvironment()]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def check_launcher_matches_trainer(launcher: dict[str, Any], trainer: dict[str, Any]) -> None:
    """Under the submitit launcher one Slurm task is one rank: tasks per node must equal
    ``trainer.devices`` and nodes ``trainer.num_nodes`` (Lightning checks it only on the node)."""
    if "submitit" not in str(launcher.get("_target_", "")):
        return
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    tasks = launcher.get("tasks_per_node", 1)
    if not isinstance(devices, int) or devices != tasks:
        raise AtxError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: under Slurm"
            " every task is one rank; set trainer.devices to an integer and keep the launcher's"
            " tasks_per_node: ${trainer.devices} (conf/hydra/launcher/slurm.yaml)"
        )
    if launcher.get("nodes", 1) != nodes:
        raise AtxError(
            f"hydra.launcher.nodes={launcher.get('nodes')} but trainer.num_nodes={nodes}; keep"
            " nodes: ${trainer.num_nodes} in the launcher config"
        )
    if devices > 1 or nodes > 1:
        strategy = str(trainer.get("strategy", "auto"))
        if strategy not in ("ddp", "auto"):
            raise AtxError(
                f"trainer.strategy={strategy} under the Slurm launcher: use trainer.strategy=ddp"
                " (Slurm starts the ranks; ddp_spawn would start them a second time)"
            )


class GpuClaim:
    """A place on a GPU held by this process for its lifetime: the first of ``count`` GPUs with
    one of its ``per_gpu`` slots free (a lock file no other job holds). For local parallel
    sweeps (``hydra/launcher=parallel``): each job trains on a GPU of its own, or
    ``jobs_per_gpu`` small jobs share each GPU (packed), however the launcher orders them."""

    def __init__(self, count: int, lock_dir: str | Path, per_gpu: int = 1) -> None:
        self.index: int | None = None
        self._file: IO[str] | None = None
        Path(lock_dir).mkdir(parents=True, exist_ok=True)
        for slot in range(per_gpu):  # fill every GPU's first slot before any second one
            for i in range(count):
                name = f"gpu{i}.lock" if slot == 0 else f"gpu{i}.slot{slot}.lock"
                handle = try_lock(Path(lock_dir) / name)
                if handle is not None:
                    self.index, self._file = i, handle
                    return
        places = count * per_gpu
        raise AtxError(
            f"all {places} GPU places ({count} GPUs x jobs_per_gpu={per_gpu}) are taken by other"
            f" jobs of this machine (locks in '{lock_dir}'); set hydra.launcher.n_jobs <= {places}"
        )

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases its lock
            self._file = None


def check_sync_batchnorm(trainer: DictConfig) -> None:
    if trainer.get("sync_batchnorm") and str(trainer.get("accelerator")) not in ("gpu", "cuda"):
        raise AtxError(
            "trainer.sync_batchnorm=true needs GPUs (SyncBatchNorm has no CPU kernel):"
            " add trainer.accelerator=gpu or drop trainer.sync_batchnorm"
        )


def sync_batchnorm(student: torch.nn.Module) -> torch.nn.Module:
    """``trainer.sync_batchnorm=true``: the student's BN layers become SyncBatchNorm (batch
    statistics over all ranks). Lightning's own switch would convert the frozen teacher too."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)


def check_sweep_strategy(cfg: DictConfig, launcher: str) -> None:
    """Lightning's ``ddp`` re-runs the command line for every rank, so under ``-m`` with an
    in-process launcher each rank would run its own copy of the sweep (and a swept device
    count would silently keep the first job's world size)."""
    t = cfg.trainer
    several = str(t.get("devices", 1)) not in ("1", "[0]") or t.get("num_nodes", 1) != 1
    in_process = "submitit" not in launcher
    if several and in_process and str(t.get("strategy", "auto")) in ("ddp", "auto"):
        raise AtxError(
            "-m with trainer.strategy=ddp (or auto) on several devices would re-run the whole"
            " sweep in every rank: use hydra/launcher=slurm (Slurm starts the ranks), or"
            " hydra/launcher=local_ddp on this machine, or trainer.strategy=ddp_spawn, or run"
            " each job without -m"
        )


@contextmanager
def gpu_of_this_job(cfg: DictConfig, hc: Any) -> Iterator[None]:
    """Local parallel sweeps (``hydra/launcher=parallel``) on a GPU machine: each one-device job
    trains on a GPU no other job of the machine holds (``trainer.devices=[i]``), or on one of
    its ``jobs_per_gpu`` places: small runs packed on a large GPU."""
    t = cfg.trainer
    joblib = "joblib" in str(hc.launcher.get("_target_", ""))
    one_gpu = str(t.accelerator) in ("gpu", "cuda") and str(t.devices) == "1"
    per_gpu = cfg.get("jobs_per_gpu", 1)
    if not (joblib and one_gpu and (torch.cuda.device_count() > 1 or per_gpu > 1)):
        yield
        return
    claim = GpuClaim(torch.cuda.device_count(), Path(hc.sweep.dir) / ".gpu_locks", per_gpu)
    try:
        with open_dict(cfg):
            cfg.trainer.devices = [claim.index]
        yield
    finally:
        claim.release()
