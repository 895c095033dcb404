"""``atx-visualize``: attention grids of finished run directories, built without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


def test_wrn_teacher_and_students(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "wrn.png"
    argv = [str(runs["teacher"]), str(runs["student"]), str(runs["student_at"])]
    assert main([*argv, "--images", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    check_png(out, rows=3, cols=1 + 3 * 3)  # input + 3 groups x 3 networks


def test_grad_adds_one_column_per_network(runs, tmp_path):
    out = tmp_path / "grad.png"
    argv = [str(runs["teacher"]), str(runs["student_at"]), "--images", "2", "--grad"]
    assert main([*argv, "--p", "1", "--mode", "max", "--out", str(out)]) == 0
    check_png(out, rows=2, cols=1 + (3 + 1) * 2)


def test_resnet18_presets_and_explicit_layers(runs, tmp_path):
    out = tmp_path / "resnet.png"
    argv = [str(runs["resnet"]), str(runs["resnet"]), "--images", "2", "--out", str(out)]
    assert main(argv) == 0  # layer1..layer4, same run twice: labels disambiguated
    check_png(out, rows=2, cols=1 + 4 * 2)
    out = tmp_path / "last2.png"
    argv = [str(runs["resnet"]), str(runs["resnet"]), "--layers", "layer3", "layer4"]
    assert main([*argv, "--images", "2", "--split", "train", "--out", str(out)]) == 0
    check_png(out, rows=2, cols=1 + 2 * 2)


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
