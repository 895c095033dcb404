"""Attention maps and the AT loss against values computed by hand from the paper's equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from atx.attention import at_loss, attention_agreement, attention_map, spatial_map

# One sample, C=2 channels, a 1x2 map: A_1 = [1, -2], A_2 = [3, 0].
A = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])


@pytest.mark.parametrize(
    ("p", "mode", "expected"),
    [
        (2.0, "sum", [10.0, 4.0]),  # F^2_sum = 1+9, 4+0
        (1.0, "sum", [4.0, 2.0]),  # F_sum = |1|+|3|, |-2|+|0|
        (4.0, "sum", [82.0, 16.0]),  # 1+81, 16+0
        (2.0, "max", [9.0, 4.0]),  # F^2_max = max(1, 9), max(4, 0)
        (1.0, "max", [3.0, 2.0]),
        (0.5, "sum", [1 + math.sqrt(3), math.sqrt(2)]),  # any real p > 0, on |A|
    ],
)
def test_spatial_map_hand_values(p, mode, expected):
    got = spatial_map(A, p, mode)
    assert got.shape == (1, 1, 2)
    torch.testing.assert_close(got.flatten(), torch.tensor(expected))


def test_p_below_one_on_relu_zeros_gives_finite_loss_and_gradients():
    torch.manual_seed(0)
    pre = torch.randn(2, 4, 5, 5, requires_grad=True)
    mask = torch.arange(25).view(1, 1, 5, 5) != 7  # one position 0 in every channel
    teacher = torch.relu(torch.randn(2, 8, 5, 5))
    for mode in ("sum", "max"):
        feats = torch.relu(pre) * mask  # about half the entries exactly 0
        assert (feats == 0).float().mean() > 0.3
        loss = at_loss(feats, teacher, p=0.5, mode=mode)
        (grad,) = torch.autograd.grad(loss, pre)
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the clamp changes values only where |A| is below the smallest normal float32
    torch.testing.assert_close(spatial_map(feats, 0.5), feats.sqrt().sum(dim=1))


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_p_from_one_up_keeps_the_exact_unclamped_values(p):
    x = torch.relu(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)))
    x[0, :, 0, 0] = 1e-40  # subnormal: a clamp would lift it to 1.2e-38
    hand = (x * x) if p == 2 else x.pow(p) if p == 4 else x.abs().pow(p)
    assert torch.equal(spatial_map(x, p), hand.sum(dim=1))


def test_attention_map_is_l2_normalised_per_sample():
    q = attention_map(A, 2.0, "sum")
    torch.testing.assert_close(q, torch.tensor([[10.0, 4.0]]) / math.sqrt(116.0))
    batch = torch.randn(5, 7, 4, 3)
    q = attention_map(batch)
    assert q.shape == (5, 12)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(5))


def test_attention_map_float32_under_autocast():
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = attention_map(x.bfloat16())
    assert q.dtype == torch.float32


def test_bad_p_and_shape():
    with pytest.raises(ValueError, match="p must be > 0"):
        spatial_map(A, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        spatial_map(torch.zeros(2, 3))


def _features_with_map(values):
    """A (1, 1, 1, n) feature whose F^2_sum map is ``values`` (square roots of them)."""
    return torch.tensor(values).sqrt().view(1, 1, 1, -1)


def test_at_loss_code_and_paper_hand_values():
    s = _features_with_map([1.0, 0.0])  # q_s = [1, 0]
    t = _features_with_map([0.0, 1.0])  # q_t = [0, 1]; diff = [1, -1]
    # code: mean over batch and positions of squared differences = (1 + 1) / 2
    torch.testing.assert_close(at_loss(s, t, reduction="code"), torch.tensor(1.0))
    # paper (Eq. 2 / beta): 1/2 * ||diff||_2 = sqrt(2) / 2
    torch.testing.assert_close(at_loss(s, t, reduction="paper"), torch.tensor(math.sqrt(2) / 2))


def test_at_loss_worked_relation_between_reductions():
    torch.manual_seed(0)
    s, t = torch.randn(4, 8, 6, 5), torch.randn(4, 16, 6, 5)  # channel counts may differ
    # q = vec(sum_c A_c^2) / its l2 norm, per sample (Eq. 2), built here from torch ops
    qs, qt = ((x * x).sum(dim=1).flatten(1) for x in (s, t))
    qs, qt = qs / qs.norm(dim=1, keepdim=True), qt / qt.norm(dim=1, keepdim=True)
    d = (qs - qt).norm(dim=1)  # d_b
    hw = 30
    torch.testing.assert_close(at_loss(s, t, reduction="code"), (d**2).mean() / hw)
    torch.testing.assert_close(at_loss(s, t, reduction="paper"), d.mean() / 2)


def test_at_loss_zero_for_scaled_teacher_and_gradient_finite():
    s = torch.randn(3, 4, 5, 5, requires_grad=True)
    t = 3.0 * s.detach()  # same map up to scale: normalisation removes it
    for reduction in ("code", "paper"):
        loss = at_loss(s, t, reduction=reduction)
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all()


def _ramp_features(h: int, w: int) -> torch.Tensor:
    """(2, 3, h, w) features whose F^2_sum maps are structured: a diagonal ramp and a blob."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = (1.0 + yy + 2 * xx).float()
    blob = torch.exp(-((yy - h / 3) ** 2 + (xx - 2 * w / 3) ** 2) / 2.0) + 0.1
    maps = torch.stack([ramp, blob])  # (2, h, w), each split evenly over 3 channels
    return (maps / 3).sqrt().unsqueeze(1).expand(2, 3, h, w).contiguous()


