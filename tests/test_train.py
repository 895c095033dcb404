"""End to end, in process: compose the real config, train a teacher, then students from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from layouts import write_cifar10, write_cifar100, write_image_folder

from atx.models import build_model
from atx.train import CONF_DIR, train

TINY = [
    "model.depth=10",  # WRN-10-1: one block per group, same three groups as WRN-16-1
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "logger=csv",
    "figure_images=2",
]


def cifar_overrides(root: Path, layout: str) -> list[str]:
    if layout == "torchvision":
        write_cifar10(root, n_train=40, n_test=20)
    else:
        write_image_folder(root, {"train": 4, "test": 2})
    return ["data=cifar10", f"data.root={root}"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A WRN-10-2 teacher trained for one epoch on an image-folder CIFAR-10 copy."""
    tmp = tmp_path_factory.mktemp("teacher")
    data = cifar_overrides(tmp / "data", "folder")
    run_dir = tmp / "run"
    run_dir.mkdir()
    cfg = compose_cfg(TINY + data + ["model.width=2", "name=teacher"])
    metrics = train(cfg, run_dir)
    assert 0 <= metrics["val/error"] <= 100
    return run_dir


def test_teacher_run_writes_its_outputs(teacher_dir: Path):
    for name in ("student.pt", "metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (teacher_dir / name).is_file(), name
    summary = json.loads((teacher_dir / "metrics.json").read_text())
    assert summary["name"] == "teacher" and summary["epochs"] == 1
    state = torch.load(teacher_dir / "student.pt", weights_only=True)
    build_model("wrn", num_classes=10, depth=10, width=2).load_state_dict(state)


@pytest.mark.parametrize(
    ("distill", "layout"),
    [
        ("at", "torchvision"),
        ("at_kd", "folder"),
        ("fact", "torchvision"),
        ("kd", "folder"),
        ("grad_at", "folder"),
        ("symmetry", "torchvision"),
        ("min_l2", "folder"),
    ],
)
def test_student_from_teacher(tmp_path, teacher_dir, distill, layout):
    data = cifar_overrides(tmp_path / "data", layout)
    cfg = compose_cfg(
        TINY
        + data
        + [
            f"distill={distill}",
            "teacher=wrn_16_2",
            "teacher.depth=10",
            f"teacher.checkpoint={teacher_dir}",
            f"name=student_{distill}",
        ]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = torch.load(teacher_dir / "student.pt", weights_only=True)
    train(cfg, run_dir)
    log = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    expected = {
        "at": ["train/at/group1_step", "train/at/group3_step"],
        "at_kd": ["train/at/group2_step", "train/kd_step", "weight/at"],
        "fact": ["train/fact/group1_step"],
        "kd": ["train/kd_step"],
        "grad_at": ["train/grad_at_step"],
        "symmetry": ["train/symmetry_step"],
        "min_l2": ["train/min_l2_step"],
    }[distill]
    for column in expected + ["train/ce_step", "val/error"]:
        assert column in log, column
    if distill not in ("symmetry", "min_l2"):  # teacher-free terms: no teacher, no figure
        assert (run_dir / "attention.png").stat().st_size > 1000
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    after = torch.load(teacher_dir / "student.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_lists_from_the_shell(tmp_path, teacher_dir):
    data = cifar_overrides(tmp_path / "data", "folder")
    cfg = compose_cfg(
        TINY
        + data
        + [
            "distill=at",
            "teacher=wrn_16_2",
            "teacher.depth=10",
            f"teacher.checkpoint={teacher_dir}",
            "distill.at.student_layers=[group2,group3.0.conv1]",
            "distill.at.teacher_layers=[group2,group3]",
        ]
    )
    (tmp_path / "run").mkdir()
    train(cfg, tmp_path / "run")
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/at/group3.0.conv1_step" in header and "train/at/group1_step" not in header


def test_plain_student_with_a_teacher_logs_agreement_and_figures(tmp_path, teacher_dir):
    """A baseline student given a teacher: attention agreement per group is measured, and the
    attention figure is drawn during training (every epoch here) as well as at the end."""
    data = cifar_overrides(tmp_path / "data", "folder")
    cfg = compose_cfg(TINY + data + [
        "distill=none", "teacher=wrn_16_2", "teacher.depth=10",
        f"teacher.checkpoint={teacher_dir}", "figure_every_n_epochs=1",
    ])  # fmt: skip
    (tmp_path / "run").mkdir()
    metrics = train(cfg, tmp_path / "run")
    for group in ("group1", "group2", "group3"):
        assert -1.0 <= metrics[f"val/agreement/{group}"] <= 1.0
        assert metrics[f"val/at_distance/{group}"] >= 0.0
    assert (tmp_path / "run" / "attention" / "epoch_001.png").stat().st_size > 1000
    assert (tmp_path / "run" / "attention.png").is_file()


def test_a_teacher_kept_for_metrics_changes_nothing_in_training(tmp_path, teacher_dir):
    """Same seed, with and without a (metrics-only) teacher: the same batches, the same student."""
    data = cifar_overrides(tmp_path / "data", "folder")
    runs = {"plain": [], "with_teacher": ["teacher=wrn_16_2", "teacher.depth=10",
                                          f"teacher.checkpoint={teacher_dir}"]}  # fmt: skip
    for name, extra in runs.items():
        (tmp_path / name).mkdir()
        train(compose_cfg(TINY + data + extra), tmp_path / name)
    a = torch.load(tmp_path / "plain" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "with_teacher" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cifar100_logs_top5_error(tmp_path):
    write_cifar100(tmp_path / "data", n_train=40, n_test=20)
    cfg = compose_cfg(TINY + ["data=cifar100", f"data.root={tmp_path / 'data'}"])
    (tmp_path / "run").mkdir()
    metrics = train(cfg, tmp_path / "run")
    assert 0 <= metrics["val/error_top5"] <= metrics["val/error"] <= 100


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.model.name in {"wrn", "nin", "resnet18", "resnet34"}
    if preset.startswith(("t1_", "t2_", "t3_")):
        assert cfg.teacher is not None and cfg.data._target_.endswith("CIFAR10DataModule")
    if preset.startswith(("t1_", "t2_")):
        assert cfg.name.startswith(preset) and cfg.name.endswith("-at")
    if preset.startswith("t3_"):  # the paper's grad-AT setting: no BN, flips only, no wd
        assert not cfg.model.batch_norm and cfg.data.pad == 0 and cfg.optim.weight_decay == 0
    cifar = preset.startswith(("t1_", "t2_", "t3_", "cifar10_"))  # the authors' cifar.py
    assert cfg.optim.recipe == ("authors" if cifar else "standard")


def test_every_term_at_once(tmp_path, teacher_dir):
    """Any combination is a config choice: CE + KD + AT + F-ActT + grad-AT + symmetry + min-l2."""
    data = cifar_overrides(tmp_path / "data", "folder")
    cfg = compose_cfg(TINY + data + [
        "distill=at_kd", "teacher=wrn_16_2", "teacher.depth=10",
        f"teacher.checkpoint={teacher_dir}", "distill.fact.beta=10", "distill.grad_at.beta=10",
        "distill.symmetry.beta=10", "distill.min_l2.beta=1", "distill.fact.student_layers=last",
    ])  # fmt: skip
    (tmp_path / "run").mkdir()
    train(cfg, tmp_path / "run")
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in ("ce", "kd", "at/group1", "fact/group3", "grad_at", "symmetry", "min_l2"):
        assert f"train/{term}_step" in header, term
    assert "train/fact/group1_step" not in header
