"""``atx.study`` (make demo, scripts/cifar10_short.py): verdicts, the table and the teacher key.
A real study end to end, and a second launch reusing its teacher: tests/test_demo.py."""

from __future__ import annotations

import statistics

from atx.study import Study, table, teacher_key, verdicts


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
