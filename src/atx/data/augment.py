"""Batched image augmentation and normalisation on tensors (torch only, no PIL, no Lightning).

Everything works on a whole batch ``(B, C, H, W)`` at once, on whatever device the batch lives,
so it can run on the GPU inside Lightning's ``on_after_batch_transfer`` hook.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PAD_MODES = ("reflect", "symmetric")


def _border_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """Source index for each of the ``n + 2*pad`` positions of a padded axis of length ``n``.

    ``reflect`` mirrors without repeating the edge (``dcb|abcd|cba``, ``torch.nn.functional.pad``
    mode "reflect", OpenCV ``BORDER_REFLECT_101``); ``symmetric`` repeats the edge
    (``cba|abcd|dcb``, OpenCV ``BORDER_REFLECT``, used by the authors' original CIFAR code).
    """
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "reflect":
        i = torch.where(i < 0, -i, i)
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i > n - 1, 2 * n - 1 - i, i)


def random_crop_flip(
    x: Tensor,
    pad: int,
    flip: bool = True,
    generator: torch.Generator | None = None,
    mode: str = "reflect",
) -> Tensor:
    """Pad by ``pad`` (mirroring the border), take a random HxW crop and flip, per sample.

    The paper's CIFAR augmentation ("reflect-pad 4, random crop 32, horizontal flip"), vectorised:
    the crop offsets ``(dy, dx)`` are drawn uniformly from ``0..2*pad`` (inclusive) independently
    for each sample, and each sample is mirrored left-right with probability 0.5 when ``flip``.
    Padding is never materialised: every output pixel is gathered from its mirrored source
    position in one ``gather``. Works for any dtype (uint8 or float) and keeps it.

    Args:
        x: batch ``(B, C, H, W)``.
        pad: padding on each side; ``0 <= pad < min(H, W)`` (``<= min(H, W)`` for "symmetric").
        flip: also apply random horizontal flips.
        generator: random source; it may live on another device than ``x``.
        mode: "reflect" (no edge repeat, the default) or "symmetric" (edge repeated).
    Returns:
        A new tensor of the same shape, dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a (B, C, H, W) batch, got {tuple(x.shape)}")
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {mode!r}; expected one of {PAD_MODES}")
    b, c, h, w = x.shape
    limit = min(h, w) - (1 if mode == "reflect" else 0)
    if not 0 <= pad <= limit:
        raise ValueError(f"pad={pad} must be in 0..{limit} for {h}x{w} images with mode {mode!r}")
    if pad == 0 and not flip:
        return x.clone()

    gen_device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=gen_device)
    flips = torch.rand(b, generator=generator, device=gen_device) < 0.5
    return crop_flip(x, pad, offsets.to(x.device), flips.to(x.device) if flip else None, mode)


def crop_flip(
    x: Tensor, pad: int, offsets: Tensor, flips: Tensor | None = None, mode: str = "reflect"
) -> Tensor:
    """The deterministic part of :func:`random_crop_flip`: sample ``i`` is cropped at row
    ``offsets[0, i]`` and column ``offsets[1, i]`` (each in ``0..2*pad``) of its ``pad``-padded
    image, then mirrored left-right where ``flips[i]`` (no flips when ``flips`` is None).
    """
    b, c, h, w = x.shape
    dev = x.device
    rows = _border_index(h, pad, mode, dev)[offsets[0, :, None] + torch.arange(h, device=dev)]
    cols = _border_index(w, pad, mode, dev)[offsets[1, :, None] + torch.arange(w, device=dev)]
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


Stats = Sequence[float] | Tensor


def _channel_stats(values: Stats, x: Tensor) -> Tensor:
    # a float32 tensor already on x's device is used as is (no host-to-device copy per batch)
    return torch.as_tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)


def normalize(x: Tensor, mean: Stats, std: Stats) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32; ``x`` is uint8 ``(B, C, H, W)``.

    ``mean``/``std`` are per-channel sequences, or float32 tensors on ``x``'s device (cheapest).
    """
    out = x.to(torch.float32).mul_(1.0 / 255.0)
    return out.sub_(_channel_stats(mean, x)).div_(_channel_stats(std, x))


def denormalize(x: Tensor, mean: Stats, std: Stats, as_uint8: bool = True) -> Tensor:
    """Inverse of :func:`normalize`: uint8 in 0..255 (default) or float32 in [0, 1], clamped."""
    out = (x.to(torch.float32) * _channel_stats(std, x) + _channel_stats(mean, x)).clamp_(0.0, 1.0)
    if as_uint8:
        return out.mul_(255.0).round_().to(torch.uint8)
    return out
