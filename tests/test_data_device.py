"""Device-resident data: ``setup`` places the uint8 tensors on the trainer's device, batches
are gathered, cropped, flipped and normalised there, and only indices cross per batch.

Without a GPU the placement logic runs against a meta device (shapes only) and a tensor that
says it lives on cuda:0; the one real CUDA comparison is skipped when no GPU is present.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from layouts import write_cifar10

import atx.data.base as data_base
from atx.data import CIFAR10DataModule


# --- device-resident data ---------------------------------------------------------------------
def _batches(dm: CIFAR10DataModule, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch as the training step sees it (after the batch hook), from ``seed``."""
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(training=True, strategy=cpu)
    dm.setup()
    torch.manual_seed(seed)
    return [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]


def test_device_resident_serves_the_same_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=40)
    on = CIFAR10DataModule(str(tmp_path), batch_size=16, device_resident=True, num_workers=2)
    off = CIFAR10DataModule(str(tmp_path), batch_size=16, device_resident=False)
    a, b = _batches(on, seed=7), _batches(off, seed=7)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.float32
    assert on.x_train.device.type == "cpu"
    c = _batches(on, seed=8)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c, strict=True))
    # on the CPU the device-resident loader keeps the host settings (workers allowed)
    assert on.train_dataloader().num_workers == 2


def test_device_resident_placement_and_loader(tmp_path: Path) -> None:
    """``place`` moves the uint8 tensors; a loader over them gathers on their device and is
    re-buildable with Lightning's DistributedSampler (each rank its own share)."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    write_cifar10(tmp_path, n_train=40)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8)
    dm.setup()
    device = "cuda" if torch.cuda.is_available() else "meta"  # meta: shapes only, no copy
    dm.place(device)
    assert dm.x_train.device.type == device and dm.y_val.device.type == device
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory
    xb, yb = next(iter(loader))
    assert xb.device.type == device and xb.shape == (8, 3, 32, 32) and xb.dtype == torch.uint8
    shares = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(0)
        shares.append(list(sampler))
        n = sum(len(x) for x, _ in _update_dataloader(loader, sampler))
        assert n == 20
    assert sorted(shares[0] + shares[1]) == list(range(40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_resident_on_cuda_matches_host(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=40)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    host = list(dm.train_dataloader())
    dm.place("cuda")
    torch.manual_seed(0)
    resident = list(dm.train_dataloader())
    assert len(host) == len(resident) == 3
    for (xh, yh), (xd, yd) in zip(host, resident, strict=True):
        assert xd.is_cuda and torch.equal(xd.cpu(), xh) and torch.equal(yd.cpu(), yh)
    assert dm.val_images(2)[0].device.type == "cpu"


def test_real_trainer_with_device_resident_data(tmp_path: Path, monkeypatch) -> None:
    """Under a real Trainer, setup() places the data on the strategy's root device (the CPU
    here; the meta-device test below checks that a GPU root device is followed)."""
    write_cifar10(tmp_path)

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0])
            return F.cross_entropy(self.fc(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = CIFAR10DataModule(str(tmp_path), batch_size=10, device_resident=True)
    placed: list[torch.device] = []
    place = dm.place
    monkeypatch.setattr(dm, "place", lambda device: placed.append(device) or place(device))
    model = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 2 and all(t.dtype == torch.float32 for t in model.seen)
    assert placed and set(placed) == {trainer.strategy.root_device}


@pytest.mark.parametrize("resident", [True, False])
def test_setup_places_the_data_on_the_trainers_device(tmp_path: Path, resident: bool) -> None:
    """setup() moves train, test and held-out tensors to ``trainer.strategy.root_device`` (a
    meta device stands in for a GPU), unless ``device_resident=False``; the batch hook then
    crops, flips and normalises on that device."""
    write_cifar10(tmp_path, n_train=40)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, device_resident=resident, val_split=10,
                           num_workers=2, pin_memory=True)
    meta = SimpleNamespace(root_device=torch.device("meta"))
    dm.trainer = SimpleNamespace(training=True, strategy=meta)
    dm.setup()
    want = "meta" if resident else "cpu"
    tensors = (dm.x_train, dm.y_train, dm.x_val, dm.y_val, dm.x_heldout, dm.y_heldout)
    assert [t.device.type for t in tensors] == [want] * 6
    loader = dm.train_dataloader()
    # gathered on the device in the main process; host batches keep the workers and pinning
    assert (loader.num_workers, loader.pin_memory) == ((0, False) if resident else (2, True))
    if resident:
        x, y = dm.on_after_batch_transfer((dm.x_train[:8], dm.y_train[:8]), 0)
        assert x.device.type == "meta" and x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
        # mean/std made on the device once, not copied from the host per batch
        assert [t.device.type for t in dm._stats_cache[torch.device("meta")]] == ["meta"] * 2


class FakeIndex:
    """Stands in for the index tensor of a batch: records how it is sent to the device."""

    def __init__(self, values: list[int], log: list) -> None:
        self.t, self.log = torch.as_tensor(values, dtype=torch.long), log

    def pin_memory(self) -> FakeIndex:
        self.log.append("pin_memory")
        return self

    def to(self, device: torch.device, non_blocking: bool = False) -> FakeIndex:
        self.log.append(("to", device, non_blocking))
        return self


class FakeCudaTensor:
    """A tensor that says it lives on cuda:0 and gathers rows by a :class:`FakeIndex`."""

    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __len__(self) -> int:
        return len(self.t)

    def index_select(self, dim: int, idx: FakeIndex) -> torch.Tensor:
        return self.t.index_select(dim, idx.t)


def test_device_resident_batches_send_only_pinned_indices_async(monkeypatch) -> None:
    """On a CUDA-resident dataset a batch copies only its indices to the device, from pinned
    memory with ``non_blocking=True``; elsewhere the indices go by a plain ``.to(device)``."""
    x, y = torch.arange(5 * 3).view(5, 3), torch.arange(5)
    log: list = []
    fake_torch = SimpleNamespace(long=torch.long, as_tensor=lambda v, dtype: FakeIndex(v, log))
    monkeypatch.setattr(data_base, "torch", fake_torch)
    batch = data_base.TensorPairDataset(FakeCudaTensor(x), FakeCudaTensor(y)).__getitems__([3, 1])
    assert log == ["pin_memory", ("to", torch.device("cuda", 0), True)]
    assert torch.equal(batch[0].x, x[[3, 1]]) and torch.equal(batch[0].y, y[[3, 1]])
    monkeypatch.undo()
    batch = data_base.TensorPairDataset(x.to("meta"), y.to("meta")).__getitems__([3, 1])
    assert batch[0].x.device.type == "meta" and batch[0].x.shape == (2, 3)
