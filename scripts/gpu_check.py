"""The GPU check: what AT+KD epochs cost on the card at hand, alone and packed.

    python scripts/gpu_check.py --data <CIFAR-10 image folders> [--epochs 2] [--jobs 1 4 8]
    python scripts/gpu_check.py --cpu-smoke      # the same path on the CPU, tiny (a test)

Runs real ``atx-train`` processes of the Table 1 pair (WRN-16-1 <- WRN-16-2, ``distill=at_kd``,
a random teacher: weights change no timing) and prints, from each run's ``metrics.json``
(``epoch_seconds``, the last epoch: after warm-up and compilation):

* the epoch time of atx's default and of ``speed=fast``;
* packed: 1 / 4 / 8 runs at once on one GPU (local processes, as ``jobs_per_gpu`` packs a
  sweep), their mean epoch time and the throughput in run-epochs per hour;
* the hours a full Table 1 row (25 runs x 200 epochs) takes at the best packing.

Without ``--data`` a random CIFAR-shaped image folder is written (timing only). Sized to fit in
about 8 minutes on one large GPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TABLE1_RUN_EPOCHS = 25 * 200  # 5 methods x 5 seeds, 200 epochs each
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logger=csv", "figure_images=0", "checkpoint.every_n_steps=0"]


def random_cifar(root: Path, per_class: int) -> Path:
    """``root/{train,test}/<class>/<i>.png`` of random 32x32 images (timing only)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(per_class // 5, 1))):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def random_teacher(path: Path) -> Path:
    from atx.models import build_model

    torch.save(build_model("wrn", 10, 3, depth=16, width=2).state_dict(), path)
    return path


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "atx.train", *overrides, f"hydra.run.dir={run_dir}"]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ)


def last_epoch_seconds(run_dir: Path) -> float:
    summary = json.loads((run_dir / "metrics.json").read_text())
    return float(summary["epoch_seconds"][-1])


def run_together(out: Path, name: str, overrides: list[str], n: int) -> list[float]:
    """``n`` runs at once; each one's last-epoch seconds."""
    dirs = [out / f"{name}_{i}" for i in range(n)]
    procs = [start(d, [*overrides, f"seed={i}"]) for i, d in enumerate(dirs)]
    for p, d in zip(procs, dirs, strict=True):
        if p.wait() != 0:
            log = d.with_suffix(".log").read_text()[-2000:]
            raise SystemExit(f"gpu_check: {d.name} failed:\n{log}")
    return [last_epoch_seconds(d) for d in dirs]


def measure(args: argparse.Namespace, out: Path) -> dict:
    smoke = args.cpu_smoke
    data = Path(args.data) if args.data else random_cifar(out / "cifar", 10 if smoke else 1000)
    teacher = random_teacher(out / "teacher.pt")
    base = ["experiment=t1_wrn_16_1-wrn_16_2", "distill=at_kd", f"teacher.checkpoint={teacher}",
            f"data.root={data}", f"trainer.max_epochs={args.epochs}", *QUIET]
    if smoke:  # the same path, seconds on a CPU: a WRN-10-1 on a few images
        base += ["trainer=cpu", "model.depth=10", "data.batch_size=16",
                 "data.num_workers=0"]
        fast = ["speed=fast", "speed.compile=false"]  # compiling costs a minute on a CPU
    else:
        base += ["trainer=gpu"]
        fast = ["speed=fast"]
    result: dict = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu (smoke)"}
    result["default"] = run_together(out, "default", base, 1)[0]
    result["fast"] = run_together(out, "fast", [*base, *fast], 1)[0]
    packed = {}
    for n in args.jobs:  # one run alone is the default run above
        seconds = [result["default"]] if n == 1 else run_together(out, f"packed{n}", base, n)
        mean = sum(seconds) / len(seconds)
        packed[n] = {"epoch_s": mean, "run_epochs_per_hour": n * 3600 / mean}
    result["packed"] = packed
    best = max(v["run_epochs_per_hour"] for v in packed.values())
    result["table1_row_hours"] = TABLE1_RUN_EPOCHS / best
    return result


def report(r: dict) -> str:
    lines = [f"device: {r['device']}", "", "| AT+KD WRN-16-1 <- WRN-16-2 | epoch s |", "|---|---|",
             f"| atx default | {r['default']:.2f} |", f"| atx speed=fast | {r['fast']:.2f} |", "",
             "| runs at once | mean epoch s | run-epochs / hour |", "|---|---|---|"]
    for n, v in r["packed"].items():
        lines.append(f"| {n} | {v['epoch_s']:.2f} | {v['run_epochs_per_hour']:.0f} |")
    lines += ["", f"a Table 1 row (25 runs x 200 epochs) at the best packing: "
              f"{r['table1_row_hours']:.2f} h"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 image folders (default: random)")
    parser.add_argument("--epochs", type=int, default=2, help="per run; the last one is timed")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU path, tiny: a test")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; --cpu-smoke runs the same path on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        result = measure(args, out)
        result["wall_s"] = time.perf_counter() - began
    print(report(result))
    print(f"\n(wall {result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
