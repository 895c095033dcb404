"""atx.train_log: the training step's values reach the loggers as Lightning's own ``self.log``
would write them, and the WRN's in-place ReLU changes no value."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_module import tiny_module
from torch.utils.data import DataLoader, TensorDataset

from atx.models import build_model
from atx.module import DistillModule
from atx.train_log import EpochSums


class LoggedByLightning(DistillModule):
    """Also logs every step's values the way atx did before ``EpochSums``: ``self.log`` per
    name per step, Lightning's running means (under ``ref/``), of the values as they were
    handed to ``EpochSums.add``."""

    def training_step(self, batch, batch_idx):
        given = {}
        add = self.train_sums.add
        self.train_sums.add = lambda values, n: (given.update(values), add(values, n))
        loss = super().training_step(batch, batch_idx)
        self.train_sums.add = add
        self.log_dict({f"ref/{k}": v for k, v in given.items() if k != "error"},
                      on_step=True, on_epoch=True)
        self.log("ref/error", given["error"], on_step=False, on_epoch=True)
        self.last_loss = loss.detach()
        return loss


def test_step_and_epoch_values_are_those_lightning_logs(tmp_path):
    module = tiny_module()
    module.__class__ = LoggedByLightning
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(10, 3, 16, 16, generator=g), torch.randint(0, 10, (10,)))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, log_every_n_steps=2,
                        logger=CSVLogger(tmp_path, name="", version=""),
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=4))  # batches of 4, 4, 2: weights differ
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    step_rows = [r for r in rows if r.get("train/loss_step")]
    # Lightning writes the steps whose count is a multiple of 2: global steps 1, 3, 5 (0-based)
    assert [int(r["step"]) for r in step_rows] == [1, 3, 5]
    names = [k.removeprefix("ref/").removesuffix("_step") for k in rows[0] if
             k.startswith("ref/") and k.endswith("_step")]
    assert {"loss", "ce", "kd", "at/group1", "at/group3"} <= set(names)
    for r in step_rows:
        for k in names:
            assert float(r[f"train/{k}_step"]) == float(r[f"ref/{k}_step"]), (k, r["step"])
    assert trainer.callback_metrics["train/loss"] == module.last_loss  # every step, for callbacks
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1]
    for r in epoch_rows:
        assert float(r["train/error"]) == pytest.approx(float(r["ref/error"]), rel=1e-6)
        for k in names:
            assert float(r[f"train/{k}_epoch"]) == pytest.approx(
                float(r[f"ref/{k}_epoch"]), rel=1e-6), (k, r["epoch"])


def test_epoch_sums_weigh_by_batch_size_and_resume_from_either_format():
    sums = EpochSums()
    sums.add({"loss": torch.tensor(1.0), "error": torch.tensor(50.0)}, 4)
    sums.add({"loss": torch.tensor(4.0), "error": torch.tensor(0.0)}, 2)
    assert sums.means()["loss"].item() == pytest.approx(2.0)  # (4 * 1 + 2 * 4) / 6
    assert sums.last["loss"].item() == 4.0
    with pytest.raises(ValueError, match="earlier steps"):
        sums.add({"loss": torch.tensor(1.0)}, 4)
    resumed = EpochSums()
    resumed.load_state_dict(sums.state_dict(), torch.device("cpu"))
    assert resumed.means() == sums.means() and resumed.images == 6
    # checkpoints of earlier versions: Lightning's running sums of each self.log name
    lightning = {"training_step.train/loss": {"value": torch.tensor(12.0),
                                              "count": torch.tensor(6)},
                 "training_step.train/error": {"value": torch.tensor(200.0),
                                               "count": torch.tensor(6)}}
    resumed.load_state_dict(lightning, torch.device("cpu"))
    assert {k: v.item() for k, v in resumed.means().items()} == pytest.approx(
        {"loss": 2.0, "error": 200 / 6})
    resumed.load_state_dict(EpochSums().state_dict(), torch.device("cpu"))
    assert resumed.means() == {}


def grads(model, x, double_backward):
    """Output and weight gradients; with ``double_backward``, of the input gradient's norm
    (grad-AT's create_graph path) instead of the output's."""
    model.zero_grad()
    x = x.clone().requires_grad_(double_backward)
    out = model(x)
    loss = out.square().sum()
    if double_backward:
        (loss,) = torch.autograd.grad(loss, x, create_graph=True)
        loss = loss.square().sum()
    loss.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("double_backward", [False, True])
def test_in_place_relu_gives_the_same_values_and_a_tapped_bn_output_its_own(double_backward):
    torch.manual_seed(0)
    model = build_model("wrn", num_classes=10, depth=10, width=1)  # train mode: batch stats
    x = torch.randn(4, 3, 16, 16)
    in_place = grads(model, x, double_backward)
    seen = {}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [bn.register_forward_hook(lambda m, _i, out: seen.__setitem__(m, out))
               for bn in bns]  # a hook on every BN: every ReLU makes a new tensor
    copied = grads(model, x, double_backward)
    for h in handles:
        h.remove()
    assert torch.equal(in_place[0], copied[0])
    assert all(torch.equal(a, b) for a, b in zip(in_place[1], copied[1], strict=True))
    assert all((seen[bn] < 0).any() for bn in bns)  # each tapped BN output kept its own
