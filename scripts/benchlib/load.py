"""The machine's other load: CPU time that processes outside ours used while a block ran.

"Ours" is this process, its living descendants (row workers, DataLoader workers, compile
workers) and its reaped children (probes), so only foreign work counts as load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a living process (``/proc/<pid>/stat``)."""
    # the command name in parentheses may hold spaces: count fields after its ")"
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``: the children of each of its threads, recursively."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for child in map(int, children):
            out += [child, *descendants(child)]
    return out


def own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its living descendants."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in descendants(os.getpid()):
        try:
            total += proc_cpu_s(pid)
        except (OSError, IndexError, ValueError):  # exited between the listing and the read
            pass
    return total


def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``), or ``None``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait (guest time is
    # already part of user, so the fields after steal are left out)
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


class LoadMeter:
    """Cores that other processes kept busy over an interval (0 = we had the machine): the
    machine's busy + steal time minus ours, over the wall time; ``None`` where ``/proc/stat``
    is unreadable."""

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        busy = machine_busy_s()
        self._start = None if busy is None else (time.perf_counter(), busy, own_cpu_s())

    def stop(self) -> float | None:
        busy = machine_busy_s()
        if self._start is None or busy is None:
            return None
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        foreign = (busy - busy0) - (own_cpu_s() - own0)
        return max(foreign, 0.0) / wall if wall > 0 else None
