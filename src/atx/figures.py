"""Pictures of attention maps: input images and, per layer group, each network's map on top
(drawn during training, ``atx.callbacks``, and by ``atx-visualize`` for finished runs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from atx.attention import MapMode, attention_map  # noqa: E402
from atx.features import LayerTaps  # noqa: E402
from atx.gradient_attention import input_gradient  # noqa: E402


def eager() -> Any:
    """A compiled run's figures run its modules eager: a few images with hooks would recompile
    them. A fresh context each time: ``set_stance`` takes effect when it is called."""
    return torch.compiler.set_stance("force_eager")


def group_maps(
    model: nn.Module, layers: Sequence[str], x: Tensor, p: float = 2.0, mode: MapMode = "sum"
) -> list[Tensor]:
    """Normalised attention maps (Eq. 2's Q/||Q||) of ``layers``, each (B, H, W), upsampled
    to the input size so maps of different resolutions can be compared."""
    taps = LayerTaps(model, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager():
            model(x)
        feats = taps.outputs()
    finally:
        taps.remove()
        model.train(was_training)
    maps = []
    for name in layers:
        f = feats[name]
        q = attention_map(f, p, mode).view(f.shape[0], 1, *f.shape[-2:])
        maps.append(F.interpolate(q, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return maps


def grad_maps(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient-based attention (Section 3.2) for display: ``|J|`` of ``J = dCE/dx`` (Eq. 3)
    summed over the input channels, divided by its per-image maximum; (B, H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), eager():
            x = x.detach().clone().requires_grad_(True)
            g = input_gradient(model(x), y, x).abs().sum(dim=1)
    finally:
        model.train(was_training)
    return g / g.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def map_name(p: float, mode: MapMode) -> str:
    """The paper's name of the map function: F_sum, F_sum^p or F_max^p."""
    return "F_sum" if (mode == "sum" and p == 1) else f"F_{mode}^{p:g}"


def save_attention_figure(
    path: str | Path,
    data: Any,
    n_images: int,
    networks: Mapping[str, tuple[nn.Module, Sequence[str]]],
    title: str = "",
    p: float = 2.0,
    mode: MapMode = "sum",
    grad: bool = False,
    images: tuple[Tensor, Tensor] | None = None,
) -> Path:
    """Write a PNG grid: one row per validation image; the image, then for every layer group
    each network's attention map over it, on a colour scale shared within the group.

    ``networks`` maps a label (e.g. ``"teacher (6.3%)"``) to (model, layer names); all
    networks must list the same number of layers (the groups being compared). ``grad`` adds
    one last column per network: its gradient-based attention (:func:`grad_maps`).
    ``images``: (uint8 images, labels) to show instead of ``data.val_images(n_images)``.
    """
    x_uint8, y = data.val_images(n_images) if images is None else images
    x = data.normalize(x_uint8)
    maps = {label: group_maps(m, layers, x, p, mode) for label, (m, layers) in networks.items()}
    n_groups = len(next(iter(maps.values())))
    labels = list(networks)
    grads = {lb: grad_maps(m, x, y) for lb, (m, _) in networks.items()} if grad else {}
    cols = 1 + (n_groups + int(grad)) * len(labels)
    n = x.shape[0]
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n + 0.6), squeeze=False)
    images = x_uint8.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        img = images[i, :, :, 0] if images.shape[-1] == 1 else images[i]
        axes[i, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        for g in range(n_groups):
            vmax = max(float(maps[lb][g][i].max()) for lb in labels)
            for j, lb in enumerate(labels):
                ax = axes[i, 1 + g * len(labels) + j]
                ax.imshow(maps[lb][g][i].numpy(), cmap="jet", vmin=0.0, vmax=vmax)
                if i == 0:
                    layer = networks[lb][1][g]
                    ax.set_title(f"{lb}\n{layer}", fontsize=7)
        for j, lb in enumerate(grads):
            ax = axes[i, 1 + n_groups * len(labels) + j]
            ax.imshow(grads[lb][i].numpy(), cmap="jet", vmin=0.0, vmax=1.0)
            if i == 0:
                ax.set_title(f"{lb}\n|dL/dx|", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    name = map_name(p, mode)
    fig.suptitle(title or f"attention maps ({name}, shared scale per group)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
