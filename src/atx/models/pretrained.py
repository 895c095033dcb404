"""Pretrained weights into a model built for other data: the one rule both the torchvision and
the timm families follow."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from atx.errors import AtxError


def fit_pretrained(
    model: nn.Module,
    state: dict[str, Tensor],
    path: str,
    heads: Iterable[str],
    first_convs: Iterable[str],
    adapt: Callable[[Tensor, int], Tensor],
) -> None:
    """Load ``state`` (read from ``path``) into ``model``. A classifier (``heads``: module names)
    of another class count is left out, so the model's fresh one stays; a first conv
    (``first_convs``: weight keys) of another input channel count is adapted by ``adapt(weight,
    in_channels)``. Any other missing, unexpected or mis-shaped key is an error naming the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise AtxError(
            f"weights file '{path}' does not match the model: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    state = dict(state)
    for head in heads:
        keys = [k for k in state if k.startswith(f"{head}.")]
        if any(state[k].shape != own[k].shape for k in keys):
            for k in keys:  # another class count: keep the model's fresh classifier
                del state[k]
    convs = set(first_convs)
    for key in [k for k in state if state[k].shape != own[k].shape]:
        w, want = state[key], own[key].shape
        if key in convs and w.dim() == 4 and (w.shape[0], *w.shape[2:]) == (want[0], *want[2:]):
            state[key] = adapt(w, want[1])
        else:
            raise AtxError(
                f"weights file '{path}' does not match the model: key '{key}' has shape "
                f"{tuple(w.shape)}, the model expects {tuple(want)}"
            )
    model.load_state_dict(state, strict=False)
