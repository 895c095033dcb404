"""The console script ``atx-visualize TEACHER STUDENT [STUDENT ...]``: the attention-map grid
of ``atx.figures`` for finished run directories, each network rebuilt from its run's config."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atx.attention import MapMode
from atx.checkpoints import STUDENT_FILE
from atx.data.spread import spread_over_classes
from atx.errors import AtxError, reason
from atx.figures import map_name, save_attention_figure


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
    parser.add_argument(
        "--mode", choices=MapMode.values(), default="sum", help="F_sum^p or F_max^p"
    )
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
            layers = layer_group_presets(cfg.model.name, model).get("all", [])
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
