"""The decaying beta of ``distill=at_kd`` and ``distill=fact`` through a real Lightning run.

Each epoch logs the weight of every term (``weight/<term>`` in ``csv/metrics.csv``); the decaying
term's must be the configured linear schedule, beta * (1 - e / E) for 0-based epoch e of E, and
every step's logged loss must be the sum of the parts weighted by that epoch's logged weights,
so the schedule is what training used, not only what was logged.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from configs import compose_cfg

from atx.models import build_model
from atx.train import train

EPOCHS = 3
RUN = [
    "model.depth=10",
    "teacher=wrn_16_2",
    "teacher.depth=10",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",  # every step's loss and parts in the CSV
    "data.train_subset=16",  # 2 steps per epoch
    "data.val_subset=8",
    "data.batch_size=8",
    "checkpoint.every_n_steps=0",
    "figure_images=0",
    "logger=csv",
]


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict(),
               path)
    return path


def rows(run: Path) -> list[dict[str, float]]:
    """The non-empty values of each row of ``csv/metrics.csv``."""
    with (run / "csv" / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def term_parts(row: dict[str, float], term: str) -> float:
    """The sum of a term's unweighted step losses (``train/kd_step``, ``train/at/<g>_step``)."""
    return sum(v for k, v in row.items() if k.endswith("_step")
               and (k == f"train/{term}_step" or k.startswith(f"train/{term}/")))


@pytest.mark.parametrize("preset, term", [("at_kd", "at"), ("fact", "fact")])
def test_beta_decays_linearly_per_epoch_in_the_logged_weight_and_the_loss(
    tmp_path: Path, teacher_pt: Path, preset: str, term: str
) -> None:
    cfg = compose_cfg([*RUN, f"distill={preset}", f"teacher.checkpoint={teacher_pt}"])
    assert cfg.distill[term].schedule.kind == "linear" and cfg.distill[term].schedule.final == 0
    train(cfg, tmp_path)
    logged = rows(tmp_path)
    beta = cfg.distill[term].beta
    weights = [r for r in logged if f"weight/{term}" in r]
    assert [int(r["epoch"]) for r in weights] == list(range(EPOCHS))  # once per epoch
    assert [r[f"weight/{term}"] for r in weights] == pytest.approx(
        [beta * (1 - e / EPOCHS) for e in range(EPOCHS)]
    )
    per_epoch = {int(r["epoch"]): {k[len("weight/"):]: v for k, v in r.items()
                                   if k.startswith("weight/")} for r in weights}
    assert set(per_epoch[0]) == ({"ce", "kd", "at"} if preset == "at_kd" else {"ce", "fact"})
    steps = [r for r in logged if "train/loss_step" in r]
    assert [int(r["epoch"]) for r in steps] == [0, 0, 1, 1, 2, 2]
    for r in steps:
        w = per_epoch[int(r["epoch"])]
        assert term_parts(r, term) > 0, r  # the decaying term contributes to the loss
        expected = sum(weight * term_parts(r, name) for name, weight in w.items())
        assert r["train/loss_step"] == pytest.approx(expected, rel=1e-5), r
