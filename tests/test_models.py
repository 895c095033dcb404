"""Model zoo: parameter counts, shapes, named layer groups, weight loading, registry errors."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atx.errors import AtxError
from atx.models import build_model, layer_group_presets, model_names


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape))
        )
        for n in names
    ]
    model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize(
    ("depth", "width", "count"),
    [(16, 1, 175_066), (16, 2, 691_674), (40, 1, 563_930), (40, 2, 2_243_546)],
)
def test_wrn_parameter_counts(depth: int, width: int, count: int) -> None:
    assert n_params(build_model("wrn", 10, depth=depth, width=width)) == count


@pytest.mark.parametrize(("depth", "width"), [(10, 2), (16, 1), (40, 2)])
def test_wrn_matches_authors_functional_resnet(depth: int, width: int) -> None:
    """Same output and group outputs as cifar.py's functional `resnet()` on our parameters.
    Depth 10 width 2 has one block a group, each with a 1x1 shortcut; depth 16 width 1 and 40
    width 2 have several blocks a group, the later ones (and WRN-16-1's first) with identity
    shortcuts."""
    torch.manual_seed(0)
    model = build_model("wrn", 10, depth=depth, width=width).eval()
    for m in model.modules():  # BN statistics and shifts away from their identity init
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    p = dict(model.state_dict())

    def act(x: torch.Tensor, base: str) -> torch.Tensor:
        return F.relu(
            F.batch_norm(
                x,
                p[base + ".running_mean"],
                p[base + ".running_var"],
                p[base + ".weight"],
                p[base + ".bias"],
                training=False,
            )
        )

    def block(x: torch.Tensor, base: str, stride: int, ni: int, no: int) -> torch.Tensor:
        o1 = act(x, base + ".bn0")
        y = F.conv2d(o1, p[base + ".conv0.weight"], stride=stride, padding=1)
        z = F.conv2d(act(y, base + ".bn1"), p[base + ".conv1.weight"], padding=1)
        # cifar.py gives a block a 1x1 `convdim` exactly when its width changes
        assert (base + ".convdim.weight" in p) == (ni != no), base
        if ni != no:
            return z + F.conv2d(o1, p[base + ".convdim.weight"], stride=stride)
        return z + x

    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]

    def group(o: torch.Tensor, g: int, stride: int) -> torch.Tensor:
        ni = 16 if g == 0 else widths[g - 1]
        for i in range(n):
            o = block(o, f"group{g + 1}.{i}", stride if i == 0 else 1, ni if i == 0 else widths[g],
                      widths[g])
        return o

    x = torch.randn(2, 3, 16, 16)  # small input: the final pool averages the whole 4x4 map
    g0 = group(F.conv2d(x, p["conv0.weight"], padding=1), 0, 1)
    g1 = group(g0, 1, 2)
    g2 = group(g1, 2, 2)
    o = F.avg_pool2d(act(g2, "bn"), g2.shape[-1], 1, 0).flatten(1)
    ref = F.linear(o, p["fc.weight"], p["fc.bias"])

    outs: dict[str, torch.Tensor] = {}
    for name in ("group1", "group2", "group3"):
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outs.__setitem__(name, out)
        )
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, ref)
    for name, g in zip(("group1", "group2", "group3"), (g0, g1, g2), strict=True):
        torch.testing.assert_close(outs[name], g)


def test_wrn_init_and_bad_depth() -> None:
    model = build_model("wrn", 10)
    bn = model.group1[0].bn0
    assert bn.weight.min() >= 0 and bn.weight.max() <= 1 and not bn.bias.any()
    assert not model.fc.bias.any()
    with pytest.raises(AtxError, match="6n\\+4"):
        build_model("wrn", 10, depth=18)


@pytest.mark.parametrize(
    ("variant", "low", "high"), [("thin", 0.15e6, 0.25e6), ("wide", 0.8e6, 1.2e6)]
)
def test_nin_parameter_counts(variant: str, low: float, high: float) -> None:
    for batch_norm in (True, False):
        assert (
            low <= n_params(build_model("nin", 10, variant=variant, batch_norm=batch_norm)) <= high
        )
    assert (
        n_params(build_model("nin", 10, variant=variant))
        == {
            "thin": 226_474,
            "wide": 971_010,
        }[variant]
    )


def test_nin_without_batch_norm_and_relu_before_pool() -> None:
    model = build_model("nin", 10, batch_norm=False, relu_before_pool=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not isinstance(model.block1[-1], nn.ReLU) and not isinstance(model.block2[-1], nn.ReLU)
    assert isinstance(model.block3[-1], nn.ReLU)
    assert isinstance(build_model("nin", 10).block1[-1], nn.ReLU)
    with pytest.raises(AtxError, match="unknown NIN variant 'fat'; known variants: thin, wide"):
        build_model("nin", 10, variant="fat")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("wrn", {}), ("nin", {}), ("resnet18", {}), ("resnet34", {})],
)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_forward_shapes(name: str, kwargs: dict, channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=channels, **kwargs)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrn", {"group1": (2, 16, 32, 32), "group2": (2, 32, 16, 16), "group3": (2, 64, 8, 8)}),
        ("nin", {"block1": (2, 96, 32, 32), "block2": (2, 96, 16, 16), "block3": (2, 96, 8, 8)}),
        (
            "resnet18",
            {
                "layer1": (2, 64, 8, 8),
                "layer2": (2, 128, 4, 4),
                "layer3": (2, 256, 2, 2),
                "layer4": (2, 512, 1, 1),
            },
        ),
    ],
)
def test_named_groups(name: str, expected: dict[str, tuple]) -> None:
    model = build_model(name, 10)
    presets = layer_group_presets(name)
    assert presets["all"] == list(expected)
    assert presets["last2"] == list(expected)[-2:] and presets["last"] == list(expected)[-1:]
    assert group_shapes(model, presets["all"], torch.randn(2, 3, 32, 32)) == expected


def test_registry() -> None:
    assert model_names() == ["nin", "resnet18", "resnet34", "timm", "torchvision", "wrn"]
    assert layer_group_presets("torchvision") == {}
    assert layer_group_presets("resnet34")["last2"] == ["layer3", "layer4"]
    with pytest.raises(AtxError) as e:
        build_model("wrm", 10)
    assert str(e.value) == (
        "model: unknown model 'wrm'; known models: nin, resnet18, resnet34, timm, torchvision,"
        " wrn (did you mean 'wrn'?)"
    )
    with pytest.raises(AtxError) as e:
        build_model("wrn", 10, depht=16)
    assert str(e.value) == (
        "unknown option 'model.depht' (did you mean 'model.depth'?); valid options: depth,"
        " dropout, width"
    )
    with pytest.raises(AtxError, match="model.depth must be int, got str '16'"):
        build_model("wrn", 10, depth="16")
    with pytest.raises(AtxError, match=r"model.arch is not set: pass model.arch=<value>"):
        build_model("torchvision", 10)
    with pytest.raises(AtxError, match="did you mean 'resnet18'"):
        build_model("torchvision", 10, arch="resnet19")
    with pytest.raises(AtxError, match="unknown model 'nope'"):
        layer_group_presets("nope")
    build_model("wrn", 10, dropout=0)  # an int is fine for a float option


def test_torchvision_generic_in_channels() -> None:
    model = build_model("torchvision", 5, in_channels=1, arch="mobilenet_v3_small")
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_weights_path_round_trip(tmp_path) -> None:
    src = build_model("resnet18", 10).eval()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    loaded = build_model("resnet18", 10, weights_path=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))

    other = build_model("resnet18", 4, weights_path=str(path))  # classifier skipped
    assert other.fc.out_features == 4
    torch.testing.assert_close(other.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert not torch.equal(other.fc.weight, src.fc.weight[:4])

    gray = build_model("resnet18", 10, in_channels=1, weights_path=str(path))
    torch.testing.assert_close(gray.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_weights_path_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(AtxError, match=re.escape(f"weights file '{missing}' not found")):
        build_model("resnet18", 10, weights_path=str(missing))
    wrong = tmp_path / "wrn.pth"
    torch.save(build_model("wrn", 10).state_dict(), wrong)
    with pytest.raises(
        AtxError, match=re.escape(f"weights file '{wrong}' does not match the model")
    ):
        build_model("resnet18", 10, weights_path=str(wrong))
    r18 = tmp_path / "r18.pth"
    torch.save(build_model("resnet18", 10).state_dict(), r18)
    with pytest.raises(AtxError, match=re.escape(f"weights file '{r18}' does not match the model")):
        build_model("resnet34", 10, weights_path=str(r18))


def test_torchvision_pretrained_weights_through_the_hub_cache(tmp_path, monkeypatch):
    """`model.weights=IMAGENET1K_V1` goes through torchvision's real download path; a file
    already in the hub cache is used as it is (no network here)."""
    import torch.hub
    from torchvision.models import ResNet18_Weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    reference = build_model("resnet18", num_classes=1000)
    cached = tmp_path / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", num_classes=7, weights="IMAGENET1K_V1")
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.fc.out_features == 7
    with pytest.raises(AtxError, match="has no pretrained weights 'IMAGENET9'"):
        build_model("resnet18", num_classes=7, weights="IMAGENET9")
    cached.unlink()  # not cached and no network: one clear line
    with pytest.raises(AtxError, match="could not get torchvision weights resnet18/IMAGENET1K_V1"):
        build_model("resnet18", num_classes=7, weights="IMAGENET1K_V1")
