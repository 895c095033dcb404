"""scripts/bench.py and its parts in scripts/benchlib: the baselines' fidelity, the ratios, the
probes, the DDP workers and a --quick run of every row (the statistics, load meter and
round-robin both benchmarks share: test_bench_parts.py)."""

import importlib.util
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from atx.attention import at_loss
from atx.models import build_model
from atx.speed import MALLOC_ENV

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
sys.path.insert(0, str(SCRIPT.parent))  # benchlib, as when the script runs

from benchlib import (  # noqa: E402
    authors,
    load,
    probes,
    results,
    rounds,
    rows,
    steps,
    workers,
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_parse_args(bench) -> None:
    args = bench.parse_args([])
    assert [r.name for r in args.row_list] == [r.name for r in rows.ROWS]
    assert any(r.compile for r in args.row_list)
    quick = bench.parse_args(["--quick"])
    assert (quick.steps, quick.batch_size, quick.threads) == (2, 4, 1)
    assert not any(r.compile for r in quick.row_list)
    some = bench.parse_args(["--rows", "AT atx", "symmetry atx"])
    assert [r.name for r in some.row_list] == ["AT atx", "symmetry atx"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "AT atxx"])
    one_thread = bench.parse_args(["--threads", "1"])  # 2 processes cannot share 1 thread
    assert [r.name for r in one_thread.row_list if r.processes > 1] == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "1", "--rows", "AT+KD atx ddp 2 processes"])


def test_authors_step_mirrors_the_same_network_and_loss() -> None:
    """The 'authors' baseline runs our WRN's weights through their functional net: same
    logits and group outputs (train-mode BN); their at_loss equals ours for p = 2."""
    torch.manual_seed(0)
    model = build_model("wrn", num_classes=10, depth=16, width=1).train()
    feats = {}
    for g in rows.GROUPS:
        model.get_submodule(g).register_forward_hook(
            lambda _m, _i, out, g=g: feats.__setitem__(g, out)
        )
    params = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    logits, groups = authors.wrn(params, x, True)
    torch.testing.assert_close(logits, model(x))
    for g, out in zip(rows.GROUPS, groups, strict=True):
        torch.testing.assert_close(out, feats[g])
    torch.testing.assert_close(params["bn.running_mean"], model.bn.running_mean)  # stats moved
    t = torch.randn(4, 32, 8, 8)
    torch.testing.assert_close(authors.at_loss(groups[2], t), at_loss(groups[2], t))


