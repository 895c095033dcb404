"""Activation-based attention maps and the attention-transfer loss (paper Section 3.1).

Plain tensor functions, torch only. Notation follows the paper: an activation tensor
``A`` of shape (C, H, W) is mapped to a spatial attention map ``F(A)`` of shape (H, W)
(Eq. 1); ``Q = vec(F(A))`` is l2-normalised per sample and student/teacher maps are
compared (Eq. 2).

Two reductions of Eq. 2 are offered, because the paper and the authors' code differ:

* ``reduction="paper"`` -- Eq. 2 as printed, one layer pair::

      L = beta/2 * mean_b || q_s[b] - q_t[b] ||_2          (q = Q / ||Q||_2)

* ``reduction="code"`` -- the released code (``utils.at_loss``)::

      L = beta * mean_{b, i} (q_s[b, i] - q_t[b, i])^2
        = beta / (B * H * W) * sum_b || q_s[b] - q_t[b] ||_2^2

  i.e. the squared distance, averaged over batch *and* map positions. This is the
  paper's "beta = 10^3 divided by the number of elements in attention map and batch
  size" (Section 4.1.1): with ``beta = 1e3`` it reproduces the authors' numbers.

Worked relation: for one pair with d_b = ||q_s[b] - q_t[b]||_2 (0 <= d_b <= 2),
``code = beta / (H*W) * mean_b d_b^2`` and ``paper = beta / 2 * mean_b d_b``. So for a
32x32 map with every d_b = 0.1, code gives beta * 9.8e-6 and paper gives beta * 0.05: the
``paper`` reduction needs a beta about H*W/(2*d) times smaller for the same pull. The
functions here return the loss *without* beta (the 1/2 of ``paper`` included); the Objective
multiplies by beta.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atx.options import Choice


class MapMode(Choice):
    """F_sum^p or F_max^p over channels (Eq. 1)."""

    sum = "sum"
    max = "max"


class Reduction(Choice):
    """Eq. 2 as the authors' code computes it, or as the paper prints it (see above)."""

    code = "code"
    paper = "paper"


# F^2_sum is taken a batch chunk of about this many elements at a time (512 KiB of float32):
# the squares stay in a core's cache instead of going through memory as a (B, C, H, W)
# temporary the size of the features (and, with the backward below, two more).
CHUNK_ELEMENTS = 1 << 17


