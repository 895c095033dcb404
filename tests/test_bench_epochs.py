"""The step benchmark's epoch rows (scripts/benchlib/epoch_rows.py): the part clock, the authors'
loop re-created (their augmentation, step, test pass, checkpoint and log line) and the parts of
a real ``atx-train`` epoch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # benchlib, as the scripts do
from benchlib import epoch_rows  # noqa: E402
from benchlib.epoch_rows import PARTS, AuthorsLoop, PartClock, atx_epochs, augment  # noqa: E402


def test_the_clock_charges_time_inside_a_timer_to_the_timer_only(monkeypatch) -> None:
    ticks = iter(range(100))
    monkeypatch.setattr(epoch_rows, "now", lambda: float(next(ticks)))
    clock = PartClock()  # t = 0
    save = clock.timed("checkpoint", lambda: None)  # each call: 1 s (two ticks)
    clock.charge("data")  # t = 1
    save()  # t = 2 -> 3
    clock.charge("step")  # t = 4: 3 s since the mark, 1 of them the checkpoint
    assert clock.total() == {**dict.fromkeys(PARTS, 0.0), "data": 1.0, "step": 2.0,
                             "checkpoint": 1.0, "epoch": 4.0}
    # a timed call inside another (a logger's log_metrics calling its save) counts once
    save_inner = clock.timed("logging", lambda: None)
    log = clock.timed("logging", lambda: save_inner())
    log()  # t = 5 -> 6 (the inner call reads no clock)
    clock.charge("step")  # t = 7: 3 s since the mark, 1 of them logging
    assert (clock.parts["logging"], clock.parts["step"]) == (1.0, 4.0)


def test_augment_is_a_reflect_padded_crop_and_flip_of_each_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, g)
    mean, std = epoch_rows.CIFAR_MEAN[:, None, None], epoch_rows.CIFAR_STD[:, None, None]
    padded = F.pad((x.float() / 255 - mean) / std, (4, 4, 4, 4), mode="reflect")
    flips = 0
    for i in range(len(x)):
        crops = {(dy, dx): padded[i, :, dy:dy + 32, dx:dx + 32]
                 for dy in range(9) for dx in range(9)}
        found = [(dy, dx, f) for (dy, dx), c in crops.items() for f in (False, True)
                 if torch.equal(c.flip(2) if f else c, out[i])]
        assert len(found) == 1, i  # exactly one crop offset and flip gives each output
        flips += found[0][2]
    assert 0 < flips < len(x)


def test_the_authors_loop_trains_tests_and_saves_each_epoch(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    data = {"x_train": torch.randint(0, 256, (18, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_train": torch.randint(0, 10, (18,), generator=g),
            "x_test": torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_test": torch.randint(0, 10, (8,), generator=g)}
    loop = AuthorsLoop(data, 4, tmp_path, "cpu")
    before = {k: v.detach().clone() for k, v in loop.runner.ps.items()}
    sizes: list[int] = []
    step = loop.runner.step
    loop.runner.step = lambda x, y: sizes.append(len(x)) or step(x, y)
    parts = [loop.epoch(e) for e in range(2)]
    assert sizes == [4, 4, 4, 4, 2] * 2  # every image every epoch, the last batch short
    for p in parts:
        assert p["epoch"] == pytest.approx(sum(p[k] for k in PARTS))
        assert p["step"] > 0 and p["eval"] > 0 and p["checkpoint"] > 0
    saved = torch.load(tmp_path / "model.pt7", weights_only=True)
    assert saved["epoch"] == 1 and set(saved["params"]) == set(before)
    assert any(not torch.equal(saved["params"][k], before[k]) for k in before)  # it trained
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1] and all(0 <= e["test_acc"] <= 1 for e in log)
    assert len(log[0]["at_losses"]) == 3  # one per WRN group


def test_the_parts_of_a_real_atx_train_epoch(tmp_path) -> None:
    from benchlib.loaders import write_synthetic_cifar10
    from benchlib.steps import write_random_teacher

    root = write_synthetic_cifar10(tmp_path / "cifar10", 40, 10)
    teacher = write_random_teacher(tmp_path / "teacher.pt")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = argparse.Namespace(device="cpu", batch_size=8, epochs=2)
    cached = {"x_train": torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8),
              "y_train": torch.randint(0, 10, (16,)),
              "x_test": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
              "y_test": torch.randint(0, 10, (8,))}
    loop = AuthorsLoop(cached, 8, tmp_path / "authors", "cpu")
    epochs, authors = atx_epochs(root, teacher, [], args, run_dir, loop)
    assert len(epochs) == len(authors) == 2  # an authors' epoch before each atx epoch
    timed = json.loads((run_dir / "metrics.json").read_text())
    for parts, beside, seconds, eval_s in zip(epochs, authors, timed["epoch_seconds"],
                                              timed["eval_seconds"], strict=True):
        assert parts["epoch"] == pytest.approx(sum(parts[k] for k in PARTS))
        assert all(parts[k] >= 0 for k in PARTS)
        assert parts["step"] > 0 and parts["checkpoint"] > 0  # best + last every epoch
        assert parts["eval"] >= eval_s - 1e-3
        # atx's own epoch clock (metrics.json) runs around the authors' epoch; the parts leave
        # it out, and hold the rest of what that clock saw
        assert beside["epoch"] < seconds and parts["epoch"] < seconds
        assert parts["epoch"] + beside["epoch"] >= seconds - 1e-3
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "authors" / "log.txt").read_text().count("\n") == 2
