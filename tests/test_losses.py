"""KD, F-ActT, schedules and the Objective against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from atx.losses import Objective, Schedule, StepOutputs, fact_loss, kd_loss
from atx.terms import AttentionTransfer, CrossEntropy, FullActivationTransfer, KnowledgeDistillation

# p_t = softmax([ln 3, 0]) = [3/4, 1/4], p_s = [1/2, 1/2]:
# KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2)
KL_HAND = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_kd_loss_hand_value_and_temperature_scaling():
    s = torch.zeros(1, 2)
    t1 = torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(kd_loss(s, t1, temperature=1.0), torch.tensor(KL_HAND))
    # at T=2 the same distributions come from logits twice as large; the loss is T^2 * KL
    t2 = 2 * t1
    torch.testing.assert_close(kd_loss(s, t2, temperature=2.0), torch.tensor(4 * KL_HAND))


# 4 classes: p_t = softmax([ln 3, 0, 0, 0]) = [1/2, 1/6, 1/6, 1/6], p_s = uniform 1/4:
# KL = 1/2 ln(2) + 3 * 1/6 ln(2/3)
KL4_HAND = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)


def test_kd_scales_hand_values():
    s, t = torch.zeros(1, 4), 2 * torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])  # at T = 2
    # batchmean: T^2 * KL summed over classes, / batch = 4 * KL
    torch.testing.assert_close(kd_loss(s, t, 2.0, "batchmean"), torch.tensor(4 * KL4_HAND))
    # jan2017: KL's 4 elements averaged (KL / 4), times 2 T^2 = 8: 2 * KL
    torch.testing.assert_close(kd_loss(s, t, 2.0, "jan2017"), torch.tensor(2 * KL4_HAND))
    with pytest.raises(ValueError, match="'mean' is not a valid KDScale"):
        kd_loss(s, t, 2.0, "mean")


def test_kd_scale_reaches_the_objective_from_the_config():
    from configs import compose_cfg

    from atx.build import build_objective

    s, t = torch.zeros(2, 4), torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]] * 2)
    out = StepOutputs(logits=s, targets=torch.zeros(2, dtype=torch.long), teacher_logits=t)
    cfg = compose_cfg(["distill=kd", "distill.kd.scale=jan2017", "distill.kd.temperature=1"])
    for scale, factor in (("jan2017", 0.5), ("batchmean", 1.0)):  # 2 / 4 classes
        cfg.distill.kd.scale = scale
        objective = build_objective(cfg.distill, {}, {}, 1)
        _, parts = objective(out)
        torch.testing.assert_close(parts["kd"], torch.tensor(factor * KL4_HAND))


def test_kd_loss_batch_mean_and_zero_when_equal():
    s = torch.zeros(3, 2)
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(kd_loss(s, t, 1.0), torch.tensor(KL_HAND / 3))
    z = torch.randn(4, 10)
    assert float(kd_loss(z, z.clone())) == pytest.approx(0.0, abs=1e-6)


def test_fact_loss_hand_value():
    # B=2, C=2, 1x2: each sample's (C, H, W) activation is flattened and l2-normalised on its
    # own; the squared distances are averaged over the batch and divided by H * W.
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]],   # -> [1, 0, 0, 0]
                      [[[0.0, 2.0]], [[0.0, 0.0]]]])  # -> [0, 1, 0, 0]
    t = torch.tensor([[[[0.0, 0.0]], [[0.0, 5.0]]],   # -> [0, 0, 0, 1]: ||diff||^2 = 2
                      [[[0.0, 1.0]], [[1.0, 0.0]]]])  # -> [0, 1, 1, 0]/sqrt2
    # (2 + (2 - sqrt2)) / B / (H * W): a batch sum would give twice this, a division by
    # C * H * W half of it, normalising over the whole batch or per channel something else
    torch.testing.assert_close(fact_loss(s, t), torch.tensor((4 - math.sqrt(2)) / 2 / 2))
    with pytest.raises(ValueError, match="equal activation shapes"):
        fact_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))


def test_schedules():
    assert Schedule(5.0)(100) == 5.0
    step = Schedule(1000.0, "step", milestones=[2, 4], gamma=0.1)
    assert [step(e) for e in range(6)] == pytest.approx([1000, 1000, 100, 100, 10, 10])
    lin = Schedule(1000.0, "linear", final=0.0, end_epoch=10)
    assert [lin(e) for e in (0, 5, 10, 20)] == pytest.approx([1000, 500, 0, 0])
    with pytest.raises(ValueError, match="'cosine' is not a valid ScheduleKind"):
        Schedule(1.0, "cosine")(0)


def _outputs(b=4, with_teacher=True):
    torch.manual_seed(0)
    return StepOutputs(
        logits=torch.randn(b, 10, requires_grad=True),
        targets=torch.randint(0, 10, (b,)),
        teacher_logits=torch.randn(b, 10) if with_teacher else None,
        student_features={
            "g1": torch.randn(b, 4, 8, 8, requires_grad=True),
            "g2": torch.randn(b, 8, 4, 4, requires_grad=True),
        },
        teacher_features={"t1": torch.randn(b, 8, 8, 8), "t2": torch.randn(b, 16, 4, 4)},
    )


def test_objective_sums_weighted_terms_and_reports_each():
    out = _outputs()
    pairs = [("g1", "t1"), ("g2", "t2")]
    alpha, beta = 0.9, 1000.0
    objective = Objective(
        [
            CrossEntropy(Schedule(1 - alpha)),
            KnowledgeDistillation(Schedule(alpha), temperature=4.0),
            AttentionTransfer(Schedule(beta), pairs),
        ]
    )
    total, parts = objective(out)
    assert set(parts) == {"ce", "kd", "at/g1", "at/g2"}
    ce = nn.functional.cross_entropy(out.logits, out.targets)
    kd = kd_loss(out.logits, out.teacher_logits, 4.0)
    from atx.attention import at_loss

    at = at_loss(out.student_features["g1"], out.teacher_features["t1"]) + at_loss(
        out.student_features["g2"], out.teacher_features["t2"]
    )
    torch.testing.assert_close(total, (1 - alpha) * ce + alpha * kd + beta * at)
    torch.testing.assert_close(parts["ce"], ce)
    assert objective.needs_teacher
    assert objective.weights(0) == pytest.approx({"ce": 0.1, "kd": 0.9, "at": 1000.0})


def test_objective_follows_beta_schedule():
    out = _outputs()
    at = AttentionTransfer(Schedule(100.0, "linear", final=0.0, end_epoch=4), [("g1", "t1")])
    objective = Objective([CrossEntropy(Schedule(1.0)), at])
    t0, parts = objective(out, epoch=0)
    t2, _ = objective(out, epoch=2)
    t4, _ = objective(out, epoch=4)
    torch.testing.assert_close(t0 - t4, 100.0 * parts["at/g1"])
    torch.testing.assert_close(t2 - t4, 50.0 * parts["at/g1"])
    assert not Objective([CrossEntropy(Schedule(1.0))]).needs_teacher


class TinyNet(nn.Module):
    """Logits and two feature groups (4 x 8x8, 8 x 4x4), like a student's layer groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g1 = self.c1(x)
        g2 = self.c2(torch.relu(g1))
        return self.fc(g2.mean((2, 3))), {"g1": g1, "g2": g2}