def _samples_per_chunk(features: Tensor) -> int:
    per_sample = math.prod(features.shape[1:])
    return max(1, CHUNK_ELEMENTS // max(per_sample, 1))


def _sum_of_squares(features: Tensor) -> Tensor:
    """``(a * a).sum(dim=1)`` of ``a = features.float()``, bitwise, one batch chunk at a time:
    every output element sums its own channels in the same order, whatever the chunk."""
    k = _samples_per_chunk(features)
    if k >= features.shape[0]:
        a = features.float()
        return (a * a).sum(dim=1)
    out = features.new_empty((features.shape[0], *features.shape[2:]), dtype=torch.float32)
    for part, o in zip(features.split(k), out.split(k), strict=True):
        part = part.float()
        torch.sum(part * part, dim=1, out=o)
    return out


class _SumOfSquares(torch.autograd.Function):
    """``(a * a).sum(1)`` of float32 ``a``, applied as ``f(a, a)``: its backward returns what
    autograd's ``MulBackward0`` does, ``g*a`` for each factor, so the two are summed into
    ``a``'s gradient where and in the order they always were (bitwise, whatever else feeds
    ``a``), but from one product computed chunk by chunk instead of two full-size ones."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, _same: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        return _sum_of_squares(a)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        (a,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops (no out=)
            ga = grad.unsqueeze(1) * a
            return ga, ga
        k = _samples_per_chunk(a)
        ga = torch.empty_like(a)
        for a_k, g_k, out in zip(a.split(k), grad.split(k), ga.split(k), strict=True):
            torch.mul(g_k.unsqueeze(1), a_k, out=out)
        return ga, ga


def spatial_map(features: Tensor, p: float = 2.0, mode: MapMode = "sum") -> Tensor:
    """Unnormalised attention map F(A), Eq. 1, shape (B, H, W), always in float32.

    ``mode="sum"``: F_sum^p(A) = sum_c |A_c|^p; ``mode="max"``: F_max^p(A) = max_c |A_c|^p.
    ``p`` may be any real > 0 (p = 1 gives F_sum). Computed in float32 with autocast off,
    so mixed-precision training does not lose the small differences the loss measures.
    For p < 1, |A| is clamped from below at the smallest normal float32 first: |a|^p has an
    infinite slope at 0, and post-ReLU features are exactly 0 in many places (the clamped
    entries get gradient 0, not NaN). Values for p >= 1 take the unclamped paths.
    """
    if features.dim() != 4:
        raise ValueError(
            f"attention maps need (B, C, H, W) features, got shape {tuple(features.shape)}"
        )
    if p <= 0:
        raise ValueError(f"attention map exponent p must be > 0, got {p}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        if p == 2 and MapMode(mode) is MapMode.sum:  # the default F^2_sum: a*a, no abs pass
            if features.requires_grad and torch.is_grad_enabled():
                a = features.float()  # a no-op for float32; else autograd's cast, as before
                return _SumOfSquares.apply(a, a)
            return _sum_of_squares(features)  # no graph (the teacher): cast chunk by chunk
        a = features.float()
        if p == 2:
            a = a * a
        elif p % 2 == 0:  # other even powers: no abs needed either
            a = a.pow(p)
        elif p < 1:
            a = a.abs().clamp_min(torch.finfo(a.dtype).tiny).pow(p)
        else:
            a = a.abs() if p == 1 else a.abs().pow(p)
        return a.sum(dim=1) if MapMode(mode) is MapMode.sum else a.amax(dim=1)


def normalise(maps: Tensor) -> Tensor:
    """Q / ||Q||_2 per sample: flatten (B, H, W) -> (B, H*W) and l2-normalise (Eq. 2)."""
    return F.normalize(maps.flatten(1), p=2.0, dim=1)


def attention_map(features: Tensor, p: float = 2.0, mode: MapMode = "sum") -> Tensor:
    """Normalised attention map Q / ||Q||_2 of Eq. 2, shape (B, H*W), float32."""
    return normalise(spatial_map(features, p, mode))


def at_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    p: float = 2.0,
    mode: MapMode = "sum",
    reduction: Reduction = "code",
    interpolate: bool = False,
) -> Tensor:
    """Attention-transfer distance for one layer pair: Eq. 2 divided by beta.

    Channel counts may differ (maps are summed over channels). Different spatial sizes are
    an error unless ``interpolate`` is true, in which case the student's *attention map* is
    resized bilinearly to the teacher's size before normalisation (Section 3.1: "if needed,
    attention maps can be interpolated to match their shapes").
    """
    s = spatial_map(student_features, p, mode)
    t = spatial_map(teacher_features, p, mode)
    if s.shape[-2:] != t.shape[-2:]:
        if not interpolate:
            raise ValueError(
                f"attention maps differ in spatial size: student {tuple(student_features.shape)}"
                f" vs teacher {tuple(teacher_features.shape)}; pick layers of equal resolution"
                " or set distill.at.interpolate=true"
            )
        s = F.interpolate(s.unsqueeze(1), size=t.shape[-2:], mode="bilinear", align_corners=False)
        s = s.squeeze(1)
    diff = normalise(s) - normalise(t)
    if Reduction(reduction) is Reduction.code:
        return diff.pow(2).mean()
    return 0.5 * diff.norm(p=2, dim=1).mean()


def map_agreement(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """How close the student's attention is to the teacher's, per sample, from their maps
    ``F(A)`` (:func:`spatial_map`, (B, h, w) and (B, H, W)): the cosine similarity
    ``q_s . q_t`` of the normalised maps (1 = the same attention) and the ``code`` AT distance
    ``mean_i (q_s[i] - q_t[i])^2``. Maps of different sizes are compared after resizing the
    student's map to the teacher's. Returns two (B,) tensors."""
    s, t = student_map, teacher_map
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s.unsqueeze(1), size=t.shape[-2:], mode="bilinear", align_corners=False)
        s = s.squeeze(1)
    qs, qt = normalise(s), normalise(t)
    return (qs * qt).sum(dim=1), (qs - qt).pow(2).mean(dim=1)
