"""The paper presets resolve to the paper's settings: every value below is written from the
paper (or, where the paper leaves it out, from the authors' released cifar.py / imagenet.py,
which the paper's numbers come from) and compared with the composed config, not only that the
preset composes. Settings the paper does not publish (fine-tuning optimiser, Table 3 lr, the
beta decay schedule) are atx's choices and are not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from hydra.utils import instantiate
from omegaconf import DictConfig

from atx.attention import at_loss
from atx.build import resolve_layers
from atx.data import CIFAR10DataModule
from atx.losses import Schedule

EXPERIMENTS = Path(__file__).parents[1] / "conf" / "experiment"

# experiment -> (student depth, width), (teacher depth, width): Table 1's WRN rows and
# Table 2's pair (WRN-16-1 student of WRN-16-2)
WRN_ROWS = {
    "t1_wrn_16_1-wrn_16_2": ((16, 1), (16, 2)),
    "t1_wrn_16_1-wrn_40_1": ((16, 1), (40, 1)),
    "t1_wrn_16_2-wrn_40_2": ((16, 2), (40, 2)),
    "t2_wrn_16_1-wrn_16_2": ((16, 1), (16, 2)),
}
CIFAR_TEACHERS = {  # the teachers' own training runs, trained like the students
    "cifar10_teacher_wrn_16_2": (16, 2),
    "cifar10_teacher_wrn_40_1": (40, 1),
    "cifar10_teacher_wrn_40_2": (40, 2),
}
CIFAR_RECIPE = [*WRN_ROWS, *CIFAR_TEACHERS, "t1_nin_thin-nin_wide", "cifar10_teacher_nin_wide"]
TABLE3 = ["t3_nin_thin-nin_wide", "t3_nin_thin-nin_wide_at"]
TABLE3_TEACHERS = ["cifar10_teacher_nin_wide_nobn", "cifar10_teacher_nin_wide_bn_norelu"]
TABLE4 = ["t4_cub_resnet18-resnet34", "t4_scenes_resnet18-resnet34"]
TABLE4_TEACHERS = ["cub_teacher_resnet34", "scenes_teacher_resnet34"]
IMAGENET = ["t5_resnet18-resnet34", "imagenet_resnet34"]
NOT_PAPER_ROWS = {"cifar10_short", "cifar10_short_teacher", "demo", "demo_teacher",
                  # beyond the paper: ViTs (tests/test_vit_presets.py)
                  "cifar10_teacher_vit_small", "cifar10_vit_tiny-wrn_16_2",
                  "cifar10_vit_tiny-vit_small", "imagenet_deit_tiny-regnety_160"}


def cfg_of(experiment: str, distill: str | None = None) -> DictConfig:
    return compose_cfg([f"experiment={experiment}", *([f"distill={distill}"] if distill else [])])


def test_every_experiment_preset_is_checked_here():
    checked = {*CIFAR_RECIPE, *TABLE3, *TABLE3_TEACHERS, *TABLE4, *TABLE4_TEACHERS, *IMAGENET}
    assert {p.stem for p in EXPERIMENTS.glob("*.yaml")} == checked | NOT_PAPER_ROWS


@pytest.mark.parametrize("experiment", CIFAR_RECIPE)
def test_cifar_presets_train_with_the_authors_cifar_recipe(experiment: str):
    # Paper Sec. 4.1: flips and random crops, batch norm, mean/std normalisation; the rest is
    # the authors' cifar.py: SGD lr 0.1 momentum 0.9 (no Nesterov), x0.2 at epochs 60/120/160,
    # SGD re-created at each drop, weight decay 5e-4, batch 128, 200 epochs, crops of 4-pixel
    # reflect padding, mean (125.3, 123.0, 113.9)/255 and std (63.0, 62.1, 66.7)/255
    cfg = cfg_of(experiment)
    o = cfg.optim
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay) == (0.1, 0.9, False, 5e-4)
    assert (list(o.milestones), o.gamma, o.recipe) == ([60, 120, 160], 0.2, "authors")
    data = instantiate(cfg.data)  # the datamodule the run builds (nothing is read yet)
    assert type(data) is CIFAR10DataModule
    assert (data.batch_size, data.pad, data.pad_mode, data.flip) == (128, 4, "reflect", True)
    assert data.mean == pytest.approx([v / 255 for v in (125.3, 123.0, 113.9)])
    assert data.std == pytest.approx([v / 255 for v in (63.0, 62.1, 66.7)])
    assert cfg.trainer.max_epochs == 200
    assert cfg.model.get("batch_norm", True)


@pytest.mark.parametrize("experiment", list(WRN_ROWS))
def test_wrn_rows_pair_the_networks_they_name_with_at_on_every_group(experiment: str):
    cfg = cfg_of(experiment)
    student, teacher = WRN_ROWS[experiment]
    assert (cfg.model.name, cfg.model.depth, cfg.model.width) == ("wrn", *student)
    assert (cfg.teacher.name, cfg.teacher.depth, cfg.teacher.width) == ("wrn", *teacher)
    # Sec. 3.1 / 4.1.1: F^2_sum AT on the output of each of the 3 groups of residual blocks
    at = cfg.distill.at
    assert (at.beta, at.p, at.mode, at.reduction) == (1000.0, 2.0, "sum", "code")
    layers = resolve_layers(at.student_layers, cfg.model.name, "student")
    assert layers == ["group1", "group2", "group3"] and at.teacher_layers is None


@pytest.mark.parametrize(("experiment", "size"), list(CIFAR_TEACHERS.items()))
def test_cifar_teacher_presets_train_the_teacher_they_name(experiment: str, size: tuple):
    cfg = cfg_of(experiment)
    assert (cfg.model.name, cfg.model.depth, cfg.model.width) == ("wrn", *size)
    assert cfg.teacher is None and cfg.distill.at.beta == 0 and cfg.distill.kd.alpha == 0


def test_nin_row_of_table1():
    # Table 1: NIN-thin (0.2M) student of NIN-wide (1M), both with batch norm (Sec. 4.1); AT
    # on each group, for NIN "a block of a 3x3, 1x1, 1x1 convolutions" (Sec. 3.1)
    cfg = cfg_of("t1_nin_thin-nin_wide")
    assert (cfg.model.name, cfg.model.variant, cfg.model.batch_norm) == ("nin", "thin", True)
    assert (cfg.teacher.name, cfg.teacher.variant, cfg.teacher.batch_norm) == ("nin", "wide", True)
    at = cfg.distill.at
    assert (at.beta, at.p, at.mode, at.reduction) == (1000.0, 2.0, "sum", "code")
    assert resolve_layers(at.student_layers, "nin", "s") == ["block1", "block2", "block3"]
    model = cfg_of("cifar10_teacher_nin_wide").model
    assert (model.name, model.variant, model.batch_norm) == ("nin", "wide", True)


def test_at_beta_is_1e3_over_map_elements_and_batch():
    """Sec. 4.1.1: "we set [beta] to 10^3 divided by number of elements in attention map and
    batch size for each layer" -- the weight the preset's beta and reduction put on the
    summed squared distance of the normalised maps."""
    at = cfg_of("t1_wrn_16_1-wrn_16_2", "at").distill.at
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 8, 6, generator=g), torch.randn(3, 8, 8, 6, generator=g)
    qs, qt = ((x * x).sum(dim=1).flatten(1) for x in (s, t))
    qs, qt = qs / qs.norm(dim=1, keepdim=True), qt / qt.norm(dim=1, keepdim=True)
    paper = 1e3 / (8 * 6 * 3) * (qs - qt).pow(2).sum()
    got = at.beta * at_loss(s, t, at.p, at.mode, at.reduction)
    torch.testing.assert_close(got, paper)


@pytest.mark.parametrize(
    ("distill", "p", "mode"),
    [("at_sum_p1", 1.0, "sum"), ("at", 2.0, "sum"), ("at_sum_p4", 4.0, "sum"),
     ("at_max_p1", 1.0, "max")],
)
def test_table2_map_functions(distill: str, p: float, mode: str):
    # Table 2: F_sum, F^2_sum, F^4_sum, F^1_max; AT otherwise as in Table 1
    at = cfg_of("t2_wrn_16_1-wrn_16_2", distill).distill.at
    assert (at.p, at.mode, at.beta, at.reduction) == (p, mode, 1000.0, "code")
    assert at.schedule.kind == "constant"


def test_kd_at_kd_and_fact_presets():
    # Sec. 4.1: KD temperature 4 for ResNet transfers, alpha = 0.9; Sec. 4.1.1: with KD, beta
    # is decayed during training; Sec. 4.1.2: F-ActT decays beta too
    for distill in ("kd", "at_kd"):
        kd = cfg_of("t1_wrn_16_1-wrn_16_2", distill).distill.kd
        assert (kd.alpha, kd.temperature) == (0.9, 4.0)
    d = cfg_of("t1_wrn_16_1-wrn_16_2", "at_kd").distill
    assert (d.at.beta, d.at.p, d.at.mode) == (1000.0, 2.0, "sum")
    for term in (d.at, cfg_of("t1_wrn_16_1-wrn_16_2", "fact").distill.fact):
        weight = Schedule.from_conf(term.beta, term.schedule, 200)
        assert weight(0) == term.beta > 0 and weight(199) < weight(100) < weight(0)


def test_table3_presets():
    # Sec. 4.1.3 / Table 3: thin NIN (0.2M) without batch norm and without ReLU before pooling,
    # trained on flips only (no crops), weight decay off, deterministic; wide NIN (1M) teacher
    for experiment in TABLE3:
        cfg = cfg_of(experiment)
        m = cfg.model
        assert (m.name, m.variant) == ("nin", "thin")
        assert not m.batch_norm and not m.relu_before_pool
        assert (cfg.data.pad, cfg.data.flip, cfg.optim.weight_decay) == (0, True, 0.0)
        assert cfg.trainer.deterministic and cfg.teacher.variant == "wide"
    for experiment in TABLE3_TEACHERS:
        assert cfg_of(experiment).model.variant == "wide"
    # the activation-based AT row: a new teacher *with* BN, no ReLU before pooling, AT on the
    # outputs of the conv blocks
    cfg = cfg_of("t3_nin_thin-nin_wide_at")
    assert cfg.teacher.batch_norm and not cfg.teacher.relu_before_pool
    at = cfg.distill.at
    assert (at.beta > 0, at.p, at.mode) == (True, 2.0, "sum")
    assert resolve_layers(at.student_layers, "nin", "s") == ["block1", "block2", "block3"]
    m = cfg_of("cifar10_teacher_nin_wide_bn_norelu").model  # that teacher's own run
    assert (m.batch_norm, m.relu_before_pool) == (True, False)


@pytest.mark.parametrize("experiment", TABLE4 + TABLE4_TEACHERS)
def test_table4_fine_tuning_presets(experiment: str):
    # Sec. 4.2.1: ImageNet-pretrained ResNets fine-tuned with batch norm fixed and the first
    # group of residual blocks frozen; CUB images cropped to their boxes, rescaled to 256 on
    # one side
    cfg = cfg_of(experiment)
    assert cfg.model.weights_path is not None or cfg.model.weights is not None
    assert cfg.finetune.freeze_bn and "layer1" in cfg.finetune.frozen_layers
    if "cub" in experiment:
        assert cfg.data._target_ == "atx.data.CUBDataModule"
        assert cfg.data.crop_to_bbox and cfg.data.resize_size == 256
    else:
        assert cfg.data._target_ == "atx.data.ScenesDataModule"
    if experiment in TABLE4:  # ResNet-18 student of ResNet-34, F^2_sum AT on the 2 last groups
        at = cfg.distill.at
        assert (cfg.model.name, cfg.teacher.name) == ("resnet18", "resnet34")
        assert (at.beta > 0, at.p, at.mode) == (True, 2.0, "sum")
        assert resolve_layers(at.student_layers, "resnet18", "s") == ["layer3", "layer4"]
    else:
        assert cfg.model.name == "resnet34" and cfg.teacher is None


@pytest.mark.parametrize("experiment", IMAGENET)
def test_imagenet_presets(experiment: str):
    # Sec. 4.2.2: ResNet-18 from scratch, ImageNet ResNet-34 teacher, F^2_sum AT on the 2 last
    # groups; the recipe is the authors' imagenet.py: SGD lr 0.1 momentum 0.9, x0.1 at epochs
    # 30/60/90, 100 epochs, weight decay 1e-4, batch 256, random-resized 224 crops and flips,
    # evaluation on the 224 centre crop of a 256 resize
    cfg = cfg_of(experiment)
    o, d = cfg.optim, cfg.data
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay) == (0.1, 0.9, False, 1e-4)
    assert (list(o.milestones), o.gamma, cfg.trainer.max_epochs) == ([30, 60, 90], 0.1, 100)
    assert d._target_ == "atx.data.ImageNetDataModule" and d.batch_size == 256
    assert (d.train_crop, d.image_size, d.resize_size, d.flip) == ("random_resized", 224, 256, True)
    assert cfg.model.weights_path is None and cfg.model.weights is None
    if experiment == "t5_resnet18-resnet34":
        at = cfg.distill.at
        assert (cfg.model.name, cfg.teacher.name) == ("resnet18", "resnet34")
        assert (at.beta, at.p, at.mode, at.reduction) == (1000.0, 2.0, "sum", "code")
        assert resolve_layers(at.student_layers, "resnet18", "s") == ["layer3", "layer4"]
    else:
        assert cfg.model.name == "resnet34" and cfg.teacher is None
