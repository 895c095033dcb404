"""Optuna searches (``+hparams_search=at_beta_p``, atx.search) through the real ``atx-train``:
a killed search continues its SQLite study, and a search that cannot work stops at start-up."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from cli import FAST, atx_train
from ddp_checks import DDP, check_ddp_run, ranks_of
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from optuna.distributions import LogUniformDistribution
from optuna.trial import TrialState

from atx.files import try_lock
from atx.models import build_model
from atx.search import search_space
from atx.train import main

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2)
               .state_dict(), path)
    return path


def search_args(sweep: Path, teacher: Path, *extra: str) -> list[str]:
    return [*FAST, "+hparams_search=at_beta_p", "logger=csv", "figure_images=0",
            "data.val_split=16", "distill=at", "teacher=wrn_16_2", "teacher.depth=10",
            f"teacher.checkpoint={teacher}", f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.n_trials=6", *extra]


def load(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name="at_beta_p", storage=f"sqlite:///{sweep}/study.db")


def wait_for_running_trial(
    process: subprocess.Popen, sweep: Path, number: int, params: int = 4
) -> None:
    """Until trial ``number`` of the study is running with all its ``params`` sampled (the
    sweeper writes them one by one after asking for the trial)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:  # read-only: optuna's own client would race the search creating its tables
            with sqlite3.connect(f"file:{sweep}/study.db?mode=ro", uri=True) as db:
                sampled = db.execute(
                    "SELECT COUNT(*) FROM trials JOIN trial_params USING (trial_id)"
                    " WHERE state = 'RUNNING' AND number = ?", (number,)
                ).fetchone()[0]
                if sampled >= params:
                    return
        except sqlite3.OperationalError:  # no database or no table yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"trial {number} never started")


