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
students, e.g. `python scripts/demo.py data.train_subset=2000`. `--tiny` runs the same pipeline
in seconds (64 teacher and 32 student images, one epoch, 2 seeds): a smoke test, not a result.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from atx.study import Study, run_study

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# --tiny: the whole pipeline in seconds, appended after the experiment presets
TINY_TEACHER = ["data.train_subset=64", "data.val_subset=32", "trainer.max_epochs=1",
                "figure_images=0"]
TINY_STUDENTS = ["data.train_subset=32", "data.val_subset=32", "trainer.max_epochs=1",
                 "trainer.check_val_every_n_epoch=1", "figure_images=0"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2"
                        " (--tiny: 0 1)")
    parser.add_argument("--methods", nargs="+", default=["none", "at", "at_kd_alpha05"],
                        help="distill presets; the first is the baseline")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/demo/<time>")
    parser.add_argument("--teachers", type=Path, default=ROOT / "outputs" / "demo" / "teachers",
                        help="where teachers are kept and reused")
    parser.add_argument("--tiny", action="store_true", help="a smoke run in seconds:"
                        " 64 teacher / 32 student images, 1 epoch")
    parser.add_argument("overrides", nargs="*", help="atx-train overrides for the students")
    args = parser.parse_args(argv)

    out = args.out or ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    seeds = args.seeds or ([0, 1] if args.tiny else [0, 1, 2])
    names = {"none": "student WRN-10-1", "at": "student + AT", "kd": "student + KD",
             "at_kd": "student + AT+KD", "at_kd_alpha05": "student + AT+KD (alpha 0.5)",
             "fact": "student + F-ActT"}
    title = ("Fashion-MNIST: WRN-10-2 teacher (20,000 images, 3 epochs), WRN-10-1 students "
             "(1,000 images, 8 epochs); test error on 2,000 test images")
    if args.tiny:
        title = ("Fashion-MNIST, --tiny smoke run (not a result): WRN-10-2 teacher (64 images,"
                 " 1 epoch), WRN-10-1 students (32 images, 1 epoch); test error on 32"
                 " images")
    study = Study(
        title=title,
        teacher=["experiment=demo_teacher", *QUIET, *(TINY_TEACHER if args.tiny else [])],
        students=[
            "experiment=demo",
            *QUIET,
            *(TINY_STUDENTS if args.tiny else []),
            *args.overrides,
        ],
        methods={names.get(m, m): m for m in args.methods},
        seeds=seeds,
        baseline=names.get(args.methods[0], args.methods[0]),
        labels={"teacher": "teacher WRN-10-2"},
    )
    out.mkdir(parents=True, exist_ok=True)
    print(run_study(study, out, args.teachers))


if __name__ == "__main__":
    main()
