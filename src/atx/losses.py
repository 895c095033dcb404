"""Loss terms of distillation and the Objective that sums them (torch only).

* Cross-entropy on the true labels, ``L(W_S, x)`` of Eq. 2.
* Knowledge distillation (Hinton et al., 2015), paper Section 3.1 / 4.1:
  ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.
* Activation-based attention transfer, Eq. 2 (``atx.attention``).
* Full-activation transfer F-ActT, Section 4.1.2: l2 on l2-normalised full activations, with a
  learned 1x1 convolution where student and teacher channel counts differ.
* Gradient-based attention, Section 3.2 (``atx.gradient_attention``): grad-AT (Eq. 4), the
  symmetry norm (Eq. 6) and min-l2; these need input gradients, which the module computes.

Each term returns its *unweighted* losses by name; the Objective multiplies them by their
weight at the current epoch (a Schedule: beta may decay, as the paper does for AT+KD) and sums.
Every loss is a mean over the local batch, so under data parallelism (gradients averaged over
ranks) beta means the same on 1 or N devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atx.attention import MapMode, Reduction, at_loss
from atx.gradient_attention import grad_at_loss, min_l2_loss, symmetry_loss

KDScale = Literal["batchmean", "jan2017"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
            scale: KDScale = "batchmean") -> Tensor:  # fmt: skip
    """Hinton's KD term ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, summed over classes,
    averaged over the batch; the T^2 keeps gradient magnitudes independent of T.

    ``scale="batchmean"`` is that, as in the authors' code since July 2018 (``kl_div`` summed,
    divided by the batch). ``scale="jan2017"`` is their January 2017 code, released with the
    paper: ``kl_div`` averaged over batch *and* classes, times ``2 T^2``, i.e. ``2 / num_classes``
    times the batchmean value. Which of the two gave the paper's KD numbers is uncertain.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    if scale == "batchmean":
        return kl
    if scale == "jan2017":
        return kl * (2.0 / student_logits.shape[1])
    raise ValueError(f"unknown KD scale {scale!r}; use 'batchmean' or 'jan2017'")


