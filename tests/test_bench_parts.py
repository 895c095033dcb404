"""The parts of scripts/benchlib both benchmarks share: the statistics and ratios, the load
meter and the round-robin."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # benchlib

from benchlib import load, report, rounds, rows, timing  # noqa: E402


def test_statistics() -> None:
    assert timing.p10_p90([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx((1.5, 5.5))
    assert timing.p10_p90([1.0, 2.0]) == pytest.approx((1.1, 1.9))
    assert timing.p10_p90([3.0]) == (3.0, 3.0)  # one round: its value
    assert timing.spread_text([3.0]) == "3.000 (3.000-3.000, 1)" and timing.spread_text([]) == "-"
    s = timing.summarize([0.1, 0.2, 0.3], batch_size=128)
    assert s["median_ms"] == pytest.approx(200.0) and s["img_s"] == pytest.approx(640.0)
    assert s["p10_ms"] == pytest.approx(120.0) and s["spread"] == pytest.approx(280 / 120)
    med = {
        "teacher forward": 1.0,
        "student atx": 1.0,
        "AT atx": 2.2,
        "AT raw": 2.0,
        "AT+KD atx": 2.0,
        "AT+KD authors": 3.0,
        "AT+KD atx fastest": 1.5,
    }
    r = rows.ratios(med)
    assert r["AT / (student + teacher forward), atx"] == pytest.approx(1.1)
    assert r["atx / raw: AT"] == pytest.approx(1.1)
    assert r["speed-up vs authors: AT+KD float32 NCHW (target >= 1.0)"] == pytest.approx(1.5)
    assert r["speed-up vs authors: AT+KD fastest (target >= 1.5)"] == pytest.approx(2.0)
    assert "atx / raw: KD" not in r  # rows not measured give no ratio


def test_load_meter_counts_our_children_as_ours() -> None:
    """A busy child is ours while it runs and once reaped: own_cpu_s grows by its CPU time."""
    own0 = load.own_cpu_s()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ninput()"],
                             stdin=subprocess.PIPE, text=True)
    busy = 0.25  # of the child's 0.3 s spin: /proc counts whole clock ticks
    deadline = time.monotonic() + 60
    try:
        while child.pid not in load.descendants(os.getpid()) or load.proc_cpu_s(child.pid) < busy:
            assert time.monotonic() < deadline, "the child never showed its CPU time"
            time.sleep(0.05)
        assert load.own_cpu_s() - own0 >= busy - 1e-9  # living: read from /proc/<pid>/stat
    finally:
        child.communicate("\n", timeout=30)
    assert load.own_cpu_s() - own0 >= busy - 1e-9  # reaped: in os.times()' children fields
    meter = load.LoadMeter()
    meter.start()
    time.sleep(0.05)
    other = meter.stop()
    assert other is None or other >= 0.0


def test_round_robin_turns_and_tables() -> None:
    """Every task takes one turn per round, in order; None gives no block; the rounds are drawn
    after the caller saw the previous round. md_table aligns the first columns left."""
    ran: list[tuple[str, int]] = []

    def task(name: str):
        def turn(rnd: int) -> int | None:
            ran.append((name, rnd))
            return None if (name, rnd) == ("b", 2) else rnd

        return turn

    tasks = {name: task(name) for name in ("a", "b")}
    seen: list[int] = []

    def more():
        for rnd in (1, 2, 3):
            if len(seen) == 2:  # stop once two rounds came back
                return
            yield rnd

    for rnd, blocks in rounds.round_robin(tasks, more()):
        seen.append(rnd)
        assert [(b.name, b.round, b.value) for b in blocks] == [
            (n, rnd, rnd) for n in ("a", "b") if not (n == "b" and rnd == 2)
        ]
    assert seen == [1, 2] and ran == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert report.md_table(("x", "y", "z"), [(1, "2", 3.5)], left=2) == [
        "| x | y | z |", "|---|---|---:|", "| 1 | 2 | 3.5 |"
    ]
