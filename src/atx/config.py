"""The config schema (typed dataclasses registered with Hydra) and start-up validation.

The schema makes a misspelt key in the shell *or* in a preset file fail while Hydra composes
the config. Groups whose keys depend on the class they build (data, model, teacher, trainer,
logger) are checked against that class's signature by ``atx.train`` before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    """SGD with step decay; defaults are the paper's CIFAR recipe (authors' cifar.py)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2


@dataclass
class FinetuneConf:
    """Fine-tuning a pretrained student (paper Section 4.2.1): BN fixed, early layers frozen."""

    freeze_bn: bool = False  # every BN layer of the student in eval mode, its affine params fixed
    frozen_layers: list[str] = field(
        default_factory=list
    )  # module names, e.g. [conv1, bn1, layer1]


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
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    figure_images: int = 8  # validation images in the attention-map figures (0: no figures)
    figure_every_n_epochs: int = 20  # also log the figure every N epochs (0: only at the end)
    debug: bool = False  # true: show the full traceback of configuration errors


def register() -> None:
    """Store the schema as ``atx_schema`` (first entry of conf/train.yaml's defaults)."""
    ConfigStore.instance().store(name="atx_schema", node=TrainConf)
