"""Sweeps and many processes: the Slurm launcher's sbatch parameters, local parallel jobs, DDP
inside a sweep job (submitit starts the ranks), a 2-process DDP run of the real CLI with test
metrics reduced over ranks, and the student-only SyncBN switch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
from cli import FAST, atx_train
from configs import compose_cfg
from ddp_checks import DDP, DDP_RUN, check_ddp_run
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.modules.batchnorm import _BatchNorm

from atx.cluster import GpuClaim, check_launcher_matches_trainer
from atx.errors import AtxError
from atx.models import build_model
from atx.train import CONF_DIR, train


class _Submitted(Exception):
    """Raised instead of calling sbatch: carries the executor the launcher configured."""


def slurm_submission(tmp_path: Path, monkeypatch, overrides: list[str]) -> tuple[Any, str]:
    """Run the submitit Slurm launcher of conf/hydra/launcher/slurm.yaml up to the sbatch call;
    return the executor and the sbatch script it would submit."""
    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a Slurm executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    class Recorder(submitit.AutoExecutor):
        def map_array(self, fn, *args):
            raise _Submitted(self)

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/s",
                                          *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the launcher's values resolve
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    executor = submitted.value.args[0]._executor
    return executor, executor._make_submission_file_text("python -m atx.train", "uid")


def test_slurm_launcher_gives_one_task_per_device(tmp_path, monkeypatch):
    executor, sbatch = slurm_submission(tmp_path, monkeypatch, [
        "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600", "name=t1",
    ])
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--nodes=2", "--time=600",
                 "--partition=gpu", "--signal=USR2@120", "--job-name=atx-t1",
                 f"--output={tmp_path}/s/.submitit/%j/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "export SUBMITIT_EXECUTOR=slurm" in sbatch and "srun " in sbatch
    assert executor.max_num_timeout == 3  # requeued after preemption / timeout


def test_slurm_launcher_follows_a_single_gpu_trainer(tmp_path, monkeypatch):
    _, sbatch = slurm_submission(tmp_path, monkeypatch, ["trainer=gpu", "hydra.launcher.qos=low"])
    assert "#SBATCH --ntasks-per-node=1\n" in sbatch and "#SBATCH --gpus-per-node=1\n" in sbatch
    assert "#SBATCH --nodes=1\n" in sbatch and "#SBATCH --qos=low\n" in sbatch


@pytest.mark.parametrize(
    ("launcher", "trainer", "message"),
    [
        ({"tasks_per_node": 1, "nodes": 1}, {"devices": 2}, "tasks_per_node=1 but trainer.dev"),
        ({"tasks_per_node": 2, "nodes": 1}, {"devices": 2, "num_nodes": 2}, "nodes=1 but"),
        ({"tasks_per_node": 2}, {"devices": 2, "strategy": "ddp_spawn"}, "trainer.strategy=ddp "),
    ],
)
def test_slurm_launcher_and_trainer_must_agree(launcher, trainer, message):
    launcher = {"_target_": "hydra_plugins.hydra_submitit_launcher.x.SlurmLauncher", **launcher}
    with pytest.raises(AtxError, match=message):
        check_launcher_matches_trainer(launcher, trainer)


def test_gpu_claims_are_exclusive(tmp_path):
    first, second = GpuClaim(2, tmp_path), GpuClaim(2, tmp_path)
    assert (first.index, second.index) == (0, 1)
    with pytest.raises(AtxError, match=r"all 2 GPU places \(2 GPUs x jobs_per_gpu=1\) are taken"):
        GpuClaim(2, tmp_path)
    first.release()
    third = GpuClaim(2, tmp_path)
    assert third.index == 0
    second.release()
    third.release()


def test_packed_claims_fill_every_gpu_before_sharing_one(tmp_path):
    """jobs_per_gpu=3 on 2 GPUs: 6 places, spread 0, 1, 0, 1, 0, 1; a 7th job is refused."""
    claims = [GpuClaim(2, tmp_path, per_gpu=3) for _ in range(6)]
    assert [c.index for c in claims] == [0, 1, 0, 1, 0, 1]
    with pytest.raises(AtxError, match=r"all 6 GPU places \(2 GPUs x jobs_per_gpu=3\)"):
        GpuClaim(2, tmp_path, per_gpu=3)
    claims[3].release()  # a job on GPU 1 ends: the next one takes its place
    assert GpuClaim(2, tmp_path, per_gpu=3).index == 1
    for c in claims:
        c.release()




def test_two_process_ddp_run_of_the_cli(tmp_path):
    """The ``trainer=cpu_ddp`` preset (2 CPU processes, gloo) in a real run."""
    run_dir = tmp_path / "run"
    result = atx_train([*FAST, "trainer=cpu_ddp", *DDP_RUN, f"hydra.run.dir={run_dir}"],
                       env={"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # Lightning started the second rank
    check_ddp_run(run_dir, 33, [*FAST, "data.val_subset=33"])


def test_ddp_spawn_inside_a_local_sweep(tmp_path):
    """The in-process alternative: the ranks of each job are spawned, the main process exports
    the student and reads the fit's progress back from the last checkpoint."""
    sweep = tmp_path / "sweep"
    heldout = "data.val_split=21"  # 21 held-out training images: uneven over 2 ranks too
    result = atx_train(["-m", *FAST, *DDP, "trainer.strategy=ddp_spawn", heldout, "seed=0",
                        f"hydra.sweep.dir={sweep}"],
                       env={"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    check_ddp_run(sweep / "0", 33, [*FAST, "data.val_subset=33", heldout], heldout=21)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["best/val_error"] == metrics["val/error"]
    # the epoch chosen on held-out error, read back from the ranks' last checkpoint
    assert metrics["selected/epoch"] == 0 and metrics["selected/test_error"] == metrics["val/error"]


class _Wrapped(Exception):
    """Raised where DDP would wrap the module: the BN kinds of the module as the strategy set it
    up (read there: on the way out Lightning's teardown reverts any layer sync it applied)."""


def bn_kinds(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, _BatchNorm)}


def test_sync_batchnorm_converts_the_student_only(tmp_path, monkeypatch):
    """trainer.sync_batchnorm=true under a real DDP strategy (1 CPU process, gloo), with a
    teacher: the student's BN becomes SyncBatchNorm, the frozen teacher's stays BatchNorm2d
    (Lightning's own switch, applied in the strategy's setup, would convert the teacher too)."""
    teacher_pt = tmp_path / "teacher.pt"
    torch.save(build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict(),
               teacher_pt)
    # SyncBatchNorm needs GPUs to train (refused up front on the CPU, tested below) and torch's
    # DDP wrapper refuses it on CPU modules: the run stops where DDP would wrap the module, after
    # the strategy applied any layer sync
    monkeypatch.setattr("atx.checks.check_sync_batchnorm", lambda trainer: None)

    def wrap(strategy: DDPStrategy, model: torch.nn.Module) -> torch.nn.Module:
        raise _Wrapped({"student": bn_kinds(model.student), "teacher": bn_kinds(model.teacher)})

    monkeypatch.setattr(DDPStrategy, "_setup_model", wrap)
    cfg = compose_cfg([*FAST, "logger=csv", "trainer.sync_batchnorm=true", "trainer.strategy=ddp",
                       "trainer.devices=1", "distill=at", "teacher=wrn_16_2", "teacher.depth=10",
                       f"teacher.checkpoint={teacher_pt}"])
    environ = dict(os.environ)  # DDP sets LOCAL_RANK, MASTER_PORT...: later runs must not see them
    try:
        with pytest.raises(_Wrapped) as wrapped:
            train(cfg, tmp_path / "run")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    (kinds,) = wrapped.value.args
    assert kinds == {"student": {torch.nn.SyncBatchNorm}, "teacher": {torch.nn.BatchNorm2d}}


def test_sync_batchnorm_on_the_cpu_is_refused_before_training(tmp_path):
    cfg = compose_cfg([*FAST, "logger=csv", "trainer.sync_batchnorm=true"])
    with pytest.raises(AtxError, match="sync_batchnorm=true needs GPUs"):
        train(cfg, tmp_path)
    assert not os.listdir(tmp_path)


def test_a_packed_job_takes_a_place_on_the_one_gpu(tmp_path, monkeypatch):
    """One GPU, jobs_per_gpu=2: each joblib job is given trainer.devices=[0] while it runs,
    a third concurrent job is refused, and a finished job frees its place."""
    from omegaconf import OmegaConf

    from atx.cluster import gpu_of_this_job

    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    hc = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.joblib.JoblibLauncher"},
                           "sweep": {"dir": str(tmp_path)}})

    def job() -> object:
        cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 1},
                                "jobs_per_gpu": 2})
        return cfg, gpu_of_this_job(cfg, hc)

    (a, ctx_a), (b, ctx_b), (c, ctx_c) = job(), job(), job()
    with ctx_a, ctx_b:
        assert list(a.trainer.devices) == list(b.trainer.devices) == [0]
        with pytest.raises(AtxError, match="all 2 GPU places"), ctx_c:
            pass
    c, ctx_c = job()  # a context manager is used once: a new job
    with ctx_c:
        assert list(c.trainer.devices) == [0]
