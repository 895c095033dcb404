"""NIN learns from its own init: without batch norm (paper Table 3, at the presets' lr) and with.

"Learns" means its loss on a fixed batch of real images falls clearly below the entropy of that
batch's labels, the best a network that ignores the images can reach (PyTorch's default conv
init stalls at that entropy here, and at ln(10) on changing batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from atx.data.fashion_mnist import DEBIAN_ROOT, FashionMNISTDataModule, read_idx
from atx.models import build_model
from atx.optim import OptimConf

EXPERIMENTS = Path(__file__).parents[1] / "conf" / "experiment"
TABLE3 = ("t3_nin_thin-nin_wide", "t3_nin_thin-nin_wide_at", "cifar10_teacher_nin_wide_nobn")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: on a loaded 2-core machine OpenMP's spinning threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """32 real Fashion-MNIST training images, normalised, pooled to 14x14 to keep steps fast."""
    x = read_idx(Path(DEBIAN_ROOT) / "train-images-idx3-ubyte.gz")[:32]
    y = read_idx(Path(DEBIAN_ROOT) / "train-labels-idx1-ubyte.gz")[:32]
    mean, std = FashionMNISTDataModule.mean[0], FashionMNISTDataModule.std[0]
    images = torch.from_numpy(x.copy()).float().div(255).sub(mean).div(std).unsqueeze(1)
    return nn.functional.avg_pool2d(images, 2), torch.from_numpy(y.copy()).long()


def label_entropy(y: torch.Tensor) -> float:
    """-sum_k f_k ln f_k of the label frequencies f: the loss of the best image-blind guess."""
    f = torch.bincount(y).float() / len(y)
    return float(-(f[f > 0] * f[f > 0].log()).sum())


def preset(name: str, key: str) -> object:
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())["optim"].get(key)


def losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], lr: float,
           steps: int) -> list[float]:
    """Training losses of SGD (momentum 0.9, no weight decay, as Table 3) on one batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    out = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


def test_nin_without_batch_norm_learns_at_the_table3_presets_lr(batch):
    lrs = {preset(name, "lr") for name in TABLE3}
    assert len(lrs) == 1 and lrs != {OptimConf().lr}  # one lr for all, not the BN default 0.1
    torch.manual_seed(0)
    model = build_model("nin", 10, in_channels=1, batch_norm=False, relu_before_pool=False)
    got = losses(model, batch, lrs.pop(), steps=24)
    assert got[0] == pytest.approx(math.log(10), abs=1e-4)  # the zero classifier: uniform logits
    assert all(math.isfinite(v) for v in got)
    assert min(got) < label_entropy(batch[1]) - 0.3


def test_nin_with_batch_norm_learns_at_the_default_lr(batch):
    torch.manual_seed(0)
    got = losses(build_model("nin", 10, in_channels=1), batch, OptimConf().lr, steps=10)
    assert got[0] == pytest.approx(math.log(10), abs=1e-4)
    assert got[-1] < label_entropy(batch[1]) - 1.0
