"""scripts/bench.py: its statistics, its baselines' fidelity, and a --quick run of every row."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from atx.attention import at_loss
from atx.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_statistics(bench) -> None:
    assert bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert bench.quantile([1.0, 2.0], 0.1) == pytest.approx(1.1)
    s = bench.summarize([0.1, 0.2, 0.3], batch_size=128)
    assert s["median_ms"] == pytest.approx(200.0) and s["img_s"] == pytest.approx(640.0)
    med = {
        "teacher forward": 1.0,
        "student atx": 1.0,
        "AT atx": 2.2,
        "AT raw": 2.0,
        "AT+KD atx": 2.0,
        "AT+KD authors": 3.0,
        "AT+KD atx fastest": 1.5,
    }
    r = bench.ratios(med)
    assert r["AT / (student + teacher forward), atx"] == pytest.approx(1.1)
    assert r["atx / raw: AT"] == pytest.approx(1.1)
    assert r["speed-up vs authors: AT+KD float32 NCHW (target >= 1.0)"] == pytest.approx(1.5)
    assert r["speed-up vs authors: AT+KD fastest (target >= 1.5)"] == pytest.approx(2.0)
    assert "atx / raw: KD" not in r  # rows not measured give no ratio


def test_parse_args(bench) -> None:
    args = bench.parse_args([])
    assert [r.name for r in args.row_list] == [r.name for r in bench.ROWS]
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


def test_authors_step_mirrors_the_same_network_and_loss(bench) -> None:
    """The 'authors' baseline runs our WRN's weights through their functional net: same
    logits and group outputs (train-mode BN); their at_loss equals ours for p = 2."""
    torch.manual_seed(0)
    model = build_model("wrn", num_classes=10, depth=16, width=1).train()
    feats = {}
    for g in bench.GROUPS:
        model.get_submodule(g).register_forward_hook(
            lambda _m, _i, out, g=g: feats.__setitem__(g, out)
        )
    params = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    logits, groups = bench.authors_wrn(params, x, True)
    torch.testing.assert_close(logits, model(x))
    for g, out in zip(bench.GROUPS, groups, strict=True):
        torch.testing.assert_close(out, feats[g])
    torch.testing.assert_close(params["bn.running_mean"], model.bn.running_mean)  # stats moved
    t = torch.randn(4, 32, 8, 8)
    torch.testing.assert_close(bench.authors_at_loss(groups[2], t), at_loss(groups[2], t))


def test_raw_loop_takes_the_same_step_as_atx(bench) -> None:
    """The raw baseline computes what the atx AT+KD module computes: after one SGD step from
    the same weights on the same batch, the students agree."""
    batches = bench.make_batches(1, 4)
    atx = bench.make_runner(bench.BY_NAME["AT+KD atx"], batches)
    raw = bench.make_runner(bench.BY_NAME["AT+KD raw"], batches)
    atx(1)
    raw(1)
    for (name, a), b in zip(
        atx.module.student.state_dict().items(), raw.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning: no val loader, few workers
def test_quick_run_prints_every_row_and_ratio(bench, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--no-probes"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in bench.parse_args(["--quick"]).row_list:
        cells = f"| {row.method} | {row.path} | {row.options or '-'} |"
        assert cells in out, cells
    for label in (
        "atx / raw: AT+KD |",
        "AT / (student + teacher forward), atx |",
        "speed-up vs authors: AT+KD float32 NCHW",
        "grad-AT / (student + teacher fwd+bwd)",
    ):
        assert label in out, label
    assert "other load" in out and "in-process wall" in out


def test_probe_in_a_fresh_process(bench) -> None:
    args = bench.parse_args(["--quick"])
    probe = bench.run_probe("AT atx", "mallopt", args)
    assert probe["ms"] > 0 and probe["faults"] >= 0 and probe["peak_mb"] >= 0
    assert probe["rss_mb"] > probe["peak_mb"]
    text = bench.probe_report({("AT atx", "mallopt"): probe})
    assert "| AT atx | mallopt |" in text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_row_runs_blocks_in_two_worker_processes(bench) -> None:
    """The DDP row: two persistent Lightning DDP workers (gloo) run each block when told, rank
    0 reports one time per step, their CPU time is known (so it is not 'other load'), and both
    exit cleanly when closed."""
    row = bench.BY_NAME["AT+KD atx ddp 2 processes"]
    with pytest.raises(SystemExit, match="does not split"):
        bench.make_runner(row, bench.make_batches(1, 4), threads=3)
    runner = bench.make_runner(row, bench.make_batches(2, 4), threads=2)
    procs = list(runner.procs)
    try:
        first, second = runner(2), runner(1)
        assert len(first) == 2 and len(second) == 1
        assert all(t > 0 for t in first + second)
        assert runner.cpu_s() > 0
    finally:
        runner.close()
    assert [p.returncode for p in procs] == [0, 0]
