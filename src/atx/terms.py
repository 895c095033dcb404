"""The loss terms of distillation, each declared once: its options (a dataclass, the keys of
``distill.<name>``), what it reads, and its loss (torch only).

* Cross-entropy on the true labels, ``L(W_S, x)`` of Eq. 2 (always on).
* Knowledge distillation (Hinton et al., 2015), paper Section 3.1 / 4.1:
  ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.
* Activation-based attention transfer, Eq. 2 (``atx.attention``).
* Full-activation transfer F-ActT, Section 4.1.2: l2 on l2-normalised full activations, with a
  learned 1x1 convolution where student and teacher channel counts differ.
* Gradient-based attention, Section 3.2 (``atx.gradient_attention``): grad-AT (Eq. 4), the
  symmetry norm (Eq. 6) and min-l2; these need input gradients, which the module computes.

A new term is one more class here (or in any module imported before ``atx.config.register``)
and a YAML preset in ``conf/distill/``; see ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from atx.attention import MapMode, Reduction, at_loss
from atx.errors import AtxError
from atx.gradient_attention import grad_at_loss, min_l2_loss, symmetry_loss
from atx.losses import (
    KDScale,
    LayerPairTerm,
    Schedule,
    ScheduleConf,
    StepOutputs,
    Term,
    TermSetup,
    fact_loss,
    kd_loss,
    register_term,
)
from atx.options import check_number


@dataclass
class CEConf:
    # atx's option for ViT recipes (the paper's CE has none): targets (1 - ls) on the true
    # class plus ls / classes on every class, as F.cross_entropy's label_smoothing
    label_smoothing: float = 0.0


@register_term
class CrossEntropy(Term):
    """Cross-entropy with the true labels, ``L(W_S, x)``; weight 1 minus KD's alpha. Always
    on (the builder adds it), so its options hold no weight."""

    name = "ce"
    Conf = CEConf

    def __init__(self, weight: Schedule, label_smoothing: float = 0.0) -> None:
        super().__init__(weight)
        self.label_smoothing = label_smoothing

    @classmethod
    def check(cls, conf: CEConf, key: str) -> None:
        if not 0 <= conf.label_smoothing < 1:
            raise AtxError(
                f"{key}.label_smoothing={conf.label_smoothing} must lie in [0, 1) (0: plain CE)"
            )

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        logits = out.logits.float()
        loss = F.cross_entropy(logits, out.targets, label_smoothing=self.label_smoothing)
        return {self.name: loss}


@dataclass
class KDConf:
    alpha: float = 0.0  # 0 = off; loss = (1 - alpha) * CE + alpha * KD
    temperature: float = 4.0
    scale: KDScale = KDScale.batchmean  # batchmean (authors since 2018) | jan2017 (2/classes)


@register_term
class KnowledgeDistillation(Term):
    """Hinton KD; its weight is alpha, and the CE term gets 1 - alpha."""

    name = "kd"
    Conf = KDConf
    needs_teacher = True
    shares_ce_weight = True

    def __init__(
        self, weight: Schedule, temperature: float = 4.0, scale: KDScale | str = "batchmean"
    ) -> None:
        super().__init__(weight)
        self.temperature, self.scale = temperature, scale

    @classmethod
    def weight_of(cls, conf: KDConf) -> float:
        return conf.alpha

    @classmethod
    def check(cls, conf: KDConf, key: str) -> None:
        if not 0 <= conf.alpha <= 1:
            raise AtxError(f"{key}.alpha={conf.alpha} must lie in [0, 1] (0 turns KD off)")
        check_number(conf.temperature, f"{key}.temperature", 0.0, strict=True)

    @classmethod
    def from_config(cls, conf: KDConf, setup: TermSetup) -> Term:
        return cls(Schedule(conf.alpha), conf.temperature, conf.scale)

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: kd_loss(out.logits, out.teacher_logits, self.temperature, self.scale)}


@dataclass
class ATConf:
    beta: float = 0.0  # 0 = off
    p: float = 2.0  # exponent of the map function F^p
    mode: MapMode = MapMode.sum
    reduction: Reduction = Reduction.code  # code (authors' release, beta ~ 1e3) | paper (Eq. 2)
    student_layers: Any = "all"  # preset name of the model (all, last2, last) or a list of names
    teacher_layers: Any = None  # None: same preset / list as the student
    interpolate: bool = False  # resize attention maps of different spatial size
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@register_term
class AttentionTransfer(LayerPairTerm):
    """Activation-based AT (Eq. 2): one loss per layer pair, weight beta."""

    name = "at"
    Conf = ATConf
    resize_option = "interpolate"

    def __init__(
        self,
        weight: Schedule,
        pairs: Sequence[tuple[str, str]],
        p: float = 2.0,
        mode: MapMode | str = "sum",
        reduction: Reduction | str = "code",
        interpolate: bool = False,
    ) -> None:
        super().__init__(weight, pairs)
        self.p, self.mode, self.reduction, self.interpolate = p, mode, reduction, interpolate

    @classmethod
    def check(cls, conf: ATConf, key: str) -> None:
        super().check(conf, key)
        check_number(conf.p, f"{key}.p", 0.0, strict=True)

    @classmethod
    def from_config(cls, conf: ATConf, setup: TermSetup) -> Term:
        weight = Schedule.from_conf(conf.beta, conf.schedule, setup.max_epochs)
        return cls(weight, setup.pairs, conf.p, conf.mode, conf.reduction, conf.interpolate)

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return at_loss(student, teacher, self.p, self.mode, self.reduction, self.interpolate)


@dataclass
class FActTConf:
    beta: float = 0.0  # 0 = off
    student_layers: Any = "all"
    teacher_layers: Any = None
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@register_term
class FullActivationTransfer(LayerPairTerm):
    """F-ActT (Section 4.1.2): FitNets-style l2 on normalised activations, one per layer pair.

    ``channels`` lists (student C, teacher C) per pair; a learned 1x1 conv maps the student
    to the teacher's width where they differ (identity where equal: "for networks of the same
    width ... regress directly"). The adapters are trained with the student.
    """

    name = "fact"
    Conf = FActTConf

    def __init__(
        self,
        weight: Schedule,
        pairs: Sequence[tuple[str, str]],
        channels: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__(weight, pairs)
        self.adapters = nn.ModuleList(
            nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=1, bias=False)
            for cs, ct in channels
        )

    @classmethod
    def from_config(cls, conf: FActTConf, setup: TermSetup) -> Term:
        weight = Schedule.from_conf(conf.beta, conf.schedule, setup.max_epochs)
        return cls(weight, setup.pairs, [(s[1], t[1]) for s, t in setup.shapes])

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return fact_loss(self.adapters[index](student), teacher)


@dataclass
class GradATConf:
    """Gradient-based AT (Eq. 4): beta/2 ||J_s - J_t||^2 on input gradients."""

    beta: float = 0.0  # 0 = off
    normalize: bool = False  # l2-normalise J per sample first
    reduce_channels: bool = False  # sum of squares over input channels: a spatial map
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@register_term
class GradientAT(Term):
    """Gradient-based AT (Eq. 4/5): ``beta/2 ||J_s - J_t||^2``, trained by double backprop."""

    name = "grad_at"
    Conf = GradATConf
    needs_teacher = True
    needs_input_grad = True
    needs_teacher_input_grad = True

    def __init__(
        self, weight: Schedule, normalize: bool = False, reduce_channels: bool = False
    ) -> None:
        super().__init__(weight)
        self.normalize, self.reduce_channels = normalize, reduce_channels

    @classmethod
    def from_config(cls, conf: GradATConf, setup: TermSetup) -> Term:
        weight = Schedule.from_conf(conf.beta, conf.schedule, setup.max_epochs)
        return cls(weight, conf.normalize, conf.reduce_channels)

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        loss = grad_at_loss(
            out.input_grad, out.teacher_input_grad, self.normalize, self.reduce_channels
        )
        return {self.name: loss}


@dataclass
class GradRegConf:
    """A teacher-free input-gradient regulariser: symmetry norm (Eq. 6) or min-l2."""

    beta: float = 0.0  # 0 = off
    schedule: ScheduleConf = field(default_factory=ScheduleConf)


@register_term
class SymmetryNorm(Term):
    """Flip invariance of the gradient attention (Eq. 6), no teacher."""

    name = "symmetry"
    Conf = GradRegConf
    needs_input_grad = True
    needs_flipped_input_grad = True

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: symmetry_loss(out.input_grad, out.flipped_input_grad)}


@register_term
class MinL2(Term):
    """Double backpropagation (Drucker & LeCun): ``beta/2 ||J||^2``, no teacher."""

    name = "min_l2"
    Conf = GradRegConf
    needs_input_grad = True

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: min_l2_loss(out.input_grad)}
