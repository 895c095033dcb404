"""The GPU check: what AT+KD epochs cost on the card at hand, alone and packed.

    python scripts/gpu_check.py --data <CIFAR-10 image folders> [--epochs 2] [--jobs 1 4 8]
    python scripts/gpu_check.py --cpu-smoke      # the same path on the CPU, tiny (a test)
    python scripts/gpu_check.py --vit --data <CIFAR-10 image folders>   # a real ViT-from-CNN run

Runs real ``atx-train`` processes of the Table 1 pair (WRN-16-1 <- WRN-16-2, ``distill=at_kd``,
a random teacher: weights change no timing) and prints, from each run's ``metrics.json``
(``epoch_seconds``, the last epoch: after warm-up and compilation):

* the epoch time of atx's default, of ``speed=fast`` and of the GPU's fastest settings
  (``speed=fast`` + ``trainer.precision=bf16-mixed`` + ``speed.compile_mode=reduce_overhead``:
  CUDA graphs for the launch-bound small WRNs), beside the authors' loop re-created on the same
  card (``scripts/benchlib/epoch_rows.py``: cached uint8 data on the device, per-batch
  crop/flip, their step and per-epoch test pass; in this process, after the atx runs);
* packed: 1 / 4 / 8 runs at once on one GPU (local processes, as ``jobs_per_gpu`` packs a
  sweep), their mean epoch time and the throughput in run-epochs per hour;
* the hours a full Table 1 row (25 runs x 200 epochs) takes at the best packing.

Without ``--data`` a random CIFAR-shaped image folder is written (timing only). Sized, by
estimate (it has not run on a GPU yet), for about 8 minutes on one large GPU with the defaults.

``--vit``: a real (short) CIFAR-10 run of a ViT-Ti/4 student from a CNN teacher, under 10
minutes on one large GPU: a WRN-16-2 teacher (15 epochs, the authors' lr drops scaled), then the
ViT student without transfer and with AT (``experiment=cifar10_vit_tiny-wrn_16_2``, 30 epochs,
both at once on the GPU); prints the test errors, the attention agreement and the epoch times.
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


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "atx.train", *overrides, f"hydra.run.dir={run_dir}"]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ)


def last_epoch_seconds(run_dir: Path) -> float:
    summary = json.loads((run_dir / "metrics.json").read_text())
    return float(summary["epoch_seconds"][-1])


def launch(out: Path, name: str, overrides: list[str], n: int) -> list[tuple]:
    """``n`` runs started at once: (process, run dir) each."""
    dirs = [out / f"{name}_{i}" for i in range(n)]
    return [(start(d, [*overrides, f"seed={i}"]), d) for i, d in enumerate(dirs)]


def collect(runs: list[tuple]) -> list[float]:
    """Wait for ``runs``; each one's last-epoch seconds."""
    for p, d in runs:
        if p.wait() != 0:
            log = d.with_suffix(".log").read_text()[-2000:]
            raise SystemExit(f"gpu_check: {d.name} failed:\n{log}")
    return [last_epoch_seconds(d) for _, d in runs]


def run_together(out: Path, name: str, overrides: list[str], n: int) -> list[float]:
    """``n`` runs at once; each one's last-epoch seconds."""
    return collect(launch(out, name, overrides, n))


def measure(args: argparse.Namespace, out: Path) -> dict:
    smoke = args.cpu_smoke
    data = Path(args.data) if args.data else random_cifar(out / "cifar", 10 if smoke else 1000)
    from benchlib.steps import write_random_teacher

    teacher = write_random_teacher(out / "teacher.pt")
    base = ["experiment=t1_wrn_16_1-wrn_16_2", "distill=at_kd", f"teacher.checkpoint={teacher}",
            f"data.root={data}", f"trainer.max_epochs={args.epochs}", *QUIET]
    if smoke:  # the same path, seconds on a CPU: a WRN-10-1 on a few images
        base += ["trainer=cpu", "model.depth=10", "data.batch_size=16",
                 "data.num_workers=0"]
        fast = ["speed=fast", "speed.compile=false"]  # compiling costs a minute on a CPU
        fastest = [*fast, "trainer.precision=bf16-mixed"]
    else:
        base += ["trainer=gpu"]
        fast = ["speed=fast"]
        fastest = [*fast, "trainer.precision=bf16-mixed", "speed.compile_mode=reduce_overhead"]
    result: dict = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu (smoke)"}
    if smoke:  # timing means nothing on a CPU: every run at once, to test the path quickly
        started = {n: launch(out, f"packed{n}", base, n) for n in args.jobs if n > 1}
        alone = [launch(out, name, [*base, *extra], 1) for name, extra in
                 (("default", []), ("fast", fast), ("fastest", fastest))]
        result["default"], result["fast"], result["fastest"] = (collect(r)[0] for r in alone)
        timed = {n: collect(r) for n, r in started.items()}
    else:  # one configuration at a time: the GPU is timed alone
        result["default"] = run_together(out, "default", base, 1)[0]
        result["fast"] = run_together(out, "fast", [*base, *fast], 1)[0]
        try:  # CUDA graphs had not run on a GPU when this was written: a failure is reported
            result["fastest"] = run_together(out, "fastest", [*base, *fastest], 1)[0]
        except SystemExit as failed:
            result["fastest"], result["fastest_error"] = None, str(failed)[-2000:]
        timed = {n: run_together(out, f"packed{n}", base, n) for n in args.jobs if n > 1}
    result["authors"] = authors_loop_epoch(out, data, args.epochs, 16 if smoke else 128,
                                           "cpu" if smoke else "cuda")
    packed = {}
    for n in args.jobs:  # one run alone is the default run above
        seconds = [result["default"]] if n == 1 else timed[n]
        mean = sum(seconds) / len(seconds)
        packed[n] = {"epoch_s": mean, "run_epochs_per_hour": n * 3600 / mean}
    result["packed"] = packed
    best = max(v["run_epochs_per_hour"] for v in packed.values())
    result["table1_row_hours"] = TABLE1_RUN_EPOCHS / best
    return result


