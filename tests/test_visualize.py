"""``atx-visualize``: attention grids of finished run directories, built without training."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from configs import compose_cfg
from layouts import write_image_folder
from omegaconf import OmegaConf
from PIL import Image

from atx.build import build_network
from atx.data import CIFAR10DataModule
from atx.data.spread import spread_over_classes
from atx.visualize import main

CELL, DPI = 1.3, 110  # inches per grid cell and dots per inch of save_attention_figure


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_image_folder(root, {"train": 2, "test": 2})
    return root


def make_run(base: Path, root: Path, name: str, model: list[str], error: float | None) -> Path:
    """A run dir as ``atx-train`` leaves it: composed config, ``student.pt``, ``metrics.json``."""
    run = base / name
    (run / ".hydra").mkdir(parents=True)
    cfg = compose_cfg(["data=cifar10", f"data.root={root}", *model, f"name={name}"])
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
    torch.manual_seed(len(name))
    torch.save(build_network(cfg.model, "model", 10, 3).state_dict(), run / "student.pt")
    if error is not None:
        (run / "metrics.json").write_text(json.dumps({"val/error": error}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {
        "teacher": make_run(base, data_root, "teacher", ["model.depth=10", "model.width=2"], 6.3),
        "student": make_run(base, data_root, "student", ["model.depth=10"], 30.0),
        "student_at": make_run(base, data_root, "student_at", ["model.depth=10"], 22.0),
        "nometrics": make_run(base, data_root, "nometrics", ["model.depth=10"], None),
        "resnet": make_run(base, data_root, "resnet", ["model=resnet18"], 12.5),
    }


def check_png(path: Path, rows: int, cols: int) -> None:
    """A real PNG of the size save_attention_figure gives a rows x cols grid."""
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert w == pytest.approx(CELL * cols * DPI, abs=2)
    assert h == pytest.approx((CELL * rows + 0.6) * DPI, abs=2)
    assert w / h == pytest.approx(CELL * cols / (CELL * rows + 0.6), rel=0.01)


# --- reading the maps back out of the PNG ------------------------------------------------------
JET = (matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.float32)
TOL = 0.03  # decoded jet colours are 1/256 steps; jet's flat stretches cost about 0.014 more


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every matplotlib figure atx.visualize closes, kept to locate its cells in the PNG."""
    kept: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (kept.append(fig), close(fig))[1])
    return kept


def cell_values(png: Path, fig, row: int, col: int, n: int = 32) -> np.ndarray:
    """The value in [0, 1] each of the n x n map pixels of grid cell (row, col) shows, read by
    matching its centre colour to the nearest jet entry (imshow upsamples ~4x with 'nearest',
    so block centres hold pure colours); the outer ring, under the axes frame, is dropped."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
    h_px, w_px = img.shape[:2]
    cols = len(fig.axes) // len({round(a.get_position().y0, 4) for a in fig.axes})
    box = fig.axes[row * cols + col].get_position()
    xs = box.x0 * w_px + (np.arange(n) + 0.5) * box.width * w_px / n
    ys = (1 - box.y1) * h_px + (np.arange(n) + 0.5) * box.height * h_px / n
    pixels = img[ys.astype(int)][:, xs.astype(int)]
    dist = ((pixels[:, :, None] - JET[None, None]) ** 2).sum(-1)
    assert dist.min(-1)[1:-1, 1:-1].max() < 9, "a map cell holds colours that are not jet's"
    return ((dist.argmin(-1) + 0.5) / 256)[1:-1, 1:-1]


def load_net(run: Path) -> torch.nn.Module:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    model = build_network(cfg.model, "model", 10, 3)
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    return model.eval()


def expected_maps(run: Path, layers: list[str], x: torch.Tensor, p: float, mode: str) -> list:
    """Eq. 2's normalised F_mode^p of each layer, bilinearly resized to the image, (B, H, W):
    computed here from forward hooks, not by atx.visualize."""
    model, feats = load_net(run), {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: feats.__setitem__(n, out)) for n in layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    out = []
    for name in layers:
        a = feats[name].abs().pow(p)
        q = a.sum(1) if mode == "sum" else a.amax(1)
        q = q / q.flatten(1).norm(dim=1).view(-1, 1, 1)
        out.append(F.interpolate(q[:, None], size=x.shape[-2:], mode="bilinear")[:, 0])
    return out


def expected_grad(run: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|dCE/dx| summed over the channels, over its per-image maximum."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(load_net(run)(x), y), x)
    g = g.abs().sum(1)
    return g / g.flatten(1).amax(1).view(-1, 1, 1)


def images(data_root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    dm = CIFAR10DataModule(str(data_root))
    x, y = dm.val_images(n)
    return dm.normalize(x), y


def check_maps(png: Path, fig, maps: dict[str, list], n_images: int) -> None:
    """Column 1 + g * len(maps) + j shows network j's map of group g on the group's scale:
    0 .. the largest value any network's map of that group has on that image."""
    labels = list(maps)
    for i in range(n_images):
        for g in range(len(maps[labels[0]])):
            vmax = max(float(maps[lb][g][i].max()) for lb in labels)
            for j, lb in enumerate(labels):
                shown = cell_values(png, fig, i, 1 + g * len(labels) + j)
                want = maps[lb][g][i].numpy()[1:-1, 1:-1] / vmax
                assert np.abs(shown - want).max() < TOL, (lb, i, g)


