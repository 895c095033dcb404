"""Speed switches (atx.speed): each gives the loss and gradients of the plain step, to rounding."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
from configs import compose_cfg
from hydra.errors import ConfigCompositionException
from layouts import write_cifar10
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atx.attention import at_loss, attention_map
from atx.config import composition_error_line
from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import DistillModule
from atx.speed import COMPILE_FALLBACK, SpeedConf, configure_allocator
from atx.terms import (
    AttentionTransfer,
    CrossEntropy,
    FullActivationTransfer,
    GradientAT,
    KnowledgeDistillation,
)
from atx.train import train

PAIRS = [("group1", "group1"), ("group2", "group2"), ("group3", "group3")]
LAYERS = [s for s, _ in PAIRS]


def wrn_module(speed: SpeedConf, fact: bool = False) -> DistillModule:
    """WRN-10-1 student, WRN-10-2 teacher (with non-trivial BN statistics), CE + KD + AT
    (+ F-ActT with its 1x1 adapters)."""
    torch.manual_seed(0)
    student = build_model("wrn", num_classes=10, depth=10, width=1)
    teacher = build_model("wrn", num_classes=10, depth=10, width=2)
    with torch.no_grad():
        teacher(torch.randn(16, 3, 16, 16) * 2 + 1)  # train-mode pass: running stats move
    terms = [CrossEntropy(Schedule(0.1)), KnowledgeDistillation(Schedule(0.9)),
             AttentionTransfer(Schedule(1000.0), PAIRS)]
    if fact:
        terms.append(FullActivationTransfer(Schedule(10.0), PAIRS, [(16, 32), (32, 64), (64, 128)]))
    return DistillModule(student, Objective(terms), 10, teacher=teacher, speed=speed)


def batch(size: int = 8, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, hw, hw, generator=g), torch.randint(0, 10, (size,), generator=g)


def step(module: DistillModule, xy: tuple[torch.Tensor, torch.Tensor]):
    """Loss, per-term losses and the student's gradients of one training step."""
    module.train()
    loss = module.training_step(xy, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters()}
    return loss.detach(), grads


def assert_same_step(fast: DistillModule, plain: DistillModule, rtol: float, grad_rtol: float):
    """Same loss to ``rtol``; every student gradient within ``grad_rtol`` in relative l2 norm."""
    xy = batch()
    loss_f, grads_f = step(fast, xy)
    loss_p, grads_p = step(plain, xy)
    assert loss_f.dtype == torch.float32
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=0.0)
    for name, g in grads_p.items():
        error = (grads_f[name] - g).norm() / g.norm()
        assert error <= grad_rtol, (name, float(error))


