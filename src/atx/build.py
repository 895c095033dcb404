"""Turn a composed config into objects, checking every value a user can get wrong on the way.

All checks happen before any data is read or any step is run, and each failure is one
``AtxError`` line naming the config key and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from atx.checkpoints import load_state, load_state_dict
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
from atx.optim import RECIPES


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
    """The DataModule (reads nothing yet: images are decoded in ``setup``); its root must exist."""
    data = instantiate_checked(cfg.data, "data")
    root = getattr(data, "root", None)
    if root and not Path(root).expanduser().exists() and not getattr(data, "download", False):
        raise AtxError(
            f"data.root='{root}' does not exist: set data.root=<folder holding"
            f" {getattr(data, 'name', 'the dataset')}>"
        )
    return data


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
    """The frozen teacher's architecture; its weights come later (:func:`load_teacher`), once
    every layer name and shape is checked."""
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
    return freeze(build_network(cfg.teacher, "teacher", num_classes, in_channels))


def load_teacher(cfg: DictConfig, teacher: nn.Module, data: Any) -> None:
    """Load ``teacher.checkpoint`` (``weights_only``) into ``teacher``; a teacher trained for
    other classes or image channels than ``data`` has is named as such."""
    path = cfg.teacher.checkpoint
    state = load_state_dict(path)
    classifier = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear)][-1:]
    first_conv = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)][:1]
    name = getattr(data, "name", "the data")
    checks = ((classifier, 0, data.num_classes, "classes"),
              (first_conv, 1, data.in_channels, "image channels"))  # fmt: skip
    for module, dim, wanted, what in checks:
        w = state.get(f"{module[0]}.weight") if module else None
        if isinstance(w, Tensor) and w.dim() > dim and w.shape[dim] != wanted:
            raise AtxError(
                f"teacher.checkpoint '{path}' is for {w.shape[dim]} {what} ({module[0]}.weight is"
                f" {tuple(w.shape)}) but {name} has {wanted}: give a teacher trained on {name}"
            )
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()),
               None)  # fmt: skip
    if bad is not None:
        raise AtxError(f"teacher.checkpoint '{path}' holds NaN/inf values in '{bad}': it is broken")
    load_state(teacher, state, path, "teacher")


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


def check_milestones(milestones: Any, key: str) -> None:
    """Epoch milestones: strictly increasing integers >= 0."""
    ms = list(milestones)
    if any(m < 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise AtxError(f"{key}={ms} must be strictly increasing epochs >= 0, e.g. [60,120,160]")


def check_schedule(node: DictConfig, key: str) -> None:
    if node.kind not in ("constant", "step", "linear"):
        raise AtxError(
            f"{key}.schedule.kind='{node.kind}' is unknown; use constant, step or linear"
        )
    check_milestones(node.milestones, f"{key}.schedule.milestones")
    for name in ("gamma", "final"):
        check_number(node[name], f"{key}.schedule.{name}", low=0.0)


def check_number(value: float, key: str, low: float, strict: bool = False, hint: str = "") -> None:
    """``value`` must be finite and ``>= low`` (``> low`` when ``strict``)."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise AtxError(f"{key}={value} must be a finite number {op} {low:g}{hint}")


def build_schedule(value: float, node: DictConfig, key: str, max_epochs: int) -> Schedule:
    check_schedule(node, key)
    return Schedule(value, node.kind, list(node.milestones), node.gamma, node.final, max_epochs)


def check_distill(d: DictConfig) -> None:
    """Value checks of the distill group (keys are already checked by the schema)."""
    if not 0 <= d.kd.alpha <= 1:
        raise AtxError(f"distill.kd.alpha={d.kd.alpha} must lie in [0, 1] (0 turns KD off)")
    check_number(d.kd.temperature, "distill.kd.temperature", 0.0, strict=True)
    if d.kd.scale not in ("batchmean", "jan2017"):
        raise AtxError(f"distill.kd.scale='{d.kd.scale}' is unknown; use batchmean or jan2017")
    for term in ("at", "fact", "grad_at", "symmetry", "min_l2"):
        check_number(d[term].beta, f"distill.{term}.beta", 0.0, hint=" (0 turns it off)")
        check_schedule(d[term].schedule, f"distill.{term}")
    check_number(d.at.p, "distill.at.p", 0.0, strict=True)
    if d.at.mode not in ("sum", "max"):
        raise AtxError(f"distill.at.mode='{d.at.mode}' is unknown; use sum or max")
    if d.at.reduction not in ("code", "paper"):
        raise AtxError(f"distill.at.reduction='{d.at.reduction}' is unknown; use code or paper")


