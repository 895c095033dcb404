"""Model zoo: a name maps to a constructor returning a plain `nn.Module` that outputs logits.

Models know nothing of distillation. Layer groups for attention transfer (paper §3.1) are names
of submodules, tapped elsewhere with forward hooks; `layer_group_presets` names the usual ones.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from atx.errors import AtxError
from atx.models.nin import NIN
from atx.models.timm_models import layer_groups, timm_model
from atx.models.torchvision_models import resnet18, resnet34, torchvision
from atx.models.wrn import WideResNet
from atx.options import check_call, did_you_mean

__all__ = [
    "NIN",
    "WideResNet",
    "build_model",
    "layer_group_presets",
    "model_names",
    "register_model",
]


Presets = dict[str, list[str]]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    # fixed names, or computed from the built network (a family whose stages vary by arch)
    presets: Presets | Callable[[nn.Module], Presets] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_COMMON = ("num_classes", "in_channels")


def _groups(names: list[str]) -> dict[str, list[str]]:
    if not names:  # a network without groups has no presets (name its layers)
        return {}
    return {"all": names, "last2": names[-2:], "last": names[-1:]}


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    presets: Presets | Callable[[nn.Module], Presets] | None = None,
) -> None:
    """Register `builder(num_classes=..., in_channels=..., **options)` under `name`; `presets`
    name its layer groups (`all`, `last2`, `last`, ...), or compute them from a built model."""
    _REGISTRY[name] = _Entry(builder, presets if callable(presets) else dict(presets or {}))


register_model("wrn", WideResNet, _groups(["group1", "group2", "group3"]))
register_model("nin", NIN, _groups(["block1", "block2", "block3"]))
register_model("resnet18", resnet18, _groups(["layer1", "layer2", "layer3", "layer4"]))
register_model("resnet34", resnet34, _groups(["layer1", "layer2", "layer3", "layer4"]))
register_model("torchvision", torchvision)
register_model("timm", timm_model, lambda net: _groups(layer_groups(net)))  # from the network


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str, where: str = "model") -> _Entry:
    if name not in _REGISTRY:
        raise AtxError(
            f"{where}: unknown model '{name}'; known models: {', '.join(model_names())}"
            f"{did_you_mean(name, model_names())}"
        )
    return _REGISTRY[name]


def build_model(
    name: str, num_classes: int, in_channels: int = 3, where: str = "model", **options: Any
) -> nn.Module:
    """Build model family ``name`` with ``num_classes`` outputs and ``in_channels`` input
    channels; ``options`` are the family's own (e.g. wrn: depth, width, dropout), checked like
    every other option (``atx.options.check_call``) and named ``<where>.<option>`` in errors."""
    entry = _entry(name, where)
    check_call(entry.builder, options, where, given=_COMMON)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AtxError(f"model '{name}': {key} must be a positive integer, got {value!r}")
    try:
        return entry.builder(num_classes=num_classes, in_channels=in_channels, **options)
    except AtxError as e:  # e.g. a pretrained-weights file: say which network it was for
        raise AtxError(f"{where}: {e}") from None


def layer_group_presets(name: str, model: nn.Module | None = None) -> Presets:
    """Preset layer groups of model `name`, e.g. {"all": [...], "last2": [...], "last": [...]}.

    Empty for `torchvision` (give submodule names yourself). A family that computes its
    presets from the network needs `model` (without it: none).
    """
    presets = _entry(name).presets
    if callable(presets):
        presets = presets(model) if model is not None else {}
    return {k: list(v) for k, v in presets.items()}
