"""scripts/gpu_check.py on the CPU (its --cpu-smoke path): real atx-train processes, alone and
two at once, timed from their metrics.json, and the Table 1 estimate computed from them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import gpu_check  # noqa: E402


def test_cpu_smoke_measures_alone_and_packed(tmp_path: Path, capsys) -> None:
    result = gpu_check.main(["--cpu-smoke", "--epochs", "1", "--jobs", "1", "2",
                             "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert result["default"] > 0 and result["fast"] > 0
    assert set(result["packed"]) == {1, 2}
    assert result["packed"][1]["epoch_s"] == result["default"]  # the alone run, reused
    for n, row in result["packed"].items():
        assert row["run_epochs_per_hour"] == pytest.approx(n * 3600 / row["epoch_s"])
    best = max(r["run_epochs_per_hour"] for r in result["packed"].values())
    assert result["table1_row_hours"] == pytest.approx(25 * 200 / best)
    # two runs really ran at once, each with its own run dir and epoch times
    assert {p.name for p in tmp_path.glob("packed2_*") if p.is_dir()} == {"packed2_0",
                                                                          "packed2_1"}
    assert f"{result['table1_row_hours']:.2f} h" in printed and "| 2 |" in printed


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here; --cpu-smoke runs the same path"):
        gpu_check.main([])