def test_a_killed_search_continues_its_study_without_repeating_trials(tmp_path, teacher_pt):
    sweep = tmp_path / "search"
    args = search_args(sweep, teacher_pt)
    process = subprocess.Popen([sys.executable, "-m", "atx.train", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_running_trial(process, sweep, 3)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind: the DB keeps trial 3 running
    process.wait()
    first = load(sweep).get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]
    finished = {t.number: (t.value, Path(t.user_attrs["run_dir"])) for t in first[:3]}
    stamps = {n: os.stat(d / "metrics.json").st_mtime_ns for n, (_, d) in finished.items()}

    result = atx_train(args)  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "atx: search 'at_beta_p': 3 trials finished, 3 to run" in result.stderr
    trials = load(sweep).get_trials()
    # 0-2 kept, 3 (killed) failed and its parameters run again first as 4, then two new ones
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] + \
        [TrialState.COMPLETE] * 3
    assert trials[4].params == first[3].params
    assert len({json.dumps(t.params, sort_keys=True) for t in trials[4:]}) == 3
    for t in trials[:3]:
        assert (t.value, Path(t.user_attrs["run_dir"])) == finished[t.number]
        assert os.stat(finished[t.number][1] / "metrics.json").st_mtime_ns == stamps[t.number]
    launches = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(launches) == 2  # one folder per launch: no trial dir is reused
    for t in (t for t in trials if t.state == TrialState.COMPLETE):
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parent == launches[t.number > 2]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["heldout/error"])  # the objective: held out
        assert t.user_attrs["test_error"] == pytest.approx(metrics["val/error"])  # beside it
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert all(f"{k}={v}" in overrides for k, v in t.params.items())
        assert set(t.params) == {"distill.at.beta", "distill.at.p", "distill.at.mode",
                                 "distill.at.student_layers"}
        assert 10 <= t.params["distill.at.beta"] <= 10000
    rows = (sweep / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,heldout_error,test_error,") and len(rows) == 8


def start_up_error(monkeypatch, capsys, args: list[str]) -> str:
    """``atx-train <args>`` in this process: exit 2 with one ``atx: error:`` line."""
    monkeypatch.setattr(sys, "argv", ["atx-train", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it; restored afterwards
    try:
        with pytest.raises(SystemExit) as stop:
            main()
    finally:
        GlobalHydra.instance().clear()
    assert stop.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("atx: error:")]
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(("override", "message"), [
    ("data.val_split=0", "a search minimises the held-out error, and data.val_split=0 holds"),
    # a range given on the command line replaces the preset's (hydra.sweeper.params)
    ("distill.at.beta=tag(log, interval(1000.0, 10.0))",
     "error: distill.at.beta: interval(1000.0, 10.0) is empty: give low < high"),
    ("distill.at.beta=interval(5.0, 5.0)", "distill.at.beta: interval(5.0, 5.0) holds one value"),
    ("distill.at.p=range(4, 1)", "distill.at.p: range(4, 1) holds no values"),
    ("distill.at.beta=tag(log, interval(0.0, 10.0))",
     "distill.at.beta: The `low` value must be larger than 0 for a log distribution"),
    ("distill.at.mode=choice()", "'distill.at.mode=choice()': empty choice is not legal"),
    ("hydra.sweeper.direction=maximize", "the objective is an error %: minimize"),
])
def test_a_search_that_cannot_work_stops_at_start_up(tmp_path, monkeypatch, capsys, override,
                                                     message):
    sweep = tmp_path / "search"
    line = start_up_error(monkeypatch, capsys, search_args(sweep, tmp_path / "t.pt", override))
    assert message in line, line
    assert not (sweep / "study.db").exists()  # refused before a study was made


def test_a_study_of_other_settings_or_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """In the preset's own sweep dir, outputs/search/<name>/<study> (``${name}`` resolved)."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "outputs" / "search" / "wrn_16_1" / "at_beta_p"
    sweep.mkdir(parents=True)
    study = optuna.create_study(study_name="at_beta_p", storage=f"sqlite:///{sweep}/study.db")
    study.set_user_attr("atx.config_key", "0123abcd")  # a first launch with other settings
    args = search_args(sweep, tmp_path / "t.pt")
    args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
    line = start_up_error(monkeypatch, capsys, args)
    assert "study 'at_beta_p' in 'sqlite:///outputs/search/wrn_16_1/at_beta_p/study.db' was " \
        "started with other settings" in line
    lock = try_lock(sweep / "study.db.lock")  # another launch searching it now
    line = start_up_error(monkeypatch, capsys, args)
    assert "is being searched by another process" in line
    lock.close()


def test_the_command_line_narrows_or_fixes_the_presets_search_space():
    params = OmegaConf.load(ROOT / "conf" / "hparams_search" / "at_beta_p.yaml").hydra.sweeper
    task = ["distill.at.beta=tag(log, interval(100.0, 1000.0))", "distill.at.mode=sum",
            "data.val_split=16"]
    space = search_space(OmegaConf.create({"hydra": {"sweeper": {"params": params.params},
                                                     "overrides": {"task": task}}}))
    assert set(space) == {"distill.at.beta", "distill.at.p", "distill.at.student_layers"}
    beta = space["distill.at.beta"]
    assert isinstance(beta, LogUniformDistribution) and (beta.low, beta.high) == (100, 1000)
    assert space["distill.at.p"].choices == (1.0, 2.0, 4.0)
    assert space["distill.at.student_layers"].choices == ("all", "last2", "last")


def with_overrides(args: list[str], *extra: str) -> list[str]:
    """``args`` with ``extra`` in place of the overrides of the same keys."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)


def test_two_trials_at_once_through_the_joblib_launcher(tmp_path, teacher_pt):
    sweep = tmp_path / "search"
    args = with_overrides(search_args(sweep, teacher_pt), "hydra.sweeper.n_trials=2",
                          "hydra.sweeper.n_jobs=2", "hydra/launcher=parallel",
                          "hydra.launcher.n_jobs=2")
    result = atx_train(args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    trials = load(sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params
    # asked as one batch (the second before the first was told) and run by 2 joblib workers
    assert trials[1].datetime_start < trials[0].datetime_complete
    dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert dirs[0] != dirs[1] and all((d / "student.pt").is_file() for d in dirs)
    for t, run_dir in zip(trials, dirs, strict=True):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["heldout/error"])
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert config.distill.at.beta == pytest.approx(t.params["distill.at.beta"])


def test_a_trial_as_a_two_rank_ddp_job_trains_one_beta_on_both_ranks(tmp_path, teacher_pt):
    """Each trial one submitit job whose 2 tasks are the DDP ranks (gloo), as on Slurm."""
    sweep = tmp_path / "search"
    args = with_overrides(search_args(sweep, teacher_pt), "hydra.sweeper.n_trials=1",
                          "hydra/launcher=local_ddp", "hydra.launcher.gpus_per_node=0", *DDP)
    result = atx_train(args, env={"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = load(sweep).get_trials()
    assert trial.state == TrialState.COMPLETE
    (rank1_log,) = sweep.glob(".submitit/*/*_1_log.err")  # submitit started task (rank) 1
    assert "MEMBER: 2/2" in rank1_log.read_text() + rank1_log.with_suffix(".out").read_text()
    run_dir = Path(trial.user_attrs["run_dir"])
    ranks = ranks_of(run_dir)  # both ranks: one config hash, one set of weights and pairs
    assert ranks[1]["weights"]["at"] == pytest.approx(trial.params["distill.at.beta"])
    check_ddp_run(run_dir, 33, [*FAST, "data.val_subset=33", "data.val_split=16"], heldout=16)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert trial.value == pytest.approx(metrics["heldout/error"])


def test_ranks_given_different_runs_stop_in_one_line(tmp_path, monkeypatch):
    from atx.callbacks import RANKS_FILE, SameRunOnEveryRank
    from atx.errors import AtxError
    from atx.losses import Objective, Schedule
    from atx.terms import AttentionTransfer, CrossEntropy

    objective = Objective([CrossEntropy(Schedule(1.0)),
                           AttentionTransfer(Schedule(50.0), [("group1", "group1")])])

    def gather(out: list, mine: dict) -> None:  # rank 1 was handed another beta
        out[:] = [mine, {**mine, "weights": {**mine["weights"], "at": 20.0}}]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    trainer = type("T", (), {"world_size": 2, "global_rank": 0, "is_global_zero": True})()
    module = type("M", (), {"objective": objective})()
    check = SameRunOnEveryRank(tmp_path, "0123abcd")
    with pytest.raises(AtxError) as e:
        check.on_fit_start(trainer, module)
    assert str(e.value).startswith("DDP rank 1 was given another run than rank 0 (its weights")
    assert "\n" not in str(e.value)
    ranks = json.loads((tmp_path / RANKS_FILE).read_text())
    assert [r["weights"]["at"] for r in ranks] == [50.0, 20.0]
