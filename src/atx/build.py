"""The one builder: a composed (and checked, ``atx.checks``) config becomes a ready
:class:`Run` (DataModule, DistillModule, trainer arguments) with :func:`build_run`; ``atx-train``,
``scripts/bench.py`` and the tests all build through it.

What can only be checked against the objects (layer names and shapes, the teacher file's class
and channel counts) is checked here, before any image is decoded or the teacher's weights are
loaded; each failure is one ``AtxError`` line naming the config key and the fix.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from atx.checkpoints import load_state, load_state_dict
from atx.cluster import sync_batchnorm
from atx.errors import AtxError
from atx.features import LayerTaps
from atx.losses import TERMS, Objective, Schedule, Term, TermSetup
from atx.models import build_model, layer_group_presets
from atx.module import Agreement, DistillModule, freeze
from atx.numerics import NanGuard
from atx.options import check_call
from atx.terms import CrossEntropy


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
    check_call(cls, kwargs, where, given=extra)
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
    return build_model(name, num_classes, in_channels, where=where, **spec)


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
              (first_conv, 1, data.in_channels, "image channels"))
    for module, dim, wanted, what in checks:
        w = state.get(f"{module[0]}.weight") if module else None
        if isinstance(w, Tensor) and w.dim() > dim and w.shape[dim] != wanted:
            raise AtxError(
                f"teacher.checkpoint '{path}' is for {w.shape[dim]} {what} ({module[0]}.weight is"
                f" {tuple(w.shape)}) but {name} has {wanted}: give a teacher trained on {name}"
            )
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()),
               None)
    if bad is not None:
        raise AtxError(f"teacher.checkpoint '{path}' holds NaN/inf values in '{bad}': it is broken")
    load_state(teacher, state, path, "teacher")


def resolve_layers(
    spec: Any, model_name: str, key: str, model: nn.Module | None = None
) -> list[str]:
    """A preset name of the model (``all``, ``last2`` ...) or an explicit list of module names."""
    if isinstance(spec, str):
        presets = layer_group_presets(model_name, model)
        if spec not in presets:
            known = ", ".join(presets) or "none"
            raise AtxError(
                f"{key}='{spec}' is not a layer preset of model '{model_name}' (presets: {known});"
                f" or give module names, e.g. {key}=[layer3,layer4]"
            )
        return list(presets[spec])
    return [str(s) for s in spec]


def active_terms(d: DictConfig) -> dict[str, Any]:
    """The options of every loss term switched on (non-zero weight), by name; CE is always on
    (``build_objective`` adds it first)."""
    terms = {n: t for n, t in TERMS.items() if t.Conf is not None and t is not CrossEntropy}
    return {name: d[name] for name, term in terms.items() if term.weight_of(d[name]) != 0}


def plan_layers(
    cfg: DictConfig,
    student_net: nn.Module | None = None,
    teacher_net: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """The (student layer, teacher layer) pairs of every active term that reads layers;
    ``student_layers=auto`` pairs the models' ``all`` groups by resolution and depth
    (:func:`auto_pairs`, which needs the networks and the input shape)."""
    plan = {}
    for name, conf in active_terms(cfg.distill).items():
        if not TERMS[name].reads_layers:
            continue
        if cfg.teacher is None:
            build_teacher(cfg, 0, 0)  # raises the "needs a teacher" error
        key = f"distill.{name}"
        if AUTO in (conf.student_layers, conf.teacher_layers):
            s_all = layer_group_presets(cfg.model.name, student_net).get("all", [])
            t_all = layer_group_presets(cfg.teacher.name, teacher_net).get("all", [])
            if not s_all or not t_all or input_shape is None:
                raise AtxError(f"{key}.student_layers=auto needs layer presets of both models;"
                               f" give {key}.student_layers and {key}.teacher_layers as lists")
            plan[name] = auto_pairs(student_net, teacher_net, s_all, t_all, input_shape)
            print(f"atx: {key} layer pairs (auto, student <- teacher): "
                  + ", ".join(f"{s} <- {t}" for s, t in plan[name]), file=sys.stderr)
            continue
        s_spec = conf.student_layers
        student = resolve_layers(s_spec, cfg.model.name, f"{key}.student_layers", student_net)
        teacher_spec = s_spec if conf.teacher_layers is None else conf.teacher_layers
        teacher = resolve_layers(
            teacher_spec, cfg.teacher.name, f"{key}.teacher_layers", teacher_net
        )
        if len(student) != len(teacher):
            raise AtxError(
                f"{key}: {len(student)} student layers {student} but {len(teacher)} teacher layers"
                f" {teacher}; give {key}.student_layers and {key}.teacher_layers of equal length"
            )
        if not student:
            raise AtxError(f"{key}.student_layers is empty: name at least one layer group")
        plan[name] = list(zip(student, teacher, strict=True))
    return plan


AUTO = "auto"  # distill.<term>.student_layers=auto: pairs chosen by auto_pairs


def auto_pairs(
    student: nn.Module,
    teacher: nn.Module,
    student_groups: list[str],
    teacher_groups: list[str],
    input_shape: tuple[int, ...],
) -> list[tuple[str, str]]:
    """The groups' map sizes for one dummy batch, paired by :func:`pair_by_size`."""
    s_shapes = probe_shapes(student, student_groups, input_shape, "student")
    t_shapes = probe_shapes(teacher, teacher_groups, input_shape, "teacher")
    return pair_by_size(
        [(s, tuple(s_shapes[s][-2:])) for s in student_groups],
        [(t, tuple(t_shapes[t][-2:])) for t in teacher_groups],
    )


