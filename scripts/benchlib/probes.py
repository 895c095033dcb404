"""Probes: one row in a fresh process, for what a shared process cannot measure: peak memory
(the RSS high-water mark, reset before the first step) and page faults per step
(``ru_minflt``) under glibc's default allocator, atx's ``mallopt`` or the ``MALLOC_*_`` env
vars."""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from atx.speed import MALLOC_ENV
from benchlib import workers
from benchlib.load import LoadMeter
from benchlib.report import md_table
from benchlib.rows import SCRIPT, TEACHER, Row
from benchlib.steps import make_batches


def rss_mb() -> tuple[float, float]:
    """(resident, high-water) MiB of this process (``/proc/self/status``; else ru_maxrss)."""
    try:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def reset_peak_rss() -> None:
    """Restart the high-water mark at the current RSS (Linux: ``clear_refs`` 5), so imports and
    building do not hide the steps' peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def probe_row(row: Row, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    """In this (fresh) process: ms/step and page faults per step after the warm-up, and the
    peak RSS of all steps (warm-up included) above the built state (modules, batches)."""
    runner = workers.make_runner(row, make_batches(2, batch_size))
    gc.collect()
    reset_peak_rss()
    rss0, _ = rss_mb()
    runner(warmup)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = runner(steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    _, peak = rss_mb()
    return {
        "ms": statistics.median(times) * 1e3,
        "faults": faults / steps,
        "peak_mb": peak - rss0,
        "rss_mb": peak,
    }


def run_probe(name: str, allocator: str, args: argparse.Namespace) -> dict[str, float]:
    """``probe_row`` in a subprocess (``bench.py --probe``) with glibc's default allocator,
    atx's mallopt or the ``MALLOC_*_`` env vars; the machine's other load while it ran is
    added."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "ATX_MALLOC"}
    if allocator == "env":
        env.update({k: str(v) for k, v in MALLOC_ENV.items()})
    cmd = [sys.executable, str(SCRIPT), "--probe", name, "--allocator", allocator]
    cmd += ["--probe-steps", str(args.probe_steps), "--warmup", str(args.warmup)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    meter = LoadMeter()
    meter.start()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"probe {name} ({allocator}) failed:\n{out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": meter.stop()}


def probe_report(probes: dict[tuple[str, str], dict[str, float]]) -> str:
    """Markdown: the probes, then the memory bound and the allocator's effect."""
    header = (
        "row", "allocator", "median ms/step", "page faults/step", "peak RSS rise MB",
        "RSS high-water MB", "other load (cores)",
    )
    lines = md_table(header, (
        (name, alloc, f"{p['ms']:.1f}", f"{p['faults']:.0f}", f"{p['peak_mb']:.1f}",
         f"{p['rss_mb']:.0f}", "-" if p.get("load") is None else f"{p['load']:.2f}")
        for (name, alloc), p in probes.items()
    ), left=2)
    get = probes.get
    extra = []
    s, t = get(("student atx", "mallopt")), get((TEACHER.name, "mallopt"))
    a = get(("AT atx", "mallopt"))
    if s and t and a:
        bound = 1.1 * (s["peak_mb"] + t["peak_mb"])
        extra.append(
            f"peak memory: AT step {a['peak_mb']:.1f} MB vs (student step + teacher"
            f" forward) x 1.1 = {bound:.1f} MB: {'ok' if a['peak_mb'] <= bound else 'OVER'}"
        )
    for name in (TEACHER.name, "AT+KD atx"):
        d, m = get((name, "default")), get((name, "mallopt"))
        if d and m:
            extra.append(
                f"allocator, {name}: default / mallopt time {d['ms'] / m['ms']:.2f}x,"
                f" page faults {d['faults']:.0f} -> {m['faults']:.0f} per step"
            )
    au, at = get(("AT+KD authors", "default")), get(("AT+KD atx", "mallopt"))
    if au and at:
        extra.append(
            "AT+KD float32 NCHW, each with its own allocator (authors: glibc default, atx:"
            f" mallopt), speed-up of atx: {au['ms'] / at['ms']:.2f}x"
        )
    return "\n".join(lines + [""] + [f"- {e}" for e in extra])