def test_raw_loop_takes_the_same_step_as_atx() -> None:
    """The raw baseline computes what the atx AT+KD module computes: after one SGD step from
    the same weights on the same batch, the students agree."""
    batches = steps.make_batches(1, 4)
    atx = workers.make_runner(rows.BY_NAME["AT+KD atx"], batches)
    raw = workers.make_runner(rows.BY_NAME["AT+KD raw"], batches)
    atx(1)
    raw(1)
    for (name, a), b in zip(
        atx.module.student.state_dict().items(), raw.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# loss terms each method's step computes, and how many calls each path makes per step (the
# bare loops call at_loss once per group; atx's AT term covers the three groups in one call)
LOSSES = {"student": {}, "KD": {"kd": 1}, "AT": {"at": 3}, "AT+KD": {"at": 3, "kd": 1},
          "F-ActT": {"fact": 1}, "grad-AT": {"grad_at": 1}}


def expected_per_step(row) -> Counter:
    """What one timed step of ``row`` runs: forwards, the teacher's input backward, SGD steps."""
    if row.path == "forward":
        return Counter({"teacher": 1, "teacher backward": int(row.method == "teacher fwd+bwd")})
    losses = {k: (1 if row.path == "atx" else n) for k, n in LOSSES[row.method].items()}
    if row.path == "atx" and "at" in losses:  # atx's one AT call: a loss per layer pair
        losses["at pairs"] = len(VIT_AT_PAIRS) if row.student == "ViT" else len(rows.GROUPS)
    uses_teacher = row.method != "student"
    return Counter({"student": 1, "teacher": int(uses_teacher), "opt": 1,
                    "teacher backward": int(row.method == "grad-AT"), **losses})


# ViT-Ti/4's preset blocks (1/4..4/4 of 12), each paired by map size with WRN-16-2's 8x8 group3
VIT_AT_PAIRS = [(f"blocks.{i}", "group3") for i in (2, 5, 8, 11)]


def check_vit_student(row, runner) -> None:
    """A ViT row's student is the full-size ViT-Ti on an 8x8 grid of 4x4 patches, and its AT
    term pairs the preset blocks with group3."""
    vit = runner.module.student
    heads, grid = vit.blocks[0].attn.num_heads, vit.patch_embed.grid_size
    assert (len(vit.blocks), vit.embed_dim, heads, grid) == (12, 192, 3, (8, 8))
    at = [t.pairs for t in runner.module.objective.terms if t.name == "at"]
    assert at == ([VIT_AT_PAIRS] if "AT" in row.method else [])


class Counted:
    """A runner whose every call checks that each timed step ran what its row names."""

    def __init__(self, row, runner, calls: Counter, monkeypatch) -> None:
        self.row, self.runner, self.calls = row, runner, calls
        count = self.count
        if row.path == "authors":  # a functional net: count the calls per weight dict
            wrn = authors.wrn
            monkeypatch.setattr(authors, "wrn", lambda ps, *a: (
                count("student" if ps is runner.ps else "teacher"), wrn(ps, *a))[1])
            for name, key in (("at_loss", "at"), ("distillation", "kd")):
                fn = getattr(authors, name)
                monkeypatch.setattr(
                    authors, name, lambda *a, fn=fn, key=key: (count(key), fn(*a))[1]
                )
            return
        nets = runner.module if row.path == "atx" else runner
        for who in ("student", "teacher"):
            net = getattr(nets, who, None)
            if net is not None:
                net.register_forward_hook(lambda *_, who=who: count(who))
        if getattr(nets, "teacher", None) is not None:
            nets.teacher.register_full_backward_hook(lambda *_: count("teacher backward"))
        if row.path == "atx":
            for term in runner.module.objective.terms:
                if term.name != "ce":
                    term.losses = self.counted_losses(term.name, term.losses)
        else:
            for name, key in (("at_loss", "at"), ("kd_loss", "kd")):  # the raw loop's
                fn = getattr(steps, name)
                monkeypatch.setattr(
                    steps, name, lambda *a, fn=fn, key=key: (count(key), fn(*a))[1]
                )

    def count(self, key: str, n: int = 1) -> None:
        if self.calls.get("runner") == self.row.name:  # only while this row's call runs
            self.calls[key] += n

    def counted_losses(self, key: str, fn):
        """An atx term's ``losses``, counted; AT's finite, positive pair losses counted too."""
        def losses(out):
            got = fn(out)
            self.count(key)
            if key == "at":
                assert all(v.isfinite() and v > 0 for v in got.values()), got
                self.count("at pairs", len(got))
            return got

        return losses

    def __call__(self, steps: int) -> list[float]:
        self.calls.clear()
        self.calls["runner"] = self.row.name
        t0 = time.perf_counter()
        times = self.runner(steps)
        wall = time.perf_counter() - t0
        ran = Counter({k: v for k, v in self.calls.items() if k != "runner" and v})
        want = Counter({k: v * steps for k, v in expected_per_step(self.row).items() if v})
        assert ran == want, (self.row.name, steps)
        assert len(times) == steps and sum(times) <= wall  # each time is one step of this call
        self.calls.clear()
        return times

    def close(self) -> None:
        self.runner.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning: no val loader, few workers
def test_quick_run_prints_every_row_and_ratio(bench, capsys, monkeypatch) -> None:
    """Every in-process row's timed steps run the student / teacher forwards, loss terms and
    SGD steps its name says, once per step; the report lists every row and ratio."""
    calls: Counter = Counter()
    counted: list[str] = []
    make_runner = bench.make_runner

    def counting_runner(row, batches, threads=None):
        runner = make_runner(row, batches, threads)
        if row.own_process:  # its steps run in a worker process: out of reach of hooks
            return runner
        counted.append(row.name)
        if row.student:
            check_vit_student(row, runner)
        return Counted(row, runner, calls, monkeypatch)

    monkeypatch.setattr(bench, "make_runner", counting_runner)
    handle = register_optimizer_step_post_hook(
        lambda *_: calls.__setitem__("opt", calls["opt"] + 1) if calls.get("runner") else None
    )
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--no-probes"]) == 0
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    quick = bench.parse_args(["--quick"]).row_list
    assert counted == [r.name for r in quick if not r.own_process]
    assert [r.name for r in quick if r.own_process] == ["AT+KD authors glibc malloc"]
    out = capsys.readouterr().out
    for row in quick:
        cells = f"| {row.label} | {row.path} | {row.options or '-'} |"
        assert cells in out, cells
    for label in (
        "atx / raw: AT+KD |",
        "AT / (student + teacher forward), atx |",
        "speed-up vs authors: AT+KD float32 NCHW",
        "grad-AT / (student + teacher fwd+bwd)",
        "ViT AT+KD / ViT KD, atx (target <= 1.05) |",
        "| authors' loop | ",  # the epoch rows
        "| atx float32 | ",
        "atx float32 epoch vs the authors' loop: ",
    ):
        assert label in out, label
    assert "other load" in out and "in-process wall" in out


def named_rows(label: str) -> tuple[list[str], list[str]]:
    """The rows a ratio's label names: (numerator, denominator)."""
    if m := re.fullmatch(r"atx / raw: (\S+)( fastest)?", label):
        return [f"{m[1]} atx{m[2] or ''}"], [f"{m[1]} raw{m[2] or ''}"]
    if m := re.fullmatch(r"(\S+) / \(student \+ (teacher forward|teacher fwd\+bwd)\), (\w+)",
                         label):
        return [f"{m[1]} {m[3]}"], [f"student {m[3]}", m[2]]
    if m := re.fullmatch(r"(\S+) / student, (\w+)", label):
        return [f"{m[1]} {m[2]}"], [f"student {m[2]}"]
    if m := re.fullmatch(r"speed-up vs authors( as released \(glibc malloc\))?: AT\+KD"
                         r" (float32 NCHW|fastest|fastest, ddp 2 processes) \(target >= .*\)",
                         label):
        atx = "AT+KD atx" + ("" if m[2] == "float32 NCHW" else f" {m[2]}")
        return ["AT+KD authors" + (" glibc malloc" if m[1] else "")], [atx]
    if m := re.fullmatch(r"(ViT \S+) / (ViT \S+), atx \(target <= .*\)", label):
        return [f"{m[1]} atx"], [f"{m[2]} atx"]
    if m := re.fullmatch(r"speed-up of (.+): AT\+KD", label):
        return ["AT+KD atx"], [f"AT+KD atx {m[1]}"]
    raise AssertionError(f"ratio label {label!r} names no rows this test knows")


def test_every_ratio_divides_the_rows_its_label_names() -> None:
    """Each ratio is the summed medians of the rows its label names, numerator over
    denominator: checked with a distinct random median per row, and in the report's table."""
    g = torch.Generator().manual_seed(0)
    med = {name: 0.05 + torch.rand(1, generator=g).item() for name in rows.BY_NAME}
    got = rows.ratios(med)
    assert set(got) == {label for label, _, _ in rows.RATIOS}
    for label, value in got.items():
        num, den = named_rows(label)
        assert value == pytest.approx(sum(med[n] for n in num) / sum(med[d] for d in den)), label
    # report(): the ratios of the rows' medians over all their kept steps
    Block = rounds.Block
    blocks = [Block("AT atx", 1, [0.30, 0.10], 0.0), Block("AT atx", 2, [0.26], 0.0),
              Block("AT raw", 1, [0.20], 0.0), Block("student atx", 1, [0.08], 0.0),
              Block("teacher forward", 1, [0.12], 0.0)]
    table, _ = results.report(results.Result(blocks=blocks, batch_size=4))
    assert f"| atx / raw: AT | {0.26 / 0.20:.3f} |" in table
    assert f"| AT / (student + teacher forward), atx | {0.26 / (0.08 + 0.12):.3f} |" in table
    assert "atx / raw: KD" not in table


class PageToucher:
    """A stand-in runner: each step maps fresh anonymous memory and touches every page (one
    minor fault per 4 KiB page: huge pages off), and reports a known time."""

    MB, TIMES = 32, [0.004, 0.001, 0.003]

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, steps: int) -> list[float]:
        self.calls.append(steps)
        for _ in range(steps):
            with mmap.mmap(-1, self.MB << 20) as m:
                m.madvise(mmap.MADV_NOHUGEPAGE)
                for i in range(0, self.MB << 20, mmap.PAGESIZE):
                    m[i] = 1
        return self.TIMES[:steps]


