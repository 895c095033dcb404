"""optim.recipe: the authors' cifar.py step schedule (lr drop at the start of the 1-based
milestone epoch, SGD re-created there) against torch's MultiStepLR (momentum kept)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atx.losses import Objective, Schedule
from atx.module import DistillModule
from atx.optim import OptimConf, sgd_step_decay
from atx.terms import CrossEntropy


def buffers(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]


def drive(recipe: str, epochs: int = 200) -> tuple[list[float], list[bool]]:
    """Per 1-based epoch: its lr and whether every momentum buffer is zero at its start
    (after the scheduler step that opened it); one SGD step per epoch, as Lightning would."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    setup = sgd_step_decay(model.parameters(), OptimConf(milestones=[60, 120, 160], gamma=0.2,
                                                         recipe=recipe))
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    lrs, zeroed = [], []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        zeroed.append(bool(buffers(optimizer)) and all(not b.any() for b in buffers(optimizer)))
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(b.abs().sum() > 0 for b in buffers(optimizer))  # non-zero after every step
        scheduler.step()
    return lrs, zeroed


def test_authors_recipe_gives_59_60_40_41_epochs_and_restarts_momentum_at_each_drop():
    lrs, zeroed = drive("authors")
    expected = [0.1] * 59 + [0.02] * 60 + [0.004] * 40 + [0.0008] * 41
    assert lrs == pytest.approx(expected, rel=1e-12)
    # epochs 60, 120 and 160 start with fresh momentum; every other epoch keeps it
    assert [e for e, z in enumerate(zeroed, start=1) if z] == [60, 120, 160]


def test_standard_recipe_gives_60_60_40_40_epochs_and_keeps_momentum():
    lrs, zeroed = drive("standard")
    expected = [0.1] * 60 + [0.02] * 60 + [0.004] * 40 + [0.0008] * 40
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert not any(zeroed)


class Probe(L.Callback):
    """The lr and momentum buffers at the start of every epoch, the buffers after each step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}
        self.zero_at_start: dict[int, bool] = {}
        self.nonzero_after_steps: list[bool] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        epoch = trainer.current_epoch + 1
        self.lr[epoch] = optimizer.param_groups[0]["lr"]
        bufs = buffers(optimizer)
        self.zero_at_start[epoch] = bool(bufs) and all(not b.any() for b in bufs)

    def on_train_batch_end(self, trainer: L.Trainer, *_args: object) -> None:
        # Lightning steps an epoch scheduler within the epoch's last batch, before this hook
        self.nonzero_after_steps.append(all(b.any() for b in buffers(trainer.optimizers[0])))


def tiny_module(recipe: str) -> DistillModule:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    optim = OptimConf(milestones=[2, 3], gamma=0.2, recipe=recipe)
    return DistillModule(student, Objective([CrossEntropy(Schedule(1.0))]), 10, optim)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)  # 2 steps per epoch


def fit(module: DistillModule, root: Path, epochs: int, ckpt: str | None = None,
        probe: Probe | None = None) -> L.Trainer:
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root, save_last=True)]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, num_sanity_val_steps=0,
                        callbacks=callbacks + ([probe] if probe else []))
    trainer.fit(module, loader(), loader(), ckpt_path=ckpt, weights_only=True)
    return trainer


@pytest.mark.parametrize(("recipe", "lrs", "fresh"), [
    ("authors", [0.1, 0.02, 0.004, 0.004], [2, 3]),
    ("standard", [0.1, 0.1, 0.02, 0.004], []),
])
def test_a_real_trainer_follows_the_recipe(tmp_path, recipe, lrs, fresh):
    probe = Probe()
    fit(tiny_module(recipe), tmp_path, 4, probe=probe)
    assert list(probe.lr.values()) == pytest.approx(lrs, rel=1e-12)
    assert [e for e, z in probe.zero_at_start.items() if z] == fresh
    # 2 steps per epoch: zero only after the last step before a drop epoch, non-zero otherwise
    zero_after = [2 * (e - 1) - 1 for e in fresh]
    assert probe.nonzero_after_steps == [i not in zero_after for i in range(8)]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resuming_at_the_drop_gives_the_uninterrupted_weights(tmp_path):
    """A checkpoint of epoch 2's end is taken before the step that opens epoch 3 (a drop): the
    resumed run must drop the lr and restart the momentum there, as the uninterrupted one."""
    whole = tiny_module("authors")
    fit(whole, tmp_path / "whole", 4)
    first = tiny_module("authors")
    fit(first, tmp_path / "part", 2)
    resumed, probe = tiny_module("authors"), Probe()
    fit(resumed, tmp_path / "resumed", 4, str(tmp_path / "part" / "last.ckpt"), probe)
    assert probe.lr == pytest.approx({3: 0.004, 4: 0.004}, rel=1e-12)
    assert probe.zero_at_start == {3: True, 4: False}
    for (name, a), b in zip(whole.student.state_dict().items(),
                            resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
