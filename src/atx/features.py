"""Tap the outputs of named submodules ("layer groups") of any nn.Module with forward hooks.

Models know nothing of distillation: the layers used for transfer are module names given in
config (``model.named_modules()`` names, e.g. ``group2`` or ``layer3.1``), so any torchvision
model can be a teacher or student without code changes. Layers of a vision transformer give
(B, C, h, w) maps too: patch tokens on the patch grid, or the class token's attention
(atx.models.vit_maps, docs/vit_maps.md); every other layer's output is kept as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atx.errors import AtxError
from atx.models.vit_maps import View, vit_views
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
        views, grid_hooks = vit_views(model, self.names)
        self._handles: list[RemovableHandle] = grid_hooks
        for n in self.names:
            if n in views:  # a transformer layer: its view needs the call's inputs (kwargs too)
                hook = partial(self._store_view, n, views[n])
                self._handles.append(modules[n].register_forward_hook(hook, with_kwargs=True))
            else:
                self._handles.append(modules[n].register_forward_hook(partial(self._store, n)))

    def _store(self, name: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        # a bound method in a partial (not a closure) keeps the model picklable (ddp_spawn)
        self._latest[name] = output

    def _store_view(
        self, name: str, view: View, module: nn.Module, args: tuple, kwargs: dict, output: Tensor
    ) -> None:
        self._latest[name] = view(module, args, kwargs, output)

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
