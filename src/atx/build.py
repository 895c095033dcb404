"""Turn a composed config into objects, checking every value a user can get wrong on the way.

All checks happen before any data is read or any step is run, and each failure is one
``AtxError`` line naming the config key and the fix.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from atx.checkpoints import load_weights
from atx.errors import AtxError
from atx.features import LayerTaps
from atx.losses import (
    AttentionTransfer,
    CrossEntropy,
    FullActivationTransfer,
    GradientAT,
    KnowledgeDistillation,
    MinL2,
    Objective,
    Schedule,
    SymmetryNorm,
    Term,
)
from atx.models import build_model, layer_group_presets
from atx.module import freeze


def accepted_kwargs(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts (following ``**kwargs`` up the MRO); None = any."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def check_keys(keys: Iterable[str], allowed: set[str] | None, where: str) -> None:
    """One-line error for the first key not in ``allowed``, with close matches."""
    if allowed is None:
        return
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{where}.{close[0]}'?)" if close else ""
            raise AtxError(
                f"unknown option '{where}.{key}'{hint}; valid options: {', '.join(sorted(allowed))}"
            )


def instantiate_checked(node: DictConfig, where: str, **extra: Any) -> Any:
    """Build ``node._target_(**node, **extra)`` after checking its keys against the signature."""
    if "_target_" not in node:
        raise AtxError(f"config group '{where}' has no _target_ naming the class to build")
    try:
        cls = get_class(node._target_)
    except Exception:
        raise AtxError(f"{where}._target_: cannot import '{node._target_}'") from None
    kwargs = {
        k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"
    }
    check_keys(kwargs, accepted_kwargs(cls), where)
    return cls(**{**kwargs, **extra})


def build_data(cfg: DictConfig) -> Any:
    return instantiate_checked(cfg.data, "data")


def build_network(node: DictConfig, where: str, num_classes: int, in_channels: int) -> nn.Module:
    """The student (``where="model"``) or the teacher's architecture, from the model registry."""
    spec = {
        k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "checkpoint"
    }
    if "name" not in spec:
        raise AtxError(f"{where}.name is not set: name a model, e.g. {where}.name=wrn")
    name = spec.pop("name")
    try:
        return build_model(name, num_classes=num_classes, in_channels=in_channels, **spec)
    except AtxError as e:
        raise AtxError(f"{where}: {e}") from None


def build_teacher(cfg: DictConfig, num_classes: int, in_channels: int) -> nn.Module:
    if cfg.teacher is None:
        raise AtxError(
            "the distillation terms in use need a teacher: add teacher=<model preset>"
            " teacher.checkpoint=<run dir or .pt>, or use distill=none"
        )
    if OmegaConf.is_missing(cfg.teacher, "checkpoint") or not cfg.teacher.get("checkpoint"):
        raise AtxError(
            "teacher.checkpoint is not set: pass teacher.checkpoint=<teacher run dir, student.pt"
            " export or .ckpt>"
        )
    teacher = build_network(cfg.teacher, "teacher", num_classes, in_channels)
    load_weights(teacher, cfg.teacher.checkpoint, "teacher")
    return freeze(teacher)


def resolve_layers(spec: Any, model_name: str, key: str) -> list[str]:
    """A preset name of the model (``all``, ``last2`` ...) or an explicit list of module names."""
    if isinstance(spec, str):
        presets = layer_group_presets(model_name)
        if spec not in presets:
            known = ", ".join(presets) or "none"
            raise AtxError(
                f"{key}='{spec}' is not a layer preset of model '{model_name}' (presets: {known});"
                f" or give module names, e.g. {key}=[layer3,layer4]"
            )
        return list(presets[spec])
    return [str(s) for s in spec]


@dataclass
class LayerPlan:
    """The (student layer, teacher layer) pairs each transfer term reads."""

    at: list[tuple[str, str]]
    fact: list[tuple[str, str]]

    @property
    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.at + self.fact))

    @property
    def teacher_layers(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.at + self.fact))


def plan_layers(cfg: DictConfig) -> LayerPlan:
    """Pair student and teacher layers for every active transfer term."""
    plans = {}
    for term in ("at", "fact"):
        node = cfg.distill[term]
        if node.beta == 0:
            plans[term] = []
            continue
        if cfg.teacher is None:
            build_teacher(cfg, 0, 0)  # raises the "needs a teacher" error
        key = f"distill.{term}"
        student = resolve_layers(node.student_layers, cfg.model.name, f"{key}.student_layers")
        teacher_spec = node.student_layers if node.teacher_layers is None else node.teacher_layers
        teacher = resolve_layers(teacher_spec, cfg.teacher.name, f"{key}.teacher_layers")
        if len(student) != len(teacher):
            raise AtxError(
                f"{key}: {len(student)} student layers {student} but {len(teacher)} teacher layers"
                f" {teacher}; give {key}.student_layers and {key}.teacher_layers of equal length"
            )
        if not student:
            raise AtxError(f"{key}.student_layers is empty: name at least one layer group")
        plans[term] = list(zip(student, teacher, strict=True))
    return LayerPlan(plans["at"], plans["fact"])


