"""W&B groups: the seeds of one configuration share a group, launched as one sweep or one by
one; the seed is in the run's name; anything else that changes what is trained splits them."""

from __future__ import annotations

from pathlib import Path

from cli import FAST, atx_train
from configs import compose_cfg
from hydra.types import RunMode
from omegaconf import OmegaConf
from run_dirs import release_locks
from wandb_records import summarise

from atx.loggers import run_group, run_labels
from atx.train import train

RUN = [*FAST, "distill=none", "name=grouped", "logger=wandb", "logger.wandb.mode=offline"]


def test_the_group_leaves_out_the_seed_and_where_a_run_runs_only():
    base = run_group(compose_cfg([*RUN, "seed=0"]))
    assert base.startswith("grouped-") and len(base) == len("grouped-") + 8
    same = ["seed=7", "data.root=/elsewhere", "trainer.enable_progress_bar=true",
            "figure_images=0", "data.num_workers=1", "checkpoint.every_n_steps=5"]
    for override in same:
        assert run_group(compose_cfg([*RUN, override])) == base, override
    # what is trained: values from any group, and 1000 vs 1000.0 spelt alike (typed schema)
    assert run_group(compose_cfg([*RUN, "distill=at", "distill.at.beta=1000"])) == \
        run_group(compose_cfg([*RUN, "distill=at", "distill.at.beta=1000.0"]))
    other = ["trainer.max_epochs=2", "distill=at", "data.batch_size=8", "model.width=2",
             "optim.lr=0.05", "data.val_split=8", "teacher=wrn_16_2"]
    groups = {run_group(compose_cfg([*RUN, o])) for o in other}
    assert base not in groups and len(groups) == len(other)
    teachers = {run_group(compose_cfg([*RUN, "teacher=wrn_16_2", f"teacher.checkpoint={t}"]))
                for t in ("/a.pt", "/b.pt")}  # another teacher file: another experiment
    assert len(teachers) == 2


def test_seeds_launched_as_a_sweep_and_one_by_one_share_a_group(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = atx_train(["-m", *RUN, "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    alone = tmp_path / "alone"
    cfg = compose_cfg([*RUN, "seed=2"])  # a third seed, started by itself (no sweep)
    train(cfg, alone)
    release_locks()
    runs = [summarise(next((sweep / str(i)).glob("wandb/offline-run-*/run-*.wandb")))
            for i in (0, 1)]
    runs.append(summarise(next(alone.glob("wandb/offline-run-*/run-*.wandb"))))
    assert {r["group"] for r in runs} == {run_group(cfg)}
    assert [r["name"] for r in runs] == ["grouped seed=0", "grouped seed=1", "grouped seed=2"]
    assert len({r["id"] for r in runs}) == 3
    assert all(r["config"]["atx.group"] == f'"{run_group(cfg)}"' for r in runs)
    assert runs[0]["config"]["atx.sweep_dir"] == f'"{sweep}"'
    assert "atx.sweep_dir" not in runs[2]["config"]


def test_an_optuna_trial_is_named_by_its_sampled_values_and_tagged_with_its_study(tmp_path):
    """A search's job: the keys of ``hydra.sweeper.params`` are what varies (Hydra's
    ``multirun.yaml`` holds them), the study is a tag and a config key."""
    params = {"distill.at.beta": "tag(log, interval(10.0, 10000.0))",
              "distill.at.mode": "choice(sum, max)"}
    OmegaConf.save({"hydra": {"overrides": {"task": ["+hparams_search=at_beta_p", "seed=3"]},
                              "sweeper": {"params": params}}}, tmp_path / "multirun.yaml")
    hc = OmegaConf.create({
        "mode": RunMode.MULTIRUN, "runtime": {"choices": {"distill": "at", "model": "wrn_16_1"}},
        "sweep": {"dir": str(tmp_path)}, "sweeper": {"study_name": "at_beta_p"},
        "overrides": {"task": ["distill.at.beta=443.5", "distill.at.mode=max",
                               "+hparams_search=at_beta_p", "seed=3"]}})
    labels = run_labels(hc, compose_cfg(RUN))
    assert labels.name == "grouped distill.at.beta=443.5 distill.at.mode=max"
    assert labels.tags == ["distill:at", "model:wrn_16_1", "study:at_beta_p"]
    assert labels.config == {"atx.sweep_dir": str(tmp_path), "atx.study": "at_beta_p"}
