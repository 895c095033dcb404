"""The step benchmark's round-robin results and its markdown report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from benchlib.report import md_table
from benchlib.rounds import Block
from benchlib.rows import BY_NAME, NOISY, ratios
from benchlib.timing import spread_text, summarize

StepBlock = Block[list[float]]  # a row's kept step times (seconds) in one round


@dataclass
class Result:
    blocks: list[StepBlock] = field(default_factory=list)
    batch_size: int = 128
    wall_s: float = 0.0
    stopped_early: bool = False

    def times(self, quiet: float | None = None) -> dict[str, list[float]]:
        """Kept step times per row; ``quiet``: only blocks with other load below it."""
        out: dict[str, list[float]] = {}
        for b in self.blocks:
            if quiet is None or (b.load is not None and b.load < quiet):
                out.setdefault(b.name, []).extend(b.value)
        return out


def paired_ratios(result: Result, quiet: float | None = None) -> dict[str, list[float]]:
    """Each ratio computed within every round (block medians), so slow drifts of the
    machine's load cancel; ``quiet``: skip rounds in which any block had that much load."""
    out: dict[str, list[float]] = {}
    for rnd in sorted({b.round for b in result.blocks}):
        blocks = [b for b in result.blocks if b.round == rnd]
        if quiet is not None and any(b.load is not None and b.load >= quiet for b in blocks):
            continue
        for k, v in ratios({b.name: statistics.median(b.value) for b in blocks}).items():
            out.setdefault(k, []).append(v)
    return out


def report(result: Result, quiet_load: float = 0.2) -> tuple[str, bool]:
    """Markdown: per-row step times, then the ratios from medians of all steps, of quiet
    blocks only and paired per quiet round. Second value: some row is noisy."""
    all_times, quiet_times = result.times(), result.times(quiet_load)
    header = (
        "row", "path", "options", "median ms/step", "p10-p90 ms", "p90/p10", "images/s",
        "steps", "quiet median ms (steps)",
    )
    cells = []
    noisy = False
    for name, times in all_times.items():
        row, s = BY_NAME[name], summarize(times, result.batch_size)
        noisy |= s["spread"] > NOISY
        q = quiet_times.get(name, [])
        cells.append((
            row.label, row.path, row.options or "-", f"{s['median_ms']:.1f}",
            f"{s['p10_ms']:.1f}-{s['p90_ms']:.1f}", f"{s['spread']:.2f}", f"{s['img_s']:.0f}",
            s["n"], f"{statistics.median(q) * 1e3:.1f} ({len(q)})" if q else "- (0)",
        ))
    lines = md_table(header, cells, left=3)
    r_all = ratios({k: statistics.median(v) for k, v in all_times.items()})
    r_quiet = ratios({k: statistics.median(v) for k, v in quiet_times.items()})
    paired = paired_ratios(result, quiet_load)
    header = (
        "ratio", "medians, all steps", "medians, quiet blocks",
        "paired per quiet round: median (p10-p90, rounds)",
    )
    lines += ["", *md_table(header, (
        (k, f"{v:.3f}", f"{r_quiet[k]:.3f}" if k in r_quiet else "-",
         spread_text(paired.get(k, [])))
        for k, v in r_all.items()
    ))]
    return "\n".join(lines), noisy
