"""``atx.study`` (make demo, scripts/cifar10_short.py): verdicts, the table, and a tiny real study
whose second launch reuses the teacher it trained."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cli import FAST

from atx.study import Study, run_study, table, teacher_key, verdicts


def _rows(errors: dict[str, list[float]]) -> dict[str, dict]:
    rows = {}
    for label, values in errors.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows[label] = {"dirs": values, "error": (statistics.fmean(values), std),
                       "agreement": [0.5, 0.75]}
    return rows


STUDY = Study(title="t", teacher=[], students=[], methods={"student": "none", "AT": "at"},
              seeds=[0, 1, 2])


def test_verdict_needs_more_than_twice_the_larger_std() -> None:
    # student 20 ± 1, AT 17.9 ± 0.1: gain 2.1 > 2 x 1 -> clearly better
    rows = _rows({"teacher": [10.0], "student": [19.0, 20.0, 21.0], "AT": [17.8, 17.9, 18.0]})
    assert verdicts(STUDY, rows)[0].startswith("AT is clearly better than the student: +2.10")
    # AT 18.1: gain 1.9 < 2 -> not clearly, whatever its own std
    rows = _rows({"teacher": [10.0], "student": [19.0, 20.0, 21.0], "AT": [18.0, 18.1, 18.2]})
    assert verdicts(STUDY, rows)[0].startswith("AT is not clearly better than the student: +1.90")
    assert verdicts(STUDY, rows)[1].startswith("teacher is clearly better")


def test_table_prints_mean_and_std_over_seeds() -> None:
    rows = _rows({"teacher": [10.0], "student": [19.0, 20.0, 21.0], "AT": [17.0, 18.0, 19.0]})
    lines = table(STUDY, rows).splitlines()
    assert lines[2] == "| teacher | 1 | 10.00 | - |"
    assert lines[3] == "| student | 3 seeds | 20.00 ± 1.00 | 0.500 / 0.750 |"
    assert lines[4] == "| AT | 3 seeds | 18.00 ± 1.00 | 0.500 / 0.750 |"


def test_teacher_key_follows_every_override() -> None:
    assert teacher_key(["a=1", "b=2"]) == teacher_key(["a=1", "b=2"])
    assert teacher_key(["a=1", "b=2"]) != teacher_key(["a=1", "b=3"])


def test_tiny_study_end_to_end_and_teacher_reused(tmp_path: Path) -> None:
    common = [*FAST, "logger=csv", "data.train_subset=48", "data.val_subset=24"]
    study = Study(
        title="tiny",
        teacher=[*common, "model=wrn_16_2", "name=tiny_teacher"],
        students=[*common, "model=wrn_16_1", "teacher=wrn_16_2", "teacher.depth=10",
                  "trainer.max_epochs=2"],
        methods={"student": "none", "student + AT": "at"},
        seeds=[0, 1],
    )
    teachers = tmp_path / "teachers"
    text = run_study(study, tmp_path / "first", teachers)
    teacher_dir = teachers / teacher_key(study.teacher)
    assert "trained in" in text
    for name in ("table.md", "curves.png", "attention.png"):
        assert (tmp_path / "first" / name).stat().st_size > 0
    # the table's AT row is the mean ± std of the two AT runs' own metrics.json
    at_errors = []
    for overrides in (tmp_path / "first" / "students").glob("*/.hydra/overrides.yaml"):
        if "distill=at" in overrides.read_text():
            run = overrides.parents[1]
            at_errors.append(json.loads((run / "metrics.json").read_text())["val/error"])
            assert len((run / "csv" / "metrics.csv").read_text().splitlines()) > 2
    assert len(at_errors) == 2
    mean, std = statistics.fmean(at_errors), statistics.stdev(at_errors)
    assert f"| student + AT | 2 seeds | {mean:.2f} ± {std:.2f} |" in text

    trained = (teacher_dir / "student.pt").stat().st_mtime_ns
    again = Study(**{**study.__dict__, "methods": {"student": "none"}, "seeds": [0]})
    text = run_study(again, tmp_path / "second", teachers)
    assert f"teacher: {teacher_dir} (reused)" in text
    assert (teacher_dir / "student.pt").stat().st_mtime_ns == trained