def probe_shapes(
    model: nn.Module, layers: list[str], input_shape: tuple[int, ...], who: str
) -> dict[str, torch.Size]:
    """Output shapes of the named layers for one dummy batch (checks the names exist)."""
    taps = LayerTaps(model, layers, who)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
        feats: dict[str, Tensor] = taps.outputs()
    finally:
        taps.remove()
        model.train(was_training)
    for name, f in feats.items():
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise AtxError(f"{who} layer '{name}' does not output a (B, C, H, W) feature map")
    return {name: f.shape for name, f in feats.items()}


def check_pair_shapes(
    plan: LayerPlan,
    student_shapes: Mapping[str, torch.Size],
    teacher_shapes: Mapping[str, torch.Size],
    interpolate: bool,
) -> list[tuple[int, int]]:
    """Spatial sizes must match (unless AT maps are interpolated); returns F-ActT channels."""
    for term, pairs in (("at", plan.at), ("fact", plan.fact)):
        for s, t in pairs:
            ss, ts = student_shapes[s], teacher_shapes[t]
            if ss[-2:] != ts[-2:] and not (term == "at" and interpolate):
                fix = "set distill.at.interpolate=true or " if term == "at" else ""
                raise AtxError(
                    f"distill.{term}: student layer '{s}' is {ss[-2]}x{ss[-1]} but teacher layer"
                    f" '{t}' is {ts[-2]}x{ts[-1]}; {fix}pair layers of equal resolution"
                )
    return [(student_shapes[s][1], teacher_shapes[t][1]) for s, t in plan.fact]


def build_schedule(value: float, node: DictConfig, key: str, max_epochs: int) -> Schedule:
    if node.kind not in ("constant", "step", "linear"):
        raise AtxError(
            f"{key}.schedule.kind='{node.kind}' is unknown; use constant, step or linear"
        )
    return Schedule(value, node.kind, list(node.milestones), node.gamma, node.final, max_epochs)


def check_distill(d: DictConfig) -> None:
    """Value checks of the distill group (keys are already checked by the schema)."""
    if not 0 <= d.kd.alpha <= 1:
        raise AtxError(f"distill.kd.alpha={d.kd.alpha} must lie in [0, 1] (0 turns KD off)")
    if d.kd.temperature <= 0:
        raise AtxError(f"distill.kd.temperature={d.kd.temperature} must be > 0")
    for term in ("at", "fact", "grad_at", "symmetry", "min_l2"):
        if d[term].beta < 0:
            raise AtxError(f"distill.{term}.beta={d[term].beta} must be >= 0 (0 turns it off)")
    if d.at.p <= 0:
        raise AtxError(f"distill.at.p={d.at.p} must be > 0")
    if d.at.mode not in ("sum", "max"):
        raise AtxError(f"distill.at.mode='{d.at.mode}' is unknown; use sum or max")
    if d.at.reduction not in ("code", "paper"):
        raise AtxError(f"distill.at.reduction='{d.at.reduction}' is unknown; use code or paper")


def teacher_given(cfg: DictConfig) -> bool:
    """A teacher preset with its checkpoint set (used for attention agreement even when no
    term needs it)."""
    return (cfg.teacher is not None and not OmegaConf.is_missing(cfg.teacher, "checkpoint")
            and bool(cfg.teacher.get("checkpoint")))  # fmt: skip


def preset_pairs(cfg: DictConfig) -> list[tuple[str, str]]:
    """The models' ``all`` layer groups, paired, when no transfer term chose layers; empty
    when the models have no presets or different group counts."""
    try:
        s = resolve_layers("all", cfg.model.name, "model")
        t = resolve_layers("all", cfg.teacher.name, "teacher")
    except AtxError:
        return []
    return list(zip(s, t, strict=True)) if len(s) == len(t) else []


def needs_teacher(d: DictConfig, plan: LayerPlan) -> bool:
    """KD, AT, F-ActT and grad-AT learn from a teacher; symmetry and min-l2 do not."""
    return d.kd.alpha > 0 or bool(plan.at or plan.fact) or d.grad_at.beta > 0


def build_objective(
    d: DictConfig, plan: LayerPlan, fact_channels: list[tuple[int, int]], max_epochs: int
) -> Objective:
    """CE, then a term for each of KD, AT, grad-AT, symmetry, min-l2 and F-ActT switched on
    (non-zero weight)."""
    alpha = d.kd.alpha
    terms: list[Term] = [CrossEntropy(Schedule(1.0 - alpha))]
    if alpha > 0:
        terms.append(KnowledgeDistillation(Schedule(alpha), d.kd.temperature))
    if plan.at:
        terms.append(
            AttentionTransfer(
                build_schedule(d.at.beta, d.at.schedule, "distill.at", max_epochs),
                plan.at,
                d.at.p,
                d.at.mode,
                d.at.reduction,
                d.at.interpolate,
            )
        )
    if d.grad_at.beta > 0:
        schedule = build_schedule(d.grad_at.beta, d.grad_at.schedule, "distill.grad_at", max_epochs)
        terms.append(GradientAT(schedule, d.grad_at.normalize, d.grad_at.reduce_channels))
    for key, term in (("symmetry", SymmetryNorm), ("min_l2", MinL2)):
        if d[key].beta > 0:
            terms.append(term(build_schedule(d[key].beta, d[key].schedule, f"distill.{key}",
                                             max_epochs)))  # fmt: skip
    if plan.fact:
        terms.append(
            FullActivationTransfer(
                build_schedule(d.fact.beta, d.fact.schedule, "distill.fact", max_epochs),
                plan.fact,
                fact_channels,
            )
        )
    return Objective(terms)
