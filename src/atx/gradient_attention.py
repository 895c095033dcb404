"""Gradient-based attention (paper Section 3.2): input gradients and the losses built on them.

Torch only. The attention of a network at an input is the gradient of its loss w.r.t. the input,
``J = dL(W, x)/dx`` (Eq. 3), with L the cross-entropy on the true labels. Every loss here is
``1/2 * mean_b ||.||_2^2`` of a per-sample difference, so the Objective's weight beta gives
``beta/2 * ||.||^2``:

* grad-AT (Eq. 4): ``beta/2 ||J_s - J_t||^2``. Eq. 4 prints an unsquared norm, but Eq. 5, the
  gradient the paper trains with, ``beta (J_s - J_t) d2L/(dW_s dx)``, is the derivative of the
  *squared* form; atx implements the squared form so that Eq. 5 holds.
* symmetry norm (Eq. 6): ``beta/2 ||J(x) - flip(J(flip(x)))||^2``; one network, no teacher.
* min-l2 (Drucker & LeCun, 1992, double backpropagation): ``beta/2 ||J||^2``.

``J`` is taken per sample: the gradient of the *summed* per-sample cross-entropies, so that
``J[b] = dL_b/dx_b`` does not shrink with the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def input_gradient(
    logits: Tensor, targets: Tensor, inputs: Tensor, create_graph: bool = False
) -> Tensor:
    """``J = dL/dx`` of Eq. 3, per sample, in float32; ``inputs`` must require grad.

    ``create_graph=True`` keeps the graph so a loss on J trains the network through a second
    backward pass (double backpropagation, Eq. 5); use it for the student only.
    """
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=create_graph)
    return grad.float()


def gradient_map(grad: Tensor, normalize: bool = False, reduce_channels: bool = False) -> Tensor:
    """Flatten J per sample. ``reduce_channels``: sum of squares over the input channels, a
    spatial (H, W) map as in Eq. 1 with p = 2; ``normalize``: divide by its l2 norm as Eq. 2
    does for activation maps. Neither is in the paper's Eq. 4 (both default off)."""
    g = grad.pow(2).sum(dim=1) if reduce_channels else grad
    g = g.flatten(1)
    return F.normalize(g, dim=1) if normalize else g


def half_mean_sq(diff: Tensor) -> Tensor:
    """``1/2 * mean_b ||diff[b]||_2^2`` for a (B, ...) tensor."""
    return 0.5 * diff.flatten(1).pow(2).sum(dim=1).mean()


def grad_at_loss(
    student_grad: Tensor,
    teacher_grad: Tensor,
    normalize: bool = False,
    reduce_channels: bool = False,
) -> Tensor:
    """Gradient-based AT, Eq. 4 (squared, see module doc) divided by beta."""
    s = gradient_map(student_grad, normalize, reduce_channels)
    t = gradient_map(teacher_grad.detach(), normalize, reduce_channels)
    return half_mean_sq(s - t)


def symmetry_loss(grad: Tensor, flipped_input_grad: Tensor) -> Tensor:
    """Flip invariance of gradient attention, Eq. 6 divided by beta: ``flipped_input_grad``
    is J at the horizontally flipped input; it is flipped back before comparing."""
    return half_mean_sq(grad - flipped_input_grad.flip(-1))


def min_l2_loss(grad: Tensor) -> Tensor:
    """Double backpropagation regulariser ``1/2 ||J||^2`` (Table 3, "min-l2")."""
    return half_mean_sq(grad)