def test_channels_last_gives_the_same_step() -> None:
    fast = wrn_module(SpeedConf(channels_last=True), fact=True)
    assert fast.student.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.teacher.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_step(fast, wrn_module(SpeedConf(), fact=True), rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
@pytest.mark.parametrize("inference_mode", [False, True])
def test_reduced_precision_teacher_gives_the_step_to_rounding(
    inference_mode: bool, precision: str, dtype: torch.dtype
) -> None:
    """A bf16/fp16 teacher changes only its targets' rounding; with inference_mode its outputs
    (inference tensors) still feed KD, AT and F-ActT and the backward works."""
    speed = SpeedConf(teacher_precision=precision, teacher_inference_mode=inference_mode)
    fast = wrn_module(speed, fact=True)
    seen = {}
    fast.teacher.group3.register_forward_hook(lambda m, i, o: seen.update(out=o))
    assert_same_step(fast, wrn_module(SpeedConf(), fact=True), rtol=2e-2, grad_rtol=5e-2)
    assert seen["out"].dtype == dtype
    assert seen["out"].is_inference() == inference_mode


def test_teacher_inference_mode_alone_is_exact() -> None:
    fast = wrn_module(SpeedConf(teacher_inference_mode=True), fact=True)
    assert_same_step(fast, wrn_module(SpeedConf(), fact=True), rtol=0.0, grad_rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_keeps_attention_maps_and_losses_float32(dtype: torch.dtype) -> None:
    """Under the Trainer's bf16-mixed / 16-mixed autocast the features are bf16 / fp16, but the
    maps and the transfer losses are float32 and the loss matches the float32 step to rounding."""
    module = wrn_module(SpeedConf())
    xy = batch()
    with torch.autocast("cpu", dtype=dtype):
        out = module._student_outputs(*xy)
        module._add_teacher_outputs(out, *xy)
        assert out.student_features["group2"].dtype == dtype
        assert attention_map(out.student_features["group2"]).dtype == torch.float32
        assert at_loss(out.student_features["group3"], out.teacher_features["group3"]).dtype == (
            torch.float32
        )
        loss_mixed, parts = module.objective(out)
    assert all(v.dtype == torch.float32 for v in parts.values()), parts
    out32 = module._student_outputs(*xy)
    module._add_teacher_outputs(out32, *xy)
    loss32, parts32 = module.objective(out32)
    torch.testing.assert_close(loss_mixed, loss32, rtol=3e-2, atol=0.0)
    for k in parts32:
        torch.testing.assert_close(parts[k], parts32[k], rtol=5e-2, atol=1e-4, msg=k)


def tiny_net(width: int) -> nn.Sequential:
    """The smallest net with a tappable group: first compilation takes seconds, not a minute."""
    return nn.Sequential(OrderedDict(
        group1=nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(width, 10),
    ))


def tiny_module(speed: SpeedConf, grad_at: bool = False) -> DistillModule:
    torch.manual_seed(0)
    student, teacher = tiny_net(4), tiny_net(8)
    terms = [CrossEntropy(Schedule(0.1)), KnowledgeDistillation(Schedule(0.9))]
    terms.append(GradientAT(Schedule(10.0)) if grad_at
                 else AttentionTransfer(Schedule(1000.0), [("group1", "group1")]))
    return DistillModule(student, Objective(terms), 10, teacher=teacher, speed=speed)


def test_compile_gives_the_same_step_and_taps_still_work() -> None:
    fast = tiny_module(SpeedConf(compile=True))
    plain = tiny_module(SpeedConf())
    assert fast.student._compiled_call_impl is not None
    assert fast.teacher._compiled_call_impl is not None
    xy = batch(4, 8)
    from torch._dynamo.utils import counters

    counters.clear()
    out_f = fast._student_outputs(*xy)
    fast._add_teacher_outputs(out_f, *xy)
    assert counters["stats"]["unique_graphs"] >= 2  # really compiled: student and teacher
    _, parts_f = fast.objective(out_f)
    out_p = plain._student_outputs(*xy)
    plain._add_teacher_outputs(out_p, *xy)
    _, parts_p = plain.objective(out_p)
    assert parts_p["at/group1"] > 0  # the AT term sees real tapped features in both
    for k in parts_p:
        torch.testing.assert_close(parts_f[k], parts_p[k], rtol=1e-5, atol=1e-7, msg=k)
    fast.student.zero_grad()
    assert_same_step(fast, plain, rtol=1e-5, grad_rtol=1e-4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    x, y = batch(8, 8)
    trainer.fit(fast, DataLoader(TensorDataset(x, y), batch_size=4))  # the real loop, compiled
    assert trainer.global_step == 2 and "train/loss" in trainer.callback_metrics


@pytest.mark.parametrize(("mode", "torch_mode"), [
    ("default", None), ("reduce_overhead", "reduce-overhead"), ("max_autotune", "max-autotune"),
    ("max_autotune_no_cudagraphs", "max-autotune-no-cudagraphs"),
])
def test_compile_mode_reaches_torch_compile(
    mode: str, torch_mode: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    cfg = compose_cfg(["speed.compile=true", f"speed.compile_mode={mode}"])
    tiny_module(OmegaConf.to_object(cfg.speed))
    assert calls == [{"mode": torch_mode}] * 2  # student and teacher


def test_a_bad_compile_mode_is_refused_while_composing() -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["speed.compile_mode=fastest"])
    line = composition_error_line(e.value)
    assert "speed.compile_mode" in line and "max_autotune" in line and "\n" not in line


def test_the_figures_of_a_compiled_run_compile_nothing() -> None:
    """Attention figures tap a few images with hooks: compiled modules would recompile."""
    from torch._dynamo import eval_frame  # its _stance is rebound by set_stance: read it anew
    from torch._dynamo.utils import counters

    from atx.figures import grad_maps, group_maps

    assert eval_frame._stance.stance == "default"  # importing the figures turns nothing off
    module = tiny_module(SpeedConf(compile=True))
    x, y = batch(3, 8)
    counters.clear()
    maps = group_maps(module.student, ["group1"], x)
    grads = grad_maps(module.teacher, x, y)
    assert not counters["stats"]  # no graph captured
    assert eval_frame._stance.stance == "default"  # and compiling is back on after the figures
    assert maps[0].shape == (3, 8, 8) and grads.shape == (3, 8, 8) and grads.max() == 1
    module.student(x)  # outside a figure the module is still compiled
    assert counters["stats"]["unique_graphs"] >= 1


def test_compile_with_grad_at_falls_back_to_eager() -> None:
    with pytest.warns(UserWarning, match="torch.compile cannot do"):
        module = tiny_module(SpeedConf(compile=True), grad_at=True)
    assert "\n" not in COMPILE_FALLBACK
    assert module.student._compiled_call_impl is None
    assert module.teacher._compiled_call_impl is None
    loss = module.training_step(batch(4, 8), 0)  # the double backward runs (eager)
    loss.backward()
    assert module.student.fc.weight.grad is not None


ALLOC_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from atx.speed import configure_allocator
    state = configure_allocator(sys.argv[1] == "on")
    from atx.models import build_model
    torch.set_num_threads(1)
    net = build_model("wrn", num_classes=10, depth=10, width=1).eval()
    x = torch.randn(32, 3, 32, 32)
    faults = []
    for _ in range(8):  # a no-grad forward frees its activations (2 MiB each) every time
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.no_grad():
            net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"state": state, "faults": faults[2:]}))
