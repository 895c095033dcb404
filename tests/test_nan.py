"""Numerical faults: a NaN/inf loss stops the run naming the step, the term and the
layer group, before the optimiser step, so the checkpoints on disk keep the last good weights;
``nan_policy=skip`` drops such steps instead (and stops after ``nan_skip_limit`` in a row)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from configs import compose_cfg

from atx.losses import Objective, Schedule, StepOutputs, Term
from atx.models import build_model
from atx.module import DistillModule
from atx.numerics import NanGuard, NonFiniteLoss, describe_nonfinite
from atx.terms import AttentionTransfer, CrossEntropy
from atx.train import train

TINY = ["model.depth=10", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0", "data.batch_size=8", "data.train_subset=16",
        "data.val_subset=8", "logger=csv", "figure_images=0"]
STEPS_PER_EPOCH = 2  # 16 images, batches of 8


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """A WRN-10-2 for the default data (Fashion-MNIST), and a copy whose group2 weights are
    huge but finite: its group2 (and later) activations overflow float32 in the forward pass."""
    tmp = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    state = build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict()
    torch.save(state, tmp / "good.pt")
    for key in ("group2.0.conv0.weight", "group2.0.conv1.weight"):
        state[key] = state[key] * 1e25
    torch.save(state, tmp / "overflow.pt")
    return {"good": tmp / "good.pt", "overflow": tmp / "overflow.pt"}


def at_run(teacher: Path, *extra: str) -> list[str]:
    return [*TINY, "distill=at", "teacher=wrn_16_2", "teacher.depth=10",
            f"teacher.checkpoint={teacher}", *extra]


def nan_in_group2_at(monkeypatch, steps: set[int]) -> None:
    """The AT loss of layer group 2 is NaN at the given training steps (0-based count of
    training calls; AT is only computed in training)."""
    original = AttentionTransfer.pair_loss
    calls = {"n": -1}

    def pair_loss(self, index, student, teacher):
        if index == 0:
            calls["n"] += 1
        loss = original(self, index, student, teacher)
        return loss * float("nan") if index == 1 and calls["n"] in steps else loss

    monkeypatch.setattr(AttentionTransfer, "pair_loss", pair_loss)


def test_describe_names_term_and_group():
    one, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    parts = {"ce": one, "at/group1": one, "at/group2": nan, "at/group3": inf, "kd": one}
    assert describe_nonfinite(nan, parts) == (
        "term 'at' of layer group 'group2' is nan (also not finite: at/group3)"
    )
    assert describe_nonfinite(inf, {"ce": one, "kd": inf}) == "term 'kd' is inf"
    assert "every term is finite" in describe_nonfinite(inf, {"ce": one})
    guard = NanGuard("skip", limit=2)
    assert guard(one, {"ce": one}, 0, 0, 0) is False
    assert guard(nan, {"at/group2": nan}, 1, 0, 1) is True
    assert guard(one, {"ce": one}, 2, 0, 2) is False  # a good step resets the run of bad ones
    assert guard(nan, {"at/group2": nan}, 3, 0, 3) is True
    with pytest.raises(NonFiniteLoss, match=r"2 non-finite losses in a row \(nan_skip_limit=2\)"):
        guard(nan, {"at/group2": nan}, 4, 0, 4)
    assert guard.skipped == 2


class NanProbe(Term):
    """A term that is 0, or NaN at the given steps."""

    name = "probe"

    def __init__(self, bad: set[int]) -> None:
        super().__init__(Schedule(1.0))
        self.bad, self.calls = bad, -1

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {self.name: out.logits.sum() * (float("nan") if self.calls in self.bad else 0.0)}


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))


def test_a_skipped_step_leaves_weights_untouched():
    """With weight decay and momentum any optimiser step would move the weights, even with a
    zero gradient: equal weights before and after mean no step was taken."""
    torch.manual_seed(0)
    module = DistillModule(build_model("wrn", 10, 1, depth=10),
                           Objective([CrossEntropy(Schedule(1.0)), NanProbe({1})]), 10,
                           nan_guard=NanGuard("skip"))
    snaps = Snapshots()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snaps])
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 8))
    assert len(snaps.after) == 3 and module.nan_guard.skipped == 1
    assert not torch.equal(snaps.before[0], snaps.after[0])  # a real step
    assert torch.equal(snaps.before[1], snaps.after[1])  # the NaN step: skipped
    assert not torch.equal(snaps.before[2], snaps.after[2])
    assert snaps.after[2].isfinite().all()


def test_nan_stops_the_run_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch, teachers):
    """Epoch 0 trains and is checkpointed; the first step of epoch 1 has a NaN in group 2's AT
    term: the run stops naming it, no checkpoint is written from that state."""
    nan_in_group2_at(monkeypatch, {STEPS_PER_EPOCH})
    cfg = compose_cfg(at_run(teachers["good"], "trainer.max_epochs=3"))
    with pytest.raises(NonFiniteLoss) as info:
        train(cfg, tmp_path)
    message = str(info.value)
    assert message.startswith(
        f"non-finite loss at step {STEPS_PER_EPOCH} (epoch 1, batch 0): term 'at' of layer group"
        " 'group2' is nan; stopped before the optimiser step"
    )
    assert "\n" not in message
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in saved
    for name in saved:
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert ckpt["global_step"] <= STEPS_PER_EPOCH and ckpt["epoch"] == 0, name
        assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "student.pt").exists()  # the run did not finish


def test_skip_policy_drops_bad_steps_and_counts_them(tmp_path, monkeypatch, teachers):
    nan_in_group2_at(monkeypatch, {1, 2})
    cfg = compose_cfg(at_run(teachers["good"], "trainer.max_epochs=2", "nan_policy=skip"))
    metrics = train(cfg, tmp_path)
    assert 0 <= metrics["val/error"] <= 100
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert skipped == [1.0, 2.0]  # after epoch 0 (step 1), after epoch 1 (step 2)
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_cli_overflowing_teacher_stops_with_one_line(tmp_path, teachers):
    """No injection: a teacher whose group2 activations overflow makes the AT terms of groups
    2 and 3 non-finite at the very first step."""
    result = subprocess.run(
        [sys.executable, "-m", "atx.train", *at_run(teachers["overflow"], "trainer.max_epochs=1"),
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("atx: error:")]
    assert lines == [result.stderr.strip().splitlines()[-1]]
    assert lines[0].startswith(
        "atx: error: non-finite loss at step 0 (epoch 0, batch 0): term 'at' of layer group"
        " 'group2' is nan (also not finite: at/group3)"
    )
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
