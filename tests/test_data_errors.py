"""Data modules' errors (one line naming the path and the fix), Lightning's distributed sampler
over them, and the download flag. Tiny copies of the official layouts in ``tmp_path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import dump_pickle, write_cifar10, write_fashion, write_idx, write_image_folder
from PIL import Image

from atx.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, read_idx
from atx.errors import AtxError


# --- errors: one line naming the path and the fix ---------------------------------------------
def _err(fn) -> str:
    with pytest.raises(AtxError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    msg = _err(lambda: CIFAR10DataModule(str(root)).setup())
    assert msg == (
        f"CIFAR-10 not found under '{root}': expected '{root}/cifar-10-batches-py' (torchvision "
        f"layout) or '{root}/train/<class>/' image folders; set data.root=... or "
        f"data.download=true"
    )
    msg = _err(lambda: CIFAR100DataModule(str(root)).setup())
    assert f"'{root}/cifar-100-python'" in msg
    msg = _err(lambda: FashionMNISTDataModule(str(root)).setup())
    assert f"'{root}' does not exist" in msg and "dataset-fashion-mnist" in msg


def test_error_missing_or_bad_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert f"CIFAR file '{batch}' is missing" in msg and "data.download=true" in msg
    batch.write_bytes(b"garbage")
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert f"CIFAR file '{batch}' is not a readable CIFAR pickle" in msg
    dump_pickle(batch, {b"data": np.zeros((2, 3072), np.uint8)})
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert f"CIFAR file '{batch}' has no 'labels' entry" in msg

    fm = tmp_path / "fm"
    write_fashion(fm)
    (fm / "t10k-labels-idx1-ubyte.gz").unlink()
    msg = _err(lambda: FashionMNISTDataModule(str(fm)).setup())
    assert f"'{fm}/t10k-labels-idx1-ubyte.gz' (or 't10k-labels-idx1-ubyte') is missing" in msg


def test_error_class_folders_differ_or_empty(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 1, "test": 1})
    shutil.move(tmp_path / "test" / "cat", tmp_path / "test" / "kitten")
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert msg.startswith(
        f"class folders differ between '{tmp_path}/train' and '{tmp_path}/test': "
        f"only in train: ['cat'], only in test: ['kitten']"
    )
    shutil.move(tmp_path / "test" / "kitten", tmp_path / "test" / "cat")
    for p in (tmp_path / "test" / "dog").iterdir():
        p.unlink()
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert f"class folder '{tmp_path}/test/dog' has no .png/.jpg/.jpeg images" in msg
    shutil.rmtree(tmp_path / "test")
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert f"image folder '{tmp_path}/test' not found" in msg


def test_error_wrong_image_size_or_mode(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 1, "test": 1})
    bad = tmp_path / "train" / "frog" / "000.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert msg == f"image '{bad}' is 16x16 RGB, expected 32x32 RGB; convert or remove it"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad)
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    assert msg.startswith(f"image '{bad}' is 32x32 L, expected 32x32 RGB")


def test_error_truncated_idx(tmp_path: Path) -> None:
    a = np.zeros((3, 28, 28), np.uint8)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        path = tmp_path / name
        write_idx(path, a, truncate=100)
        msg = _err(lambda p=path: read_idx(p))
        assert msg.startswith(f"'{path}' is truncated: its IDX header announces shape (3, 28, 28)")
        assert msg.endswith("re-download it")
    cut = tmp_path / "cut.gz"
    write_idx(cut, a)
    cut.write_bytes(cut.read_bytes()[:-20])  # a cut gzip stream
    assert f"cannot read '{cut}'" in _err(lambda: read_idx(cut))
    fm = tmp_path / "fm"
    write_fashion(fm)
    write_idx(fm / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28), np.uint8), truncate=1)
    msg = _err(lambda: FashionMNISTDataModule(str(fm)).setup())
    assert f"'{fm}/train-images-idx3-ubyte.gz' is truncated" in msg


def test_error_bad_arguments(tmp_path: Path) -> None:
    assert "data.pad=40" in _err(lambda: CIFAR10DataModule("x", pad=40))
    assert "data.pad_mode" in _err(lambda: CIFAR10DataModule("x", pad_mode="zeros"))
    write_cifar10(tmp_path)
    msg = _err(lambda: CIFAR10DataModule(str(tmp_path), train_subset=21).setup())
    assert "data.train_subset=21 exceeds the 20 images" in msg


def test_loader_survives_lightning_distributed_sampler(tmp_path: Path) -> None:
    """Lightning rebuilds the loader with a DistributedSampler under DDP; batches stay pairs."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0)
        for xb, yb in _update_dataloader(loader, sampler):
            assert xb.shape[1:] == (3, 32, 32) and len(xb) == len(yb) <= 4
            seen += [int(torch.nonzero((dm.x_train == img).flatten(1).all(1))[0]) for img in xb]
    assert sorted(seen) == list(range(20))


def test_download_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = CIFAR10DataModule(str(tmp_path), download=True)

    def offline(train: bool) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(dm, "_torchvision_dataset", offline)
    msg = _err(dm.prepare_data)
    assert msg.startswith(f"downloading CIFAR-10 into '{tmp_path}' failed (OSError: network")
    assert msg.endswith("set data.download=false")
    write_cifar10(tmp_path)
    dm.prepare_data()  # a copy is there: nothing to download
    dm.setup()
    assert len(dm.x_train) == 20
