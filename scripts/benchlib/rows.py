"""What the step benchmark times (its rows and probes) and the ratios it reports."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from atx.speed import SpeedConf

SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"  # workers and probes re-enter it
DISTILL = {
    "student": "none",
    "KD": "kd",
    "AT": "at",
    "AT+KD": "at_kd",
    "F-ActT": "fact",
    "grad-AT": "grad_at",
    "symmetry": "symmetry",
    "min-l2": "min_l2",
}
# the student of a row (its name's prefix, "" = WRN-16-1) -> its composed-config overrides
STUDENTS = {
    "": ("model=wrn_16_1",),
    # ViT-Ti/4 (12 blocks, dim 192, 3 heads) on 32x32: an 8x8 grid; AT pairs its 4 preset
    # blocks with the WRN-16-2's 8x8 group3 (README "Vision transformers and timm")
    "ViT": (
        "model=timm",
        "model.arch=vit_tiny_patch16_224",
        "model.img_size=32",
        "model.patch_size=4",
        "distill.at.student_layers=auto",
    ),
}
NOISY = 1.3  # p90 / p10 above this flags a row as noisy
GROUPS = ("group1", "group2", "group3")


@dataclass(frozen=True)
class Row:
    """One timed configuration: a method on a path, with speed options."""

    method: str  # student | KD | AT | AT+KD | F-ActT | grad-AT | ... | teacher forward | ...
    path: str  # atx | raw | authors | forward
    options: str = ""  # label of the speed options ("" = float32, NCHW, eager)
    channels_last: bool = False
    precision: str = "32-true"  # the Trainer's precision (raw: bf16 autocast when bf16-mixed)
    teacher_precision: str = "same"
    inference_mode: bool = False
    compile: bool = False
    processes: int = 1  # > 1: DDP over that many CPU processes (gloo), threads split evenly
    allocator: str = "mallopt"  # "default": glibc as shipped, in a process of its own
    student: str = ""  # a key of STUDENTS: "" = WRN-16-1, "ViT" = ViT-Ti/4 (atx path only)

    def __post_init__(self) -> None:
        if self.student and self.path != "atx":  # the bare loops know only the WRN groups
            raise ValueError(f"a {self.student} student runs on the atx path only")

    @property
    def own_process(self) -> bool:
        """Runs in worker subprocesses (``workers.WorkerRunner``), not in the benchmark's."""
        return self.processes > 1 or self.allocator != "mallopt"

    @property
    def label(self) -> str:
        """The method with its student: "AT+KD", "ViT AT+KD"."""
        return f"{self.student} {self.method}" if self.student else self.method

    @property
    def name(self) -> str:
        if self.path == "forward":
            return self.method
        return f"{self.label} {self.path}" + (f" {self.options}" if self.options else "")

    @property
    def speed(self) -> SpeedConf:
        return SpeedConf(
            channels_last=self.channels_last,
            compile=self.compile,
            teacher_precision=self.teacher_precision,
            teacher_inference_mode=self.inference_mode,
        )


