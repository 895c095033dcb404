"""Untrusted files: a checkpoint carrying a pickle payload is refused with one clear
line, and the payload never runs, on every path that reads model files: teacher.checkpoint
(plain state dict, Lightning .ckpt, run dir), torchvision weights_path and pretrained weights
from the hub cache, atx-visualize, resumed checkpoints and the dataset cache.

The payload runs ``touch <marker>`` when unpickled; the first test shows it really does when
loaded unsafely, so the marker staying absent elsewhere means the loader refused to run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from layouts import write_image_folder
from omegaconf import OmegaConf

from atx.checkpoints import STUDENT_FILE
from atx.data import cache
from atx.errors import AtxError
from atx.models import build_model
from atx.resume import newest_checkpoint
from atx.train import train
from atx.visualize import main as visualize_main

TINY = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "data.train_subset=16", "data.val_subset=8",
        "logger=csv", "figure_images=0"]
REFUSED = "it is not a plain tensor checkpoint (weights_only=True rejected it"


class Payload:
    """Unpickling this object runs a shell command (pickle calls ``os.system(cmd)``)."""

    def __init__(self, marker: Path) -> None:
        self.cmd = f"touch {marker}"

    def __reduce__(self) -> tuple:
        return os.system, (self.cmd,)


def teacher_state() -> dict[str, torch.Tensor]:
    """A real WRN-10-2 state dict for the default data (Fashion-MNIST: 1 channel, 10 classes)."""
    return build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict()


def save_evil(path: Path, marker: Path, lightning: bool = False) -> Path:
    """Valid weights with the payload next to them (as a Lightning checkpoint if asked)."""
    state: dict = {**teacher_state(), "extra": Payload(marker)}
    if lightning:
        state = {"state_dict": {f"student.{k}": v for k, v in teacher_state().items()},
                 "epoch": 0, "loops": {}, "callbacks": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "pwned"
    path = save_evil(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # what a careless loader would do
    assert marker.exists()


@pytest.mark.parametrize("kind", ["state dict", "lightning ckpt", "run dir"])
def test_teacher_checkpoint_is_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "run dir":
        target = tmp_path / "teacher_run"
        save_evil(target / STUDENT_FILE, marker)
    else:
        target = save_evil(tmp_path / ("evil.ckpt" if "ckpt" in kind else "evil.pt"), marker,
                           lightning="ckpt" in kind)
    cfg = compose_cfg(["model.depth=10", *TINY, "distill=at", "teacher=wrn_16_2",
                       "teacher.depth=10", f"teacher.checkpoint={target}"])
    (tmp_path / "run").mkdir()
    with pytest.raises(AtxError) as info:
        train(cfg, tmp_path / "run")
    file = target if kind != "run dir" else target / STUDENT_FILE
    assert f"refused to load checkpoint '{file}'" in str(info.value)
    assert REFUSED in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_torchvision_weights_path_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "r18.pt"
    torch.save({**build_model("resnet18", num_classes=10).state_dict(), "x": Payload(marker)},
               evil)
    cfg = compose_cfg([*TINY, "model=resnet18", f"model.weights_path={evil}"])
    with pytest.raises(AtxError) as info:
        train(cfg, tmp_path)
    assert f"model: refused to load weights file '{evil}': {REFUSED}" in str(info.value)
    assert not marker.exists()


def test_pretrained_weights_in_the_hub_cache_are_refused(tmp_path, monkeypatch):
    """``model.weights=IMAGENET1K_V1`` reads torch hub's cached file: a poisoned cache is
    refused like any other file."""
    import torch.hub
    from torchvision.models import ResNet18_Weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    marker = tmp_path / "pwned"
    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save({**build_model("resnet18", num_classes=1000).state_dict(), "x": Payload(marker)},
               cached)
    with pytest.raises(AtxError, match="refused to load weights file"):
        build_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_visualize_refuses_a_run_with_a_poisoned_student(tmp_path, capsys):
    write_image_folder(tmp_path / "data", {"train": 1, "test": 1})
    cfg = compose_cfg(["model.depth=10", "data=cifar10", f"data.root={tmp_path / 'data'}"])
    marker = tmp_path / "pwned"
    runs = []
    for name in ("teacher", "student"):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
        model = build_model("wrn", num_classes=10, in_channels=3, depth=10)
        torch.save(model.state_dict(), run / STUDENT_FILE)
        runs.append(run)
    save_evil(runs[1] / STUDENT_FILE, marker)
    code = visualize_main([str(r) for r in runs] + ["--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    refused = f"refused to load checkpoint '{runs[1] / STUDENT_FILE}'"
    assert err.startswith(f"atx-visualize: error: {refused}")
    assert "\n" not in err and not marker.exists() and not (tmp_path / "grid.png").exists()


def test_resume_skips_a_poisoned_checkpoint_and_lightning_refuses_it(tmp_path, capsys):
    """Choosing the checkpoint to resume from (``atx.resume.newest_checkpoint``) reads with
    ``weights_only=True``: the poisoned newest file is named and passed over for the older
    good one. The load Lightning does itself (``trainer.fit(weights_only=True)``, as
    ``atx.train`` calls it) refuses it too."""
    import lightning as L

    from atx.losses import Objective, Schedule
    from atx.module import DistillModule
    from atx.terms import CrossEntropy

    ckpt_dir = tmp_path / "checkpoints"
    module = DistillModule(build_model("wrn", 10, 1, depth=10), Objective([CrossEntropy(
        Schedule(1.0))]), 10)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer.fit(module, loader)
    good = ckpt_dir / "epoch-end.ckpt"
    trainer.save_checkpoint(good)
    marker = tmp_path / "pwned"
    evil = save_evil(ckpt_dir / "last.ckpt", marker, lightning=True)
    os.utime(good, (1, 1))  # the poisoned file is the newest
    capsys.readouterr()

    found = newest_checkpoint(tmp_path)
    assert found is not None and found[0] == good
    assert f"skipping unreadable checkpoint '{evil}' (UnpicklingError" in capsys.readouterr().err
    trainer2 = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer2.fit(module, loader, ckpt_path=evil, weights_only=True)
    assert not marker.exists()


def test_a_poisoned_dataset_cache_is_ignored(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-key.pt"
    torch.save({"x_train": torch.zeros(1), "classes": ["a"], "x": Payload(marker)}, path)
    with pytest.warns(UserWarning, match="ignoring the unreadable data cache"):
        assert cache.read(path) is None
    assert not marker.exists()


def test_cli_refuses_a_poisoned_teacher_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = save_evil(tmp_path / "evil.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "atx.train", "model.depth=10", *TINY, "distill=at",
         "teacher=wrn_16_2", "teacher.depth=10", f"teacher.checkpoint={evil}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"atx: error: refused to load checkpoint '{evil}': {REFUSED}")
    assert "Traceback" not in result.stderr and not marker.exists()
