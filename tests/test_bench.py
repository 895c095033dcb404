"""Smoke test of scripts/bench_step.py: every runner takes real steps on tiny batches."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_statistics(bench) -> None:
    assert bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert bench.quantile([1.0, 2.0], 0.1) == pytest.approx(1.1)
    s = bench.summarize([0.1, 0.2, 0.3], batch_size=128)
    assert s["median_ms"] == pytest.approx(200.0) and s["img_s"] == pytest.approx(640.0)
    r = bench.ratios({"teacher forward": 1.0, "student": 1.0, "KD": 2.0, "AT": 2.2})
    assert r["AT / (student + teacher forward)"] == pytest.approx(1.1)
    assert r["AT / KD"] == pytest.approx(1.1)


def test_parse_args(bench) -> None:
    assert bench.parse_args([]).paths == ["trainer", "manual"]
    assert bench.parse_args(["--manual"]).paths == ["manual"]
    args = bench.parse_args(["--trainer", "--steps", "5", "--batch-size", "8"])
    assert (args.paths, args.steps, args.batch_size) == (["trainer"], 5, 8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning: no val loader, few workers
def test_tiny_run(bench) -> None:
    threads = torch.get_num_threads()
    try:
        result = bench.run_benchmark(
            configs=[
                "teacher forward",
                "teacher fwd+bwd",
                "student",
                "AT",
                "F-ActT",
                "grad-AT",
                "symmetry",
            ],  # fmt: skip
            paths=["trainer", "manual"],
            steps=2,
            warmup=1,
            block=1,
            batch_size=4,
            threads=1,
        )
    finally:
        torch.set_num_threads(threads)
    times = result.times()
    students = ("student", "AT", "F-ActT", "grad-AT", "symmetry")
    assert set(times) == {
        ("teacher forward", "forward"),
        ("teacher fwd+bwd", "forward"),
        *((c, p) for c in students for p in ("trainer", "manual")),
    }
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert {b.round for b in result.blocks} == {2, 3}  # round 1 was the warm-up
    table, _ = bench.report(result, min_quiet=1)
    assert "| AT | trainer |" in table and "AT / (student + teacher forward)" in table
    assert "grad-AT / (student + teacher fwd+bwd)" in table and "symmetry / student" in table