def check_optim(o: DictConfig) -> None:
    """SGD settings torch would only reject at the first step (or never)."""
    check_number(o.lr, "optim.lr", 0.0, strict=True)
    check_number(o.momentum, "optim.momentum", 0.0)
    check_number(o.weight_decay, "optim.weight_decay", 0.0)
    check_number(o.gamma, "optim.gamma", 0.0, strict=True)
    check_milestones(o.milestones, "optim.milestones")
    if o.nesterov and o.momentum == 0:
        raise AtxError("optim.nesterov=true needs optim.momentum > 0")
    if o.recipe not in RECIPES:
        raise AtxError(f"optim.recipe='{o.recipe}' is unknown; use authors or standard")


def check_run_options(cfg: DictConfig) -> None:
    """Top-level options: figures and the policy for non-finite losses (``atx.numerics``)."""
    for key in ("figure_images", "figure_every_n_epochs"):
        if cfg[key] < 0:
            raise AtxError(f"{key}={cfg[key]} must be >= 0 (0 turns it off)")
    if cfg.nan_policy not in ("stop", "skip"):
        raise AtxError(f"nan_policy='{cfg.nan_policy}' is unknown; use stop or skip")
    if cfg.nan_skip_limit < 1:
        raise AtxError(f"nan_skip_limit={cfg.nan_skip_limit} must be >= 1")
    devices = device_count(cfg.trainer.get("devices", "auto"))
    if cfg.nan_policy == "skip" and ((devices or 1) > 1 or cfg.trainer.get("num_nodes", 1) > 1):
        raise AtxError(
            "nan_policy=skip works on one device only (Lightning cannot skip a step under DDP):"
            " use nan_policy=stop or trainer.devices=1"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (None: 'auto' or -1, i.e. all there are)."""
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if _is_int(devices):
        return None if devices == -1 else devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": device ids
        return len([d for d in devices.split(",") if d.strip()])
    if devices == "auto":
        return None
    raise AtxError(f"trainer.devices={devices!r} is not a count, a list of ids or auto")


def check_trainer(t: DictConfig) -> None:
    """Values of the Trainer group Lightning would reject late (or never): epochs, and more
    devices than this machine has (CPU: processes beyond its cores)."""
    for key in ("max_epochs", "max_steps", "num_nodes", "log_every_n_steps"):
        if t.get(key) is not None and not _is_int(t[key]):
            raise AtxError(f"trainer.{key}={t[key]!r} must be an integer")
    epochs, steps = t.get("max_epochs"), t.get("max_steps", -1)
    if epochs is not None and epochs < 1 and not (epochs == -1 and steps > 0):
        raise AtxError(f"trainer.max_epochs={epochs} must be >= 1 (or -1 with trainer.max_steps>0)")
    wanted = device_count(t.get("devices", "auto"))
    accelerator = str(t.get("accelerator", "auto")).lower()
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if have == 0:
            raise AtxError(
                f"trainer.accelerator={t.accelerator} but this machine has no CUDA GPU: use"
                " trainer=cpu (or trainer.accelerator=cpu)"
            )
        if wanted is not None and wanted > have:
            raise AtxError(
                f"trainer.devices={t.devices} asks for {wanted} GPUs but this machine has {have}:"
                f" set trainer.devices<={have}"
            )
    elif accelerator == "cpu" and wanted is not None:
        cores = os.cpu_count() or 1  # the node's cores (a Slurm rank may be bound to fewer)
        if wanted > cores:
            raise AtxError(
                f"trainer.devices={t.devices} asks for {wanted} CPU processes but this machine"
                f" has {cores} cores: set trainer.devices<={cores}"
            )


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
        terms.append(KnowledgeDistillation(Schedule(alpha), d.kd.temperature, d.kd.scale))
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
