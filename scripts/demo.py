"""The default job (`make demo`): the paper's claim on a laptop, in a few minutes.

1. a WRN-10-2 teacher on all 60,000 Fashion-MNIST training images (Debian's
   dataset-fashion-mnist, no download); kept in outputs/demo/teachers/ and reused next time;
2. WRN-10-1 students on a small subset of those images, short: plain, with AT (F^2_sum on the
   three group outputs, beta = 1e3) and with AT+KD, each over 3 seeds (same seeds, same data
   order for every method);
3. the table (test error mean ± std over the seeds, attention agreement), the verdicts (is a
   method's mean error lower than the plain student's by more than twice the larger seed
   std?), the error curves and the attention maps.

Every stage is the real `atx-train` command (``atx.study``): each run dir holds its config, CSV
metrics, checkpoints and exported student.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from atx.study import Study, run_study

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10, help="WRN depth of both networks")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--teacher-images", type=int, default=None, help="default: all 60,000")
    parser.add_argument("--epochs", type=int, default=4, help="student epochs")
    parser.add_argument("--train-subset", type=int, default=2000, help="student images")
    parser.add_argument("--val-subset", type=int, default=2000, help="test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["none", "at", "at_kd"],
                        help="distill presets; the first is the baseline")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/demo/<time>")
    args = parser.parse_args()

    out = args.out or ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    d, e = args.depth, args.epochs
    common = ["experiment=demo", f"data.val_subset={args.val_subset}",
              "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false"]  # fmt: skip
    teacher_images = args.teacher_images or "null"
    student = f"student WRN-{d}-1"
    names = {"none": student, "at": f"{student} + AT", "kd": f"{student} + KD",
             "at_kd": f"{student} + AT+KD", "fact": f"{student} + F-ActT"}  # fmt: skip
    study = Study(
        title=(f"Fashion-MNIST: WRN-{d}-2 teacher ({args.teacher_epochs} epochs, "
               f"{args.teacher_images or 60000} images), WRN-{d}-1 students ({e} epochs, "
               f"{args.train_subset} images), test error on {args.val_subset} test images"),
        teacher=[*common, "model=wrn_16_2", f"model.depth={d}", "seed=0",
                 f"data.train_subset={teacher_images}",
                 f"trainer.max_epochs={args.teacher_epochs}",
                 f"optim.milestones=[{args.teacher_epochs}]", "name=demo_teacher"],
        students=[*common, "model=wrn_16_1", f"model.depth={d}", "teacher=wrn_16_2",
                  f"teacher.depth={d}", f"data.train_subset={args.train_subset}",
                  f"trainer.max_epochs={e}", f"optim.milestones=[{max(1, round(0.75 * e))}]"],
        methods={names.get(m, m): m for m in args.methods},
        seeds=args.seeds,
        baseline=names.get(args.methods[0], args.methods[0]),
        labels={"teacher": f"teacher WRN-{d}-2"},
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    print(run_study(study, out, ROOT / "outputs" / "demo" / "teachers"))


if __name__ == "__main__":
    main()