def test_at_loss_spatial_mismatch_and_interpolation():
    s, t = torch.ones(2, 3, 4, 4), torch.ones(2, 5, 8, 8)
    with pytest.raises(ValueError, match=r"student \(2, 3, 4, 4\) vs teacher \(2, 5, 8, 8\)"):
        at_loss(s, t)
    s = _ramp_features(4, 5)
    t = torch.randn(2, 5, 8, 6, generator=torch.Generator().manual_seed(0))
    # by hand: the student's map F^2_sum, resized bilinearly (half-pixel centres) to the
    # teacher's 8x6, then both normalised and compared as the code reduction does
    s_map = (s * s).sum(dim=1, keepdim=True)
    up = F.interpolate(s_map, size=(8, 6), mode="bilinear", align_corners=False)
    qs, qt = up.flatten(1), (t * t).sum(dim=1).flatten(1)
    qs, qt = qs / qs.norm(dim=1, keepdim=True), qt / qt.norm(dim=1, keepdim=True)
    torch.testing.assert_close(at_loss(s, t, interpolate=True), (qs - qt).pow(2).mean())
    # a teacher whose map is exactly that resize is at distance 0; one whose map is the
    # nearest-neighbour or the corner-aligned resize is not
    bilinear = up.sqrt().expand(2, 4, 8, 6)
    assert float(at_loss(s, bilinear, interpolate=True)) == pytest.approx(0.0, abs=1e-7)
    cosine, _ = attention_agreement(s, bilinear)
    torch.testing.assert_close(cosine, torch.ones(2))
    for mode, corners in (("nearest", None), ("bilinear", True)):
        other = F.interpolate(s_map, size=(8, 6), mode=mode, align_corners=corners)
        assert float(at_loss(s, other.sqrt(), interpolate=True)) > 1e-5, mode


def test_attention_agreement_hand_values():
    s = _features_with_map([1.0, 0.0])  # q = [1, 0]
    t = _features_with_map([1.0, 1.0])  # q = [1, 1] / sqrt(2)
    cosine, distance = attention_agreement(s, t)
    torch.testing.assert_close(cosine, torch.tensor([1 / math.sqrt(2)]))
    # mean over the 2 positions of (1 - 1/sqrt2)^2 and (0 - 1/sqrt2)^2
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + 0.5) / 2
    torch.testing.assert_close(distance, torch.tensor([expected]))
    same_c, same_d = attention_agreement(s, 2 * s)
    torch.testing.assert_close(same_c, torch.ones(1))
    torch.testing.assert_close(same_d, torch.zeros(1))
