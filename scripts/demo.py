"""The default job (`make demo`): the paper's two-stage recipe, small enough for a laptop.

1. train a teacher (WRN-10-2) on Fashion-MNIST (Debian's dataset-fashion-mnist, no download);
2. train the same student (WRN-10-1, same seed) twice: without and with attention transfer
   (F^2_sum on the three group outputs, beta = 1e3) from that teacher;
3. print teacher / student / student+AT test error and write a PNG of their attention maps.

Every stage is the real `atx-train` command, so each run dir under outputs/demo/ holds its
config, CSV metrics, checkpoints and exported student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def atx_train(run_dir: Path, overrides: list[str]) -> dict:
    """Run one `atx-train` job into ``run_dir``; returns its metrics.json."""
    cmd = [sys.executable, "-m", "atx.train", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"$ atx-train {' '.join(overrides)} hydra.run.dir={run_dir}", flush=True)
    began = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"demo: stage failed ({run_dir.name}):\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"  -> test error {metrics['val/error']:.2f}% ({time.perf_counter() - began:.0f} s)")
    return metrics


def attention_figure(out: Path, errors: dict[str, float], depth: int) -> Path:
    """Teacher, student and student+AT attention maps of the same test images, one PNG."""
    from atx.data import FashionMNISTDataModule
    from atx.models import build_model
    from atx.visualize import save_attention_figure

    data = FashionMNISTDataModule()
    data.setup()
    groups = ["group1", "group2", "group3"]
    networks = {}
    for run, label, width in (("teacher", "teacher", 2), ("student", "student", 1),
                              ("student_at", "student+AT", 1)):  # fmt: skip
        model = build_model("wrn", num_classes=10, in_channels=1, depth=depth, width=width)
        model.load_state_dict(torch.load(out / run / "student.pt", weights_only=True))
        networks[f"{label} ({errors[run]:.1f}%)"] = (model, groups)
    title = (f"Fashion-MNIST: WRN-{depth}-2 teacher, WRN-{depth}-1 student without / with AT"
             " (test error)")  # fmt: skip
    return save_attention_figure(out / "attention.png", data, 6, networks, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10, help="WRN depth of both networks")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--val-subset", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/demo/<time>")
    args = parser.parse_args()

    out = args.out or ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    e = args.epochs
    common = [
        "experiment=demo",  # conf/experiment/demo.yaml: CSV logger, subsets, short schedule
        f"data.train_subset={args.train_subset}",
        f"data.val_subset={args.val_subset}",
        f"trainer.max_epochs={e}",
        f"optim.milestones=[{max(1, round(0.67 * e))}]",  # one x0.2 drop near the end
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "seed=0",
        f"model.depth={args.depth}",
    ]
    began = time.perf_counter()
    teacher = ["teacher=wrn_16_2", f"teacher.depth={args.depth}",
               f"teacher.checkpoint={out / 'teacher'}"]  # fmt: skip
    runs = {
        "teacher": [*common, "model=wrn_16_2", "name=demo_teacher"],
        # the plain student is given the teacher too, only to measure attention agreement
        "student": [*common, "model=wrn_16_1", "name=demo_student", *teacher],
        "student_at": [*common, "model=wrn_16_1", "name=demo_student_at", "distill=at",
                       *teacher],
    }  # fmt: skip
    metrics = {run: atx_train(out / run, overrides) for run, overrides in runs.items()}
    errors = {run: m["val/error"] for run, m in metrics.items()}
    figure = attention_figure(out, errors, args.depth)

    print(f"\nFashion-MNIST, {args.train_subset} training images, {e} epochs, "
          f"test error on {args.val_subset} test images:\n")  # fmt: skip
    print("| network | test error (%) | best epoch (%) | attention agreement with the teacher |")
    print("|---|---|---|---|")
    d = args.depth
    labels = {"teacher": f"teacher WRN-{d}-2", "student": f"student WRN-{d}-1",
              "student_at": f"student WRN-{d}-1 + AT"}  # fmt: skip
    for run, label in labels.items():
        m = metrics[run]
        agree = [f"{m[k]:.3f}" for k in sorted(m) if k.startswith("val/agreement/")]
        print(f"| {label} | {m['val/error']:.2f} | {m['best/val_error']:.2f} | "
              f"{' / '.join(agree) or '-'} |")  # fmt: skip
    print(
        "\n(agreement: cosine similarity of student and teacher attention maps, F^2_sum, per"
        " group 1 / 2 / 3, averaged over the test images; 1 = the teacher's own attention)"
    )
    print(f"\nattention maps: {figure}\nrun dirs: {out}")
    print(f"total time: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
