"""``atx-report <dir> --sensitivity``: how sensitive attention transfer is to beta, p and F_sum
vs F_max, from the finished runs of a search or a sweep.

A *setting* is one (beta, p, mode, layers) of ``distill.at``; its runs over seeds give a mean
and a sample std of the error. A *band* is every setting of one (p, mode, layers): error against
beta. Writes into the output dir

- ``sensitivity.png``: error vs beta (log axis) for F_sum and for F_max side by side, one band
  (mean ± std over seeds) per p (and layer group), and error vs p at each band's best beta;
- ``sensitivity.md``: the verdict table, one row per band: its best beta, that setting's error
  mean ± std (seeds), and the beta range whose mean error is within one std of that best; the
  overall best setting first. With one seed per setting (a search) the std is the pooled
  within-setting std of the settings that have several seeds, and no range without any.

The error is the held-out error (``heldout/error``, what a search minimises) when every run has
one, else the last-epoch test error (``val/error``); ``--metric`` picks any metrics.json key.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atx.errors import AtxError
from atx.report import find_runs

AT = ("distill", "at")


@dataclass
class Point:
    """One setting: its beta, the mean and sample std of its runs' errors, how many runs."""

    beta: float
    mean: float
    std: float
    seeds: int


@dataclass
class Band:
    """Every setting of one (p, mode, layers), in order of beta."""

    p: float
    mode: str
    layers: str
    points: list[Point] = field(default_factory=list)

    @property
    def best(self) -> Point:
        return min(self.points, key=lambda q: q.mean)


@dataclass
class Sensitivity:
    metric: str
    bands: list[Band]
    noise: float | None  # the std used when a setting has one seed (pooled), None: unknown

    def spread(self, point: Point) -> float | None:
        """One std of ``point``: its own over seeds, else the pooled one."""
        return point.std if point.seeds > 1 else self.noise

    def flat_range(self, band: Band) -> tuple[float, float] | None:
        """The beta range of ``band`` whose mean error is within one std of its best."""
        best, std = band.best, self.spread(band.best)
        if std is None:
            return None
        near = [q.beta for q in band.points if q.mean <= best.mean + std]
        return min(near), max(near)


def _at(config: dict[str, Any]) -> dict[str, Any]:
    return ((config.get(AT[0]) or {}).get(AT[1])) or {}


def default_metric(runs: list[dict[str, Any]]) -> str:
    held_out = all("heldout/error" in r["metrics"] for r in runs)
    return "heldout/error" if held_out else "val/error"


def collect(runs: list[dict[str, Any]], metric: str) -> Sensitivity:
    """The settings and bands of the attention-transfer runs (beta > 0) that have ``metric``."""
    errors: dict[tuple[float, str, str, float], list[float]] = {}
    for run in runs:
        at = _at(run["config"])
        if not at.get("beta") or run["metrics"].get(metric) is None:
            continue
        layers = at.get("student_layers", "all")
        layers = ",".join(map(str, layers)) if isinstance(layers, list) else str(layers)
        key = (float(at.get("p", 2.0)), str(at.get("mode", "sum")), layers, float(at["beta"]))
        errors.setdefault(key, []).append(float(run["metrics"][metric]))
    if not errors:
        raise AtxError(f"no attention-transfer runs (distill.at.beta > 0) with '{metric}' in "
                       "their metrics.json")
    bands: dict[tuple[float, str, str], Band] = {}
    for (p, mode, layers, beta), values in sorted(errors.items()):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        band = bands.setdefault((p, mode, layers), Band(p, mode, layers))
        band.points.append(Point(beta, statistics.fmean(values), std, len(values)))
    several = [v for v in errors.values() if len(v) > 1]
    # pooled within-setting variance: sum of squared deviations over the degrees of freedom
    dof = sum(len(v) - 1 for v in several)
    squares = sum((len(v) - 1) * statistics.variance(v) for v in several)
    noise = math.sqrt(squares / dof) if dof else None
    return Sensitivity(metric, list(bands.values()), noise)


def band_label(band: Band, bands: list[Band]) -> str:
    """``p=2`` (plus the layers when they vary), the mode being the panel."""
    label = f"p={band.p:g}"
    if len({b.layers for b in bands}) > 1:
        label += f" {band.layers}"
    return label


def map_name(mode: str, p: float) -> str:
    return f"F{p:g}_{mode}"


