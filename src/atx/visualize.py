"""Pictures of attention maps: input images and, per layer group, each network's map on top.

Also the console script ``atx-visualize TEACHER STUDENT [STUDENT ...]``: the same grid for
finished run directories, each network rebuilt from its run's own config.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
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
from atx.checkpoints import STUDENT_FILE  # noqa: E402
from atx.data.spread import spread_over_classes  # noqa: E402
from atx.errors import AtxError, reason  # noqa: E402
from atx.features import LayerTaps  # noqa: E402
from atx.gradient_attention import input_gradient  # noqa: E402


def group_maps(
    model: nn.Module, layers: Sequence[str], x: Tensor, p: float = 2.0, mode: MapMode = "sum"
) -> list[Tensor]:
    """Normalised attention maps (Eq. 2's Q/||Q||) of ``layers``, each (B, H, W), upsampled
    to the input size so maps of different resolutions can be compared."""
    taps = LayerTaps(model, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
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
        with torch.enable_grad():
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


# --- atx-visualize: the grid for finished runs ------------------------------------------------
def load_run(run_dir: str | Path) -> tuple[Path, Any]:
    """A run directory's path and its composed config (``.hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise AtxError(f"run directory '{run_dir}' not found")
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        raise AtxError(f"'{run_dir}' is not an atx run directory: it has no .hydra/config.yaml")
    if not (run / STUDENT_FILE).is_file():
        raise AtxError(f"run directory '{run_dir}' has no {STUDENT_FILE} (did the run finish?)")
    try:
        cfg = OmegaConf.load(config)
    except Exception as e:
        raise AtxError(f"cannot read '{config}': {reason(e)}") from e
    if cfg.get("model") is None:
        raise AtxError(f"'{config}' has no 'model' section: is it an atx run config?")
    return run, cfg


def run_label(run: Path, cfg: Any) -> str:
    """``name (error%)`` from the run's config and ``metrics.json`` (``n/a`` without it)."""
    try:  # metrics.json holds the resolved name; the saved config may hold ${hydra:...}
        metrics = json.loads((run / "metrics.json").read_text())
        return f"{metrics.get('name') or run.name} ({float(metrics['val/error']):.1f}%)"
    except (OSError, ValueError, KeyError, TypeError):
        from omegaconf import OmegaConf

        name = str(OmegaConf.to_container(cfg).get("name") or "")  # unresolved, as saved
        return f"{name if name and '${' not in name else run.name} (n/a)"


def pick_images(data: Any, split: str, n: int) -> tuple[Tensor, Tensor]:
    """``n`` (uint8 images, labels) of ``split``, spread over the classes."""
    if split == "val":
        return data.val_images(n)
    x, y = getattr(data, "x_train", None), getattr(data, "y_train", None)
    if x is None or y is None:
        raise AtxError(f"--split train is not available for {type(data).__name__}; use --split val")
    idx = torch.tensor(spread_over_classes(y, n), dtype=torch.long, device=x.device)
    return x[idx].cpu().clone(), y[idx].cpu().clone()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="atx-visualize",
        description="Attention maps of a teacher and students (atx run directories) over the"
        " same images, one PNG: per layer group, each network's map on a shared colour scale.",
    )
    parser.add_argument("teacher", metavar="TEACHER", help="the teacher's run directory")
    parser.add_argument("students", metavar="STUDENT", nargs="+", help="students' run directories")
    parser.add_argument("--images", type=int, default=8, help="number of images (rows)")
    parser.add_argument("--p", type=float, default=2.0, help="exponent p of the map (1: F_sum)")
    parser.add_argument("--mode", choices=("sum", "max"), default="sum", help="F_sum^p or F_max^p")
    parser.add_argument(
        "--grad", action="store_true", help="add each network's gradient attention |dL/dx|"
    )
    parser.add_argument(
        "--layers", nargs="+", metavar="NAME", help="module names (default: each model's 'all')"
    )
    parser.add_argument("--out", default="attention.png", help="the PNG to write")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="image source")
    return parser.parse_args(argv)


def visualize(args: argparse.Namespace) -> Path:
    """Rebuild every run's network, load its ``student.pt`` and write the figure."""
    from atx import build
    from atx.checkpoints import load_weights
    from atx.models import layer_group_presets

    if args.images < 1:
        raise AtxError(f"--images={args.images} must be >= 1")
    if args.p <= 0:
        raise AtxError(f"--p={args.p} must be > 0")
    runs = [load_run(d) for d in [args.teacher, *args.students]]
    data = build.build_data(runs[1][1])
    data.setup()
    networks: dict[str, tuple[nn.Module, list[str]]] = {}
    for i, (run, cfg) in enumerate(runs):
        who = "teacher" if i == 0 else f"student {i}"
        model = build.build_network(cfg.model, "model", data.num_classes, data.in_channels)
        load_weights(model, run, who)
        if args.layers:
            layers = list(args.layers)
        else:
            layers = layer_group_presets(cfg.model.name).get("all", [])
            if not layers:
                raise AtxError(
                    f"model '{cfg.model.name}' ({run}) has no layer presets: pass --layers"
                )
        label = run_label(run, cfg)
        if label in networks:
            label = f"{label} [{run.name}]"
        networks[label] = (model, layers)
    counts = {lb: len(layers) for lb, (_, layers) in networks.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{lb}: {c}" for lb, c in counts.items())
        raise AtxError(
            f"the networks have different numbers of layer groups ({listing});"
            " pass --layers to compare the same groups"
        )
    images = pick_images(data, args.split, args.images)
    if images[0].shape[0] == 0:
        raise AtxError(f"the {args.split} split has no images")
    name = map_name(args.p, args.mode)
    title = f"{' vs '.join(networks)}: {name} attention, shared colour scale per group"
    cols = 1 + (counts[next(iter(counts))] + int(args.grad)) * len(networks)
    title = "\n".join(textwrap.wrap(title, width=max(40, int(cols * 14))))
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_attention_figure(
        out, data, args.images, networks, title, args.p, args.mode, args.grad, images
    )


def main(argv: list[str] | None = None) -> int:
    """Console script ``atx-visualize``; returns the exit status (2 on a user error)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse's own usage errors (already printed) and --help
        return int(e.code or 0)
    try:
        out = visualize(args)
    except AtxError as e:
        print(f"atx-visualize: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
