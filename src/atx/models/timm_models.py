"""Any timm model (pytorch-image-models) by name, as student or teacher: ``model=timm
model.arch=resnet50``.

Always built with ``pretrained=False``: weights come only from a local file
(``weights_path``), never from the network. Layer groups are computed from the built network
(:func:`layer_groups`). timm is imported on first use (it costs a second at every start-up).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atx.errors import AtxError, reason
from atx.files import is_state_dict, read_tensors
from atx.models.pretrained import fit_pretrained
from atx.options import did_you_mean

# the builder's own options; options={...} may not repeat them (nor what atx sets from the data)
_NAMED = ("img_size", "patch_size", "drop_rate", "drop_path_rate")
_SET_BY_ATX = {
    "num_classes": "atx sets it from the data",
    "in_chans": "atx sets it from the data",
    "pretrained": "weights come only from weights_path (never downloaded)",
}
# where a training checkpoint (timm's train.py and others) nests its state dict
_NESTED = ("state_dict", "model", "state_dict_ema")


def timm_archs() -> list[str]:
    """Names timm can build (without pretrained tags such as ``.augreg_in21k``)."""
    import timm

    return timm.list_models()


def timm_model(
    arch: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    options: dict[str, Any] | None = None,
    weights_path: str | None = None,
) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=...)`` with the
    options that are set (None: timm's default) and ``options`` passed through as they are
    (e.g. ``{depth: 2, embed_dim: 32}``); ``weights_path`` then loads a local state dict
    (:func:`load_timm_weights`)."""
    import timm

    archs = timm_archs()
    if arch.partition(".")[0] not in archs:
        raise AtxError(f"unknown timm model '{arch}'{did_you_mean(arch, archs)}")
    for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if value is not None and not 0 <= value < 1:
            raise AtxError(f"{key}={value} must be a number in [0, 1)")
    extra = dict(options or {})
    clash = next((k for k in extra if k in _NAMED or k in _SET_BY_ATX), None)
    if clash is not None:
        fix = _SET_BY_ATX.get(clash, f"set {clash}=<value> itself")
        raise AtxError(f"options.{clash} is not an option to pass through: {fix}")
    named = dict(zip(_NAMED, (img_size, patch_size, drop_rate, drop_path_rate), strict=True))
    kwargs = {**{k: v for k, v in named.items() if v is not None}, **extra}
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # an option it lacks
        raise AtxError(f"timm cannot build '{arch}' with {kwargs}: {reason(e)}") from e
    if weights_path is not None:
        load_timm_weights(model, weights_path)
    return model


def _names(value: Any) -> list[str]:
    """A pretrained_cfg entry (a module name, a tuple of them, or None) as a list."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s): ``get_classifier()`` (DeiT's distilled models
    have two) and the ``classifier`` of timm's pretrained config."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, tuple) else (heads,)
    found = [n for n, m in model.named_modules() if any(m is h for h in heads if h is not None)]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(dict.fromkeys(found + _names(cfg.get("classifier"))))


def _first_conv(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = _names(cfg.get("first_conv"))
    if named:
        return named
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:1]


def read_weights(weights_path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file (safetensors), or any other file as plain tensors
    (``weights_only``: a file carrying a pickled object is refused); a timm training checkpoint
    nesting it under ``state_dict``/``model`` and DDP's ``module.`` prefixes are unwrapped."""
    path = Path(weights_path)
    if not path.is_file():
        raise AtxError(f"weights file '{weights_path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise AtxError(f"cannot read weights file '{path}': {reason(e)}") from e
    else:
        state = read_tensors(path, "weights file")
    if isinstance(state, dict) and not is_state_dict(state):
        state = next((state[k] for k in _NESTED if is_state_dict(state.get(k))), state)
    if not is_state_dict(state):
        raise AtxError(f"weights file '{weights_path}' does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _filtered(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> dict:
    """timm's own checkpoint filter of the model's family, as its pretrained loading applies it
    (e.g. ViT: position embeddings resampled to another img_size, patch kernels to another
    patch_size)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, model))
    except Exception as e:
        raise AtxError(f"weights file '{path}' does not fit the model: {reason(e)}") from e


def load_timm_weights(model: nn.Module, weights_path: str) -> None:
    """Load a local timm/torch state dict into ``model``. A classifier of another class count is
    left out (the model's fresh one stays); a first conv of another channel count is adapted
    (timm's ``adapt_input_conv``: summed for 1 channel, else tiled and rescaled). Any other
    missing, unexpected or mis-shaped key is an error naming the file."""
    from timm.models import adapt_input_conv

    state = _filtered(model, read_weights(weights_path), weights_path)
    fit_pretrained(
        model, state, weights_path, classifier_names(model),
        [f"{c}.weight" for c in _first_conv(model)],
        lambda w, chans: adapt_input_conv(chans, w, base_chans=w.shape[1]),
    )


def _quarters(names: list[str]) -> list[str]:
    """The blocks at 1/4, 2/4, 3/4 and 4/4 of the depth (fewer when there are fewer)."""
    picks = sorted({math.ceil(len(names) * k / 4) - 1 for k in range(1, 5)})
    return [names[i] for i in picks]


def layer_groups(model: nn.Module) -> list[str]:
    """The layer groups (``all``) of a built timm model, from its ``feature_info``:

    * a plain (isotropic) model, every level at one stride (ViT, DeiT, MLP-Mixer): the blocks
      at 1/4, 2/4, 3/4, 4/4 of its depth;
    * a CNN (or hierarchical transformer): its stages, without the stride-2 stem (e.g. ResNet's
      ``act1``), as the paper's groups are the residual stages (``layer1``..``layer4``);
    * no ``feature_info`` but ``blocks``: as a plain model. Otherwise none.
    """
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info) or []  # timm's FeatureInfo (features_only) or a list
    levels = [(d["module"], d.get("reduction")) for d in info if d.get("module") in modules]
    names = [m for m, _ in levels]
    if len({r for _, r in levels}) == 1:
        return _quarters(names)
    if levels:
        stages = [m for m, r in levels if r is None or r >= 4]
        return stages if len(stages) >= 2 else names
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        return _quarters([f"blocks.{i}" for i in range(len(blocks))])
    return []
