"""The config schema (typed dataclasses registered with Hydra) and start-up validation.

The schema makes a misspelt key in the shell *or* in a preset file fail while Hydra composes
the config. Groups whose keys depend on the class they build (data, model, teacher, trainer,
logger) are checked against that class's signature by ``atx.train`` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from atx.errors import AtxError


@dataclass
class ScheduleConf:
    """How a loss weight changes over epochs (``atx.losses.Schedule``)."""

    kind: str = "constant"  # constant | step | linear
    milestones: list[int] = field(default_factory=list)  # step: multiply by gamma at each
    gamma: float = 0.1
    final: float = 0.0  # linear: weight reached at the last epoch


@dataclass
class KDConf:
    alpha: float = 0.0  # 0 = off; loss = (1 - alpha) * CE + alpha * KD
    temperature: float = 4.0
    # batchmean: T^2 KL, batch mean (authors' code since 2018) | jan2017: 2/classes of that
    scale: str = "batchmean"


@dataclass
class ATConf:
    beta: float = 0.0  # 0 = off
    p: float = 2.0  # exponent of the map function F^p
    mode: str = "sum"  # sum | max
    reduction: str = "code"  # code (authors' release, beta ~ 1e3) | paper (Eq. 2 as printed)
    student_layers: Any = "all"  # preset name of the model (all, last2, last) or a list of names
    teacher_layers: Any = None  # None: same preset / list as the student
    interpolate: bool = False  # resize attention maps of different spatial size
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@dataclass
class FActTConf:
    beta: float = 0.0  # 0 = off
    student_layers: Any = "all"
    teacher_layers: Any = None
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@dataclass
class GradATConf:
    """Gradient-based AT (Eq. 4): beta/2 ||J_s - J_t||^2 on input gradients."""

    beta: float = 0.0  # 0 = off
    normalize: bool = False  # l2-normalise J per sample first
    reduce_channels: bool = False  # sum of squares over input channels: a spatial map
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@dataclass
class GradRegConf:
    """A teacher-free input-gradient regulariser: symmetry norm (Eq. 6) or min-l2."""

    beta: float = 0.0  # 0 = off
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@dataclass
class DistillConf:
    kd: KDConf = field(default_factory=KDConf)
    at: ATConf = field(default_factory=ATConf)
    fact: FActTConf = field(default_factory=FActTConf)
    grad_at: GradATConf = field(default_factory=GradATConf)
    symmetry: GradRegConf = field(default_factory=GradRegConf)
    min_l2: GradRegConf = field(default_factory=GradRegConf)


@dataclass
class OptimConf:
    """SGD with step decay; the defaults are the paper's CIFAR values (authors' cifar.py)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    # standard: torch's MultiStepLR, momentum kept | authors: cifar.py, lr drops at the start
    # of each 1-based milestone epoch and SGD is re-created there (atx.optim)
    recipe: str = "standard"


@dataclass
class FinetuneConf:
    """Fine-tuning a pretrained student (paper Section 4.2.1): BN fixed, early layers frozen."""

    freeze_bn: bool = False  # every BN layer of the student in eval mode, its affine params fixed
    frozen_layers: list[str] = field(
        default_factory=list
    )  # module names, e.g. [conv1, bn1, layer1]


@dataclass
class SpeedConf:
    """Speed switches (``atx.speed``); none changes what is trained beyond float rounding."""

    channels_last: bool = False  # NHWC memory layout for student, teacher and batches
    compile: bool = False  # torch.compile student and teacher (eager for input-gradient terms)
    teacher_precision: str = "same"  # same | bf16 | fp16: autocast dtype of the teacher forward
    teacher_inference_mode: bool = False  # teacher under torch.inference_mode, not no_grad
    allocator: bool = True  # CPU: glibc mallopt so freed activations are reused, not re-faulted


@dataclass
class CheckpointConf:
    """Checkpoints in ``<run>/checkpoints``: last + best at every epoch end, and these."""

    every_n_steps: int = 1000  # also save every N training steps, mid-epoch (0: off)
    keep_last: int = 2  # step checkpoints kept (the newest)


@dataclass
class TrainConf:
    name: str = "run"
    seed: int = 0
    data: Any = MISSING
    model: Any = MISSING
    teacher: Any = None
    distill: DistillConf = field(default_factory=DistillConf)
    optim: OptimConf = field(default_factory=OptimConf)
    finetune: FinetuneConf = field(default_factory=FinetuneConf)
    speed: SpeedConf = field(default_factory=SpeedConf)
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    figure_images: int = 8  # validation images in the attention-map figures (0: no figures)
    figure_every_n_epochs: int = 20  # also log the figure every N epochs (0: only at the end)
    debug: bool = False  # true: show the full traceback of configuration errors
    nan_policy: str = "stop"  # a NaN/inf loss: stop (name step, term, group) | skip the step
    nan_skip_limit: int = 10  # skip: stop anyway after this many non-finite steps in a row
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    resume: str | None = None  # a run dir: continue that run from its newest checkpoint


def check_schema_keys(node: Any, schema: type = TrainConf, prefix: str = "") -> None:
    """Every key of the composed config under a schema'd group must be in the schema: Hydra
    lets ``+distill.at.bta=3`` from the shell add a key it would refuse without the ``+``."""
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise AtxError(
                f"unknown option '{prefix}{key}'{hint}; valid options: {', '.join(sorted(hints))}"
            )
        if dataclasses.is_dataclass(hints[key]):
            check_schema_keys(node[key], hints[key], f"{prefix}{key}.")


def composition_error_line(error: BaseException) -> str:
    """Hydra's multi-line composition error (unknown key or wrong type from the shell, unknown
    preset) as one line, with a close match where there is one."""
    text = str(error).split("Config search path:")[0]
    options = [ln.strip() for ln in text.splitlines() if ln.startswith("\t")]
    head = [ln.strip().rstrip(".:") for ln in text.splitlines() if ln.strip()]
    head = [ln for ln in head if ln not in options]
    cause = error.__cause__
    if cause is not None:  # an OmegaConf error: unknown key or a value of the wrong type
        schema = getattr(cause, "object_type", None)
        key, full_key = str(getattr(cause, "key", "")), str(getattr(cause, "full_key", ""))
        is_schema = dataclasses.is_dataclass(schema)
        fields = [f.name for f in dataclasses.fields(schema)] if is_schema else []
        close = [c for c in difflib.get_close_matches(key, fields, n=1) if c != key]
        where = full_key.rpartition(".")[0]
        hint = f" (did you mean '{where + '.' if where else ''}{close[0]}'?)" if close else ""
        line = f"{head[0]}: {str(cause).splitlines()[0]}{hint}"
        if not fields and len(head) > 1:  # a free-form group (trainer, data): + adds a key
            line += f"; {head[1][0].lower()}{head[1][1:]}"
        return line
    missing = re.search(r"Could not find '[^/']+/([^']+)'", text)
    close = difflib.get_close_matches(missing.group(1), options, n=1) if missing else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    rest = f"; {head[-1].lower()}: {', '.join(options)}" if options and len(head) > 1 else ""
    return f"{head[0]}{hint}{rest}" if options else "; ".join(head)


def register() -> None:
    """Store the schema as ``atx_schema`` (first entry of conf/train.yaml's defaults)."""
    ConfigStore.instance().store(name="atx_schema", node=TrainConf)