def authors_loop_epoch(out: Path, data: Path, epochs: int, batch_size: int, device: str) -> float:
    """The authors' loop re-created, on as many cached (random) images as ``data`` has: the
    seconds of its last of ``epochs`` epochs."""
    from benchlib.epoch_rows import AuthorsLoop

    n_train, n_test = (sum(f.is_file() for f in (data / split).glob("*/*"))
                       for split in ("train", "test"))
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)

    cached = {"x_train": images(n_train), "y_train": torch.randint(0, 10, (n_train,), generator=g),
              "x_test": images(n_test), "y_test": torch.randint(0, 10, (n_test,), generator=g)}
    loop = AuthorsLoop(cached, batch_size, out / "authors", device)
    return [loop.epoch(e) for e in range(epochs)][-1]["epoch"]


def vit_commands(data: str, out: Path, epochs: int = 30) -> list[list[str]]:
    """The teacher's command, then the two students' (run together)."""
    teacher = [
        "experiment=cifar10_teacher_wrn_16_2", f"data.root={data}", "trainer=gpu",
        "trainer.max_epochs=15", "optim.milestones=[5,10,13]", *QUIET,
        f"hydra.run.dir={out / 'teacher'}",
    ]
    students = [
        ["experiment=cifar10_vit_tiny-wrn_16_2", f"distill={d}", f"data.root={data}",
         "trainer=gpu", f"teacher.checkpoint={out / 'teacher'}", f"trainer.max_epochs={epochs}",
         *QUIET, f"hydra.run.dir={out / d}"]
        for d in ("none", "at")
    ]
    return [teacher, *students]


def vit_run(data: str, out: Path) -> str:
    teacher, *students = vit_commands(data, out)
    for group in ([teacher], students):
        procs = [subprocess.Popen([sys.executable, "-m", "atx.train", *cmd], cwd=ROOT)
                 for cmd in group]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("gpu_check --vit: a run failed (its log is above)")
    lines = ["| run | test error % | agreement (mean of groups) | last epoch s |",
             "|---|---|---|---|"]
    for name in ("teacher", "none", "at"):
        m = json.loads((out / name / "metrics.json").read_text())
        agree = [v for k, v in m.items() if k.startswith("val/agreement/")]
        mean = f"{sum(agree) / len(agree):.3f}" if agree else "-"
        lines.append(f"| {name} | {m['val/error']:.2f} | {mean} | {m['epoch_seconds'][-1]:.2f} |")
    return "\n".join(lines)


def seconds(value: float | None) -> str:
    return "failed (below)" if value is None else f"{value:.2f}"


def report(r: dict) -> str:
    lines = [f"device: {r['device']}", "", "| AT+KD WRN-16-1 <- WRN-16-2 | epoch s |", "|---|---|",
             f"| authors' loop (re-created) | {r['authors']:.2f} |",
             f"| atx default | {r['default']:.2f} |", f"| atx speed=fast | {r['fast']:.2f} |",
             f"| atx fastest (speed=fast, bf16-mixed, CUDA graphs) | {seconds(r['fastest'])} |",
             "", *(f"authors' loop / {k}: {r['authors'] / r[k]:.2f}x" for k in
                   ("default", "fast", "fastest") if r[k]), "",
             "| runs at once | mean epoch s | run-epochs / hour |", "|---|---|---|"]
    for n, v in r["packed"].items():
        lines.append(f"| {n} | {v['epoch_s']:.2f} | {v['run_epochs_per_hour']:.0f} |")
    lines += ["", f"a Table 1 row (25 runs x 200 epochs) at the best packing: "
              f"{r['table1_row_hours']:.2f} h"]
    if r.get("fastest_error"):
        lines += ["", "the fastest settings failed:", r["fastest_error"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 image folders (default: random)")
    parser.add_argument("--epochs", type=int, default=2, help="per run; the last one is timed")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU path, tiny: a test")
    parser.add_argument("--vit", action="store_true", help="a real ViT-from-CNN CIFAR-10 run")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; --cpu-smoke runs the same path on the CPU")
    if args.vit:
        if not args.data:
            raise SystemExit("gpu_check --vit: give --data <CIFAR-10 image folders>")
        out = args.out or ROOT / "outputs" / "gpu_check_vit"
        print(vit_run(args.data, out))
        return {}
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