def draw(s: Sensitivity) -> Any:
    """The figure: a panel of error-vs-beta bands per mode (F_sum, then F_max), then error vs p
    at each band's best beta (error bars: one std); the y axis is shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("sum", "max") if any(b.mode == m for b in s.bands)]
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(4.2 * (len(modes) + 1), 3.6),
                             sharey=True, squeeze=False)
    colours = plt.get_cmap("tab10").colors
    keys = sorted({(b.p, b.layers) for b in s.bands})  # one colour per (p, layers) everywhere
    for ax, mode in zip(axes[0], modes, strict=False):
        for band in (b for b in s.bands if b.mode == mode):
            colour = colours[keys.index((band.p, band.layers)) % len(colours)]
            x = [q.beta for q in band.points]
            mean = [q.mean for q in band.points]
            ax.plot(x, mean, marker="o", color=colour, label=band_label(band, s.bands))
            ax.fill_between(x, [q.mean - q.std for q in band.points],
                            [q.mean + q.std for q in band.points], color=colour, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("beta (distill.at.beta)")
        ax.set_title(f"F_{mode}: error vs beta (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{s.metric} %")
    ax = axes[0][-1]
    all_layers = sorted({b.layers for b in s.bands})
    shades = plt.get_cmap("Dark2").colors  # not the p colours of the beta panels
    for mode in modes:
        for i, layers in enumerate(all_layers):
            chosen = sorted((b for b in s.bands if b.mode == mode and b.layers == layers),
                            key=lambda b: b.p)
            if chosen:
                label = f"F_{mode}" + (f" {layers}" if len(all_layers) > 1 else "")
                ax.errorbar([b.p for b in chosen], [b.best.mean for b in chosen],
                            yerr=[b.best.std for b in chosen], capsize=3, label=label,
                            marker="o" if mode == "sum" else "s",
                            linestyle="-" if mode == "sum" else "--",
                            color=shades[i % len(shades)])
    ax.set_xlabel("p (distill.at.p)")
    if len(modes) == 2:  # the same beta axis for F_sum and F_max
        axes[0][1].sharex(axes[0][0])
    ax.set_title("error vs p at each band's best beta", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def verdict(s: Sensitivity) -> str:
    """The Markdown verdict: the best setting, then one row per band, best band first."""
    bands = sorted(s.bands, key=lambda b: b.best.mean)
    top = bands[0]
    lines = [f"Best: {map_name(top.mode, top.p)}, layers {top.layers}, beta {top.best.beta:g}: "
             f"{s.metric} {_error(s, top.best)} %", *_near_best(s, top.best), "",
             "| map | layers | best beta | error % mean ± std (seeds) | beta within one std |",
             "|---|---|---|---|---|"]
    for band in bands:
        span = s.flat_range(band)
        where = f"{span[0]:g} - {span[1]:g}" if span else "-"
        lines.append(f"| {map_name(band.mode, band.p)} | {band.layers} | {band.best.beta:g} | "
                     f"{_error(s, band.best)} | {where} |")
    if any(q.seeds == 1 for b in s.bands for q in b.points):
        lines += ["", "One seed per setting: " + (
            f"one std is the pooled within-setting std, {s.noise:.2f}." if s.noise is not None
            else "no std known, no range: rerun the best settings with several seeds.")]
    return "\n".join(lines) + "\n"


def _near_best(s: Sensitivity, best: Point) -> list[str]:
    """How many settings of every band are within one std of the best: how flat it all is."""
    std = s.spread(best)
    if std is None:
        return []
    points = [q for b in s.bands for q in b.points]
    near = sum(q.mean <= best.mean + std for q in points)
    return [f"Within one std ({std:.2f}) of it: {near} of {len(points)} settings."]


def _error(s: Sensitivity, q: Point) -> str:
    spread = s.spread(q)
    return f"{q.mean:.2f} ± {spread:.2f} ({q.seeds})" if spread is not None else \
        f"{q.mean:.2f} ({q.seeds})"


def write_sensitivity(root: Path, out: Path, metric: str | None = None) -> Sensitivity:
    """Collect the runs below ``root``; write ``sensitivity.png`` and ``sensitivity.md``."""
    runs = find_runs(root)
    s = collect(runs, metric or default_metric(runs))
    out.mkdir(parents=True, exist_ok=True)
    fig = draw(s)
    fig.savefig(out / "sensitivity.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    (out / "sensitivity.md").write_text(verdict(s))
    return s
