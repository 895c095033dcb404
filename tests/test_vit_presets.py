"""The ViT presets: each CIFAR one trains a few batches end to end (networks shrunk, the
preset's recipe, pairing and terms kept); the ImageNet DeiT-Ti <- RegNetY-16GF preset pairs its
real networks' layers automatically."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from layouts import write_image_folder

from atx.build import auto_pairs, build_network
from atx.models import layer_group_presets
from atx.train import train

SMALL_VIT = "{depth:4,embed_dim:24,num_heads:2}"
TINY = [
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "optim.warmup_epochs=0",  # warm-up must end before the last epoch
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "figure_images=2",
    f"model.options={SMALL_VIT}",
]
CASES = {
    "cifar10_vit_tiny-wrn_16_2": ["teacher.depth=10"],
    "cifar10_vit_tiny-vit_small": [f"teacher.options={SMALL_VIT}"],
    "cifar10_teacher_vit_small": [],
}


@pytest.mark.parametrize("experiment", list(CASES))
def test_cifar_vit_presets_train_a_few_batches(tmp_path: Path, experiment: str) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 4, "test": 2})
    overrides = [f"experiment={experiment}", f"data.root={root}", *TINY, *CASES[experiment]]
    cfg = compose_cfg(overrides)
    assert (cfg.optim.name, cfg.optim.schedule, cfg.distill.ce.label_smoothing) == (
        "adamw", "cosine", 0.1
    )
    if cfg.teacher is not None:  # a saved random teacher of the preset's (shrunk) architecture
        teacher = build_network(cfg.teacher, "teacher", 10, 3)
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
        cfg = compose_cfg([*overrides, f"teacher.checkpoint={tmp_path / 'teacher.pt'}"])
    run = tmp_path / "run"
    run.mkdir()
    metrics = train(cfg, run)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    at = {k.removesuffix("_step") for r in rows for k, v in r.items()
          if k.startswith("train/at/") and k.endswith("_step") and v}
    if cfg.distill.at.beta > 0:
        # auto pairing: the ViT's 4 blocks at 1/4..4/4 depth each have a term
        assert at == {f"train/at/blocks.{i}" for i in (0, 1, 2, 3)}, at
        assert (run / "attention.png").is_file()
    else:
        assert not at


def test_deit_tiny_and_regnety_160_pair_on_the_14x14_grid() -> None:
    cfg = compose_cfg(["experiment=imagenet_deit_tiny-regnety_160"])
    assert (cfg.optim.name, cfg.optim.warmup_epochs, cfg.trainer.max_epochs) == ("adamw", 5, 300)
    student = build_network(cfg.model, "model", 1000, 3)
    teacher = build_network(cfg.teacher, "teacher", 1000, 3)
    s_all = layer_group_presets("timm", student)["all"]
    t_all = layer_group_presets("timm", teacher)["all"]
    assert s_all == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    pairs = auto_pairs(student, teacher, s_all, t_all, (3, 224, 224))
    # RegNetY's stages give 56, 28, 14 and 7 px maps: every DeiT block (14x14) meets s3
    assert pairs == [(s, "s3") for s in s_all], pairs
