"""The real ``atx-train`` command in a subprocess: a multirun sweep, W&B offline, error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli import FAST, atx_train
from wandb_records import summarise

from atx.models import build_model
from atx.report import report


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    """An untrained WRN-10-2 for the default data (Fashion-MNIST: 1 channel)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(
        build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict(), path
    )
    return path


def test_multirun_sweep_beta_by_p_by_layers_with_wandb_offline(tmp_path, teacher_pt):
    sweep = tmp_path / "sweep"
    result = atx_train(
        [
            "-m",
            *FAST,
            "distill=at",
            "teacher=wrn_16_2",
            "teacher.depth=10",
            f"teacher.checkpoint={teacher_pt}",
            "distill.at.beta=500,1000",
            "distill.at.p=1,2",
            "distill.at.student_layers=all,[group3]",  # a preset and a free list
            "logger=wandb",
            "name=sweep_test",
            f"hydra.sweep.dir={sweep}",
        ],
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert sorted(int(j.name) for j in jobs) == list(range(8))
    seen, run_ids, groups_seen = set(), set(), set()
    for job in jobs:
        assert (job / "student.pt").is_file() and (job / "metrics.json").is_file()
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        at = cfg["distill"]["at"]
        seen.add((at["beta"], at["p"], str(at["student_layers"])))
        (run_file,) = list(job.glob("wandb/offline-run-*/run-*.wandb"))  # one W&B run per job
        run = summarise(run_file)
        run_ids.add(run["id"])
        groups_seen.add(run["group"])
        assert run["group"].startswith("sweep_test-")  # grouped by config (test_wandb_groups)
        assert run["config"]["atx.sweep_dir"] == f'"{sweep}"'  # the sweep, as a config key
        layers = "all" if at["student_layers"] == "all" else "[group3]"  # named by the sweep
        assert run["name"] == (f"sweep_test distill.at.beta={at['beta']:g} "
                               f"distill.at.p={at['p']:g} distill.at.student_layers={layers} "
                               "seed=0")
        assert {"distill:at", "model:wrn_16_1", "teacher:wrn_16_2"} <= set(run["tags"])
        assert run["config"]["distill.at.beta"] == str(cfg["distill"]["at"]["beta"])
        groups = "group1,group2,group3" if layers == "all" else "group3"
        assert run["config"]["layers.student"] == f'"{groups}"'  # the preset resolved
        assert {"val/error", "train/at/group3_epoch", "weight/at"} <= run["history_keys"]
        assert ("train/at/group1_epoch" in run["history_keys"]) == (layers == "all")
        assert run["images"] >= 1  # the attention figure
    assert seen == {(b, p, s) for b in (500.0, 1000.0) for p in (1.0, 2.0)
                    for s in ("all", "['group3']")}
    assert len(run_ids) == 8 and len(groups_seen) == 8  # 8 configurations, 8 groups
    # atx-report on the real sweep: one row per (beta, p, layers), plots against beta and p
    rows = report(sweep)
    assert len(rows) == 8 and all(r["seeds"] == 1 for r in rows)
    assert {(r["distill.at.beta"], r["distill.at.p"]) for r in rows} == {s[:2] for s in seen}
    for plot in ("error_vs_beta", "error_vs_p", "transfer_losses"):
        assert (sweep / f"report_{plot}.png").stat().st_size > 1000


def test_config_typo_is_one_message_without_traceback(tmp_path):
    """README, Config errors: every problem is one ``atx: error:`` line, exit code 2."""
    result = atx_train(["distill.at.bta=3", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]  # one line, no traceback
    assert line.startswith("atx: error: ") and "Key 'bta' not in 'ATConf'" in line
    assert "did you mean 'distill.at.beta'?" in line


def test_user_error_is_one_line_exit_2(tmp_path):
    result = atx_train(["model.name=wrm", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("atx: error: model: unknown model 'wrm'")
    assert "did you mean 'wrn'" in lines[-1]
    assert "Traceback" not in result.stderr


def test_missing_teacher_checkpoint_is_one_line(tmp_path):
    result = atx_train(
        [
            "distill=at",
            "teacher=wrn_16_2",
            f"teacher.checkpoint={tmp_path}/nothing",
            f"hydra.run.dir={tmp_path}/r",
        ]
    )
    assert result.returncode == 2
    assert f"atx: error: checkpoint '{tmp_path}/nothing' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_with_in_process_ddp_stops_at_start_up(tmp_path):
    result = atx_train(["-m", "trainer.strategy=ddp", "trainer.devices=2", "seed=0,1",
                        f"hydra.sweep.dir={tmp_path}/sweep"], timeout=120)
    assert result.returncode == 2
    assert "atx: error: -m with trainer.strategy=ddp" in result.stderr
    assert "ddp_spawn" in result.stderr and "Traceback" not in result.stderr
