"""Model zoo: a name maps to a constructor returning a plain `nn.Module` that outputs logits.

Models know nothing of distillation. Layer groups for attention transfer (paper §3.1) are names
of submodules, tapped elsewhere with forward hooks; `layer_group_presets` names the usual ones.
"""

import difflib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from atx.errors import AtxError
from atx.models.nin import NIN
from atx.models.torchvision_models import resnet18, resnet34, torchvision
from atx.models.wrn import WideResNet

__all__ = [
    "NIN",
    "WideResNet",
    "build_model",
    "layer_group_presets",
    "model_names",
    "register_model",
]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    presets: dict[str, list[str]] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_COMMON = ("num_classes", "in_channels")


def _groups(names: list[str]) -> dict[str, list[str]]:
    return {"all": names, "last2": names[-2:], "last": names[-1:]}


def register_model(
    name: str, builder: Callable[..., nn.Module], presets: dict[str, list[str]] | None = None
) -> None:
    """Register `builder(num_classes=..., in_channels=..., **options)` under `name`."""
    _REGISTRY[name] = _Entry(builder, dict(presets or {}))


register_model("wrn", WideResNet, _groups(["group1", "group2", "group3"]))
register_model("nin", NIN, _groups(["block1", "block2", "block3"]))
register_model("resnet18", resnet18, _groups(["layer1", "layer2", "layer3", "layer4"]))
register_model("resnet34", resnet34, _groups(["layer1", "layer2", "layer3", "layer4"]))
register_model("torchvision", torchvision)


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), model_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise AtxError(f"unknown model '{name}'; known models: {', '.join(model_names())}{hint}")
    return _REGISTRY[name]


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return True
    if isinstance(annotation, types.UnionType):
        return any(_type_ok(value, a) for a in annotation.__args__)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("NoneType", "None")


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build model `name` with `num_classes` outputs and `in_channels` input channels.

    `kwargs` are the model's own options (e.g. wrn: depth, width, dropout). Unknown names,
    unknown or missing options and wrongly typed values raise a one-line AtxError.
    """
    entry = _entry(name)
    params = inspect.signature(entry.builder).parameters
    options = [p for p in params if p not in _COMMON]
    for key, value in kwargs.items():
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise AtxError(
                f"model '{name}' has no option '{key}'; its options are: {', '.join(options)}{hint}"
            )
        annotation = params[key].annotation
        if not _type_ok(value, annotation):
            raise AtxError(
                f"model '{name}' option '{key}' must be {_type_name(annotation)}, "
                f"got {type(value).__name__} {value!r}"
            )
    for key in options:
        if params[key].default is inspect.Parameter.empty and key not in kwargs:
            raise AtxError(
                f"model '{name}' needs option '{key}'; its options are: {', '.join(options)}"
            )
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AtxError(f"model '{name}': {key} must be a positive integer, got {value!r}")
    return entry.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def layer_group_presets(name: str) -> dict[str, list[str]]:
    """Preset layer groups of model `name`, e.g. {"all": [...], "last2": [...], "last": [...]}.

    Empty for `torchvision` (give submodule names yourself).
    """
    return {k: list(v) for k, v in _entry(name).presets.items()}
