"""Spatial maps of vision-transformer layers, as (B, C, h, w) features (docs/vit_maps.md).

A vision transformer here is any module with ``patch_embed`` and ``num_prefix_tokens`` (timm's
VisionTransformer and its DeiT / register-token / no-class-token variants). A tapped layer
inside one gets one of two views, picked by the layer's kind:

- *activation* (a block, ``blocks.3``, or ``norm``): its output tokens (B, N, D), prefix tokens
  (class, distillation, register) dropped, reshaped to the patch grid of this forward ->
  (B, D, h, w); the paper's F^p_sum / F^p_max then reduce D like a CNN's channels.
- *self-attention* (an attention module with a ``qkv`` Linear, ``blocks.3.attn``): the
  class token's attention to the patch tokens, mean over heads -> (B, 1, h, w); without a class
  token the mean over all query tokens. It is recomputed from the module's input, so the
  model's own (possibly fused) attention and its outputs are untouched.

Layers outside a vision transformer (every CNN) are not viewed at all: their outputs are
tapped as they are. timm is not imported: the modules are recognised by their attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atx.errors import AtxError

# view(module, args, kwargs, output) -> the tapped layer's (B, C, h, w) map
View = Callable[[nn.Module, tuple, dict, Any], Any]


def is_vision_transformer(module: nn.Module) -> bool:
    return hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens")


def is_self_attention(module: nn.Module) -> bool:
    """timm's ``Attention``: one qkv projection, heads, a scale and q/k norms."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and all(
        hasattr(module, a) for a in ("num_heads", "head_dim", "scale", "q_norm", "k_norm")
    )


class PatchGrid:
    """The patch grid (h, w) of the latest forward of a vision transformer, read from its
    input's size by a forward pre-hook (so dynamic image sizes give their own grid)."""

    def __init__(self, vit: nn.Module) -> None:
        self.patch_embed = vit.patch_embed
        self.hw: tuple[int, int] | None = None

    def record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        size = (int(x.shape[-2]), int(x.shape[-1]))
        feat_size = getattr(self.patch_embed, "dynamic_feat_size", None)
        if feat_size is not None:  # timm: ceil when the image is padded to whole patches
            self.hw = tuple(feat_size(size))
        else:
            ph, pw = self.patch_embed.patch_size
            self.hw = (size[0] // ph, size[1] // pw)

    def size(self) -> tuple[int, int]:
        # a block run outside its model's forward: the grid the model was built for
        return self.hw if self.hw is not None else tuple(self.patch_embed.grid_size)


class TokenMap:
    """Activation view: patch tokens of a (B, N, D) output on the (B, D, h, w) patch grid."""

    def __init__(self, grid: PatchGrid, name: str) -> None:
        self.grid, self.name = grid, name

    def __call__(self, _module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        h, w = self.grid.size()
        if not isinstance(output, Tensor):
            return output  # left for the shape check (build.probe_shapes) to name
        if output.dim() == 4:
            if tuple(output.shape[-2:]) != (h, w) and tuple(output.shape[1:3]) == (h, w):
                return output.permute(0, 3, 1, 2)  # NHWC (a dynamic-size patch_embed)
            return output
        if output.dim() != 3 or output.shape[1] < h * w:
            return output
        # prefix tokens come first (class, distillation, registers); patches are the last h*w
        patches = output[:, output.shape[1] - h * w :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)


class ClassAttentionMap:
    """Self-attention view: softmax(q k^T * scale) of the module's input, row of the class
    token (mean over all query rows without one), mean over heads, patch columns -> (B, 1, h, w).
    Attention dropout is not applied: the map is the attention probabilities themselves."""

    def __init__(self, grid: PatchGrid, class_token: bool, name: str) -> None:
        self.grid, self.class_token, self.name = grid, class_token, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> Tensor:
        extra = [k for k, v in kwargs.items() if k != "x" and v is not None and v is not False]
        if extra or any(a is not None and a is not False for a in args[1:]):
            raise AtxError(
                f"layer '{self.name}': attention maps of attention called with"
                f" {', '.join(extra) or 'extra arguments'} (masks, rotary embeddings) are not"
                " supported; tap its block for an activation map"
            )
        x = args[0] if args else kwargs["x"]
        b, n, _ = x.shape
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim)
        q, k, _v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        q, k = module.q_norm(q), module.k_norm(k)
        if self.class_token:
            q = q[:, :, :1]  # the class token is token 0 (timm puts it first)
        with torch.autocast(device_type=x.device.type, enabled=False):
            attn = ((q.float() * module.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)
        h, w = self.grid.size()
        rows = attn.mean(dim=(1, 2))  # heads, then query rows: (B, N) over keys
        return rows[:, n - h * w :].reshape(b, 1, h, w)


def _vit_of(modules: dict[str, nn.Module], name: str) -> str | None:
    """Name of the innermost vision transformer holding layer ``name`` ("" = the model)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:depth])
        if is_vision_transformer(modules[owner]):
            return owner
    return None


def vit_views(
    model: nn.Module, names: list[str]
) -> tuple[dict[str, View], list[RemovableHandle]]:
    """The view of each named layer that lies inside a vision transformer (others: none), and
    the pre-hooks that record each such transformer's patch grid (remove them with the taps)."""
    modules = dict(model.named_modules())
    grids: dict[str, PatchGrid] = {}
    handles: list[RemovableHandle] = []
    views: dict[str, View] = {}
    for name in names:
        owner = _vit_of(modules, name)
        if owner is None:
            continue
        if owner not in grids:
            vit = modules[owner]
            grids[owner] = PatchGrid(vit)
            handles.append(vit.register_forward_pre_hook(grids[owner].record, with_kwargs=True))
        layer = modules[name]
        if is_self_attention(layer):
            class_token = getattr(modules[owner], "cls_token", None) is not None
            views[name] = ClassAttentionMap(grids[owner], class_token, name)
        else:
            views[name] = TokenMap(grids[owner], name)
    return views, handles
