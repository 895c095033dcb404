"""The default job (`make demo`): the paper's claim on a laptop, in a few minutes.

1. a WRN-10-2 teacher on 20,000 Fashion-MNIST training images (`experiment=demo_teacher`;
   Debian's dataset-fashion-mnist, no download), kept in outputs/demo/teachers/ and reused by
   the next `make demo` of the same config;
2. WRN-10-1 students on 1,000 of those images, 8 short epochs (`experiment=demo`): plain, with
   AT (F^2_sum on the three group outputs, beta = 1e3) and with AT+KD (`distill=at_kd_alpha05`:
   alpha = 0.5, as the paper's 0.9 leaves too little of the labels here), each over 3 seeds (the
   same seeds and data order for every method);
3. the table (test error mean ± std over the seeds, attention agreement), the verdicts (is a
   method's mean error lower than the plain student's by more than twice the larger seed
   std?), the error curves and the attention maps.

Every stage is the real `atx-train` command (``atx.study``): each run dir holds its config, CSV
metrics, checkpoints and exported student. Extra arguments are atx-train overrides for the
students, e.g. `python scripts/demo.py data.train_subset=2000`.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from atx.study import Study, run_study

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["none", "at", "at_kd_alpha05"],
                        help="distill presets; the first is the baseline")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/demo/<time>")
    parser.add_argument("overrides", nargs="*", help="atx-train overrides for the students")
    args = parser.parse_args()

    out = args.out or ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    names = {"none": "student WRN-10-1", "at": "student + AT", "kd": "student + KD",
             "at_kd": "student + AT+KD", "at_kd_alpha05": "student + AT+KD (alpha 0.5)",
             "fact": "student + F-ActT"}
    study = Study(
        title=("Fashion-MNIST: WRN-10-2 teacher (20,000 images, 3 epochs), WRN-10-1 students "
               "(1,000 images, 8 epochs); test error on 2,000 test images"),
        teacher=["experiment=demo_teacher", *QUIET],
        students=["experiment=demo", *QUIET, *args.overrides],
        methods={names.get(m, m): m for m in args.methods},
        seeds=args.seeds,
        baseline=names.get(args.methods[0], args.methods[0]),
        labels={"teacher": "teacher WRN-10-2"},
    )
    out.mkdir(parents=True, exist_ok=True)
    print(run_study(study, out, ROOT / "outputs" / "demo" / "teachers"))


if __name__ == "__main__":
    main()
