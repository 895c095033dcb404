"""optim.recipe: the authors' cifar.py step schedule (lr drop at the start of the 1-based
milestone epoch, SGD re-created there) against torch's MultiStepLR (momentum kept); then atx's
ViT recipe (optim.name=adamw, optim.schedule=cosine, optim.warmup_epochs), CE label smoothing
and the checks of their values."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from configs import compose_cfg
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atx import build
from atx.checks import check_config
from atx.errors import AtxError
from atx.losses import Objective, Schedule, StepOutputs
from atx.module import DistillModule
from atx.optim import OptimConf, configure_optimizers
from atx.terms import CrossEntropy
from atx.train import train


def buffers(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]


def drive(recipe: str, epochs: int = 200) -> tuple[list[float], list[bool]]:
    """Per 1-based epoch: its lr and whether every momentum buffer is zero at its start
    (after the scheduler step that opened it); one SGD step per epoch, as Lightning would."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    setup = configure_optimizers(model.parameters(), OptimConf(milestones=[60, 120, 160], gamma=0.2,
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


def tiny_module(recipe: str = "standard", **optim: object) -> DistillModule:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    conf = OptimConf(**{"milestones": [2, 3], "gamma": 0.2, "recipe": recipe, **optim})
    return DistillModule(student, Objective([CrossEntropy(Schedule(1.0))]), 10, conf)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)  # 2 steps per epoch


class StopAfter(L.Callback):
    """An interrupted run: it stops after ``epochs`` of its ``max_epochs``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


def fit(module: DistillModule, root: Path, epochs: int, ckpt: str | None = None,
        probe: Probe | None = None, stop_after: int | None = None) -> L.Trainer:
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root, save_last=True)]
    callbacks += [probe] if probe else []
    callbacks += [StopAfter(stop_after)] if stop_after else []
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, num_sanity_val_steps=0, callbacks=callbacks)
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


# -- atx's ViT recipe: AdamW, cosine, linear warm-up (atx's choice, not the paper's) -----------
LR, MIN_LR, EPOCHS, WARMUP, START = 0.1, 0.01, 6, 2, 0.25
RECIPE = {"lr": LR, "milestones": [3, 5], "gamma": 0.5, "min_lr": MIN_LR,
          "warmup_start_factor": START}


def hand_lrs(schedule: str, warmup: int) -> list[float]:
    """The lr of each 0-based epoch, written out: warm-up START -> 1 over ``warmup`` epochs
    times the schedule; step: x0.5 from epochs 3 and 5; cosine from LR at the end of warm-up
    to MIN_LR at EPOCHS."""
    lrs = []
    for k in range(EPOCHS):
        if schedule == "step":
            lr = LR * 0.5 ** ((k >= 3) + (k >= 5))
        else:
            t = max(k - warmup, 0) / (EPOCHS - warmup)
            lr = MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * t)) / 2
        lrs.append(lr * (START + (1 - START) * k / warmup if k < warmup else 1.0))
    return lrs


def test_the_hand_formula_in_numbers():
    assert hand_lrs("step", WARMUP) == pytest.approx([0.025, 0.0625, 0.1, 0.05, 0.05, 0.025])
    r = math.sqrt(0.5)  # cos(pi/4): the cosine's 4 epochs after warm-up at 0, 1/4, 2/4, 3/4
    expected = [0.025, 0.0625, 0.1, 0.01 + 0.045 * (1 + r), 0.055, 0.01 + 0.045 * (1 - r)]
    assert hand_lrs("cosine", WARMUP) == pytest.approx(expected)


@pytest.mark.parametrize("warmup", [0, WARMUP])
@pytest.mark.parametrize("schedule", ["step", "cosine"])
@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD),
                                            ("adamw", torch.optim.AdamW)])
def test_a_real_trainer_follows_each_recipe(tmp_path, name, kind, schedule, warmup):
    probe = Probe()
    module = tiny_module(name=name, schedule=schedule, warmup_epochs=warmup, **RECIPE)
    trainer = fit(module, tmp_path, EPOCHS, probe=probe)
    assert type(trainer.optimizers[0]) is kind
    assert list(probe.lr.values()) == pytest.approx(hand_lrs(schedule, warmup), rel=1e-12)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resuming_in_the_warm_up_gives_the_uninterrupted_lrs_and_weights(tmp_path):
    """The closed-form scheduler's checkpoint state reads back with weights_only=True."""
    recipe = {"name": "adamw", "schedule": "cosine", "warmup_epochs": 3, **RECIPE}
    whole, probe_whole = tiny_module(**recipe), Probe()
    fit(whole, tmp_path / "whole", EPOCHS, probe=probe_whole)
    fit(tiny_module(**recipe), tmp_path / "part", EPOCHS, stop_after=2)
    resumed, probe = tiny_module(**recipe), Probe()
    fit(resumed, tmp_path / "resumed", EPOCHS, str(tmp_path / "part" / "last.ckpt"), probe)
    assert probe.lr == pytest.approx({e: probe_whole.lr[e] for e in range(3, EPOCHS + 1)})
    for (name, a), b in zip(whole.student.state_dict().items(),
                            resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def adamw_reference(epochs: int, **adamw: float) -> dict[str, torch.Tensor]:
    """tiny_module's student after ``epochs`` passes of a plain loop with torch's AdamW."""
    student = tiny_module().student
    optimizer = torch.optim.AdamW(student.parameters(), **adamw)
    for _ in range(epochs):
        for x, y in loader():
            optimizer.zero_grad()
            F.cross_entropy(student(x), y).backward()
            optimizer.step()
    return student.state_dict()


def test_adamw_is_torchs_adamw_with_the_configured_values(tmp_path):
    conf = {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.05}
    module = tiny_module(name="adamw", milestones=[], **conf)
    trainer = fit(module, tmp_path, 2)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    settings = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    reference = adamw_reference(2, **settings)
    for name, value in module.student.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-7)
    # 4 steps tell the configured betas and decay from torch's defaults
    default = adamw_reference(2, lr=0.01, eps=1e-6)
    assert not all(torch.allclose(v, default[k], atol=1e-6)
                   for k, v in module.student.state_dict().items())


