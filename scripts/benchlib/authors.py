"""The authors' released step (szagoruyko/attention-transfer, ``cifar.py`` and ``utils.py``):
their functional WRN on a dict of tensors and their loss functions, over our state-dict names."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from benchlib.rows import GROUPS


def wrn(params: dict[str, Tensor], x: Tensor, training: bool) -> tuple[Tensor, list[Tensor]]:
    """``cifar.py: resnet().f``: logits and the three group outputs."""

    def bn_relu(o: Tensor, base: str) -> Tensor:  # utils.batch_norm + F.relu
        return F.relu(
            F.batch_norm(
                o,
                params[base + ".running_mean"],
                params[base + ".running_var"],
                params[base + ".weight"],
                params[base + ".bias"],
                training,
            )
        )

    def block(o: Tensor, base: str, stride: int) -> Tensor:
        o1 = bn_relu(o, base + ".bn0")
        y = F.conv2d(o1, params[base + ".conv0.weight"], stride=stride, padding=1)
        z = F.conv2d(bn_relu(y, base + ".bn1"), params[base + ".conv1.weight"], padding=1)
        if base + ".convdim.weight" in params:
            return z + F.conv2d(o1, params[base + ".convdim.weight"], stride=stride)
        return z + o

    o = F.conv2d(x, params["conv0.weight"], padding=1)
    groups = []
    for g, stride in zip(GROUPS, (1, 2, 2), strict=True):
        n = len({k.split(".")[1] for k in params if k.startswith(g + ".")})
        for i in range(n):
            o = block(o, f"{g}.{i}", stride if i == 0 else 1)
        groups.append(o)
    o = F.avg_pool2d(bn_relu(o, "bn"), 8, 1, 0).view(o.size(0), -1)
    return F.linear(o, params["fc.weight"], params["fc.bias"]), groups


def at(x: Tensor) -> Tensor:  # utils.at
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def at_loss(x: Tensor, y: Tensor) -> Tensor:  # utils.at_loss
    return (at(x) - at(y)).pow(2).mean()


def distillation(
    y: Tensor, teacher_scores: Tensor, labels: Tensor, T: float, alpha: float
) -> Tensor:
    """``utils.distillation`` (``batchmean`` for the deprecated ``mean``: same cost)."""
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    kl = F.kl_div(p, q, reduction="batchmean")
    return kl * (T * T * 2.0 * alpha) + F.cross_entropy(y, labels) * (1.0 - alpha)
