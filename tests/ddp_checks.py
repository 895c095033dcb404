"""What a 2-rank DDP run must have written: every test (and held-out) image counted once, the
errors of the exported student, rank 0 alone logging to W&B, and both ranks training one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from wandb_records import summarise

from atx import build
from atx.models import build_model

DDP_RUN = ["data.val_subset=33", "logger=wandb"]  # 33 test images: uneven over 2 ranks
DDP = ["trainer.strategy=ddp", "trainer.devices=2", *DDP_RUN]


def evaluate(student_pt: Path, overrides: list[str]) -> dict[str, float]:
    """Error (%) of an exported student on the run's test images (``val``) and held-out
    training images (``heldout``, with data.val_split), in this process."""
    cfg = compose_cfg(overrides)
    data = build.build_data(cfg)
    data.setup()
    model = build_model("wrn", num_classes=10, in_channels=1, depth=10, width=1)
    model.load_state_dict(torch.load(student_pt, weights_only=True))
    errors = {}
    for split, x, y in (("val", data.x_val, data.y_val), ("heldout", data.x_heldout,
                                                          data.y_heldout)):
        if x is not None:
            with torch.no_grad():
                logits = model.eval()(data.normalize(x))
            errors[split] = float((logits.argmax(1) != y).float().mean() * 100)
    return errors


def check_ddp_run(run_dir: Path, val_images: int, overrides: list[str], heldout: int = 0) -> None:
    """metrics.json of a 2-rank run: every test (and ``heldout`` held-out) image counted once,
    errors = the saved student's."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["val/images"] == val_images  # 2 ranks, odd count: none padded or repeated
    errors = evaluate(run_dir / "student.pt", overrides)
    assert metrics["val/error"] == pytest.approx(errors["val"], abs=1e-4)
    if heldout:  # each rank evaluated its share of the same held-out images
        assert metrics["heldout/images"] == heldout
        assert metrics["heldout/error"] == pytest.approx(errors["heldout"], abs=1e-4)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # rank 0 alone logs
    assert "val/error" in summarise(wandb_file)["history_keys"]


def ranks_of(run_dir: Path) -> list[dict]:
    """``ranks.json``: what each rank trained (the same config hash, weights and pairs)."""
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all({k: v for k, v in r.items() if k != "rank"} ==
               {k: v for k, v in ranks[0].items() if k != "rank"} for r in ranks)
    return ranks
