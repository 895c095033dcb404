"""Attention maps and the AT loss against values computed by hand from the paper's equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from atx.attention import at_loss, attention_map, map_agreement, spatial_map

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
    cosine, _ = map_agreement(spatial_map(s), spatial_map(bilinear))
    torch.testing.assert_close(cosine, torch.ones(2))
    for mode, corners in (("nearest", None), ("bilinear", True)):
        other = F.interpolate(s_map, size=(8, 6), mode=mode, align_corners=corners)
        assert float(at_loss(s, other.sqrt(), interpolate=True)) > 1e-5, mode


def test_attention_agreement_hand_values():
    s = _features_with_map([1.0, 0.0])  # q = [1, 0]
    t = _features_with_map([1.0, 1.0])  # q = [1, 1] / sqrt(2)
    cosine, distance = map_agreement(spatial_map(s), spatial_map(t))
    torch.testing.assert_close(cosine, torch.tensor([1 / math.sqrt(2)]))
    # mean over the 2 positions of (1 - 1/sqrt2)^2 and (0 - 1/sqrt2)^2
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + 0.5) / 2
    torch.testing.assert_close(distance, torch.tensor([expected]))
    same_c, same_d = map_agreement(spatial_map(s), spatial_map(2 * s))
    torch.testing.assert_close(same_c, torch.ones(1))
    torch.testing.assert_close(same_d, torch.zeros(1))


def _token_view(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """(b, c, h, w) patch tokens of a transformer: a strided view, class token dropped."""
    return torch.randn(b, h * w + 1, c)[:, 1:].transpose(1, 2).unflatten(2, (h, w))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens", "bfloat16"])
def test_default_map_by_batch_chunks_is_bitwise_the_plain_formula(monkeypatch, layout):
    import atx.attention as attention

    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 130)  # 60 per sample: chunks 2, 2, 2, 1
    torch.manual_seed(0)
    x = torch.randn(7, 3, 4, 5)
    x = {"channels_last": x.contiguous(memory_format=torch.channels_last),
         "tokens": _token_view(7, 3, 4, 5), "bfloat16": x.bfloat16()}.get(layout, x)
    assert attention._samples_per_chunk(x) == 2
    grad_out = torch.randn(7, 4, 5)
    ours, plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = spatial_map(ours)
    a = plain.float()
    want = (a * a).sum(dim=1)  # the formula autograd differentiates op by op
    assert torch.equal(got, want) and got.dtype == torch.float32
    (got * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    assert ours.grad.dtype == x.dtype and torch.equal(ours.grad, plain.grad)
    with torch.no_grad():  # the teacher's path: no graph
        assert torch.equal(spatial_map(x), want)


@pytest.mark.parametrize("at_first", [True, False])
def test_chunked_at_loss_gives_bitwise_the_weight_gradients_of_the_plain_formula(
    monkeypatch, at_first
):
    """A conv layer's output feeds the AT term and the rest of the network: its weight gradient
    equals the op-by-op formula's. Autograd runs the branch built last first, so the two
    orders add the AT gradient's two products and the other one in different orders."""
    import atx.attention as attention

    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 300)  # 4*6*6 = 144 per sample: 2 a chunk
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(2, 4, 3, padding=1), torch.randn(5, 2, 6, 6)
    teacher = torch.randn(5, 8, 6, 6)

    def weight_grad(at) -> torch.Tensor:
        conv.zero_grad()
        feats = conv(x)
        if at_first:
            loss = 1e3 * at(feats, teacher) + feats.relu().mean()
        else:
            rest = feats.relu().mean()
            loss = rest + 1e3 * at(feats, teacher)
        loss.backward()
        return conv.weight.grad.clone()

    def plain_at(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        qs, qt = (F.normalize((f * f).sum(dim=1).flatten(1), dim=1) for f in (s, t))
        return (qs - qt).pow(2).mean()

    assert torch.equal(weight_grad(at_loss), weight_grad(plain_at))


def test_default_map_second_derivative():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    w, v = torch.randn(3, 4, 4), torch.randn(3, 2, 4, 4)
    (g,) = torch.autograd.grad((spatial_map(x) * w).sum(), x, create_graph=True)
    torch.testing.assert_close(g, 2 * w.unsqueeze(1) * x)
    (hv,) = torch.autograd.grad((g * v).sum(), x)  # d/dx <2 w x, v> = 2 w v
    torch.testing.assert_close(hv, 2 * w.unsqueeze(1) * v)
