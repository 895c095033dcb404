"""atx-report --sensitivity on finished runs whose errors are known: the bands drawn, the
error-vs-p points and the verdict table, computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from atx.report import find_runs, main
from atx.sensitivity import collect, draw, verdict, write_sensitivity

SQRT2, HALF_SQRT2 = 2**0.5, 0.5**0.5


def fake_run(root: Path, name: str, seed: int, heldout: float | None, test: float,
             beta: float, p: float = 2.0, mode: str = "sum", layers: object = "all") -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    overrides = [f"distill.at.beta={beta}", f"distill.at.p={p}", f"distill.at.mode={mode}",
                 f"seed={seed}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    at = {"beta": beta, "p": p, "mode": mode, "student_layers": layers}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed,
                                                                "distill": {"at": at}}))
    metrics = {"val/error": test, "best/val_error": test}
    if heldout is not None:
        metrics["heldout/error"] = heldout
    (run / "metrics.json").write_text(json.dumps(metrics))


# (p, mode, beta): held-out errors over seeds
GRID = {
    (2.0, "sum", 100.0): [10.0, 12.0],        # 11 ± sqrt(2)
    (2.0, "sum", 1000.0): [8.0, 9.0, 10.0],   # 9 ± 1: the best
    (2.0, "sum", 10000.0): [9.3, 10.3],       # 9.8 ± sqrt(0.5): within one std of 9 ± 1
    (1.0, "sum", 100.0): [11.0, 11.0],        # 11 ± 0
    (1.0, "sum", 1000.0): [9.5, 10.5],        # 10 ± sqrt(0.5): 11 is not within it
    (2.0, "max", 100.0): [12.0, 13.0],        # 12.5 ± sqrt(0.5)
    (2.0, "max", 1000.0): [9.8, 10.6],        # 10.2 ± sqrt(0.32)
}


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    for (p, mode, beta), errors in GRID.items():
        for seed, error in enumerate(errors):
            fake_run(tmp_path, f"{mode}{p:g}_{beta:g}_{seed}", seed, error, error + 1, beta,
                     p, mode)
    fake_run(tmp_path, "plain", 0, 7.0, 7.0, 0.0)  # no attention transfer: not a setting
    return tmp_path


def test_bands_over_seeds_and_the_verdict_table(grid: Path):
    s = write_sensitivity(grid, grid)
    assert s.metric == "heldout/error" and s.noise == pytest.approx(
        # pooled: every setting has 2-3 seeds; squares 2 + 2 + 0.5 + 0 + 0.5 + 0.5 + 0.32 over 8
        ((2 + 2 + 0.5 + 0 + 0.5 + 0.5 + 0.32) / 8) ** 0.5)
    bands = {(b.p, b.mode): b for b in s.bands}
    assert set(bands) == {(2.0, "sum"), (1.0, "sum"), (2.0, "max")}
    got = [(q.beta, q.mean, q.std, q.seeds) for q in bands[2.0, "sum"].points]
    np.testing.assert_allclose(got, [(100, 11, SQRT2, 2), (1000, 9, 1, 3),
                                     (10000, 9.8, HALF_SQRT2, 2)])
    assert s.flat_range(bands[2.0, "sum"]) == (1000, 10000)
    assert s.flat_range(bands[1.0, "sum"]) == (1000, 1000)
    table = (grid / "sensitivity.md").read_text()
    assert table.startswith("Best: F2_sum, layers all, beta 1000: heldout/error 9.00 ± 1.00 (3) %\n"
                            "Within one std (1.00) of it: 3 of 7 settings.")  # 9, 9.8, 10
    rows = [ln for ln in table.splitlines() if ln.startswith("| F")]
    assert rows == ["| F2_sum | all | 1000 | 9.00 ± 1.00 (3) | 1000 - 10000 |",
                    "| F1_sum | all | 1000 | 10.00 ± 0.71 (2) | 1000 - 1000 |",
                    "| F2_max | all | 1000 | 10.20 ± 0.57 (2) | 1000 - 1000 |"]
    assert "One seed per setting" not in table
    assert (grid / "sensitivity.png").stat().st_size > 5000


def test_the_drawn_bands_are_the_numbers(grid: Path):
    fig = draw(collect(find_runs(grid), "heldout/error"))
    sums, maxes, by_p = fig.axes
    assert sums.get_xscale() == "log" and "F_sum" in sums.get_title()
    assert [ln.get_label() for ln in sums.lines] == ["p=1", "p=2"]
    assert sums.get_shared_x_axes().joined(sums, maxes)  # one beta axis for F_sum and F_max
    for ax, mode in ((sums, "sum"), (maxes, "max")):
        for line, band in zip(ax.lines, ax.collections, strict=True):
            p = float(line.get_label().removeprefix("p="))
            keys = sorted(k for k in GRID if k[:2] == (p, mode))
            means = [np.mean(GRID[k]) for k in keys]
            stds = [np.std(GRID[k], ddof=1) for k in keys]
            np.testing.assert_allclose(line.get_xdata(), [k[2] for k in keys])
            np.testing.assert_allclose(line.get_ydata(), means)
            vertices = band.get_paths()[0].vertices  # the band's outline: mean ± std
            for beta, mean, std in zip([k[2] for k in keys], means, stds, strict=True):
                ys = vertices[np.isclose(vertices[:, 0], beta), 1]
                assert ys.min() == pytest.approx(mean - std) and \
                    ys.max() == pytest.approx(mean + std)
    # error vs p at each band's best beta: F_sum at p=1 and 2 (10, 9), F_max at p=2 (10.2)
    bars = {c.get_label(): c for c in by_p.containers}
    np.testing.assert_allclose(bars["F_sum"].lines[0].get_xydata(), [[1, 10], [2, 9]])
    np.testing.assert_allclose(bars["F_max"].lines[0].get_xydata(), [[2, 10.2]])
    (caps,) = bars["F_sum"].lines[2]  # the error bars: one std of the best setting
    np.testing.assert_allclose([seg[:, 1] for seg in caps.get_segments()],
                               [[10 - HALF_SQRT2, 10 + HALF_SQRT2], [8, 10]])


def test_one_seed_per_setting_uses_the_pooled_std(tmp_path: Path):
    """A search: one run per setting; a setting run with three seeds gives the noise."""
    for i, (beta, error) in enumerate([(10, 12.0), (100, 10.0), (1000, 10.5), (3000, 11.5)]):
        fake_run(tmp_path, f"t{i}", 0, error, 20.0, float(beta), layers=["group3"])
    for seed, error in enumerate([10.0, 11.0, 12.0]):  # std 1
        fake_run(tmp_path, f"max{seed}", seed, error, 20.0, 300.0, mode="max",
                 layers=["group3"])
    fake_run(tmp_path, "no_heldout", 0, None, 5.0, 50.0, layers=["group3"])  # val_split=0
    s = collect(find_runs(tmp_path), "heldout/error")
    assert s.noise == pytest.approx(1.0)
    (band,) = [b for b in s.bands if b.mode == "sum"]
    assert [q.beta for q in band.points] == [10, 100, 1000, 3000]  # the run without: left out
    assert s.flat_range(band) == (100, 1000)  # mean <= 10 + 1
    text = verdict(s)
    assert "| F2_sum | group3 | 100 | 10.00 ± 1.00 (1) | 100 - 1000 |" in text
    assert "one std is the pooled within-setting std, 1.00." in text


def test_the_command(grid: Path, capsys):
    assert main([str(grid), "--sensitivity", "--metric", "val/error"]) == 0
    out = capsys.readouterr().out
    assert "Best: F2_sum, layers all, beta 1000: val/error 10.00 ± 1.00 (3) %" in out
    assert main([str(grid), "--sensitivity", "--metric", "nope"]) == 2
    assert "atx-report: error: no attention-transfer runs (distill.at.beta > 0) with 'nope'" \
        in capsys.readouterr().err
