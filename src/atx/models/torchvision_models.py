"""torchvision classification models by name (paper §4.2: ResNet-18/34 on CUB, Scenes, ImageNet).

ResNet layer groups for attention transfer are `layer1` ... `layer4` (paper §4.2.2).
Weights are never downloaded: pass `weights_path` to a local torchvision-format state dict.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from atx.errors import AtxError
from atx.files import is_state_dict, read_tensors
from atx.models.pretrained import fit_pretrained
from atx.options import did_you_mean


def classification_archs() -> list[str]:
    """Names of torchvision's classification model builders."""
    return sorted(tvm.list_models(module=tvm))


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def _classifier_prefix(model: nn.Module) -> str | None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def _set_in_channels(model: nn.Module, in_channels: int) -> None:
    found = _first_conv(model)
    if found is None or found[1].in_channels != 3:
        raise AtxError(f"cannot set in_channels={in_channels}: no 3-channel first conv found")
    name, old = found
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB conv weight -> `in_channels` (timm's rule: sum for 1 channel, else tile and rescale)."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_pretrained(model: nn.Module, weights_path: str) -> None:
    """Load a torchvision-format state dict from `weights_path` into `model`.

    The classifier (last Linear) is skipped when its shape differs (other num_classes), and the
    first conv is adapted when in_channels != 3 (summed over RGB for 1 channel). Any other
    missing, unexpected or mis-shaped key raises AtxError naming the file.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise AtxError(f"weights file '{weights_path}' not found")
    state = read_tensors(path, "weights file")
    if not is_state_dict(state):
        raise AtxError(f"weights file '{weights_path}' does not hold a state dict of tensors")
    fc, conv = _classifier_prefix(model), _first_conv(model)
    fit_pretrained(model, state, weights_path, [fc] if fc else [],
                   [f"{conv[0]}.weight"] if conv else [], _adapt_input_conv)


def pretrained_weights_file(arch: str, weights: str) -> str:
    """torchvision's pretrained weights ``weights`` (e.g. 'IMAGENET1K_V1' or 'DEFAULT') for
    ``arch``, as a local file: taken from torch hub's cache ($TORCH_HOME/hub/checkpoints)
    when there, else downloaded into it by torchvision (needs internet)."""
    try:
        enum = tvm.get_model_weights(arch)[weights]
    except (KeyError, ValueError):
        msg = f"torchvision model '{arch}' has no pretrained weights '{weights}'"
        raise AtxError(msg) from None
    from torch.hub import get_dir, load_state_dict_from_url

    cached = Path(get_dir()) / "checkpoints" / Path(enum.url).name
    if cached.is_file():  # read once, by load_pretrained (weights_only, refused if not tensors)
        return str(cached)
    try:
        load_state_dict_from_url(enum.url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:
        raise AtxError(
            f"could not get torchvision weights {arch}/{weights} from {enum.url} "
            f"({type(e).__name__}); offline, download the file elsewhere and pass "
            "model.weights_path=<file>"
        ) from None
    return str(cached)


def torchvision(
    arch: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    weights_path: str | None = None,
    weights: str | None = None,
) -> nn.Module:
    """Any torchvision classification model by builder name, e.g. 'resnet50', 'vgg11_bn'.

    Built with `torchvision.models.get_model(arch, weights=None, num_classes=...)`; the first
    3-channel conv is replaced when `in_channels != 3`; `weights_path` loads a local state dict
    (see `load_pretrained`: with another num_classes, everything except the classifier is loaded);
    `weights` names torchvision's pretrained weights instead (downloaded when online, see
    `pretrained_weights_file`).
    """
    archs = classification_archs()
    if arch not in archs:
        hint = did_you_mean(arch, archs)
        raise AtxError(f"unknown torchvision classification model '{arch}'{hint}")
    model = tvm.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _set_in_channels(model, in_channels)
    if weights_path is not None and weights is not None:
        raise AtxError("give model.weights_path (a local file) or model.weights, not both")
    if weights is not None:
        weights_path = pretrained_weights_file(arch, weights)
    if weights_path is not None:
        load_pretrained(model, weights_path)
    return model


def torchvision_arch(arch: str, role: str) -> Callable[..., nn.Module]:
    """:func:`torchvision` of one ``arch`` as a model name of its own (``model=resnet18``)."""

    def build(
        num_classes: int = 1000,
        in_channels: int = 3,
        weights_path: str | None = None,
        weights: str | None = None,
    ) -> nn.Module:
        return torchvision(arch, num_classes, in_channels, weights_path, weights)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = f"torchvision {arch} ({role}); groups `layer1`..`layer4`."
    return build


resnet18 = torchvision_arch("resnet18", "student of paper §4.2")
resnet34 = torchvision_arch("resnet34", "teacher of paper §4.2")