def pair_by_size(
    student: list[tuple[str, tuple[int, int]]], teacher: list[tuple[str, tuple[int, int]]]
) -> list[tuple[str, str]]:
    """Each student group (in depth order, with its map's (h, w)) with the teacher group
    closest first in spatial resolution (the ratio of map areas, in octaves), then in relative
    depth (position / number of groups); a teacher group may serve several student groups."""

    def octaves(a: tuple[int, int], b: tuple[int, int]) -> float:
        return abs(math.log2((a[0] * a[1]) / (b[0] * b[1])))

    def distance(i: int, j: int) -> tuple[float, float]:
        depth = abs((i + 1) / len(student) - (j + 1) / len(teacher))
        return octaves(student[i][1], teacher[j][1]), depth

    return [
        (s, teacher[min(range(len(teacher)), key=lambda j, i=i: distance(i, j))][0])
        for i, (s, _) in enumerate(student)
    ]


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


Shapes = dict[str, list[tuple[torch.Size, torch.Size]]]


def pair_shapes(
    cfg: DictConfig,
    plan: Mapping[str, list[tuple[str, str]]],
    student: nn.Module,
    teacher: nn.Module | None,
    input_shape: tuple[int, ...],
) -> Shapes:
    """(student, teacher) feature shapes of every planned pair; spatial sizes must match
    unless the term resizes (its ``resize_option``, e.g. ``distill.at.interpolate``)."""
    pairs = [p for ps in plan.values() for p in ps]
    if not pairs:
        return {}
    s_layers, t_layers = (list(dict.fromkeys(side)) for side in zip(*pairs, strict=True))
    s_shapes = probe_shapes(student, s_layers, input_shape, "student")
    t_shapes = probe_shapes(teacher, t_layers, input_shape, "teacher")
    shapes = {}
    for name, term_pairs in plan.items():
        option = TERMS[name].resize_option
        resizes = option is not None and bool(cfg.distill[name][option])
        for s, t in term_pairs:
            ss, ts = s_shapes[s], t_shapes[t]
            if ss[-2:] != ts[-2:] and not resizes:
                fix = f"set distill.{name}.{option}=true or " if option else ""
                raise AtxError(
                    f"distill.{name}: student layer '{s}' is {ss[-2]}x{ss[-1]} but teacher layer"
                    f" '{t}' is {ts[-2]}x{ts[-1]}; {fix}pair layers of equal resolution"
                )
        shapes[name] = [(s_shapes[s], t_shapes[t]) for s, t in term_pairs]
    return shapes


def teacher_given(cfg: DictConfig) -> bool:
    """A teacher preset with its checkpoint set (used for attention agreement even when no
    term needs it)."""
    if cfg.teacher is None or OmegaConf.is_missing(cfg.teacher, "checkpoint"):
        return False
    return bool(cfg.teacher.get("checkpoint"))


