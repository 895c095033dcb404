"""Any timm model as student or teacher: building, layer presets, local weights, errors, and
real Trainer runs (AT between timm CNNs, KD into a timm ViT) on Fashion-MNIST."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from configs import compose_cfg
from safetensors.torch import save_file
from torch import nn

from atx import build
from atx.errors import AtxError
from atx.models import build_model, layer_group_presets
from atx.train import train

# tiny random networks: a ResNet-10-T with 8..64 channels, a 2-block ViT on 28x28 (7x7 patches)
CNN: dict[str, Any] = {"arch": "resnet10t", "options": {"channels": [8, 16, 32, 64],
                                                        "stem_width": 8}}
VIT: dict[str, Any] = {"arch": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4,
                       "options": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
CNN_TEACHER = ["teacher=timm", "teacher.arch=resnet10t",
               "teacher.options={channels:[8,16,32,64],stem_width:8}"]
VIT_MODEL = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.img_size=28",
             "model.patch_size=4", "model.options={depth:2,embed_dim:32,num_heads:2}"]
TINY = [
    "data=fashion_mnist",
    "data.train_subset=32",
    "data.val_subset=16",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "figure_images=2",
]


def shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, y, n=n: out.__setitem__(n, tuple(y.shape))) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def test_build_from_the_composed_presets() -> None:
    """model=timm / teacher=timm pass img_size, patch_size and options through to timm; class
    and channel counts come from the data; nothing is pretrained."""
    cfg = compose_cfg(TINY + VIT_MODEL + CNN_TEACHER + ["teacher.checkpoint=x",
                                                       "model.drop_path_rate=0.1"])
    vit = build.build_network(cfg.model, "model", 10, 1)
    assert (len(vit.blocks), vit.embed_dim, vit.patch_embed.proj.kernel_size) == (2, 32, (4, 4))
    assert vit.patch_embed.proj.in_channels == 1 and vit.pos_embed.shape == (1, 50, 32)
    assert vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    cnn = build.build_network(cfg.teacher, "teacher", 10, 1)
    assert (cnn.conv1[0].in_channels, cnn.layer4[0].conv1.out_channels, cnn.fc.out_features) == (
        1, 64, 10)
    x = torch.randn(2, 1, 28, 28)
    assert vit(x).shape == cnn(x).shape == (2, 10)


def test_layer_presets_from_the_built_network() -> None:
    """CNNs: the stages of feature_info without the stride-2 stem (strides 4..32); ViTs: the
    blocks at 1/4..4/4 of the depth, fewer when the model has fewer blocks."""
    cnn = build_model("timm", 10, **CNN)
    groups = layer_group_presets("timm", cnn)
    assert groups == {"all": ["layer1", "layer2", "layer3", "layer4"],
                      "last2": ["layer3", "layer4"], "last": ["layer4"]}
    maps = shapes(cnn, groups["all"], torch.randn(1, 3, 64, 64))
    assert [s[-1] for s in maps.values()] == [16, 8, 4, 2]
    effnet = layer_group_presets("timm", build_model("timm", 10, arch="test_efficientnet"))
    assert effnet["all"] == ["blocks.1", "blocks.2", "blocks.3", "blocks.4"]  # blocks.0: stride 2

    vit = build_model("timm", 10, **VIT)
    assert layer_group_presets("timm", vit) == {"all": ["blocks.0", "blocks.1"],
                                                "last2": ["blocks.0", "blocks.1"],
                                                "last": ["blocks.1"]}
    for depth, picked in ((12, [2, 5, 8, 11]), (6, [1, 2, 4, 5]), (3, [0, 1, 2])):
        opts = {**VIT["options"], "depth": depth}
        model = build_model("timm", 10, **{**VIT, "options": opts})
        assert layer_group_presets("timm", model)["all"] == [f"blocks.{i}" for i in picked]
    assert layer_group_presets("timm") == {}  # no network built: none
    # any module name still works as a layer group
    assert build.resolve_layers(["layer2.0.conv1"], "timm", "distill.at.student_layers",
                                cnn) == ["layer2.0.conv1"]


def test_weights_round_trip(tmp_path: Path) -> None:
    """A saved state dict loads into a model of another class count (head fresh, the rest
    the file's), of another channel count (first conv summed over RGB), from .safetensors and
    from a training checkpoint with DDP prefixes."""
    src = build_model("timm", 10, **CNN).eval()
    state = src.state_dict()
    pth = tmp_path / "cnn.pth"
    torch.save(state, pth)
    x = torch.randn(2, 3, 28, 28)
    same = build_model("timm", 10, **CNN, weights_path=str(pth)).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x))

    torch.manual_seed(7)
    fresh = build_model("timm", 4, **CNN).state_dict()
    torch.manual_seed(7)
    other = build_model("timm", 4, **CNN, weights_path=str(pth)).state_dict()
    assert other["fc.weight"].shape == (4, 64)
    for key in ("fc.weight", "fc.bias"):  # the model's own new head, not the file's
        assert torch.equal(other[key], fresh[key]), key
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(other[k], state[k]) for k in body)
    assert not torch.equal(fresh["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])

    st = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    gray = build_model("timm", 10, in_channels=1, **CNN, weights_path=str(st)).state_dict()
    torch.testing.assert_close(gray["conv1.0.weight"],
                               state["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(gray["layer4.0.conv2.weight"], state["layer4.0.conv2.weight"])

    nested = tmp_path / "train_ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, nested)
    again = build_model("timm", 10, **CNN, weights_path=str(nested)).state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_vit_weights_at_another_size_and_class_count(tmp_path: Path) -> None:
    """timm's own ViT filter resamples the position embeddings to another img_size; the class
    token's embedding and every block are the file's."""
    src = build_model("timm", 10, **{**VIT, "img_size": 32}).state_dict()
    path = tmp_path / "vit.pth"
    torch.save(src, path)
    small = build_model("timm", 5, **{**VIT, "img_size": 16}, weights_path=str(path))
    got = small.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 4 * 4, 32) and got["head.weight"].shape == (5, 32)
    assert torch.equal(got["pos_embed"][:, 0], src["pos_embed"][:, 0])
    assert all(torch.equal(got[k], src[k]) for k in src if k.startswith(("blocks.", "cls_")))
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_weights_errors(tmp_path: Path) -> None:
    carrying = tmp_path / "pickle.pth"
    torch.save({"fc.weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, carrying)
    with pytest.raises(AtxError) as e:
        build_model("timm", 10, **CNN, weights_path=str(carrying))
    assert str(e.value).startswith(f"model: refused to load weights file '{carrying}': it is not"
                                   " a plain tensor checkpoint")
    assert "\n" not in str(e.value)
    vit_file = tmp_path / "vit.pth"
    torch.save(build_model("timm", 10, **VIT).state_dict(), vit_file)
    with pytest.raises(AtxError, match=re.escape(
            f"teacher: weights file '{vit_file}' does not match the model: missing keys")):
        build_model("timm", 10, where="teacher", **CNN, weights_path=str(vit_file))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(AtxError, match=re.escape(f"cannot read weights file '{broken}'")):
        build_model("timm", 10, **CNN, weights_path=str(broken))
    with pytest.raises(AtxError, match="weights file '.*nope.pth' not found"):
        build_model("timm", 10, **CNN, weights_path=str(tmp_path / "nope.pth"))


def test_option_errors_are_one_line() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"arch": "vit_tiny_patch16_22"},
         "model: unknown timm model 'vit_tiny_patch16_22' (did you mean 'vit_tiny_patch16_224'?)"),
        ({"arch": "resnet10t", "img_size": 28},
         "model: timm cannot build 'resnet10t' with {'img_size': 28}: TypeError:"
         " ResNet.__init__() got an unexpected keyword argument 'img_size'"),
        ({"arch": "resnet10t", "options": {"in_chans": 3}},
         "model: options.in_chans is not an option to pass through: atx sets it from the data"),
        ({"arch": "resnet10t", "options": {"pretrained": True}},
         "model: options.pretrained is not an option to pass through: weights come only from"
         " weights_path (never downloaded)"),
        ({"arch": "resnet10t", "options": {"drop_rate": 0.1}},
         "model: options.drop_rate is not an option to pass through: set drop_rate=<value>"
         " itself"),
        ({"arch": "resnet10t", "drop_path_rate": 1.0},
         "model: drop_path_rate=1.0 must be a number in [0, 1)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AtxError) as e:
            build_model("timm", 10, **kwargs)
        assert str(e.value) == message
    with pytest.raises(AtxError, match=r"^unknown option 'teacher.img_sise' \(did you mean"
                                       r" 'teacher.img_size'\?\)"):
        build_model("timm", 10, where="teacher", arch="resnet10t", img_sise=28)


def column(run_dir: Path, name: str) -> list[float]:
    """A logged metric's values, from the run's CSV log."""
    lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    at = lines[0].split(",").index(name)
    return [float(row.split(",")[at]) for row in lines[1:] if row.split(",")[at]]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm ResNet-10-T teacher trained for one epoch on 32 Fashion-MNIST images."""
    run_dir = tmp_path_factory.mktemp("timm_teacher")
    cfg = compose_cfg(TINY + ["model=timm", "model.arch=resnet10t",
                              "model.options={channels:[8,16,32,64],stem_width:8}"])
    train(cfg, run_dir)
    return run_dir


def test_at_between_timm_cnns(tmp_path: Path, teacher_dir: Path) -> None:
    """distill=at from a timm teacher into another timm CNN: the preset groups pair stage by
    stage, the AT terms are logged, and AT changes the student (same seed and batches as a
    plain run)."""
    teacher = CNN_TEACHER + [f"teacher.checkpoint={teacher_dir}"]
    student = ["model=timm", "model.arch=test_resnet"]
    runs = {}
    for distill in ("none", "at"):
        run_dir = tmp_path / distill
        run_dir.mkdir()
        cfg = compose_cfg(TINY + student + teacher + [f"distill={distill}"])
        run = build.build_run(cfg)
        assert run.pairs == [(g, g) for g in ("layer1", "layer2", "layer3", "layer4")]
        metrics = train(cfg, run_dir)
        runs[distill] = torch.load(run_dir / "student.pt", weights_only=True)
        assert {f"val/agreement/layer{i}" for i in range(1, 5)} <= set(metrics)
    for group in ("layer1", "layer2", "layer3"):  # layer4 is 1x1 here: its map is constant
        values = column(tmp_path / "at", f"train/at/{group}_step")
        assert len(values) == 4 and all(v > 0 for v in values), group
    assert not torch.equal(runs["at"]["layer1.0.conv1.weight"],
                           runs["none"]["layer1.0.conv1.weight"])
    build_model("timm", 10, in_channels=1, arch="test_resnet").load_state_dict(runs["at"])


def test_kd_into_a_timm_vit(tmp_path: Path, teacher_dir: Path) -> None:
    """distill=kd from the timm CNN teacher into a 2-block ViT student: a real fit whose KD
    term is logged and whose export is the ViT's state dict."""
    cfg = compose_cfg(TINY + VIT_MODEL + CNN_TEACHER
                      + [f"teacher.checkpoint={teacher_dir}", "distill=kd"])
    start = {k: v.clone() for k, v in build.build_run(cfg).student.state_dict().items()}
    metrics = train(cfg, tmp_path)
    kd = column(tmp_path, "train/kd_step")
    assert len(kd) == 4 and all(v > 0 for v in kd)
    assert 0 <= metrics["val/error"] <= 100
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    build_model("timm", 10, in_channels=1, **VIT).load_state_dict(state)
    assert state.keys() == start.keys()
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
