"""atx-report: finished runs grouped over seeds, statistics by hand, files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from atx.report import main, report


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
    assert "| `distill.at.beta=500` | 3 | 12.00 ± 2.00 (12.00) | 9.50 ± 0.50 (9.50) | 0.600 |" in md
    with (tmp_path / "report.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "report_error_vs_beta.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "atx-report: error: " in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no finished runs under" in capsys.readouterr().err
