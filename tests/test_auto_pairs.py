"""``distill.at.student_layers=auto``: each student group meets the teacher group closest in
spatial resolution, then in relative depth (atx.build.auto_pairs; the rule is in the README)."""

from __future__ import annotations

import pytest
from configs import compose_cfg
from torch import nn

from atx.build import auto_pairs, pair_by_size, plan_layers
from atx.models import build_model, layer_group_presets


def pairs_of(student: nn.Module, s_name: str, teacher: nn.Module, t_name: str,
             shape: tuple[int, ...]) -> list[tuple[str, str]]:
    s_all = layer_group_presets(s_name, student)["all"]
    t_all = layer_group_presets(t_name, teacher)["all"]
    return auto_pairs(student, teacher, s_all, t_all, shape)


def test_wrn_pairs_group_by_group() -> None:
    s = build_model("wrn", 10, 3, depth=16, width=1)
    t = build_model("wrn", 10, 3, depth=16, width=2)
    assert pairs_of(s, "wrn", t, "wrn", (3, 32, 32)) == [
        ("group1", "group1"), ("group2", "group2"), ("group3", "group3")
    ]


def test_resnet18_34_pair_stage_by_stage() -> None:
    s, t = build_model("resnet18", 10, 3), build_model("resnet34", 10, 3)
    assert pairs_of(s, "resnet18", t, "resnet34", (3, 64, 64)) == [
        ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")
    ]


def test_resolution_wins_over_depth() -> None:
    """At 32 px a WRN's groups are 32, 16 and 8 px maps and a ResNet-18's stages 8, 4, 2 and
    1 px: every WRN group is nearest in size to layer1 (group3 exactly), whatever the depth."""
    s = build_model("wrn", 10, 3, depth=10, width=1)
    t = build_model("resnet18", 10, 3)
    assert pairs_of(s, "wrn", t, "resnet18", (3, 32, 32)) == [
        ("group1", "layer1"), ("group2", "layer1"), ("group3", "layer1")
    ]


def test_depth_breaks_ties_of_resolution() -> None:
    """A ViT's blocks all share one grid: the student's blocks meet the teacher's blocks at
    the same relative depth; a CNN stage meets the block grid of its own size."""
    vit = [(f"blocks.{i}", (8, 8)) for i in (2, 5, 8, 11)]
    deeper = [(f"blocks.{i}", (8, 8)) for i in (5, 11, 17, 23)]
    assert pair_by_size(vit, deeper) == list(zip([n for n, _ in vit], [n for n, _ in deeper],
                                                 strict=True))
    cnn = [("group1", (32, 32)), ("group2", (16, 16)), ("group3", (8, 8))]
    assert pair_by_size(cnn, vit) == [("group1", "blocks.2"), ("group2", "blocks.8"),
                                      ("group3", "blocks.11")]
    assert pair_by_size(vit, cnn) == [(n, "group3") for n, _ in vit]
    # non-square maps compare by area: 4x16 is as near to 8x8 as 8x8 itself
    assert pair_by_size([("s", (4, 16))], [("a", (16, 16)), ("b", (8, 8))]) == [("s", "b")]


def test_auto_from_the_config_and_explicit_lists_still_win() -> None:
    cfg = compose_cfg(["distill=at", "distill.at.student_layers=auto", "teacher=wrn_16_2",
                       "teacher.checkpoint=unused"])
    s = build_model("wrn", 10, 1, depth=16, width=1)
    t = build_model("wrn", 10, 1, depth=16, width=2)
    assert plan_layers(cfg, s, t, (1, 32, 32))["at"] == [
        ("group1", "group1"), ("group2", "group2"), ("group3", "group3")
    ]
    cfg.distill.at.student_layers = ["group3"]
    assert plan_layers(cfg, s, t, (1, 32, 32))["at"] == [("group3", "group3")]


def test_auto_needs_presets_of_both_models() -> None:
    from atx.errors import AtxError

    cfg = compose_cfg(["distill=at", "distill.at.student_layers=auto", "teacher=wrn_16_2",
                       "teacher.checkpoint=unused", "teacher.name=torchvision",
                       "+teacher.arch=resnet18"])
    s = build_model("wrn", 10, 3, depth=10, width=1)
    t = build_model("torchvision", 10, 3, arch="resnet18")
    with pytest.raises(AtxError, match="student_layers=auto needs layer presets of both models"):
        plan_layers(cfg, s, t, (3, 32, 32))