""")


def allocator_probe(switch: str, env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ATX_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE, switch], env={**clean, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_allocator_switch_keeps_freed_memory_mapped() -> None:
    """Observable effect of mallopt: a forward's freed activations are reused without page
    faults. glibc's default returns them to the OS and faults them back in on every forward
    (about 5,000 pages for this WRN-10-1 forward here)."""
    on = allocator_probe("on", {})
    off = allocator_probe("on", {"ATX_MALLOC": "0"})  # the env switch wins over the config
    assert (on["state"], off["state"]) == ("mallopt", "off")
    assert statistics.median(off["faults"]) > 1000  # default glibc: faulted back every time
    assert statistics.median(on["faults"]) < 100  # mallopt: reused in place


def test_allocator_respects_env_vars_and_the_switch(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert configure_allocator(True) == "env"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("ATX_MALLOC", "0")
    assert configure_allocator(True) == "off"
    assert configure_allocator(False) == "off"


@pytest.mark.parametrize(
    ("precision", "teacher_precision", "cudnn_benchmark"),
    [("bf16-mixed", "bf16", False), ("16-mixed", "fp16", True)],
)
def test_train_with_speed_options_end_to_end(
    tmp_path: Path, precision: str, teacher_precision: str, cudnn_benchmark: bool
) -> None:
    """The real config path: AT+KD on tiny CIFAR-10 with channels_last, a reduced-precision
    teacher under inference_mode and mixed-precision training; the exported student loads into a
    plain WRN. The GPU switches are accepted on the CPU: Lightning runs ``16-mixed`` there as
    ``bf16-mixed`` (with its warning; fp16 autocast itself is tested above) and passes
    ``trainer.benchmark`` to torch's cudnn flag."""
    write_cifar10(tmp_path / "data", n_train=16, n_test=8)
    teacher_pt = tmp_path / "teacher.pt"
    torch.save(build_model("wrn", num_classes=10, depth=10, width=2).state_dict(), teacher_pt)
    cfg = compose_cfg([
        "data=cifar10", f"data.root={tmp_path / 'data'}", "data.batch_size=8",
        "model.depth=10", "teacher=wrn_16_2", "teacher.depth=10",
        f"teacher.checkpoint={teacher_pt}", "distill=at_kd", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", f"trainer.precision={precision}",
        f"trainer.benchmark={str(cudnn_benchmark).lower()}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv", "figure_images=0", "speed.channels_last=true",
        f"speed.teacher_precision={teacher_precision}", "speed.teacher_inference_mode=true",
    ])
    before = torch.backends.cudnn.benchmark
    try:
        metrics = train(cfg, tmp_path / "run")
        assert torch.backends.cudnn.benchmark is cudnn_benchmark
    finally:
        torch.backends.cudnn.benchmark = before
    assert 0 <= metrics["val/error"] <= 100
    logged = (tmp_path / "run" / "csv").rglob("metrics.csv")
    assert any("train/loss" in f.read_text() for f in logged)
    state = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    build_model("wrn", num_classes=10, depth=10, width=1).load_state_dict(state)


def test_bad_teacher_precision_is_one_clear_error() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["model.depth=10", "logger=csv", "speed.teacher_precision=int8"])
    assert composition_error_line(info.value) == (
        "speed.teacher_precision=int8: Invalid value 'int8', expected one of [same, bf16, fp16]"
    )


def test_speed_presets_compose() -> None:
    assert compose_cfg([]).speed == OmegaConf.structured(SpeedConf())
    fast = OmegaConf.to_object(compose_cfg(["speed=fast"]).speed)
    assert fast == SpeedConf(channels_last=True, compile=True, teacher_inference_mode=True)