def test_probe_measures_the_steps_it_times(monkeypatch) -> None:
    """probe_row: warm-up first, then the timed steps; the median of their times, and the
    faults and memory rise of steps that touch 32 MB of fresh pages each."""
    fake = PageToucher()
    built = []
    monkeypatch.setattr(workers, "make_runner", lambda row, b: built.append((row, b)) or fake)
    probe = probes.probe_row(rows.BY_NAME["AT atx"], steps=3, warmup=1, batch_size=4)
    assert fake.calls == [1, 3] and built[0][0] == rows.BY_NAME["AT atx"]
    assert [x.shape[0] for x, _ in built[0][1]] == [4, 4]
    assert probe["ms"] == pytest.approx(statistics.median(PageToucher.TIMES) * 1e3)
    pages = (PageToucher.MB << 20) // mmap.PAGESIZE
    assert 0.9 * pages <= probe["faults"] <= 1.5 * pages  # per step
    assert probe["peak_mb"] >= 0.9 * PageToucher.MB and probe["rss_mb"] > probe["peak_mb"]


def test_probe_in_a_fresh_process(bench, monkeypatch) -> None:
    """run_probe starts this script for the named row and allocator (MALLOC_* env vars only
    for "env") and returns what that process measured, plus the machine's load."""
    args = bench.parse_args(["--quick"])
    seen = []
    run = subprocess.run

    def spy(cmd, env, **kw):
        seen.append((cmd, env))
        return run(cmd, env=env, **kw)

    monkeypatch.setattr(probes.subprocess, "run", spy)
    probe = probes.run_probe("AT atx", "mallopt", args)
    cmd, env = seen[0]
    assert cmd[1:] == [str(SCRIPT), "--probe", "AT atx", "--allocator", "mallopt", "--probe-steps",
                       "2", "--warmup", "1", "--batch-size", "4", "--threads", "1"]
    assert not {*MALLOC_ENV, "ATX_MALLOC"} & set(env)
    assert set(probe) == {"ms", "faults", "peak_mb", "rss_mb", "load"}
    assert probe["rss_mb"] > probe["peak_mb"]  # the rise is part of the high-water mark
    text = probes.probe_report({("AT atx", "mallopt"): probe})
    assert "| AT atx | mallopt |" in text
    printed = {"ms": 1.5, "faults": 2.0, "peak_mb": 3.0, "rss_mb": 4.0}
    fake = SimpleNamespace(returncode=0, stdout="noise\n" + json.dumps(printed) + "\n")
    monkeypatch.setattr(probes.subprocess, "run", lambda cmd, env, **kw: seen.append((cmd, env))
                        or fake)
    measured = probes.run_probe("AT atx", "env", args)
    assert {k: v for k, v in measured.items() if k != "load"} == printed
    assert {k: seen[-1][1][k] for k in MALLOC_ENV} == {k: str(v) for k, v in MALLOC_ENV.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_row_runs_blocks_in_two_worker_processes() -> None:
    """The DDP row: two persistent Lightning DDP workers (gloo) run each block when told, rank
    0 reports one time per step, the load meter counts their CPU time as ours (so it is not
    'other load'), and both exit cleanly when closed."""
    row = rows.BY_NAME["AT+KD atx ddp 2 processes"]
    with pytest.raises(SystemExit, match="does not split"):
        workers.make_runner(row, steps.make_batches(1, 4), threads=3)
    runner = workers.make_runner(row, steps.make_batches(2, 4), threads=2)
    procs = list(runner.procs)
    try:
        assert {p.pid for p in procs} <= set(load.descendants(os.getpid()))
        cpu0 = sum(load.proc_cpu_s(p.pid) for p in procs)
        t0 = time.perf_counter()
        first = runner(2)
        wall = time.perf_counter() - t0
        second = runner(1)
        assert len(first) == 2 and len(second) == 1
        assert sum(first) <= wall  # seconds of steps that ran inside this block
        assert sum(load.proc_cpu_s(p.pid) for p in procs) > cpu0  # growing as they step
    finally:
        runner.close()
    assert [p.returncode for p in procs] == [0, 0]
    assert not {p.pid for p in procs} & set(load.descendants(os.getpid()))
