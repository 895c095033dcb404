"""The loss equations of KD and F-ActT, loss-weight schedules, and the Term / Objective frame
(torch only). The terms themselves, each declared once, are in ``atx.terms``.

Each term returns its *unweighted* losses by name; the Objective multiplies them by their
weight at the current epoch (a Schedule: beta may decay, as the paper does for AT+KD) and sums.
Every loss is a mean over the local batch, so under data parallelism (gradients averaged over
ranks) beta means the same on 1 or N devices.

A term is a :class:`Term` subclass registered with :func:`register_term`: its name is the key
of its options under ``distill`` (``Conf``, a dataclass) and of its logged losses; what it needs
(a teacher, layer pairs, input gradients) is declared on the class, so the builder, the config
schema and the module ask the term instead of keeping lists of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atx.options import Choice, check_milestones, check_number


class KDScale(Choice):
    """``batchmean``: the authors' code since 2018; ``jan2017``: their code of the paper."""

    batchmean = "batchmean"
    jan2017 = "jan2017"


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    scale: KDScale | str = "batchmean",
) -> Tensor:
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
    if KDScale(scale) is KDScale.jan2017:
        return kl * (2.0 / student_logits.shape[1])
    return kl


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


class ScheduleKind(Choice):
    constant = "constant"
    step = "step"
    linear = "linear"


@dataclass
class ScheduleConf:
    """How a loss weight changes over epochs (:class:`Schedule`)."""

    kind: ScheduleKind = ScheduleKind.constant
    milestones: list[int] = field(default_factory=list)  # step: multiply by gamma at each
    gamma: float = 0.1
    final: float = 0.0  # linear: weight reached at the last epoch


def check_schedule(conf: ScheduleConf, key: str) -> None:
    check_milestones(conf.milestones, f"{key}.schedule.milestones")
    for name in ("gamma", "final"):
        check_number(getattr(conf, name), f"{key}.schedule.{name}", low=0.0)


@dataclass
class Schedule:
    """A loss weight as a function of the epoch.

    ``constant``: ``value``. ``step``: ``value * gamma^k`` after the k-th milestone.
    ``linear``: from ``value`` at epoch 0 to ``final`` at ``end_epoch``, then ``final``.
    """

    value: float
    kind: ScheduleKind | str = "constant"
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    final: float = 0.0
    end_epoch: int = 1

    @classmethod
    def from_conf(cls, value: float, conf: ScheduleConf, end_epoch: int) -> Schedule:
        return cls(value, conf.kind, list(conf.milestones), conf.gamma, conf.final, end_epoch)

    def __call__(self, epoch: int) -> float:
        kind = ScheduleKind(self.kind)
        if kind is ScheduleKind.step:
            return self.value * self.gamma ** sum(epoch >= m for m in self.milestones)
        if kind is ScheduleKind.linear:
            frac = min(max(epoch / max(self.end_epoch, 1), 0.0), 1.0)
            return self.value + (self.final - self.value) * frac
        return self.value


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


@dataclass
class TermSetup:
    """What building a term may need beyond its own options."""

    max_epochs: int = 1  # the end of a linear schedule
    pairs: list[tuple[str, str]] = field(default_factory=list)  # layer-pair terms
    shapes: list[tuple[torch.Size, torch.Size]] = field(default_factory=list)  # per pair


class Term(nn.Module):
    """One weighted term of the Objective; ``losses`` returns unweighted values by name.

    A subclass declares: ``name`` (config key ``distill.<name>`` and log key), ``Conf`` (its
    options; None: not configurable), what it reads (``needs_*``, ``reads_layers``), and may
    override ``weight_of`` / ``check`` / ``from_config`` for options beyond beta + schedule.
    """

    name: ClassVar[str] = "term"
    Conf: ClassVar[type | None] = None
    needs_teacher: ClassVar[bool] = False
    needs_input_grad: ClassVar[bool] = False  # the student's input gradient J (double backprop)
    needs_teacher_input_grad: ClassVar[bool] = False
    needs_flipped_input_grad: ClassVar[bool] = False
    reads_layers: ClassVar[bool] = False  # one loss per (student, teacher) layer pair
    resize_option: ClassVar[str | None] = None  # the bool option letting pairs differ in size
    shares_ce_weight: ClassVar[bool] = False  # its weight w turns CE's into 1 - w (KD)

    def __init__(self, weight: Schedule) -> None:
        super().__init__()
        self.weight = weight

    @classmethod
    def weight_of(cls, conf: Any) -> float:
        """The weight at epoch 0; 0 turns the term off."""
        return conf.beta

    @classmethod
    def check(cls, conf: Any, key: str) -> None:
        """Value checks of the options (their types and choices are the schema's)."""
        check_number(conf.beta, f"{key}.beta", 0.0, hint=" (0 turns it off)")
        check_schedule(conf.schedule, key)

    @classmethod
    def from_config(cls, conf: Any, setup: TermSetup) -> Term:
        return cls(Schedule.from_conf(conf.beta, conf.schedule, setup.max_epochs))

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        raise NotImplementedError


TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Class decorator: ``cls`` becomes ``distill.<cls.name>`` (after ``atx.config.register``)."""
    TERMS[cls.name] = cls
    return cls


class LayerPairTerm(Term):
    """A term with one loss per (student layer, teacher layer) pair, logged as
    ``<name>/<student layer>``; its options hold ``student_layers`` and ``teacher_layers``."""

    needs_teacher = True
    reads_layers = True

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


def _any_term(need: str) -> property:
    """An :class:`Objective` needs what any of its terms declares it needs."""
    return property(lambda self: any(getattr(t, need) for t in self.terms),
                    doc=f"Whether a term has ``{need}``.")


class Objective(nn.Module):
    """The training loss: ``sum_t weight_t(epoch) * sum(term_t losses)``.

    Returns the total and a flat dict of every unweighted loss (``ce``, ``kd``,
    ``at/<group>``, ...) for logging. AT+KD is simply both terms present.
    """

    def __init__(self, terms: Sequence[Term]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    needs_teacher = _any_term("needs_teacher")
    needs_input_grad = _any_term("needs_input_grad")
    needs_teacher_input_grad = _any_term("needs_teacher_input_grad")
    needs_flipped_input_grad = _any_term("needs_flipped_input_grad")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every (student, teacher) layer pair a term reads, first use first."""
        pairs = (p for t in self.terms if isinstance(t, LayerPairTerm) for p in t.pairs)
        return list(dict.fromkeys(pairs))

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
