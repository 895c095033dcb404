"""Pre-activation Wide ResNet WRN-d-k for CIFAR (paper §4.1; authors' `cifar.py` `resnet()`).

Layer groups for attention transfer are the submodules `group1`, `group2`, `group3`; their outputs
are the residual sums (before the next BN-ReLU), exactly the `g0, g1, g2` the authors' code
returns (paper §3.1).
"""

import torch
from torch import nn

from atx.errors import AtxError


class Block(nn.Module):
    """bn0-relu-conv0(3x3, stride)-bn1-relu-(dropout)-conv1(3x3) plus shortcut.

    The shortcut is a 1x1 conv (with stride) on relu(bn0(x)) when the width changes, else x.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.convdim = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = relu_of(self.bn0, x)
        y = self.conv0(o1)
        z = self.conv1(self.dropout(relu_of(self.bn1, y)))
        return z + (self.convdim(o1) if self.convdim is not None else x)


def relu_of(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(bn(x)), the ReLU in place on the BN output (no new activation tensor: the CPU step
    is bound by memory traffic) unless a hook, such as a layer tap, sees that output. The
    values and gradients are the same either way: BN's backward needs its input, not its
    output."""
    hooked = _hooked(bn)  # before the call: a hook may remove itself once it has run
    out = bn(x)
    return torch.relu(out) if hooked else torch.relu_(out)


def _hooked(m: nn.Module) -> bool:
    """Any forward or backward hook on ``m``, its own or global (``nn.modules.module``)."""
    hooks = nn.modules.module
    return bool(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or hooks._global_forward_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), as in the authors' AT code (paper §4.1).

    conv0 (in_channels->16) -> group1 (16k, stride 1) -> group2 (32k, stride 2) -> group3 (64k,
    stride 2) -> bn -> relu -> global average pool -> fc. Each group has n = (depth-4)/6 blocks.
    Adaptive pooling lets 28x28 inputs work too. Init as the authors' final `utils.py`:
    Kaiming-normal (fan_in, gain sqrt 2) conv and fc weights, fc bias 0, BN weight ~ U(0,1),
    BN bias 0. (Their Jan-2017 code drew weights with std 2/sqrt(fan_in) instead.)
    Trainable parameters with 10 classes: WRN-16-1 175,066; WRN-16-2 691,674;
    WRN-40-1 563,930; WRN-40-2 2,243,546. `dropout` (default off, as in the AT paper) sits
    between the two convs of a block, as in the WRN paper.
    """

    def __init__(
        self,
        depth: int = 16,
        width: int = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AtxError(
                f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        if width < 1:
            raise AtxError(f"WRN width must be a positive integer, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise AtxError(f"WRN dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv0 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.group1 = self._group(16, widths[0], n, 1, dropout)
        self.group2 = self._group(widths[0], widths[1], n, 2, dropout)
        self.group3 = self._group(widths[1], widths[2], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_ch: int, out_ch: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                Block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        x = self.group3(self.group2(self.group1(x)))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))
