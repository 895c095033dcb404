"""Network-in-Network for CIFAR, thin (0.2M) and wide (1M) (paper §3.1, §4.1, §4.1.3, Table 3).

The paper gives only the parameter counts and that "a group refers to a block of a 3x3, 1x1, 1x1
convolutions"; the exact widths are unpublished (nor in the authors' code), so the widths
here are our choice.
"""

import torch
from torch import nn

from atx.errors import AtxError

#: Channels of every conv in a variant (all three convs of all three blocks).
NIN_WIDTHS: dict[str, int] = {"thin": 96, "wide": 200}


def init_weights(model: "NIN") -> None:
    """Kaiming-normal conv weights (fan_in, ReLU gain: variance 2/fan_in, as the authors' WRN
    init), zero biases and a zero classifier; what lets NIN *without* BN learn (paper Table 3).

    PyTorch's default (uniform, variance 1/(3 fan_in)) shrinks the activations by about sqrt(6)
    per ReLU layer, so after nine convs the gradients vanish and, without BN, the loss stays at
    ln(10). Kaiming's gain keeps the scale. The classifier starts at zero (no ReLU follows it),
    so the first logits are uniform instead of a random guess to undo. Without BN this needs a
    smaller lr than 0.1 (the Table 3 presets use 0.01): at 0.1 it diverges within a few steps.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)


class NIN(nn.Module):
    """NIN: block1 -> pool1 -> block2 -> pool2 -> block3 -> classifier -> global average pool.

    Each block `blockI` is conv3x3 -> conv1x1 -> conv1x1, every conv followed by BN (if
    `batch_norm`) and ReLU; all convs of a variant have the same width: thin 96 channels (half of
    the 192 of Lin et al.'s CIFAR NIN), wide 200. Pools are 3x3 max-pools, stride 2, padding 1,
    so on 32x32 inputs the block outputs (the AT layer groups) are 32x32, 16x16 and 8x8, like
    WRN's. `classifier` is a 1x1 conv (with bias) to `num_classes`, then global average pooling.

    Trainable parameters (10 classes, 3 input channels):
    thin 226,474 with BN / 225,610 without; wide 971,010 with BN / 969,210 without.

    `batch_norm=False` gives conv (with bias) -> ReLU, the paper's grad-AT setting (§4.1.3).
    `relu_before_pool=False` drops the ReLU that feeds each max-pool (the last of block1 and
    block2), so those blocks end on a conv/BN output: §4.1.3's student NIN without BN had no
    ReLU before pooling, and its BN teacher for activation AT likewise. `dropout` > 0 adds dropout
    after each max-pool, as in Lin et al. Init: `init_weights` (atx's choice; the paper gives
    none).
    """

    def __init__(
        self,
        variant: str = "thin",
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
        relu_before_pool: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in NIN_WIDTHS:
            known = ", ".join(NIN_WIDTHS)
            raise AtxError(f"unknown NIN variant '{variant}'; known variants: {known}")
        if not 0.0 <= dropout < 1.0:
            raise AtxError(f"NIN dropout must be in [0, 1), got {dropout}")
        w = NIN_WIDTHS[variant]
        self.block1 = self._block(in_channels, w, batch_norm, relu_before_pool)
        self.pool1 = self._pool(dropout)
        self.block2 = self._block(w, w, batch_norm, relu_before_pool)
        self.pool2 = self._pool(dropout)
        self.block3 = self._block(w, w, batch_norm, True)
        self.classifier = nn.Conv2d(w, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        init_weights(self)

    @staticmethod
    def _block(in_ch: int, w: int, batch_norm: bool, last_relu: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (k, c_in) in enumerate([(3, in_ch), (1, w), (1, w)]):
            layers.append(nn.Conv2d(c_in, w, k, padding=k // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(w))
            if i < 2 or last_relu:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    @staticmethod
    def _pool(dropout: float) -> nn.Sequential:
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        return nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.classifier(self.block3(x))
        return torch.flatten(self.pool(x), 1)
