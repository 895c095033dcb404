"""Tap the outputs of named submodules ("layer groups") of any nn.Module with forward hooks.

Models know nothing of distillation: the layers used for transfer are module names given in
config (``model.named_modules()`` names, e.g. ``group2`` or ``layer3.1``), so any torchvision
model can be a teacher or student without code changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atx.errors import AtxError
from atx.options import did_you_mean


def check_layer_names(model: nn.Module, names: Sequence[str], who: str) -> None:
    """Raise an AtxError naming any layer that ``model`` does not have, with close matches."""
    known = dict(model.named_modules())
    for name in names:
        if name not in known or name == "":
            hint = did_you_mean(name, known, n=3)
            top = [n for n in known if n and "." not in n]
            raise AtxError(
                f"{who} has no layer named '{name}'{hint}; its top-level layers are:"
                f" {', '.join(top)} (nested names use dots, e.g. '{top[-1]}.0')"
            )


class LayerTaps:
    """Keep the latest outputs of the named submodules of ``model``.

    >>> taps = LayerTaps(model, ["group1", "group2"])
    >>> logits = model(x); feats = taps.outputs()   # {"group1": A_1, "group2": A_2}
    """

    def __init__(self, model: nn.Module, names: Sequence[str], who: str = "model") -> None:
        check_layer_names(model, names, who)
        self.names = list(names)
        self._latest: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self._handles: list[RemovableHandle] = [
            modules[n].register_forward_hook(partial(self._store, n)) for n in self.names
        ]

    def _store(self, name: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        # a bound method in a partial (not a closure) keeps the model picklable (ddp_spawn)
        self._latest[name] = output

    def outputs(self) -> dict[str, Tensor]:
        """The tapped outputs of the last forward pass by layer name; the references are
        released so no activation outlives its step."""
        feats = dict(self._latest)
        self._latest.clear()
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