WRN = ["group1", "group2", "group3"]


def test_wrn_teacher_and_students(runs, data_root, tmp_path, capsys, figures):
    out = tmp_path / "figs" / "wrn.png"
    names = ["teacher", "student", "student_at"]
    assert main([*(str(runs[n]) for n in names), "--images", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    check_png(out, rows=3, cols=1 + 3 * 3)  # input + 3 groups x 3 networks
    x, _ = images(data_root, 3)
    maps = {n: expected_maps(runs[n], WRN, x, 2.0, "sum") for n in names}
    check_maps(out, figures[-1], maps, 3)
    # the scale is shared: where the networks' peaks differ, only one cell reaches the top
    peaks = [[cell_values(out, figures[-1], i, 1 + 3 * g + j).max() for j in range(3)]
             for i in range(3) for g in range(3)]
    assert any(min(p) < 0.9 for p in peaks)


def test_grad_columns_and_the_max_mode(runs, data_root, tmp_path, figures):
    names = ["teacher", "student_at"]
    argv = [*(str(runs[n]) for n in names), "--images", "2", "--p", "1"]
    out = tmp_path / "grad.png"
    assert main([*argv, "--grad", "--mode", "max", "--out", str(out)]) == 0
    check_png(out, rows=2, cols=1 + (3 + 1) * 2)
    x, y = images(data_root, 2)
    max_maps = {n: expected_maps(runs[n], WRN, x, 1.0, "max") for n in names}
    check_maps(out, figures[-1], max_maps, 2)
    for j, n in enumerate(names):  # the last two columns: |dL/dx| on its own 0..1 scale
        grad = expected_grad(runs[n], x, y)
        for i in range(2):
            shown = cell_values(out, figures[-1], i, 1 + 3 * 2 + j)
            assert np.abs(shown - grad[i].numpy()[1:-1, 1:-1]).max() < TOL, (n, i)
            for col in range(1, 1 + 3 * 2):  # and unlike any activation map beside it
                assert np.abs(shown - cell_values(out, figures[-1], i, col)).mean() > 0.05
    out_sum = tmp_path / "sum.png"
    assert main([*argv, "--mode", "sum", "--out", str(out_sum)]) == 0
    sum_maps = {n: expected_maps(runs[n], WRN, x, 1.0, "sum") for n in names}
    check_maps(out_sum, figures[-1], sum_maps, 2)
    diffs = [np.abs(cell_values(out, figures[-2], i, c) - cell_values(out_sum, figures[-1], i, c))
             for i in range(2) for c in range(1, 1 + 3 * 2)]
    assert min(d.mean() for d in diffs) > 0.02  # F_max^1 and F_sum: every cell differs


def test_resnet18_presets_and_explicit_layers(runs, tmp_path, figures):
    out = tmp_path / "resnet.png"
    argv = [str(runs["resnet"]), str(runs["resnet"]), "--images", "2", "--out", str(out)]
    assert main(argv) == 0  # layer1..layer4, same run twice: labels disambiguated
    check_png(out, rows=2, cols=1 + 4 * 2)
    for i in range(2):  # the same map on the shared scale: the same colours in both columns
        for g in range(4):
            a, b = (cell_values(out, figures[-1], i, 1 + 2 * g + j) for j in (0, 1))
            assert np.array_equal(a, b) and a.max() > 0.99  # both peak at the top colour
            assert g > 0 or a.min() < 0.9  # layer1 (8x8) is no flat fill; layer4 is 1x1
    out = tmp_path / "last2.png"
    argv = [str(runs["resnet"]), str(runs["resnet"]), "--layers", "layer3", "layer4"]
    assert main([*argv, "--images", "2", "--split", "train", "--out", str(out)]) == 0
    check_png(out, rows=2, cols=1 + 2 * 2)


def test_a_vit_student_beside_a_cnn_teacher(runs, data_root, tmp_path, figures):
    """atx-visualize of a timm ViT run: its preset blocks (computed from the rebuilt network)
    beside the WRN teacher's groups, every ViT cell a real map (not a flat fill)."""
    vit = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.img_size=32",
           "model.patch_size=4", "model.options={depth:3,embed_dim:24,num_heads:2}"]
    student = make_run(tmp_path, data_root, "vit", vit, 40.0)
    out = tmp_path / "vit.png"
    argv = [str(runs["teacher"]), str(student), "--images", "2", "--out", str(out)]
    assert main(argv) == 0  # WRN group1..3 beside ViT blocks.0..2: 3 groups each
    check_png(out, rows=2, cols=1 + 3 * 2)
    for g in range(3):
        cell = cell_values(out, figures[-1], 0, 1 + 2 * g + 1)  # the ViT's column of group g
        assert cell.max() > cell.min()


def test_labels_name_and_error(runs):
    from atx.visualize import load_run, run_label

    assert run_label(*load_run(runs["student_at"])) == "student_at (22.0%)"
    assert run_label(*load_run(runs["nometrics"])) == "nometrics (n/a)"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "not found"),
        ("noconfig", "no .hydra/config.yaml"),
        ("noweights", "no student.pt"),
        ("groups", "different numbers of layer groups"),
        ("layer", "has no layer named 'nope'"),
    ],
)
def test_bad_inputs_one_line_exit_2(runs, tmp_path, capsys, case, message):
    teacher, student = str(runs["teacher"]), str(runs["student"])
    if case == "missing":
        argv = [teacher, str(tmp_path / "nowhere")]
    elif case == "noconfig":
        (tmp_path / "empty").mkdir()
        argv = [teacher, str(tmp_path / "empty")]
    elif case == "noweights":
        run = tmp_path / "noweights"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(
            (runs["student"] / ".hydra/config.yaml").read_text()
        )
        argv = [teacher, str(run)]
    elif case == "groups":
        argv = [teacher, str(runs["resnet"])]  # WRN: 3 groups, ResNet-18: 4
    else:
        argv = [teacher, student, "--layers", "nope"]
    assert main([*argv, "--images", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atx-visualize: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_figure_images_are_spread_over_the_classes(data_root) -> None:
    """An image-folder CIFAR-10 lists its test images class by class (airplanes first): the
    figures take the first image of every class, then the second, the same on every call."""
    assert spread_over_classes([0, 0, 0, 1, 1, 2], 5) == [0, 3, 5, 1, 4]
    assert spread_over_classes([3, 1, 3], 9) == [1, 0, 2] and spread_over_classes([], 4) == []
    dm = CIFAR10DataModule(str(data_root))
    dm.setup()
    assert dm.y_val.tolist()[:4] == [0, 0, 1, 1]  # file order
    x, y = dm.val_images(12)
    assert y.tolist() == [*range(10), 0, 1]
    assert torch.equal(x, dm.x_val[[*range(0, 20, 2), 1, 3]])
    again = CIFAR10DataModule(str(data_root))
    assert torch.equal(again.val_images(12)[0], x)