# -- through the config: atx-train's own path --------------------------------------------------
TINY = ["model.depth=10", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "data.batch_size=8", "data.train_subset=16",
        "data.val_subset=8", "logger=csv", "figure_images=0"]
VIT_RECIPE = ["optim.name=adamw", "optim.lr=0.001", "optim.beta2=0.95", "optim.weight_decay=0.05",
              "optim.schedule=cosine", "optim.min_lr=0.0001", "optim.warmup_epochs=1",
              "optim.warmup_start_factor=0.1", "trainer.max_epochs=3",
              "distill.ce.label_smoothing=0.1"]


def test_atx_train_runs_the_vit_recipe_from_the_shell(tmp_path, monkeypatch):
    built: list[DistillModule] = []
    build_run = build.build_run

    def keep(cfg: DictConfig) -> build.Run:
        run = build_run(cfg)
        built.append(run.module)
        return run

    monkeypatch.setattr(build, "build_run", keep)
    train(compose_cfg(TINY + VIT_RECIPE), tmp_path)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    # warm-up epoch at 0.1 x lr, then the cosine over the 2 epochs left, from lr to min_lr
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 2)) / 2])
    optimizer = built[0].trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.9, 0.95), 0.05)
    assert built[0].objective.terms[0].label_smoothing == 0.1  # the loss: the test below


def test_label_smoothing_reaches_the_ce_loss():
    cfg = compose_cfg(TINY + ["distill=kd", "distill.kd.alpha=0.25",
                              "distill.ce.label_smoothing=0.2"])
    objective = build.build_objective(cfg.distill, {}, {}, 1)
    ce = objective.terms[0]
    assert isinstance(ce, CrossEntropy) and ce.weight(0) == 0.75  # still 1 - KD's alpha
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    _, parts = objective(StepOutputs(logits, targets, teacher_logits=logits.flip(0)))
    smoothed = F.cross_entropy(logits, targets, label_smoothing=0.2)
    assert parts["ce"] == smoothed and not torch.isclose(smoothed, F.cross_entropy(logits, targets))


BAD_OPTIM = [
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1 must be a finite number >= 0 (0: no"
     " warm-up)"),
    (["optim.min_lr=-0.1"], "optim.min_lr=-0.1 must be a finite number >= 0"),
    (["optim.schedule=cosine", "optim.min_lr=0.1"],
     "optim.min_lr=0.1 must be below optim.lr=0.1 for a cosine"),
    (["optim.beta1=1"], "optim.beta1=1.0 must lie in [0, 1)"),
    (["optim.beta2=-0.5"], "optim.beta2=-0.5 must lie in [0, 1)"),
    (["optim.eps=0"], "optim.eps=0.0 must be a finite number > 0"),
    (["optim.warmup_start_factor=0"], "optim.warmup_start_factor=0.0 must lie in (0, 1]"),
    (["optim.recipe=authors", "optim.name=adamw"], "optim.recipe=authors is the authors' SGD step"
     " decay and needs optim.name=sgd, not adamw (or set optim.recipe=standard)"),
    (["optim.recipe=authors", "optim.schedule=cosine"], "optim.recipe=authors is the authors' SGD"
     " step decay and needs optim.schedule=step, not cosine (or set optim.recipe=standard)"),
    (["optim.recipe=authors", "optim.warmup_epochs=5"], "optim.recipe=authors is the authors' SGD"
     " step decay and needs optim.warmup_epochs=0, not 5 (or set optim.recipe=standard)"),
    (["optim.name=adamw", "optim.nesterov=true"],
     "optim.nesterov=true is an SGD option: drop it for optim.name=adamw"),
    (["optim.schedule=cosine", "trainer.max_epochs=-1", "trainer.max_steps=100"],
     "optim.schedule=cosine ends at trainer.max_epochs: set trainer.max_epochs"),
    (["optim.warmup_epochs=5", "trainer.max_epochs=5"], "optim.warmup_epochs=5 must be below"
     " trainer.max_epochs=5 (the warm-up would never end)"),
    (["distill.ce.label_smoothing=1"],
     "distill.ce.label_smoothing=1.0 must lie in [0, 1) (0: plain CE)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OPTIM, ids=[m for _, m in BAD_OPTIM])
def test_a_bad_recipe_value_is_one_line(overrides, message):
    with pytest.raises(AtxError) as info:
        check_config(compose_cfg(["trainer.accelerator=cpu", *overrides]))
    assert str(info.value) == message
