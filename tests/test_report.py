"""atx-report: finished runs grouped over seeds, statistics by hand, files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from configs import compose_cfg
from omegaconf import DictConfig

from atx.paper import PAPER_ERRORS
from atx.report import loss_curves, main, report


def fake_run(root: Path, name: str, overrides: list[str], seed: int, last: float, best: float,
             beta: float, agreement: float | None = None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    config = {"seed": seed, "distill": {"at": {"beta": beta, "p": 2.0}}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"val/error": last, "best/val_error": best}
    if agreement is not None:
        metrics["val/agreement/group1"] = agreement
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_rows_group_seeds_with_hand_computed_statistics(tmp_path):
    # skewed seeds: median and mean differ, so the paper's statistic (median of 5 runs,
    # Table 2 caption) is told apart from the mean
    for i, (last, best) in enumerate([(10.0, 9.0), (15.0, 10.4), (11.0, 9.2)]):
        fake_run(tmp_path, f"a{i}", ["distill.at.beta=500"], i, last, best, 500.0, 0.5 + i / 10)
    for i, last in enumerate([8.0, 9.0]):
        fake_run(tmp_path, f"b{i}", ["distill.at.beta=1000"], i, last, last - 1, 1000.0)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)  # no metrics.json: skipped
    rows = {r["config"]: r for r in report(tmp_path)}
    a, b = rows["distill.at.beta=500"], rows["distill.at.beta=1000"]
    assert a["seeds"] == 3 and b["seeds"] == 2
    assert a["last_mean"] == pytest.approx(12.0) and a["last_median"] == pytest.approx(11.0)
    assert a["last_std"] == pytest.approx(7**0.5)  # sample std of 10, 15, 11: sqrt(14 / 2)
    assert a["best_mean"] == pytest.approx(9.533333) and a["best_median"] == pytest.approx(9.2)
    assert a["agreement/group1"] == pytest.approx(0.6) and "agreement/group1" not in b
    assert b["last_mean"] == pytest.approx(8.5) and b["best_mean"] == pytest.approx(7.5)
    md = (tmp_path / "report.md").read_text()
    # best: mean 9.53, sample std sqrt((0.28444 + 0.75111 + 0.11111) / 2) = 0.757
    row = "| `distill.at.beta=500` | 3 | 12.00 ± 2.65 (11.00) | 9.53 ± 0.76 (9.20) | - | 0.600 |"
    assert row in md
    with (tmp_path / "report.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "report_error_vs_beta.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "atx-report: error: " in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no finished runs under" in capsys.readouterr().err


def test_paper_numbers_and_transfer_loss_curves(tmp_path):
    """A run composed from a paper preset shows the paper's error beside it; the per-group AT
    losses of its metrics.csv are averaged over seeds and plotted."""
    for seed, distill, scale in [(0, "at_sum_p1", 1.0), (1, "at_sum_p1", 3.0), (0, "none", 0.0)]:
        name = f"{distill}{seed}"
        fake_run(tmp_path, name, [f"distill={distill}"], seed, 8.0 + seed, 7.5, 1000.0)
        choices = {"experiment": "t2_wrn_16_1-wrn_16_2", "distill": distill}
        (tmp_path / name / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
        )
        if scale:
            (tmp_path / name / "csv").mkdir()
            lines = ["epoch,step,train/at/group1_epoch,train/at/group2_epoch,train/loss_epoch"]
            lines += [f"{e},{e * 10},{scale * (2 - e)},{scale * (4 - e)},9" for e in (0, 1)]
            (tmp_path / name / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    rows = {r["config"]: r for r in report(tmp_path)}
    # paper Table 2: F_sum 7.99, no attention transfer 8.77
    assert rows["distill=at_sum_p1"]["paper_error"] == pytest.approx(7.99)
    assert rows["distill=none"]["paper_error"] == pytest.approx(8.77)
    assert "| 7.99 (Table 2) |" in (tmp_path / "report.md").read_text()
    curves = [loss_curves(d) for d in rows["distill=at_sum_p1"]["dirs"]]
    assert curves[1] == {"at/group1": {0: 6.0, 1: 3.0}, "at/group2": {0: 12.0, 1: 9.0}}
    assert (tmp_path / "report_transfer_losses.png").stat().st_size > 1000


# The paper's verified test errors (%), keyed by what a run trains, not by preset name:
# (dataset, student, teacher or None, transfer terms). Tables 1 and 2: CIFAR-10, median of 5
# runs (8.77 and 7.93 are Table 2's "no attention transfer" and F2_sum rows too); Table 3:
# single runs of a thin NIN without batch norm; Table 5: ImageNet top-1 (authors' README).
PAPER: dict[tuple[str, str, str | None, str], float] = {
    ("CIFAR10", "wrn-16-1", None, "none"): 8.77,
    ("CIFAR10", "wrn-16-2", None, "none"): 6.31,
    ("CIFAR10", "wrn-16-1", "wrn-16-2", "at F2_sum"): 7.93,
    ("CIFAR10", "wrn-16-1", "wrn-16-2", "at F1_sum"): 7.99,
    ("CIFAR10", "wrn-16-1", "wrn-16-2", "at F4_sum"): 8.09,
    ("CIFAR10", "wrn-16-1", "wrn-16-2", "at F1_max"): 8.08,
    ("CIFAR10", "nin-thin-nobn", None, "none"): 13.5,
    ("CIFAR10", "nin-thin-nobn", None, "min_l2"): 12.5,
    ("CIFAR10", "nin-thin-nobn", "nin-wide-nobn", "grad_at"): 12.1,
    ("CIFAR10", "nin-thin-nobn", "nin-wide-nobn", "kd"): 12.1,
    ("CIFAR10", "nin-thin-nobn", None, "symmetry"): 11.8,
    ("CIFAR10", "nin-thin-nobn", "nin-wide", "at F2_sum"): 11.2,  # BN teacher
    ("ImageNet", "resnet18", None, "none"): 30.4,
    ("ImageNet", "resnet18", "resnet34", "at F2_sum"): 29.3,
}


def _net(node: DictConfig) -> str:
    if node.name == "wrn":
        return f"wrn-{node.depth}-{node.width}"
    if node.name == "nin":
        return f"nin-{node.variant}" + ("" if node.batch_norm else "-nobn")
    return str(node.name)


def what_it_trains(cfg: DictConfig) -> tuple[str, str, str | None, str]:
    """(dataset, student, teacher, terms) of a composed config, read from its values."""
    d = cfg.distill
    terms = ["kd"] if d.kd.alpha > 0 else []
    terms += [f"at F{d.at.p:g}_{d.at.mode}"] if d.at.beta > 0 else []
    terms += [t for t in ("fact", "grad_at", "symmetry", "min_l2") if d[t].beta > 0]
    uses_teacher = d.kd.alpha > 0 or d.at.beta > 0 or d.fact.beta > 0 or d.grad_at.beta > 0
    dataset = cfg.data._target_.rsplit(".", 1)[-1].removesuffix("DataModule")
    teacher = _net(cfg.teacher) if uses_teacher else None
    return dataset, _net(cfg.model), teacher, " + ".join(terms) or "none"


def test_paper_column_is_the_paper_number_of_what_the_presets_train():
    """Each (experiment, distill) pair of atx.paper gets the paper's number for the network,
    teacher and loss its composed config really trains; together they cover every verified
    number, so a mislabelled or edited preset, or a number copied wrong, fails here."""
    seen = set()
    for (experiment, distill), (_table, error) in PAPER_ERRORS.items():
        key = what_it_trains(compose_cfg([f"experiment={experiment}", f"distill={distill}"]))
        assert key in PAPER, (experiment, distill, key)
        assert error == PAPER[key], (experiment, distill)
        seen.add(key)
    assert seen == set(PAPER)
