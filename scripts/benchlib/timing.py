"""Statistics of step times and rates."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def p10_p90(xs: Sequence[float]) -> tuple[float, float]:
    """10th and 90th percentiles, linear between the sorted values (one value is both)."""
    if len(xs) < 2:  # statistics.quantiles wants two points (before Python 3.13)
        return xs[0], xs[0]
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def summarize(times: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median, p10, p90 (ms), images/s at the median, p90/p10 and the step count."""
    med = statistics.median(times)
    p10, p90 = p10_p90(times)
    return {
        "median_ms": med * 1e3,
        "p10_ms": p10 * 1e3,
        "p90_ms": p90 * 1e3,
        "img_s": batch_size / med,
        "spread": p90 / p10,
        "n": len(times),
    }


def spread_text(xs: Sequence[float]) -> str:
    """``median (p10-p90, n)`` of ``xs``, or ``-``."""
    if not xs:
        return "-"
    p10, p90 = p10_p90(xs)
    return f"{statistics.median(xs):.3f} ({p10:.3f}-{p90:.3f}, {len(xs)})"