def fact_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """F-ActT distance (Section 4.1.2) for one layer pair of equal shape (B, C, H, W).

    Each sample's activation is flattened and l2-normalised; the squared distance is averaged
    like the ``code`` reduction of AT, ``1/(B*H*W) * sum_b ||a_s[b] - a_t[b]||^2``, so one
    beta scale serves both AT and F-ActT.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"F-ActT needs equal activation shapes after the adapter: student"
            f" {tuple(student_features.shape)} vs teacher {tuple(teacher_features.shape)}"
        )
    h, w = student_features.shape[-2:]
    s = F.normalize(student_features.float().flatten(1), dim=1)
    t = F.normalize(teacher_features.float().flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean() / (h * w)


@dataclass
class Schedule:
    """A loss weight as a function of the epoch.

    ``constant``: ``value``. ``step``: ``value * gamma^k`` after the k-th milestone.
    ``linear``: from ``value`` at epoch 0 to ``final`` at ``end_epoch``, then ``final``.
    """

    value: float
    kind: Literal["constant", "step", "linear"] = "constant"
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    final: float = 0.0
    end_epoch: int = 1

    def __call__(self, epoch: int) -> float:
        if self.kind == "constant":
            return self.value
        if self.kind == "step":
            return self.value * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "linear":
            frac = min(max(epoch / max(self.end_epoch, 1), 0.0), 1.0)
            return self.value + (self.final - self.value) * frac
        raise ValueError(f"unknown schedule kind {self.kind!r}; use constant, step or linear")


@dataclass
class StepOutputs:
    """What one training step produced, as the loss terms see it."""

    logits: Tensor
    targets: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)  # by layer name
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    input_grad: Tensor | None = None  # J_s = dL/dx of the student, with graph (Eq. 3)
    teacher_input_grad: Tensor | None = None  # J_t, no graph
    flipped_input_grad: Tensor | None = None  # J_s at flip(x), with graph (Eq. 6)


class Term(nn.Module):
    """One weighted term of the Objective; ``losses`` returns unweighted values by name."""

    name: str = "term"
    needs_teacher: bool = False
    needs_input_grad: bool = False  # the student's input gradient J (double backprop)
    needs_teacher_input_grad: bool = False
    needs_flipped_input_grad: bool = False

    def __init__(self, weight: Schedule) -> None:
        super().__init__()
        self.weight = weight

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        raise NotImplementedError


class CrossEntropy(Term):
    """Cross-entropy with the true labels, ``L(W_S, x)``."""

    name = "ce"

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: F.cross_entropy(out.logits.float(), out.targets)}


class KnowledgeDistillation(Term):
    """Hinton KD; its weight is alpha, and the CE term gets 1 - alpha."""

    name = "kd"
    needs_teacher = True

    def __init__(self, weight: Schedule, temperature: float = 4.0,
                 scale: KDScale = "batchmean") -> None:  # fmt: skip
        super().__init__(weight)
        self.temperature, self.scale = temperature, scale

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: kd_loss(out.logits, out.teacher_logits, self.temperature, self.scale)}


class LayerPairTerm(Term):
    """A term with one loss per (student layer, teacher layer) pair, logged as
    ``<name>/<student layer>``."""

    needs_teacher = True

    def __init__(self, weight: Schedule, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__(weight)
        self.pairs = [tuple(p) for p in pairs]

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        raise NotImplementedError

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {
            f"{self.name}/{s}": self.pair_loss(i, out.student_features[s], out.teacher_features[t])
            for i, (s, t) in enumerate(self.pairs)
        }


class AttentionTransfer(LayerPairTerm):
    """Activation-based AT (Eq. 2): one loss per layer pair, weight beta."""

    name = "at"

    def __init__(
        self,
        weight: Schedule,
        pairs: Sequence[tuple[str, str]],
        p: float = 2.0,
        mode: MapMode = "sum",
        reduction: Reduction = "code",
        interpolate: bool = False,
    ) -> None:
        super().__init__(weight, pairs)
        self.p, self.mode, self.reduction, self.interpolate = p, mode, reduction, interpolate

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return at_loss(student, teacher, self.p, self.mode, self.reduction, self.interpolate)


class FullActivationTransfer(LayerPairTerm):
    """F-ActT (Section 4.1.2): FitNets-style l2 on normalised activations, one per layer pair.

    ``channels`` lists (student C, teacher C) per pair; a learned 1x1 conv maps the student
    to the teacher's width where they differ (identity where equal: "for networks of the same
    width ... regress directly"). The adapters are trained with the student.
    """

    name = "fact"

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

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return fact_loss(self.adapters[index](student), teacher)


class GradientAT(Term):
    """Gradient-based AT (Eq. 4/5): ``beta/2 ||J_s - J_t||^2``, trained by double backprop."""

    name = "grad_at"
    needs_teacher = True
    needs_input_grad = True
    needs_teacher_input_grad = True

    def __init__(self, weight: Schedule, normalize: bool = False,
                 reduce_channels: bool = False) -> None:  # fmt: skip
        super().__init__(weight)
        self.normalize, self.reduce_channels = normalize, reduce_channels

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: grad_at_loss(out.input_grad, out.teacher_input_grad, self.normalize,
                                        self.reduce_channels)}  # fmt: skip


class SymmetryNorm(Term):
    """Flip invariance of the gradient attention (Eq. 6), no teacher."""

    name = "symmetry"
    needs_input_grad = True
    needs_flipped_input_grad = True

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: symmetry_loss(out.input_grad, out.flipped_input_grad)}


class MinL2(Term):
    """Double backpropagation (Drucker & LeCun): ``beta/2 ||J||^2``, no teacher."""

    name = "min_l2"
    needs_input_grad = True

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: min_l2_loss(out.input_grad)}


class Objective(nn.Module):
    """The training loss: ``sum_t weight_t(epoch) * sum(term_t losses)``.

    Returns the total and a flat dict of every unweighted loss (``ce``, ``kd``,
    ``at/<group>``, ...) for logging. AT+KD is simply both terms present.
    """

    def __init__(self, terms: Sequence[Term]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    @property
    def needs_input_grad(self) -> bool:
        return any(t.needs_input_grad for t in self.terms)

    @property
    def needs_teacher_input_grad(self) -> bool:
        return any(t.needs_teacher_input_grad for t in self.terms)

    @property
    def needs_flipped_input_grad(self) -> bool:
        return any(t.needs_flipped_input_grad for t in self.terms)

    def weights(self, epoch: int) -> dict[str, float]:
        return {t.name: t.weight(epoch) for t in self.terms}

    def forward(self, out: StepOutputs, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        total = out.logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            losses = term.losses(out)
            parts.update(losses)
            weight = term.weight(epoch)
            if weight != 0:
                total = total + weight * sum(losses.values())
        return total, parts
