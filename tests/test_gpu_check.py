"""scripts/gpu_check.py on the CPU (its --cpu-smoke path): real atx-train processes, alone and
two at once, timed from their metrics.json, and the Table 1 estimate computed from them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import gpu_check  # noqa: E402


def test_cpu_smoke_measures_alone_and_packed(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # five runs at once on the CPU: a thread each
    result = gpu_check.main(["--cpu-smoke", "--epochs", "1", "--jobs", "1", "2",
                             "--out", str(tmp_path)])
    assert result["default"] > 0 and result["fast"] > 0 and result["fastest"] > 0
    assert result["authors"] > 0  # the authors' loop, on as many images as the runs had
    assert (tmp_path / "authors" / "model.pt7").is_file()
    printed = capsys.readouterr().out
    assert gpu_check.report(result) in printed
    assert f"authors' loop / fast: {result['authors'] / result['fast']:.2f}x" in printed
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
    failed = gpu_check.report({**result, "fastest": None, "fastest_error": "gpu_check: x failed"})
    assert "| failed (below) |" in failed and failed.endswith("gpu_check: x failed")
    assert "authors' loop / fastest" not in failed


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here; --cpu-smoke runs the same path"):
        gpu_check.main([])


def test_the_vit_runs_pass_atx_start_up_checks(tmp_path: Path, monkeypatch) -> None:
    """--vit's three commands compose and pass every start-up check (a GPU pretended)."""
    from configs import compose_cfg

    from atx.checks import check_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    commands = gpu_check.vit_commands("data/cifar10", tmp_path)
    assert [c[0] for c in commands] == ["experiment=cifar10_teacher_wrn_16_2",
                                        *["experiment=cifar10_vit_tiny-wrn_16_2"] * 2]
    for cmd in commands:
        overrides = [o for o in cmd if not o.startswith("hydra.")]
        cfg = compose_cfg(overrides)
        check_config(cfg)
        assert cfg.trainer.accelerator == "gpu"
    assert compose_cfg(commands[2][:-1]).distill.at.student_layers == "auto"