def _train_parts(term, student: nn.Module, params, lr: float, steps: int = 10):
    """The term's per-pair losses before and after ``steps`` SGD steps on one batch of 4,
    against a fixed teacher twice as wide (its features repeated along the channels)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with torch.no_grad():
        t_logits, t = TinyNet()(x)
    t_feats = {"t1": t["g1"].repeat(1, 2, 1, 1), "t2": t["g2"].repeat(1, 2, 1, 1)}
    objective = Objective([term])
    opt = torch.optim.SGD(params, lr=lr)
    history = []
    for _ in range(steps + 1):
        logits, feats = student(x)
        total, parts = objective(StepOutputs(logits, y, t_logits, feats, t_feats))
        history.append({k: v.item() for k, v in parts.items()})
        opt.zero_grad()
        total.backward()
        opt.step()
    return history[0], history[-1]


PAIRS = [("g1", "t1"), ("g2", "t2")]


def test_at_term_pulls_the_student_maps_to_the_teachers():
    torch.manual_seed(1)
    student = TinyNet()
    term = AttentionTransfer(Schedule(1000.0), PAIRS)
    first, last = _train_parts(term, student, student.parameters(), lr=0.01)
    assert set(first) == {"at/g1", "at/g2"}
    for key in first:  # every layer pair's distance at least halves in 10 steps
        assert 0 < last[key] < 0.5 * first[key], (key, first[key], last[key])


def test_fact_adapters_only_where_widths_differ_and_they_learn():
    term = FullActivationTransfer(Schedule(1000.0), PAIRS, channels=[(4, 8), (8, 16)])
    assert all(isinstance(a, nn.Conv2d) for a in term.adapters)
    same = FullActivationTransfer(Schedule(1.0), [("g1", "g1")], channels=[(4, 4)])
    assert isinstance(same.adapters[0], nn.Identity)
    torch.manual_seed(1)
    student = TinyNet()
    # student and adapters together, as the module trains them
    first, last = _train_parts(term, student, [*student.parameters(), *term.parameters()], 0.01)
    assert set(first) == {"fact/g1", "fact/g2"}
    for key in first:
        assert 0 < last[key] < 0.5 * first[key], (key, first[key], last[key])
    # the adapters alone, student fixed: they learn to map its channels onto the teacher's
    torch.manual_seed(1)
    student, term = TinyNet(), FullActivationTransfer(Schedule(1000.0), PAIRS, [(4, 8), (8, 16)])
    first, last = _train_parts(term, student, term.parameters(), lr=0.1)
    for key in first:
        assert 0 < last[key] < 0.85 * first[key], (key, first[key], last[key])
