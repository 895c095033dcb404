"""A new loss term is one Python class and one YAML preset: this file declares a toy term and
its preset outside ``src/``, and a real run composes, checks, builds, trains and logs it."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from configs import compose_cfg
from hydra.errors import ConfigCompositionException
from torch import Tensor

from atx import config
from atx.errors import AtxError
from atx.losses import TERMS, LayerPairTerm, Schedule, ScheduleConf, TermSetup, register_term
from atx.train import train

RUN = [
    "model.depth=10",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "data.train_subset=32",
    "data.val_subset=16",
    "data.batch_size=16",
    "logger=csv",
    "figure_images=0",
]


@dataclass
class MeanMatchConf:
    beta: float = 0.0
    power: float = 2.0
    student_layers: Any = "all"
    teacher_layers: Any = None
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


class MeanMatch(LayerPairTerm):
    """Toy: |mean activation of the student - of the teacher|^power per layer pair."""

    name = "mean_match"
    Conf = MeanMatchConf

    def __init__(self, weight: Schedule, pairs: list[tuple[str, str]], power: float) -> None:
        super().__init__(weight, pairs)
        self.power = power

    @classmethod
    def check(cls, conf: MeanMatchConf, key: str) -> None:
        super().check(conf, key)
        if conf.power < 1:
            raise AtxError(f"{key}.power={conf.power} must be >= 1")

    @classmethod
    def from_config(cls, conf: MeanMatchConf, setup: TermSetup) -> MeanMatch:
        weight = Schedule.from_conf(conf.beta, conf.schedule, setup.max_epochs)
        return cls(weight, setup.pairs, conf.power)

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return (student.float().mean() - teacher.float().mean()).abs().pow(self.power)


@pytest.fixture
def toy_term(tmp_path: Path) -> Iterator[Path]:
    """The class registered and its preset in a search-path folder of the user's own."""
    register_term(MeanMatch)
    config.register()
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "mean_match.yaml").write_text(
        "mean_match:\n  beta: 10.0\n  power: 2.0\n  student_layers: last2\n"
    )
    yield tmp_path
    TERMS.pop(MeanMatch.name)
    config.register()


def teacher_run(tmp_path: Path) -> Path:
    run = tmp_path / "teacher"
    run.mkdir()
    train(compose_cfg([*RUN, "name=teacher"]), run)
    return run


def test_a_toy_term_trains_from_a_class_and_a_yaml_file(toy_term: Path) -> None:
    teacher = teacher_run(toy_term)
    search = f"hydra.searchpath=[file://{toy_term / 'conf'}]"
    teacher_options = ["teacher=wrn_16_1", "teacher.depth=10", f"teacher.checkpoint={teacher}"]
    overrides = [*RUN, search, "distill=mean_match", *teacher_options]
    cfg = compose_cfg(overrides)
    assert cfg.distill.mean_match.beta == 10.0 and cfg.distill.at.beta == 0
    run = toy_term / "student"
    run.mkdir()
    train(cfg, run)
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    # the term's losses per layer pair of the model's last2 preset, and its weight
    assert {"train/mean_match/group2_step", "train/mean_match/group3_step"} <= logged
    assert "weight/mean_match" in logged and "train/at/group3_step" not in logged
    weights = [float(r["weight/mean_match"]) for r in rows if r.get("weight/mean_match")]
    assert weights == [10.0]


def test_a_toy_terms_options_are_checked_like_every_other(toy_term: Path) -> None:
    search = f"hydra.searchpath=[file://{toy_term / 'conf'}]"
    with pytest.raises(AtxError, match=r"distill.mean_match.power=0.5 must be >= 1"):
        bad = compose_cfg([*RUN, search, "distill=mean_match", "distill.mean_match.power=0.5"])
        train(bad, toy_term / "bad")
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg([*RUN, search, "distill=mean_match", "distill.mean_match.powr=2"])
    line = config.composition_error_line(error.value)
    assert "Key 'powr' not in 'MeanMatchConf' (did you mean 'distill.mean_match.power'?)" in line
