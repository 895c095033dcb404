"""atx-report: finished runs grouped over seeds, statistics by hand, files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from atx.paper import PAPER_ERRORS
from atx.report import loss_curves, main, report


def fake_run(root: Path, name: str, overrides: list[str], seed: int, last: float, best: float,
             beta: float, agreement: float | None = None) -> None:  # fmt: skip
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    config = {"seed": seed, "distill": {"at": {"beta": beta, "p": 2.0}}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"val/error": last, "best/val_error": best}
    if agreement is not None:
        metrics["val/agreement/group1"] = agreement
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_rows_group_seeds_with_hand_computed_statistics(tmp_path):
    for i, (last, best) in enumerate([(10.0, 9.0), (12.0, 10.0), (14.0, 9.5)]):
        fake_run(tmp_path, f"a{i}", ["distill.at.beta=500"], i, last, best, 500.0, 0.5 + i / 10)
    for i, last in enumerate([8.0, 9.0]):
        fake_run(tmp_path, f"b{i}", ["distill.at.beta=1000"], i, last, last - 1, 1000.0)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)  # no metrics.json: skipped
    rows = {r["config"]: r for r in report(tmp_path)}
    a, b = rows["distill.at.beta=500"], rows["distill.at.beta=1000"]
    assert a["seeds"] == 3 and b["seeds"] == 2
    assert a["last_mean"] == pytest.approx(12.0) and a["last_median"] == pytest.approx(12.0)
    assert a["last_std"] == pytest.approx(2.0)  # sample std of 10, 12, 14
    assert a["best_median"] == pytest.approx(9.5)
    assert a["agreement/group1"] == pytest.approx(0.6) and "agreement/group1" not in b
    assert b["last_mean"] == pytest.approx(8.5) and b["best_mean"] == pytest.approx(7.5)
    md = (tmp_path / "report.md").read_text()
    row = "| `distill.at.beta=500` | 3 | 12.00 ± 2.00 (12.00) | 9.50 ± 0.50 (9.50) | - | 0.600 |"
    assert row in md
    with (tmp_path / "report.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "report_error_vs_beta.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "atx-report: error: " in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no finished runs under" in capsys.readouterr().err


def test_paper_numbers_and_transfer_loss_curves(tmp_path):
    """A run composed from a paper preset shows the paper's error beside it; the per-group AT
    losses of its metrics.csv are averaged over seeds and plotted."""
    for seed, distill, scale in [(0, "at_sum_p1", 1.0), (1, "at_sum_p1", 3.0), (0, "none", 0.0)]:
        name = f"{distill}{seed}"
        fake_run(tmp_path, name, [f"distill={distill}"], seed, 8.0 + seed, 7.5, 1000.0)
        choices = {"experiment": "t2_wrn_16_1-wrn_16_2", "distill": distill}
        (tmp_path / name / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
        )
        if scale:
            (tmp_path / name / "csv").mkdir()
            lines = ["epoch,step,train/at/group1_epoch,train/at/group2_epoch,train/loss_epoch"]
            lines += [f"{e},{e * 10},{scale * (2 - e)},{scale * (4 - e)},9" for e in (0, 1)]
            (tmp_path / name / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    rows = {r["config"]: r for r in report(tmp_path)}
    assert rows["distill=at_sum_p1"]["paper_error"] == pytest.approx(7.99)
    assert rows["distill=none"]["paper_error"] == pytest.approx(8.77)
    assert "| 7.99 (Table 2) |" in (tmp_path / "report.md").read_text()
    curves = [loss_curves(d) for d in rows["distill=at_sum_p1"]["dirs"]]
    assert curves[1] == {"at/group1": {0: 6.0, 1: 3.0}, "at/group2": {0: 12.0, 1: 9.0}}
    assert (tmp_path / "report_transfer_losses.png").stat().st_size > 1000


def test_paper_rows_name_existing_presets():
    conf = Path(__file__).parents[1] / "conf"
    for experiment, distill in PAPER_ERRORS:
        assert (conf / "experiment" / f"{experiment}.yaml").is_file(), experiment
        assert (conf / "distill" / f"{distill}.yaml").is_file(), distill
