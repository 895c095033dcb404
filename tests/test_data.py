"""Data modules: on-disk layouts, batched augmentation, the Lightning batch hook (error
messages, the distributed sampler and downloads: test_data_errors.py).

Tiny copies of the official layouts are written into ``tmp_path``; no network is used.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atx.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    denormalize,
    normalize,
    random_crop_flip,
)
from atx.data.augment import crop_flip
from atx.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR_MEAN, CIFAR_STD
from atx.data.spread import spread_over_classes

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


from layouts import (  # noqa: E402
    write_cifar10,
    write_cifar100,
    write_fashion,
    write_image_folder,
)


# --- loading each layout ----------------------------------------------------------------------
def test_attributes_known_before_setup() -> None:
    for cls, n, c, s in (
        (CIFAR10DataModule, 10, 3, 32),
        (CIFAR100DataModule, 100, 3, 32),
        (FashionMNISTDataModule, 10, 1, 28),
    ):
        dm = cls(root="/nonexistent")
        assert (dm.num_classes, dm.in_channels, dm.image_size) == (n, c, s)
        assert len(dm.classes) == n and len(dm.mean) == len(dm.std) == c
    assert FashionMNISTDataModule().pad == 2 and CIFAR10DataModule("x").pad == 4
    assert FashionMNISTDataModule.classes[0] == "T-shirt/top"
    assert FashionMNISTDataModule.classes[-1] == "Ankle boot"


def test_cifar10_torchvision_layout(tmp_path: Path) -> None:
    x_tr, y_tr, x_te, y_te = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8)
    dm.setup("fit")
    assert dm.x_train.shape == (20, 3, 32, 32) and dm.x_train.dtype == torch.uint8
    assert dm.x_val.shape == (10, 3, 32, 32)
    assert dm.y_train.dtype == torch.int64
    assert torch.equal(dm.x_train, torch.from_numpy(x_tr.reshape(20, 3, 32, 32)))
    assert dm.y_train.tolist() == y_tr.tolist() and dm.y_val.tolist() == y_te.tolist()
    assert torch.equal(dm.x_val, torch.from_numpy(x_te.reshape(10, 3, 32, 32)))
    assert dm.classes == CIFAR10_CLASSES
    # root may also be the batches folder itself
    dm2 = CIFAR10DataModule(str(tmp_path / "cifar-10-batches-py"))
    dm2.setup()
    assert torch.equal(dm2.x_train, dm.x_train)


def test_cifar100_torchvision_layout(tmp_path: Path) -> None:
    x_tr, y_tr, x_te, y_te = write_cifar100(tmp_path)
    dm = CIFAR100DataModule(str(tmp_path))
    dm.setup()
    assert dm.x_train.shape == (20, 3, 32, 32) and dm.x_val.shape == (10, 3, 32, 32)
    assert torch.equal(dm.x_val, torch.from_numpy(x_te.reshape(10, 3, 32, 32)))
    assert dm.y_train.tolist() == y_tr.tolist()  # fine labels, not coarse
    assert dm.classes == CIFAR100_CLASSES and len(dm.classes) == 100


def test_cifar_image_folder_layout(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path, {"train": 2, "test": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    dm = CIFAR10DataModule(str(tmp_path))
    dm.setup()
    assert dm.x_train.shape == (20, 3, 32, 32) and dm.x_val.shape == (10, 3, 32, 32)
    assert dm.classes == sorted(CIFAR10_CLASSES)
    assert dm.y_train.tolist() == [i for i in range(10) for _ in range(2)]
    assert dm.y_val.tolist() == list(range(10))
    # PNG is lossless: pixels survive, CHW order
    first = torch.from_numpy(images["train"][dm.classes[0]][1]).permute(2, 0, 1)
    assert torch.equal(dm.x_train[1], first)


def test_fashion_mnist_idx_gz_and_plain(tmp_path: Path) -> None:
    for gz in (True, False):
        root = tmp_path / ("gz" if gz else "plain")
        x_tr, y_tr, x_te, y_te = write_fashion(root, gz=gz)
        dm = FashionMNISTDataModule(str(root))
        dm.setup()
        assert dm.x_train.shape == (12, 1, 28, 28) and dm.x_val.shape == (6, 1, 28, 28)
        assert torch.equal(dm.x_train[:, 0], torch.from_numpy(x_tr))
        assert dm.y_val.tolist() == y_te.tolist() and dm.y_val.dtype == torch.int64


def test_fashion_mnist_real_debian_package() -> None:
    """The real dataset from the Debian package dataset-fashion-mnist (CI installs it)."""
    dm = FashionMNISTDataModule(FASHION_ROOT)
    dm.setup()
    assert dm.x_train.shape == (60000, 1, 28, 28) and dm.x_val.shape == (10000, 1, 28, 28)
    assert dm.x_train.dtype == torch.uint8
    assert torch.bincount(dm.y_train).tolist() == [6000] * 10
    assert torch.bincount(dm.y_val).tolist() == [1000] * 10
    assert dm.y_train[:3].tolist() == [9, 0, 0]  # the file's first labels: boot, T-shirt, T-shirt
    x = dm.x_train.float() / 255
    assert abs(x.mean().item() - dm.mean[0]) < 1e-3 and abs(x.std().item() - dm.std[0]) < 1e-3


# --- augmentation -----------------------------------------------------------------------------
def _coords(b: int, h: int, w: int) -> torch.Tensor:
    """Batch whose channel 0 holds the row and channel 1 the column of each pixel."""
    rows = torch.arange(h).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(b, h, w)
    return torch.stack([rows, cols], 1).to(torch.uint8)


def _recover(out: torch.Tensor, pad: int, mode: str) -> tuple[list[int], list[int], list[bool]]:
    """Crop offsets ``dy, dx`` and flips of each sample of an augmented :func:`_coords` batch."""

    def windows(n: int) -> list[torch.Tensor]:
        table = torch.from_numpy(np.pad(np.arange(n), pad, mode=mode))  # numpy's modes, same names
        return [table[d : d + n] for d in range(2 * pad + 1)]

    h, w = out.shape[-2:]
    win_h, win_w = windows(h), windows(w)
    dys, dxs, flips = [], [], []
    for o in out.long():
        assert (o[0] == o[0, :, :1]).all() and (o[1] == o[1, :1, :]).all()  # a true crop
        row, col = o[0, :, 0], o[1, 0, :]
        dy = [d for d, win in enumerate(win_h) if torch.equal(row, win)]
        dx = [d for d, win in enumerate(win_w) if torch.equal(col, win)]
        dx_f = [d for d, win in enumerate(win_w) if torch.equal(col, win.flip(0))]
        assert len(dy) == 1 and len(dx) + len(dx_f) == 1
        dys.append(dy[0])
        dxs.append((dx + dx_f)[0])
        flips.append(bool(dx_f))
    return dys, dxs, flips


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
def test_crop_offsets_cover_range_and_flip_half(mode: str) -> None:
    pad, b = 4, 3000
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(_coords(b, 32, 32), pad, generator=g, mode=mode)
    assert out.shape == (b, 2, 32, 32) and out.dtype == torch.uint8
    dys, dxs, flips = _recover(out, pad, mode)
    for offsets in (dys, dxs):
        counts = np.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # nothing outside 0..2*pad
        assert (counts > b / (2 * pad + 1) * 0.7).all()  # every offset, roughly uniform
    assert 0.45 < np.mean(flips) < 0.55


def test_crop_matches_reflect_padding_reference() -> None:
    """Random content follows torch's reflect padding exactly (mirrored pixels, never zeros)."""
    pad, b, h, w = 3, 64, 8, 10
    content = torch.rand(b, 3, h, w) + 1.0  # no zeros anywhere
    x = torch.cat([_coords(b, h, w).float(), content], 1)
    out = random_crop_flip(x, pad, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and (out[:, 2:] > 0).all()
    padded = F.pad(content, (pad,) * 4, mode="reflect")
    dys, dxs, flips = _recover(out[:, :2], pad, "reflect")
    assert len(set(dys)) > 1 and len(set(dxs)) > 1 and 0 < sum(flips) < b
    for i, (dy, dx, flipped) in enumerate(zip(dys, dxs, flips, strict=True)):
        ref = padded[i, :, dy : dy + h, dx : dx + w]
        assert torch.equal(out[i, 2:], ref.flip(-1) if flipped else ref)


def test_augment_identity_reproducible_and_errors() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    same = random_crop_flip(x, 0, flip=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    only_flip = random_crop_flip(x, 0, flip=True, generator=torch.Generator().manual_seed(0))
    for a, o in zip(x, only_flip, strict=True):
        assert torch.equal(o, a) or torch.equal(o, a.flip(-1))
    a = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ValueError, match="pad=32"):
        random_crop_flip(x, 32)
    with pytest.raises(ValueError, match="unknown pad mode"):
        random_crop_flip(x, 4, mode="zeros")


def test_normalize_denormalize_round_trip() -> None:
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    x[0, :, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    z = normalize(x, mean, std)
    assert z.dtype == torch.float32 and z.shape == x.shape
    expected = [(0 / 255 - 0.1) / 0.2, (128 / 255 - 0.5) / 0.3, (255 / 255 - 0.9) / 0.4]
    torch.testing.assert_close(z[0, :, 0, 0], torch.tensor(expected))
    assert torch.equal(denormalize(z, mean, std), x)
    torch.testing.assert_close(denormalize(z, mean, std, as_uint8=False), x.float() / 255)
    dm = CIFAR10DataModule("unused")
    assert torch.equal(dm.denormalize(dm.normalize(x)), x)
    torch.testing.assert_close(dm.normalize(x), normalize(x, CIFAR_MEAN, CIFAR_STD))


# --- data module behaviour --------------------------------------------------------------------
def test_on_after_batch_transfer_augments_only_in_training(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=20)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    plain = dm.normalize(x)
    for trainer in (None, SimpleNamespace(training=False)):
        dm.trainer = trainer
        xo, yo = dm.on_after_batch_transfer((x, y), 0)
        assert xo.dtype == torch.float32 and torch.equal(xo, plain) and torch.equal(yo, y)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    xo, _ = dm.on_after_batch_transfer((x, y), 0)
    assert xo.shape == x.shape and xo.dtype == torch.float32 and not torch.equal(xo, plain)
    # augmented images are crops/flips of the originals: same value set per image
    for a, o in zip(dm.denormalize(xo), x, strict=True):
        assert set(a.unique().tolist()) <= set(o.unique().tolist())
    off = CIFAR10DataModule(str(tmp_path), pad=0, flip=False)
    off.setup()
    off.trainer = SimpleNamespace(training=True)
    assert torch.equal(off.on_after_batch_transfer((x, y), 0)[0], plain)


def test_setup_subsets_loaders_and_val_images(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    calls = []
    dm = CIFAR10DataModule(str(tmp_path), batch_size=3, train_subset=7, val_subset=4, seed=5)
    orig = dm._load
    dm._load = lambda: calls.append(1) or orig()  # type: ignore[method-assign]
    dm.setup("fit")
    dm.setup("validate")
    assert len(calls) == 1
    assert len(dm.x_train) == 7 and len(dm.x_val) == 4
    again = CIFAR10DataModule(str(tmp_path), train_subset=7, val_subset=4, seed=5)
    again.setup()
    assert torch.equal(again.x_train, dm.x_train) and torch.equal(again.y_val, dm.y_val)
    other = CIFAR10DataModule(str(tmp_path), train_subset=7, seed=6)
    other.setup()
    assert not torch.equal(other.x_train, dm.x_train)
    # the subset is a subset of the full data
    full = CIFAR10DataModule(str(tmp_path))
    full.setup()
    flat = {bytes(img.numpy()) for img in full.x_train}
    assert all(bytes(img.numpy()) in flat for img in dm.x_train)

    train = dm.train_dataloader()
    assert sum(len(b[0]) for b in train) == 7 and len(train) == 3  # drop_last=False
    pairs = {(bytes(i.numpy()), int(t)) for i, t in zip(dm.x_train, dm.y_train, strict=True)}
    for xb, yb in train:  # batches are gathered in one go: images still carry their own labels
        assert xb.dtype == torch.uint8 and yb.dtype == torch.int64
        assert all((bytes(i.numpy()), int(t)) in pairs for i, t in zip(xb, yb, strict=True))
    torch.manual_seed(0)
    order1 = torch.cat([b[1] for b in dm.train_dataloader()])
    torch.manual_seed(1)
    order2 = torch.cat([b[1] for b in dm.train_dataloader()])
    assert sorted(order1.tolist()) == sorted(dm.y_train.tolist())
    assert not torch.equal(order1, order2) or len(set(dm.y_train.tolist())) == 1
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.x_val)
    assert torch.equal(torch.cat([b[0] for b in dm.test_dataloader()]), dm.x_val)
    xs, ys = dm.val_images(2)  # spread over the classes (test_visualize.py)
    idx = spread_over_classes(dm.y_val, 2)
    assert torch.equal(xs, dm.x_val[idx]) and torch.equal(ys, dm.y_val[idx])
    assert not dm.train_dataloader().persistent_workers

    lazy = CIFAR10DataModule(str(tmp_path))
    assert lazy.val_images(3)[0].shape == (3, 3, 32, 32)  # val_images runs setup itself


class _Probe(L.LightningModule):
    """Records what the training and validation steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch[0].detach().clone())
        return F.cross_entropy(self.fc(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0].detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def crops_of(x: torch.Tensor, pad: int) -> dict[bytes, tuple[int, int, int, bool]]:
    """Every reflect-padded crop, flipped or not, of every uint8 image of ``x``, normalised as
    the hook does: its bytes -> (image index, dy, dx, flipped)."""
    dm = CIFAR10DataModule("unused")
    found = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            for flip in (False, True):
                offsets = torch.tensor([[dy], [dx]]).expand(2, len(x))
                flips = torch.full((len(x),), flip)
                crops = dm.normalize(crop_flip(x, pad, offsets, flips, mode="reflect"))
                for i, c in enumerate(crops):
                    found[c.numpy().tobytes()] = (i, dy, dx, flip)
    return found


def test_real_trainer_calls_the_hook(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=10)
    L.seed_everything(0, verbose=False)  # the sampler's order and the crops/flips drawn
    model = _Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen["train"]) == 2 and len(model.seen["val"]) == 1
    assert all(t.dtype == torch.float32 for v in model.seen.values() for t in v)
    assert torch.equal(model.seen["val"][0], dm.normalize(dm.x_val[:10]))  # not augmented
    # every training image of the epoch is one reflect-pad-4 crop (flipped or not) of a train
    # image (random pixels: no other crop matches), and the epoch holds each image once
    crops = crops_of(dm.x_train, pad=4)
    seen = [crops.get(t.numpy().tobytes()) for b in model.seen["train"] for t in b]
    assert None not in seen, "a training image is no crop/flip of the padded originals"
    assert sorted(i for i, *_ in seen) == list(range(20))
    offsets = [d for _, dy, dx, _ in seen for d in (dy, dx)]
    flipped = sum(f for *_, f in seen)
    # offsets uniform in 0..8, flips with p = 0.5: the whole range, about half flipped (seeded,
    # so fixed; fair draws leave these bounds with P < 1e-4 for offsets, 0.012 for flips)
    assert min(offsets) <= 1 and max(offsets) >= 7 and len(set(offsets)) >= 7
    assert 5 <= flipped <= 15