TEACHER = Row("teacher forward", "forward")
TEACHER_GRAD = Row("teacher fwd+bwd", "forward")
ATKD = Row("AT+KD", "atx")
# the fastest correct options on our 2-core CPUs (bf16 is slower than float32 there, see
# docs/benchmarks.md); on a GPU also try precision="bf16-mixed" / "16-mixed"
FASTEST = dict(channels_last=True, inference_mode=True, compile=True)
ROWS = (
    TEACHER,
    TEACHER_GRAD,
    *(Row(m, "atx") for m in ("student", "KD", "AT", "AT+KD", "F-ActT", "grad-AT")),
    *(Row(m, "raw") for m in ("student", "KD", "AT", "AT+KD")),
    *(Row(m, "authors") for m in ("student", "KD", "AT", "AT+KD")),
    # the authors' step as they ship it: glibc's default allocator (a process of its own)
    Row("AT+KD", "authors", "glibc malloc", allocator="default"),
    replace(ATKD, options="channels_last", channels_last=True),
    replace(ATKD, options="bf16-mixed", precision="bf16-mixed"),
    replace(ATKD, options="teacher bf16+inference", teacher_precision="bf16", inference_mode=True),
    replace(ATKD, options="compile", compile=True),
    replace(ATKD, options="fastest", **FASTEST),
    Row("AT+KD", "raw", "fastest", channels_last=True, compile=True),  # no_grad teacher
    # the same global batch over 2 DDP processes of half the threads each (BN statistics per
    # process: half the batch each, as any DDP run without SyncBatchNorm)
    replace(ATKD, options="fastest, ddp 2 processes", processes=2, **FASTEST),
    # a vision-transformer student: what the AT term on its block tokens costs over KD
    *(Row(m, "atx", student="ViT") for m in ("KD", "AT+KD")),
)
EXTRA_ROWS = (
    Row("symmetry", "atx"),  # by --rows only: slow steps
    Row("min-l2", "atx"),
    replace(ATKD, options="ddp 2 processes", processes=2),  # the test's DDP row: no compile
)
BY_NAME = {r.name: r for r in (*ROWS, *EXTRA_ROWS)}
# probes: (row, allocator) in fresh processes; "default" = glibc as shipped (ATX_MALLOC=0)
PROBES = (
    (TEACHER.name, "default"),
    (TEACHER.name, "mallopt"),
    (TEACHER.name, "env"),
    ("student atx", "mallopt"),
    ("AT atx", "mallopt"),
    ("AT+KD atx", "default"),
    ("AT+KD atx", "mallopt"),
    ("AT+KD authors", "default"),
)
QUICK_PROBES = ((TEACHER.name, "default"), (TEACHER.name, "mallopt"))

# (label, numerator rows, denominator rows): a ratio of summed median step times
RATIOS = (
    *((f"atx / raw: {m}", (f"{m} atx",), (f"{m} raw",)) for m in ("student", "KD", "AT", "AT+KD")),
    ("atx / raw: AT+KD fastest", ("AT+KD atx fastest",), ("AT+KD raw fastest",)),
    *(
        (f"{m} / (student + teacher forward), {path}", (f"{m} {path}",),
         (f"student {path}", TEACHER.name))
        for m, path in (("AT", "atx"), ("AT", "raw"), ("AT", "authors"), ("AT+KD", "atx"),
                        ("KD", "atx"), ("F-ActT", "atx"))
    ),
    (
        "grad-AT / (student + teacher fwd+bwd), atx",
        ("grad-AT atx",),
        ("student atx", TEACHER_GRAD.name),
    ),
    ("symmetry / student, atx", ("symmetry atx",), ("student atx",)),
    ("ViT AT+KD / ViT KD, atx (target <= 1.05)", ("ViT AT+KD atx",), ("ViT KD atx",)),
    ("min-l2 / student, atx", ("min-l2 atx",), ("student atx",)),
    *(
        (f"speed-up vs authors{released}: AT+KD {label}", (f"AT+KD authors{malloc}",), (name,))
        for released, malloc in (("", ""), (" as released (glibc malloc)", " glibc malloc"))
        for label, name in (
            ("float32 NCHW (target >= 1.0)", "AT+KD atx"),
            ("fastest (target >= 1.5)", "AT+KD atx fastest"),
            ("fastest, ddp 2 processes (target >= 1.5)", "AT+KD atx fastest, ddp 2 processes"),
        )
    ),
    *(
        (f"speed-up of {r.options}: AT+KD", ("AT+KD atx",), (r.name,))
        for r in ROWS
        if r.label == "AT+KD" and r.path == "atx" and r.options
    ),
)


def ratios(med: dict[str, float]) -> dict[str, float]:
    """Every ratio of RATIOS whose rows were measured."""
    return {
        label: sum(med[n] for n in num) / sum(med[d] for d in den)
        for label, num, den in RATIOS
        if all(r in med for r in (*num, *den))
    }