def preset_pairs(
    cfg: DictConfig, student: nn.Module | None = None, teacher: nn.Module | None = None
) -> list[tuple[str, str]]:
    """The models' ``all`` layer groups, paired, when no transfer term chose layers; empty
    when the models have no presets or different group counts."""
    try:
        s = resolve_layers("all", cfg.model.name, "model", student)
        t = resolve_layers("all", cfg.teacher.name, "teacher", teacher)
    except AtxError:
        return []
    return list(zip(s, t, strict=True)) if len(s) == len(t) else []


def needs_teacher(d: DictConfig) -> bool:
    """Whether any active term learns from a teacher (KD, AT, F-ActT, grad-AT do)."""
    return any(TERMS[name].needs_teacher for name in active_terms(d))


def build_objective(
    d: DictConfig,
    plan: Mapping[str, list[tuple[str, str]]],
    shapes: Shapes,
    max_epochs: int,
) -> Objective:
    """CE, then every active term in registration order; CE's weight is 1 minus the weights
    of the terms that share it (KD's alpha)."""
    active = active_terms(d)
    shared = sum(TERMS[n].weight_of(c) for n, c in active.items() if TERMS[n].shares_ce_weight)
    terms: list[Term] = [CrossEntropy(Schedule(1.0 - shared), d.ce.label_smoothing)]
    for name, conf in active.items():
        setup = TermSetup(max_epochs, plan.get(name, []), list(shapes.get(name, [])))
        terms.append(TERMS[name].from_config(conf, setup))
    return Objective(terms)


@dataclass
class Run:
    """Everything a fit needs, built from one composed config."""

    data: Any
    module: DistillModule
    trainer_kwargs: dict[str, Any]
    pairs: list[tuple[str, str]]  # layers of the figures and agreement metrics

    @property
    def student(self) -> nn.Module:
        return self.module.student

    @property
    def teacher(self) -> nn.Module | None:
        return self.module.teacher


def build_run(cfg: DictConfig) -> Run:
    """Data, student, teacher and module of ``cfg``; the seed is set before the models are
    built and again after (the data order and augmentation of a run do not depend on whether a
    teacher or adapters were built: baseline and AT see the same batches)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    student = build_network(cfg.model, "model", data.num_classes, data.in_channels)
    teacher = None
    if needs_teacher(cfg.distill) or teacher_given(cfg):
        # a given teacher is loaded even for a plain/KD student: attention agreement is logged
        teacher = build_teacher(cfg, data.num_classes, data.in_channels)
    module, pairs = build_module(cfg, student, teacher, data)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("sync_batchnorm", None)  # done by build_module, for the student only
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return Run(data, module, trainer_kwargs, pairs)


def build_module(
    cfg: DictConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    data: Any,
    load_teacher_weights: bool = True,
) -> tuple[DistillModule, list[tuple[str, str]]]:
    """The DistillModule of ``cfg`` around built networks, and the layer pairs of its figures;
    ``data`` gives ``num_classes``, ``in_channels`` and ``image_size``. The teacher's weights
    are loaded once every layer name and shape is checked (``load_teacher_weights=False``:
    kept as they are, e.g. random for a benchmark)."""
    shape = (data.in_channels, data.image_size, data.image_size)
    plan = plan_layers(cfg, student, teacher, shape)
    first = next(iter(plan.values()), None)
    pairs = (first or preset_pairs(cfg, student, teacher)) if teacher is not None else []
    shapes = pair_shapes(cfg, plan, student, teacher, shape)
    if teacher is not None and load_teacher_weights:
        load_teacher(cfg, teacher, data)
    if cfg.trainer.get("sync_batchnorm", False):  # the student's BN only, never the teacher's
        student = sync_batchnorm(student)
    max_epochs = cfg.trainer.get("max_epochs") or 1
    objective = build_objective(cfg.distill, plan, shapes, max_epochs)
    module = DistillModule(
        student,
        objective,
        data.num_classes,
        OmegaConf.to_object(cfg.optim),
        teacher,
        speed=OmegaConf.to_object(cfg.speed),
        finetune=OmegaConf.to_object(cfg.finetune),
        agreement=Agreement(pairs, cfg.distill.at.p, cfg.distill.at.mode),
        nan_guard=NanGuard(cfg.nan_policy, cfg.nan_skip_limit),
    )
    return module, list(pairs)
