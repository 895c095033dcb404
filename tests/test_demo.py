"""``make demo`` (scripts/demo.py): its ``--tiny`` budget end to end on the real Fashion-MNIST
(teacher, 2 seeds x 3 methods, table, curves, attention maps; a second launch reusing the
teacher), and the full run's settings."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from atx.study import Study, run_study

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")
METHODS = {"student WRN-10-1": "none", "student + AT": "at",
           "student + AT+KD (alpha 0.5)": "at_kd_alpha05"}


def overrides(run: Path) -> list[str]:
    return yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_full_demo_settings_are_the_experiment_presets(demo, tmp_path, monkeypatch) -> None:
    """Without --tiny the study is exactly the README's: the demo presets, 3 seeds, teachers
    kept in outputs/demo/teachers."""
    seen = []
    monkeypatch.setattr(demo, "run_study", lambda *a: seen.append(a) or "done")
    demo.main(["--out", str(tmp_path / "out")])
    study, out, teachers = seen[0]
    assert study.teacher == ["experiment=demo_teacher", *demo.QUIET]
    assert study.students == ["experiment=demo", *demo.QUIET]
    assert study.seeds == [0, 1, 2] and study.methods == METHODS
    assert study.baseline == "student WRN-10-1" and "20,000 images, 3 epochs" in study.title
    assert out == tmp_path / "out" and teachers == demo.ROOT / "outputs" / "demo" / "teachers"


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_tiny_demo_prints_the_table_and_writes_the_figures(demo, tmp_path, capsys,
                                                           monkeypatch) -> None:
    out, teachers = tmp_path / "demo", tmp_path / "teachers"
    studies: list[Study] = []  # what the demo ran, for the second launch below
    monkeypatch.setattr(demo, "run_study", lambda study, *a: studies.append(study) or
                        run_study(study, *a))
    demo.main(["--tiny", "--out", str(out), "--teachers", str(teachers)])
    printed = capsys.readouterr().out
    text = (out / "table.md").read_text()
    assert text.strip() in printed  # the table, verdicts and file list are what it printed
    lines = text.splitlines()
    assert lines[0].startswith("Fashion-MNIST, --tiny smoke run")
    header = lines.index("| network | runs | test error % (mean ± std) | attention agreement "
                         "with the teacher (per group) |")
    rows = lines[header + 2 : header + 2 + 1 + len(METHODS)]
    assert rows[0].startswith("| teacher WRN-10-2 | 1 | ") and rows[0].endswith(" | - |")
    students = sorted((out / "students").glob("*/metrics.json"))
    assert len(students) == 2 * len(METHODS)
    for row, (label, preset) in zip(rows[1:], METHODS.items(), strict=True):
        runs = [p.parent for p in students if f"distill={preset}" in overrides(p.parent)]
        errors = [json.loads((r / "metrics.json").read_text())["val/error"] for r in runs]
        assert len(errors) == 2, label
        mean, std = statistics.fmean(errors), statistics.stdev(errors)
        assert row.startswith(f"| {label} | 2 seeds | {mean:.2f} ± {std:.2f} | "), row
        assert row.count(" / ") == 2  # agreement for each of the three WRN groups
    for label in list(METHODS)[1:]:
        assert any(v.startswith(f"{label} is ") for v in lines), label  # its verdict
    for name in ("curves.png", "attention.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200, name
    # the tiny budget reached every run: 64 teacher and 32 student images, one epoch
    teacher_cfg = OmegaConf.load(next(teachers.glob("*/.hydra/config.yaml")))
    assert (teacher_cfg.data.train_subset, teacher_cfg.trainer.max_epochs) == (64, 1)
    student_cfg = OmegaConf.load(students[0].parent / ".hydra" / "config.yaml")
    assert (student_cfg.data.train_subset, student_cfg.trainer.max_epochs) == (32, 1)
    assert student_cfg.data.root == str(FASHION)
    # a second launch (one plain student) reuses the teacher the first trained
    (teacher_dir,) = (p.parent for p in teachers.glob("*/student.pt"))
    trained = (teacher_dir / "student.pt").stat().st_mtime_ns
    base = studies[0].baseline
    again = Study(**{**studies[0].__dict__, "methods": {base: "none"}, "seeds": [0]})
    text = run_study(again, tmp_path / "again", teachers)
    assert f"teacher: {teacher_dir} (reused)" in text
    assert (teacher_dir / "student.pt").stat().st_mtime_ns == trained
    assert len(list((tmp_path / "again" / "students").glob("*/metrics.json"))) == 1
