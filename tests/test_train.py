"""End to end, in process: compose the real config, train a teacher, then students from it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from configs import compose_cfg
from layouts import write_cifar10, write_cifar100, write_image_folder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atx import build
from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import Agreement, DistillModule
from atx.terms import CrossEntropy
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


GROUPS = ("group1", "group2", "group3")


def validate(module: DistillModule, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The logged metrics of one real validation pass over (x, y) in batches of 4."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


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
def test_student_from_teacher(tmp_path, teacher_dir, monkeypatch, distill, layout):
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
    seen: dict[str, Any] = {}

    def record_teacher(module: DistillModule) -> None:  # after the last training step
        seen["state"] = {k: v.clone() for k, v in module.teacher.state_dict().items()}
        seen["training"] = [n for n, m in module.teacher.named_modules() if m.training]
        seen["requires_grad"] = [n for n, p in module.teacher.named_parameters() if p.requires_grad]

    monkeypatch.setattr(DistillModule, "on_train_end", record_teacher)
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
    # the teacher stayed frozen through the steps: eval mode (BN running stats untouched), no
    # parameter gradients, every weight and buffer still the file's
    file_state = torch.load(teacher_dir / "student.pt", weights_only=True)
    state = seen.pop("state")
    assert state.keys() == file_state.keys()
    seen["changed"] = [k for k in file_state if not torch.equal(state[k], file_state[k])]
    assert seen == {"training": [], "requires_grad": [], "changed": []}


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


def test_a_teacher_agrees_with_itself(teacher_dir):
    """The agreement metric's scale: a student that is a copy of the teacher has agreement 1
    and AT distance 0 in every group."""
    teacher = build_model("wrn", num_classes=10, depth=10, width=2)
    teacher.load_state_dict(torch.load(teacher_dir / "student.pt", weights_only=True))
    module = DistillModule(copy.deepcopy(teacher), Objective([CrossEntropy(Schedule(1.0))]), 10,
                           teacher=teacher, agreement=Agreement([(g, g) for g in GROUPS]))
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metrics = validate(module, x, torch.arange(10))
    for group in GROUPS:
        assert metrics[f"val/agreement/{group}"] == pytest.approx(1.0, abs=1e-6), group
        assert metrics[f"val/at_distance/{group}"] == pytest.approx(0.0, abs=1e-6), group


def test_at_student_agrees_with_the_teacher_more_than_a_plain_one(tmp_path, teacher_dir):
    """The same student init and batches, with and without AT: attention agreement per group
    is measured for both (the plain one is given the teacher for that), and AT raises it. The
    attention figure is drawn during training (every epoch here) as well as at the end."""
    data = cifar_overrides(tmp_path / "data", "folder")
    teacher = ["teacher=wrn_16_2", "teacher.depth=10", f"teacher.checkpoint={teacher_dir}"]
    metrics = {}
    for distill in ("none", "at"):
        (tmp_path / distill).mkdir()
        cfg = compose_cfg(TINY + data + teacher + [f"distill={distill}", "figure_every_n_epochs=1"])
        metrics[distill] = train(cfg, tmp_path / distill)
    for group in GROUPS:
        agreement, distance = f"val/agreement/{group}", f"val/at_distance/{group}"
        assert metrics["at"][agreement] > metrics["none"][agreement], group
        assert metrics["at"][distance] < metrics["none"][distance], group
    assert (tmp_path / "none" / "attention" / "epoch_001.png").stat().st_size > 1000
    assert (tmp_path / "none" / "attention.png").is_file()


def test_a_teacher_kept_for_metrics_changes_nothing_in_training(tmp_path, teacher_dir):
    """Same seed, with and without a (metrics-only) teacher: the same batches, the same student."""
    data = cifar_overrides(tmp_path / "data", "folder")
    runs = {"plain": [], "with_teacher": ["teacher=wrn_16_2", "teacher.depth=10",
                                          f"teacher.checkpoint={teacher_dir}"]}
    for name, extra in runs.items():
        (tmp_path / name).mkdir()
        train(compose_cfg(TINY + data + extra), tmp_path / name)
    a = torch.load(tmp_path / "plain" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "with_teacher" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cifar100_logs_top5_error(tmp_path):
    write_cifar100(tmp_path / "data", n_train=40, n_test=200)  # 200: a few top-5 hits
    cfg = compose_cfg(TINY + ["data=cifar100", f"data.root={tmp_path / 'data'}"])
    (tmp_path / "run").mkdir()
    metrics = train(cfg, tmp_path / "run")
    # recounted by hand: the exported student's top-5 misses on the test images
    data = build.build_data(cfg)
    data.setup()
    student = build_model("wrn", num_classes=100, depth=10, width=1)
    student.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    with torch.no_grad():
        top5 = student.eval()(data.normalize(data.x_val)).topk(5, dim=1).indices
    misses = int((top5 != data.y_val[:, None]).all(dim=1).sum())
    assert 0 < misses < len(data.y_val)  # not all hits or all misses: the count tells apart
    assert metrics["val/error_top5"] == pytest.approx(100 * misses / len(data.y_val), abs=1e-4)


def test_top5_error_equals_a_hand_count():
    """Logits built so that each label sits at a chosen place in its row's ranking."""
    ranks = torch.tensor([0, 0, 1, 3, 4, 5, 6, 50, 99, 2])  # 0 = the highest logit
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(100, generator=g) for _ in ranks])  # classes, best first
    logits = torch.empty(len(ranks), 100)
    logits.scatter_(1, orders, torch.arange(100, 0, -1.0).expand(len(ranks), 100))
    labels = orders.gather(1, ranks[:, None]).squeeze(1)
    metrics = validate(DistillModule(nn.Identity(), Objective([CrossEntropy(Schedule(1.0))]), 100),
                       logits, labels)
    assert metrics["val/error_top5"] == pytest.approx(40.0)  # ranks 5, 6, 50, 99: 4 of 10
    assert metrics["val/error"] == pytest.approx(80.0)  # all but the two rank-0 labels


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.model.name in {"wrn", "nin", "resnet18", "resnet34", "timm"}
    if preset.startswith(("t1_", "t2_", "t3_")):
        assert cfg.teacher is not None and cfg.data._target_.endswith("CIFAR10DataModule")
    if preset.startswith(("t1_", "t2_")):
        assert cfg.name.startswith(preset) and cfg.name.endswith("-at")
    if preset.startswith("t3_"):  # the paper's grad-AT setting: no BN, flips only, no wd
        assert not cfg.model.batch_norm and cfg.data.pad == 0 and cfg.optim.weight_decay == 0
    vit = "vit" in preset  # atx's ViT recipe (AdamW, cosine), tests/test_vit_presets.py
    cifar = preset.startswith(("t1_", "t2_", "t3_", "cifar10_")) and not vit  # authors' cifar.py
    assert cfg.optim.recipe == ("authors" if cifar else "standard")
    assert (cfg.optim.name == "adamw") == (vit or "deit" in preset)


def test_every_term_at_once(tmp_path, teacher_dir):
    """Any combination is a config choice: CE + KD + AT + F-ActT + grad-AT + symmetry + min-l2."""
    data = cifar_overrides(tmp_path / "data", "folder")
    cfg = compose_cfg(TINY + data + [
        "distill=at_kd", "teacher=wrn_16_2", "teacher.depth=10",
        f"teacher.checkpoint={teacher_dir}", "distill.fact.beta=10", "distill.grad_at.beta=10",
        "distill.symmetry.beta=10", "distill.min_l2.beta=1", "distill.fact.student_layers=last",
    ])
    (tmp_path / "run").mkdir()
    train(cfg, tmp_path / "run")
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in ("ce", "kd", "at/group1", "fact/group3", "grad_at", "symmetry", "min_l2"):
        assert f"train/{term}_step" in header, term
    assert "train/fact/group1_step" not in header
