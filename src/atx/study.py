"""A teacher and its students over seeds, as one command: the table, the curves, the verdict.

`make demo` and `scripts/cifar10_short.py` are studies. Each is two real ``atx-train`` calls:

1. the teacher, into ``<teachers>/<key>/``, where the key is a hash of its overrides: a finished
   teacher of the same config is found there and reused (``atx-train`` skips a finished run);
2. every student as one Hydra multirun (``-m distill=<methods> seed=<seeds>``, one process),
   each given that teacher (the plain student only to measure its attention agreement).

Then it writes into the study dir ``table.md`` (mean ± std over seeds of the last-epoch test
error, and the attention agreement per layer group), ``curves.png`` (test error per epoch,
mean ± std band per method) and ``attention.png`` (``atx-visualize`` of the teacher and seed 0
of each attention student beside the plain one).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atx.report import epoch_columns, mean_std_median


@dataclass
class Study:
    """What to run. ``methods`` maps a row label to a ``distill`` preset; ``baseline`` is the
    label every other method is compared with; ``labels`` names the teacher and student nets."""

    title: str
    teacher: list[str]
    students: list[str]
    methods: dict[str, str]
    seeds: list[int]
    baseline: str = "student"
    labels: dict[str, str] = field(default_factory=dict)


def teacher_key(overrides: list[str]) -> str:
    """The teacher's cache key: its overrides, order kept (a changed value trains anew)."""
    return hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:12]


def atx_train(args: list[str], cwd: Path | None = None) -> float:
    """One real ``atx-train`` process; exits with its error output on failure. Seconds taken."""
    print(f"$ atx-train {' '.join(args)}", flush=True)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "atx.train", *args], cwd=cwd,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"study: atx-train failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def epoch_errors(run_dir: Path) -> dict[int, float]:
    """``{epoch: test error}`` of a run (epochs counted from 1)."""
    return {e + 1: v for e, v in epoch_columns(run_dir).get("val/error", {}).items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return mean_std_median(values)[:2]


def sweep_jobs(sweep_dir: Path) -> dict[tuple[str, int], Path]:
    """``{(distill preset, seed): run dir}`` of a multirun, read from each job's overrides."""
    jobs = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        values = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()))
        jobs[values["distill"], int(values["seed"])] = overrides_file.parents[1]
    return jobs


def collect(study: Study, teacher_dir: Path, students_dir: Path) -> dict[str, dict[str, Any]]:
    """Per row (teacher, then each method): its run dirs, final metrics and per-epoch errors."""
    rows: dict[str, dict[str, Any]] = {"teacher": {"dirs": [teacher_dir]}}
    jobs = sweep_jobs(students_dir)
    for label, preset in study.methods.items():
        rows[label] = {"dirs": [jobs[preset, s] for s in study.seeds]}
    for row in rows.values():
        row["metrics"] = [json.loads((d / "metrics.json").read_text()) for d in row["dirs"]]
        row["curves"] = [epoch_errors(d) for d in row["dirs"]]
        row["error"] = _mean_std([m["val/error"] for m in row["metrics"]])
        keys = sorted(k for k in row["metrics"][0] if k.startswith("val/agreement/"))
        row["agreement"] = [statistics.fmean(m[k] for m in row["metrics"]) for k in keys]
    return rows


def verdicts(study: Study, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Each method against the baseline: "clearly better" when its mean error is lower by more
    than twice the larger of the two seed standard deviations."""
    base_mean, base_std = rows[study.baseline]["error"]
    lines = []
    for label in [*study.methods, "teacher"]:
        if label == study.baseline:
            continue
        mean, std = rows[label]["error"]
        gain, margin = base_mean - mean, 2 * max(std, base_std)
        word = "clearly better than" if gain > margin else "not clearly better than"
        lines.append(f"{study.labels.get(label, label)} is {word} the {study.baseline}: "
                     f"{gain:+.2f} points (2 x the larger std = {margin:.2f})")
    return lines


def table(study: Study, rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown table: test error mean ± std over seeds, attention agreement per group."""
    n = len(study.seeds)
    lines = ["| network | runs | test error % (mean ± std) | attention agreement with the "
             "teacher (per group) |", "|---|---|---|---|"]
    for label, row in rows.items():
        mean, std = row["error"]
        agree = " / ".join(f"{a:.3f}" for a in row["agreement"]) if label != "teacher" else "-"
        spread = f"{mean:.2f} ± {std:.2f}" if len(row["dirs"]) > 1 else f"{mean:.2f}"
        runs = f"{n} seeds" if len(row["dirs"]) > 1 else "1"
        lines.append(f"| {study.labels.get(label, label)} | {runs} | {spread} | {agree} |")
    return "\n".join(lines)


def curves_figure(study: Study, rows: dict[str, dict[str, Any]], path: Path) -> Path:
    """Test error per epoch: mean ± std band over seeds per method; the teacher's final error
    as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for label, row in rows.items():
        name = study.labels.get(label, label)
        if label == "teacher":
            ax.axhline(row["error"][0], color="black", linestyle="--", linewidth=1, label=name)
            continue
        epochs = sorted(set.intersection(*(set(c) for c in row["curves"])))
        stats = [_mean_std([c[e] for c in row["curves"]]) for e in epochs]
        mean = [m for m, _ in stats]
        ax.plot(epochs, mean, marker="o", label=name)
        ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test error % (mean ± std, {len(study.seeds)} seeds)")
    ax.set_title(textwrap.fill(study.title, 80), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(study: Study, out: Path, teachers: Path) -> str:
    """Train (or reuse) the teacher, train the students, write the results; returns the text
    printed at the end (table, verdicts, files, times)."""
    began = time.perf_counter()
    teacher_dir = teachers / teacher_key(study.teacher)
    reused = (teacher_dir / "metrics.json").is_file()
    teacher_s = atx_train([*study.teacher, f"hydra.run.dir={teacher_dir}"])
    students = out / "students"
    atx_train(["-m", *study.students, f"teacher.checkpoint={teacher_dir}",
               f"distill={','.join(study.methods.values())}",
               f"seed={','.join(str(s) for s in study.seeds)}",
               f"hydra.sweep.dir={students}"])
    rows = collect(study, teacher_dir, students)
    from atx.visualize import main as visualize

    attention = [rows["teacher"]["dirs"][0], *(rows[m]["dirs"][0] for m in study.methods)]
    visualize([*map(str, attention), "--images", "8", "--out", str(out / "attention.png")])
    curves = curves_figure(study, rows, out / "curves.png")
    text = "\n".join([
        f"{study.title}\n", table(study, rows), "",
        "(agreement: cosine similarity of student and teacher attention maps, F^2_sum, per layer"
        " group, mean over the test images; 1 = the teacher's own attention)", "",
        *verdicts(study, rows), "",
        f"teacher: {teacher_dir} ({'reused' if reused else f'trained in {teacher_s:.0f} s'})",
        f"students: {students}", f"curves: {curves}", f"attention maps: {out / 'attention.png'}",
        f"total time: {time.perf_counter() - began:.0f} s",
    ])
    (out / "table.md").write_text(text + "\n")
    return text
