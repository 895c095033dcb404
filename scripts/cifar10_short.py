"""Real CIFAR-10 on a CPU in about an hour: a WRN-16-2 teacher, then WRN-16-1 students with
CE / AT / KD / AT+KD over seeds, on a short schedule (not the paper's 200 epochs).

    python scripts/cifar10_short.py --data-root <dir with train/<class>/ and test/<class>/>

Writes table.md (test error mean ± std over seeds, attention agreement), curves.png (test error
per epoch) and attention.png into --out (default outputs/cifar10_short/<time>/); the teacher is
kept in outputs/cifar10_short/teachers/ and reused by the next run of the same config.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from atx.study import Study, run_study

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True,
                        help="CIFAR-10: torchvision's download dir or image folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = ROOT / "outputs" / "cifar10_short"
    out = args.out or base / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             f"data.root={args.data_root.resolve()}"]
    study = Study(
        title="CIFAR-10, short schedule (teacher 5 epochs, students 3; not the paper's 200)",
        teacher=["experiment=cifar10_short_teacher", *quiet],
        students=["experiment=cifar10_short", *quiet],
        methods={"student": "none", "student + AT": "at", "student + KD": "kd",
                 "student + AT+KD": "at_kd"},
        seeds=args.seeds,
        labels={"teacher": "teacher WRN-16-2", "student": "student WRN-16-1"},
    )
    out.mkdir(parents=True, exist_ok=True)
    print(run_study(study, out, base / "teachers"))


if __name__ == "__main__":
    main()
