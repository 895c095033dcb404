"""Gradient-based attention (Section 3.2): input gradients, double backprop, flip symmetry, BN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from atx.gradient_attention import (
    grad_at_loss,
    gradient_map,
    input_gradient,
    min_l2_loss,
    symmetry_loss,
)
from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import DistillModule, bn_stats_frozen
from atx.terms import CrossEntropy, GradientAT, MinL2, SymmetryNorm


def tiny_net(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """Smooth (tanh) so finite differences and gradcheck are exact enough."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 5, 4)
    ).to(dtype)


def test_input_gradient_matches_finite_differences():
    net = tiny_net()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1])
    grad = input_gradient(net(x), y, x).double()

    def total_loss(inp):
        return F.cross_entropy(net(inp), y, reduction="sum")

    eps = 1e-6
    numeric = torch.zeros_like(x)
    flat = x.detach().clone().view(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        numeric.view(-1)[i] = (total_loss(plus.view_as(x)) - total_loss(minus.view_as(x))) / (
            2 * eps
        )
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_input_gradient_is_per_sample_not_batch_mean():
    net = tiny_net()
    x = torch.randn(4, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    whole = input_gradient(net(x), y, x)
    x0 = x[:1].detach().requires_grad_(True)
    alone = input_gradient(net(x0), y[:1], x0)
    torch.testing.assert_close(whole[:1], alone)


def test_linear_model_hand_value_and_min_l2():
    # logits = W x for a linear model: J = W^T (softmax(Wx) - onehot(y))
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 1, 1, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 0])
    logits = x.flatten(1) @ w.T
    grad = input_gradient(logits, y, x)
    expected = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 3)) @ w
    torch.testing.assert_close(grad.double().flatten(1), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        min_l2_loss(grad).double(), 0.5 * expected.pow(2).sum(1).mean(), rtol=1e-6, atol=1e-8
    )


def test_grad_at_loss_hand_values_and_options():
    js = torch.tensor([[[[3.0, 0.0]], [[0.0, 4.0]]]])  # (1, 2, 1, 2)
    jt = torch.zeros_like(js)
    assert float(grad_at_loss(js, jt)) == pytest.approx(0.5 * 25)  # 1/2 ||J_s - J_t||^2
    # per-channel sum of squares -> spatial map [9, 16]
    torch.testing.assert_close(gradient_map(js, reduce_channels=True), torch.tensor([[9.0, 16.0]]))
    # normalised: unit vectors, so the loss only sees the direction
    assert float(grad_at_loss(js, 10 * js, normalize=True)) == pytest.approx(0.0, abs=1e-7)


def test_transfer_gradient_matches_gradcheck_in_float64():
    """d/dW_s of beta/2 ||J_s - J_t||^2 through double backprop (Eq. 5) vs numerical."""
    student, teacher = tiny_net(0), tiny_net(1)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    y = torch.tensor([1, 2])
    x_t = x.clone().requires_grad_(True)
    j_t = input_gradient(teacher(x_t), y, x_t).double()
    names = [n for n, _ in student.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())

    def loss_of_weights(*weights):
        xs = x.clone().requires_grad_(True)
        logits = functional_call(student, dict(zip(names, weights, strict=True)), (xs,))
        j_s = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xs,
                                  create_graph=True)[0]
        return 0.5 * (j_s - j_t).flatten(1).pow(2).sum(1).mean()

    assert torch.autograd.gradcheck(loss_of_weights, params, eps=1e-6, atol=1e-5)
    # and atx's own functions give the same value
    xs = x.clone().requires_grad_(True)
    ours = grad_at_loss(input_gradient(student(xs), y, xs, create_graph=True), j_t)
    torch.testing.assert_close(ours.double(), loss_of_weights(*params), rtol=1e-5, atol=1e-8)


class FlipInvariant(nn.Module):
    """f(x) = g(x) + g(flip(x)): exactly invariant to horizontal flips."""

    def __init__(self) -> None:
        super().__init__()
        self.g = tiny_net(2, torch.float32)

    def forward(self, x):
        return self.g(x) + self.g(x.flip(-1))


def _symmetry_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    xa = x.clone().requires_grad_(True)
    xf = x.flip(-1).requires_grad_(True)
    return float(symmetry_loss(input_gradient(net(xa), y, xa), input_gradient(net(xf), y, xf)))


def test_symmetry_zero_for_flip_invariant_network_positive_otherwise():
    x, y = torch.randn(3, 2, 4, 5), torch.tensor([0, 1, 2])
    assert _symmetry_of(FlipInvariant(), x, y) == pytest.approx(0.0, abs=1e-10)
    assert _symmetry_of(tiny_net(2, torch.float32), x, y) > 1e-6


def _module(terms, teacher: bool, depth: int = 10) -> DistillModule:
    torch.manual_seed(0)
    student = build_model("wrn", num_classes=10, depth=depth, width=1)
    t = build_model("wrn", num_classes=10, depth=depth, width=1) if teacher else None
    return DistillModule(student, Objective([CrossEntropy(Schedule(1.0)), *terms]), 10, teacher=t)


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_grad_at_trains_student_only_through_second_backward():
    module = _module([GradientAT(Schedule(10.0))], teacher=True)
    x, y = _batch()
    out = module._student_outputs(x, y)
    module._add_teacher_outputs(out, x, y)
    assert out.input_grad.requires_grad and not out.teacher_input_grad.requires_grad
    loss, parts = module.objective(out)
    assert parts["grad_at"] > 0
    only_transfer = 10.0 * parts["grad_at"]
    only_transfer.backward()  # no CE here: any student gradient comes from double backprop
    assert all(p.grad is None for p in module.teacher.parameters())
    grads = [p.grad for p in module.student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_symmetry_pass_updates_bn_running_stats_once():
    """atx's BN choice: both passes use batch statistics (train mode), but only the unflipped
    pass moves the running statistics, exactly as a plain CE step would."""
    x, y = _batch()
    plain = _module([], teacher=False)
    sym = _module([SymmetryNorm(Schedule(1.0))], teacher=False)
    plain._student_outputs(x, y)
    out = sym._student_outputs(x, y)
    assert out.flipped_input_grad is not None
    for (name, a), (_, b) in zip(plain.student.named_buffers(), sym.student.named_buffers(),
                                 strict=True):
        assert torch.equal(a, b), name
    bn = next(m for m in sym.student.modules() if isinstance(m, nn.BatchNorm2d))
    with bn_stats_frozen(sym.student):
        assert bn.momentum == 0.0
    assert bn.momentum == 0.1


def test_input_gradient_path_is_float32_under_autocast():
    module = _module([MinL2(Schedule(1.0))], teacher=False)
    x, y = _batch()
    reference = module._student_outputs(x, y).input_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module._student_outputs(x, y)
    assert out.input_grad.dtype == torch.float32 and out.logits.dtype == torch.float32
    # BN running stats moved between calls, but batch statistics are used in train mode
    torch.testing.assert_close(out.input_grad, reference)
