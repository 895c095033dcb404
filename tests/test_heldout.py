"""The held-out model-selection split (``data.val_split``): stratified, exact, seeded by
``data.split_seed`` only, taken before ``data.train_subset``, in every data module; the epoch it
selects, in a real run, in metrics.json and in atx-report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from configs import compose_cfg
from layouts import write_cifar10, write_fashion, write_imagenet

from atx import build
from atx.callbacks import HeldOutSelection
from atx.data import CIFAR10DataModule, ImageNetDataModule
from atx.data.split import hold_out, stratified_counts
from atx.errors import AtxError
from atx.report import report
from atx.train import train


def one_line_error(fn) -> str:
    with pytest.raises(AtxError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the split itself -------------------------------------------------------------------------
def test_stratified_counts_are_proportional_and_exact():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    assert stratified_counts(labels, 10)[1].tolist() == [5, 3, 2]
    # shares 1.4 / 1.4 / 1.2: one image left over, to the largest remainder (lower label on ties)
    assert stratified_counts(np.repeat([0, 1, 2], [7, 7, 6]), 4)[1].tolist() == [2, 1, 1]
    rng = np.random.default_rng(0)
    for n in (10, 37, 333):
        labels = rng.integers(0, 10, 1000)
        classes, take = stratified_counts(labels, n)
        counts = np.bincount(labels)
        assert take.sum() == n and (np.abs(take - n * counts / 1000) < 1).all()


def test_hold_out_is_disjoint_exact_stratified_and_seeded_by_the_split_seed_only():
    labels = np.random.default_rng(1).integers(0, 10, 500)
    torch.manual_seed(0)
    kept, held = hold_out(labels, 50, seed=3, num_classes=10, name="data")
    assert len(held) == 50 and len(kept) == 450
    assert not set(kept) & set(held) and sorted({*kept, *held}) == list(range(500))
    assert (
        np.bincount(labels[held], minlength=10).tolist()
        == stratified_counts(labels, 50)[1].tolist()
    )
    torch.manual_seed(1)  # another run seed: the global RNG is not used
    assert np.array_equal(hold_out(labels, 50, 3, 10, "data")[1], held)
    assert not np.array_equal(hold_out(labels, 50, 4, 10, "data")[1], held)
    assert hold_out(labels, 0, 3, 10, "data") is None


def test_bad_counts_are_one_line():
    labels = np.arange(20) % 10
    assert "data.val_split=20 would hold out every training image" in one_line_error(
        lambda: hold_out(labels, 20, 0, 10, "CIFAR-10")
    )
    assert "data.val_split=9 is below the 10 classes of CIFAR-10" in one_line_error(
        lambda: hold_out(labels, 9, 0, 10, "CIFAR-10")
    )
    assert "data.val_split=-1 must be a whole number" in one_line_error(
        lambda: CIFAR10DataModule("x", val_split=-1)
    )
    assert "data.val_split=3 is below the 10 classes" in one_line_error(
        lambda: CIFAR10DataModule("x", val_split=3)  # known before any image is read
    )


# --- the data modules -------------------------------------------------------------------------
def rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy()) for img in x}


def test_tensor_module_holds_out_before_the_subset(tmp_path: Path):
    x_tr, y_tr, _, _ = write_cifar10(tmp_path, n_train=60, n_test=10)
    full = torch.from_numpy(x_tr.reshape(-1, 3, 32, 32))
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, val_split=12, split_seed=1,
                           train_subset=30)
    dm.setup()
    held = dm.heldout_index
    assert len(dm.x_heldout) == 12 and len(dm.x_train) == 30
    assert torch.equal(dm.x_heldout, full[held]) and torch.equal(
        dm.y_heldout, torch.from_numpy(y_tr)[held]
    )
    assert not rows(dm.x_train) & rows(dm.x_heldout)  # never trained on
    seen = torch.cat([x for x, _ in dm.train_dataloader()])  # the resumable training sampler
    assert len(seen) == 30 and not rows(seen) & rows(dm.x_heldout)
    test, heldout = dm.val_dataloader()
    assert torch.equal(torch.cat([x for x, _ in heldout]), dm.x_heldout)
    assert torch.equal(torch.cat([x for x, _ in test]), dm.x_val)
    assert torch.equal(torch.cat([x for x, _ in dm.test_dataloader()]), dm.x_val)
    # the same held-out images without the subset and for another subset seed
    for other in (CIFAR10DataModule(str(tmp_path), val_split=12, split_seed=1),
                  CIFAR10DataModule(str(tmp_path), val_split=12, split_seed=1, seed=7,
                                    train_subset=20)):
        other.setup()
        assert torch.equal(other.heldout_index, held)
    other = CIFAR10DataModule(str(tmp_path), val_split=12, split_seed=2)
    other.setup()
    assert not torch.equal(other.heldout_index, held)
    msg = one_line_error(CIFAR10DataModule(str(tmp_path), val_split=12, train_subset=49).setup)
    assert "data.train_subset=49 exceeds the 48 images available" in msg
    assert "after data.val_split=12 held out" in msg


def test_the_run_seed_does_not_move_the_held_out_set(tmp_path: Path):
    write_cifar10(tmp_path, n_train=40, n_test=10)
    held = []
    for seed in (0, 1):
        cfg = compose_cfg(["data=cifar10", f"data.root={tmp_path}", "data.val_split=10",
                           f"seed={seed}"])
        torch.manual_seed(seed)
        data = build.build_data(cfg)
        data.setup()
        held.append(data.heldout_index)
    assert torch.equal(*held)


def test_image_folder_module_holds_out_with_the_eval_transform(tmp_path: Path):
    write_imagenet(tmp_path, n_train=4, n_val=1)
    small = {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 4}
    dm = ImageNetDataModule(str(tmp_path), val_split=3, train_subset=5, **small)
    dm.setup()
    train_paths, held_paths = set(dm.train_set.samples.paths), set(dm.heldout_set.samples.paths)
    assert len(dm.train_set) == 5 and len(held_paths) == 3 and not train_paths & held_paths
    assert sorted(dm.heldout_set.samples.labels.tolist()) == [0, 1, 2]  # one per class
    x0, _ = dm.heldout_set[0]
    assert torch.equal(x0, dm.heldout_set[0][0])  # no random crop or flip
    test, heldout = dm.val_dataloader()
    assert test.dataset is dm.val_set and heldout.dataset is dm.heldout_set
    assert dm.test_dataloader().dataset is dm.val_set
    again = ImageNetDataModule(str(tmp_path), val_split=3, seed=5, **small)
    again.setup()
    assert set(again.heldout_set.samples.paths) == held_paths
    assert "data.val_split=2 is below the 3 classes of ImageNet" in one_line_error(
        ImageNetDataModule(str(tmp_path), val_split=2, **small).setup
    )


# --- model selection: the callback, a real run, the report ------------------------------------
def validated(selection: HeldOutSelection, epoch: int, heldout: float, test: float) -> None:
    metrics = {"heldout/error": torch.tensor(heldout), "val/error": torch.tensor(test)}
    trainer = SimpleNamespace(callback_metrics=metrics, sanity_checking=False,
                              current_epoch=epoch, global_step=10 * (epoch + 1))
    selection.on_validation_end(trainer, None)


def test_selection_takes_the_first_epoch_of_lowest_held_out_error_and_resumes():
    selection = HeldOutSelection()
    sanity = SimpleNamespace(callback_metrics={"heldout/error": torch.tensor(0.0)},
                             sanity_checking=True)
    selection.on_validation_end(sanity, None)  # the sanity check is not an epoch
    for epoch, heldout, test in [(0, 50.0, 40.0), (1, 30.0, 35.0), (2, 30.0, 20.0)]:
        validated(selection, epoch, heldout, test)
    resumed = HeldOutSelection()
    resumed.load_state_dict(selection.state_dict())
    validated(resumed, 3, 40.0, 10.0)
    assert resumed.summary() == {
        "selected/epoch": 1, "selected/step": 20, "selected/heldout_error": 30.0,
        "selected/test_error": 35.0, "best/val_error": 10.0,
    }


def test_a_real_run_reports_the_test_error_of_the_held_out_best_epoch(tmp_path: Path):
    write_fashion(tmp_path / "data", n_train=40, n_test=12)
    cfg = compose_cfg([
        f"data.root={tmp_path / 'data'}", "data.val_split=10", "data.batch_size=15",
        "model.depth=10", "trainer.max_epochs=3", "trainer.accelerator=cpu", "optim.lr=1.0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "logger=csv", "figure_images=0",
        "checkpoint.every_n_steps=0",
    ])
    run = tmp_path / "run"
    run.mkdir()
    train(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    with (run / "csv" / "metrics.csv").open() as f:
        epochs = [r for r in csv.DictReader(f) if r["heldout/error"]]
    assert [int(r["epoch"]) for r in epochs] == [0, 1, 2]
    assert all(float(r["heldout/images"]) == 10 and float(r["val/images"]) == 12 for r in epochs)
    heldout = [float(r["heldout/error"]) for r in epochs]
    chosen = epochs[heldout.index(min(heldout))]
    assert metrics["selected/epoch"] == int(chosen["epoch"])
    assert metrics["selected/test_error"] == pytest.approx(float(chosen["val/error"]))
    assert metrics["val/error"] == pytest.approx(float(epochs[-1]["val/error"]))  # last epoch
    assert metrics["best/val_error"] == pytest.approx(min(float(r["val/error"]) for r in epochs))
    assert metrics["heldout/error"] == pytest.approx(heldout[-1])
    best = sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
    assert best == [f"best-epoch{metrics['selected/epoch']}.ckpt"]


def test_report_shows_the_test_error_at_the_held_out_best_epoch(tmp_path: Path):
    def run(name: str, overrides: list[str], seed: int, metrics: dict[str, float]) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(
            json.dumps([*overrides, f"seed={seed}"])  # JSON is YAML
        )
        (tmp_path / name / ".hydra" / "config.yaml").write_text(json.dumps({"seed": seed}))
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))

    for seed, selected in enumerate([10.0, 12.0, 14.0]):
        run(f"a{seed}", ["data.val_split=5000"], seed,
            {"val/error": 9.0, "best/val_error": 8.0, "selected/test_error": selected})
    run("b0", ["data.val_split=0"], 0, {"val/error": 7.0, "best/val_error": 6.0})
    rows = {r["config"]: r for r in report(tmp_path)}
    a = rows["data.val_split=5000"]
    assert (a["selected_mean"], a["selected_std"], a["selected_median"]) == (12.0, 2.0, 12.0)
    assert "selected_mean" not in rows["data.val_split=0"]
    md = (tmp_path / "report.md").read_text()
    assert "| test error % at held-out-best epoch, mean ± std (median) |" in md
    assert "| 9.00 ± 0.00 (9.00) | 8.00 ± 0.00 (8.00) | 12.00 ± 2.00 (12.00) | - |" in md
    assert "| 7.00 ± 0.00 (7.00) | 6.00 ± 0.00 (6.00) | - | - |" in md
