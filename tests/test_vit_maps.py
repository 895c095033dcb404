"""Maps of vision-transformer layers (atx.models.vit_maps through atx.features.LayerTaps): the
activation map is a block's patch tokens on the patch grid, the self-attention map the class
token's attention to the patches; the model itself is untouched. Tiny timm models, built here,
then a real atx-train run (model=timm) whose logged agreement is recomputed from those maps."""

from __future__ import annotations

import math

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from configs import compose_cfg
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from atx.attention import at_loss, spatial_map
from atx.build import build_data, build_network, probe_shapes
from atx.errors import AtxError
from atx.features import LayerTaps
from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import DistillModule
from atx.optim import OptimConf
from atx.terms import AttentionTransfer, CrossEntropy
from atx.train import train

PATCH, DIM, HEADS = 8, 32, 2

# (timm name, options, prefix tokens before the patches: class, distillation, registers)
KINDS = {
    "class": ("vit_tiny_patch16_224", {}, 1),
    "no_class": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
    "distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
}


def tiny_vit(kind: str = "class", seed: int = 0, **options) -> nn.Module:
    name, kind_options, _ = KINDS[kind]
    torch.manual_seed(seed)
    options = {"img_size": 32, **kind_options, **options}
    model = timm.create_model(name, pretrained=False, num_classes=10, patch_size=PATCH,
                              embed_dim=DIM, depth=2, num_heads=HEADS, **options)
    return model.eval()


def hooked(module: nn.Module) -> dict[str, Tensor]:
    """The module's raw output and input, by a hook of the test's own."""
    seen: dict[str, Tensor] = {}

    def keep(_m: nn.Module, args: tuple, output: Tensor) -> None:
        seen["input"], seen["output"] = args[0], output

    module.register_forward_hook(keep)
    return seen


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_map_is_its_patch_tokens_on_the_grid(kind):
    model = tiny_vit(kind, dynamic_img_size=True)
    prefix = KINDS[kind][2]
    assert model.num_prefix_tokens == prefix
    raw = hooked(model.blocks[1])
    taps = LayerTaps(model, ["blocks.1", "patch_embed"], "student")
    # one model, two grids in turn: the map follows each forward's image size
    for size, (h, w) in (((32, 32), (4, 4)), ((32, 48), (4, 6))):
        x = torch.randn(2, 3, *size)
        model(x)
        feats = taps.outputs()
        tokens = raw["output"]
        assert tokens.shape == (2, prefix + h * w, DIM)
        by_hand = tokens[:, prefix:].transpose(1, 2).reshape(2, DIM, h, w)
        assert torch.equal(feats["blocks.1"], by_hand)
        for mode in ("sum", "max"):
            assert torch.equal(spatial_map(feats["blocks.1"], 2.0, mode),
                               spatial_map(by_hand, 2.0, mode))
        # row-major patch order: the patch_embed map is its convolution's own (B, D, h, w) output
        assert torch.equal(feats["patch_embed"], model.patch_embed.proj(x))


def test_padded_images_give_the_ceil_grid():
    model = tiny_vit("class", dynamic_img_size=True, dynamic_img_pad=True)
    taps = LayerTaps(model, ["blocks.0", "blocks.0.attn"], "student")
    model(torch.randn(2, 3, 36, 41))  # padded to 40 x 48 pixels: 5 x 6 patches
    assert {k: tuple(v.shape) for k, v in taps.outputs().items()} == {
        "blocks.0": (2, DIM, 5, 6), "blocks.0.attn": (2, 1, 5, 6)}


def test_probe_shapes_of_a_non_square_model():
    model = tiny_vit("registers", img_size=(32, 48))
    shapes = probe_shapes(model, ["blocks.0", "blocks.1.attn", "norm"], (3, 32, 48), "student")
    assert shapes == {"blocks.0": (2, DIM, 4, 6), "blocks.1.attn": (2, 1, 4, 6),
                      "norm": (2, DIM, 4, 6)}
    with pytest.raises(AtxError, match="'head' does not output a"):
        probe_shapes(model, ["head"], (3, 32, 48), "student")


def attention_by_hand(attn: nn.Module, x: Tensor, class_token: bool, prefix: int) -> Tensor:
    """Per head from the qkv weights' q and k rows, q/k norms, 1/sqrt(head dim) and a softmax
    over all keys; the class row (or the mean of all rows), the mean of the heads, patch keys."""
    b, n, d = x.shape
    hd = d // HEADS
    w, bias = attn.qkv.weight, attn.qkv.bias
    q_all, k_all = x @ w[:d].T + bias[:d], x @ w[d:2 * d].T + bias[d:2 * d]
    heads = []
    for i in range(HEADS):
        q = attn.q_norm(q_all[..., i * hd:(i + 1) * hd])
        k = attn.k_norm(k_all[..., i * hd:(i + 1) * hd])
        scores = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)  # (B, N, N)
        heads.append(scores[:, 0] if class_token else scores.mean(dim=1))
    side = int(math.isqrt(n - prefix))
    return torch.stack(heads).mean(dim=0)[:, prefix:].reshape(b, 1, side, side)


@pytest.mark.parametrize("kind", ["class", "no_class", "registers"])
def test_attention_map_equals_the_class_tokens_attention_by_hand(kind):
    model = tiny_vit(kind, qk_norm=True)
    attn = model.blocks[1].attn
    with torch.no_grad():  # non-trivial q/k norms: leaving one out changes the map
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    prefix = KINDS[kind][2]
    raw = hooked(attn)
    taps = LayerTaps(model, ["blocks.1.attn"], "student")
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    for fused in (True, False):
        attn.fused_attn = fused
        model(x)
        maps[fused] = taps.outputs()["blocks.1.attn"]
    assert torch.equal(maps[True], maps[False])
    assert maps[True].shape == (2, 1, 4, 4)
    by_hand = attention_by_hand(attn, raw["input"], kind != "no_class", prefix)
    torch.testing.assert_close(maps[True], by_hand, rtol=1e-5, atol=1e-7)
    # timm's own probabilities (the unfused path's attn_drop input) give the same map
    probs = hooked(attn.attn_drop)
    model(x)
    rows = probs["input"][:, :, 0] if kind != "no_class" else probs["input"].mean(dim=2)
    timm_map = rows.mean(dim=1)[:, prefix:].reshape(2, 1, 4, 4)
    torch.testing.assert_close(taps.outputs()["blocks.1.attn"], timm_map, rtol=1e-5, atol=1e-7)
    # each row's unit mass: all on the patches, or shared with the prefix keys
    mass = float(by_hand.sum())
    assert mass == pytest.approx(2.0) if prefix == 0 else mass < 1.99


@pytest.mark.parametrize("fused", [True, False])
def test_tapping_changes_no_logit_and_removes_cleanly(fused):
    model = tiny_vit("distilled")
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    taps = LayerTaps(model, ["blocks.0.attn", "blocks.1", "blocks.1.attn"], "student")
    assert torch.equal(model(x), before)
    assert all(b.attn.fused_attn is fused for b in model.blocks)
    assert set(taps.outputs()) == {"blocks.0.attn", "blocks.1", "blocks.1.attn"}
    taps.remove()
    assert not model._forward_pre_hooks
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), before)


def test_maps_carry_gradients_to_the_student():
    model = tiny_vit("class").train()
    taps = LayerTaps(model, ["blocks.0.attn", "blocks.1"], "student")
    model(torch.randn(2, 3, 32, 32))
    feats = taps.outputs()
    (spatial_map(feats["blocks.0.attn"]).sum() + spatial_map(feats["blocks.1"]).sum()).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0


def test_masked_attention_is_refused():
    model = tiny_vit("class")
    LayerTaps(model, ["blocks.0.attn"], "student")
    tokens = torch.randn(2, 17, DIM)
    with pytest.raises(AtxError, match="layer 'blocks.0.attn': .* attn_mask"):
        model.blocks[0].attn(tokens, attn_mask=torch.zeros(17, 17))


def test_cnn_layers_are_tapped_as_they_are():
    model = build_model("wrn", num_classes=10, depth=10, width=1).eval()
    raw = hooked(model.group2)
    taps = LayerTaps(model, ["group2"], "teacher")
    model(torch.randn(2, 3, 32, 32))
    assert taps.outputs()["group2"] is raw["output"]


# 4x4 student maps (patch 8 on 32x32) resized to the WRN's 8x8 group3 maps
PAIRS = [("blocks.1", "group3"), ("blocks.1.attn", "group3")]


def at_distances(module: DistillModule, x: Tensor) -> list[float]:
    with torch.no_grad():
        module.student(x)
        module.teacher(x)
        s, t = module.student_taps.outputs(), module.teacher_taps.outputs()
    return [float(at_loss(s[a], t[b], interpolate=True)) for a, b in PAIRS]


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_vit_from_wrn(beta: float, tmp_path) -> tuple[list[float], list[float], list[float]]:
    """8 AdamW steps on one batch of 16: (AT distances before, after, loss of each step)."""
    student = tiny_vit("class").train()
    torch.manual_seed(1)
    teacher = build_model("wrn", num_classes=10, depth=10, width=1)
    objective = Objective([CrossEntropy(Schedule(1.0)),
                           AttentionTransfer(Schedule(beta), PAIRS, interpolate=True)])
    module = DistillModule(student, objective, 10, teacher=teacher,
                           optim=OptimConf(name="adamw", lr=3e-3, weight_decay=0.0))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    start = at_distances(module, x)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    steps = StepLosses()
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[steps])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    return start, at_distances(module, x), steps.losses


def test_at_from_a_cnn_teacher_trains_a_vit_student(tmp_path):
    """A real Trainer: AT of a ViT's block and attention maps to a WRN's (interpolated)."""
    start, end, losses = fit_vit_from_wrn(1000.0, tmp_path)
    assert len(losses) == 8 and all(math.isfinite(v) for v in start + end + losses)
    assert losses[-1] < 0.9 * losses[0], losses
    for a, b in zip(start, end, strict=True):
        assert b < 0.9 * a, (start, end)
    # the same steps without AT leave the maps as far from the teacher's
    start, end, _ = fit_vit_from_wrn(0.0, tmp_path)
    for a, b in zip(start, end, strict=True):
        assert b > 0.98 * a, (start, end)


# --- through atx-train's config path: model=timm, a WRN teacher, Fashion-MNIST -----------------

VIT_RUN = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.img_size=28",
           "model.patch_size=4", f"model.options={{depth:2,embed_dim:{DIM},num_heads:{HEADS}}}",
           "data=fashion_mnist", "data.train_subset=32", "data.val_subset=16",
           "data.batch_size=8", "trainer.max_epochs=1", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "trainer.log_every_n_steps=1", "logger=csv", "figure_images=2",
           "teacher=wrn_16_1", "teacher.depth=10", "distill=at", "distill.at.interpolate=true",
           "distill.at.student_layers=[blocks.1,blocks.1.attn]",
           "distill.at.teacher_layers=[group2,group3]"]
PAIRS_28 = [("blocks.1", "group2"), ("blocks.1.attn", "group3")]  # 7x7 vs 14x14, 7x7 vs 7x7


def agreement_by_hand(cfg, student_state: dict, teacher_state: dict) -> dict[str, float]:
    """Mean cosine of the normalised F^2_sum maps on the test split: the ViT's from its hooked
    block tokens and attention input (by hand), resized to the WRN's map size."""
    data = build_data(cfg)
    data.setup()
    nets = {}
    for who, node, state in (("s", cfg.model, student_state), ("t", cfg.teacher, teacher_state)):
        nets[who] = build_network(node, who, data.num_classes, data.in_channels).eval()
        nets[who].load_state_dict(state)
    raw = {"blocks.1": hooked(nets["s"].blocks[1]), "attn": hooked(nets["s"].blocks[1].attn),
           "group2": hooked(nets["t"].group2), "group3": hooked(nets["t"].group3)}
    cos: dict[str, list[float]] = {"blocks.1": [], "blocks.1.attn": []}
    with torch.no_grad():
        for batch in data.val_dataloader():
            x, _ = data.on_after_batch_transfer(batch, 0)
            nets["s"](x)
            nets["t"](x)
            tokens = raw["blocks.1"]["output"]
            maps = {
                "blocks.1": tokens[:, 1:].transpose(1, 2).reshape(len(x), DIM, 7, 7),
                "blocks.1.attn": attention_by_hand(nets["s"].blocks[1].attn,
                                                   raw["attn"]["input"], True, 1),
            }
            for (s, t), f in zip(PAIRS_28, maps.values(), strict=True):
                teacher_map = raw[t]["output"].pow(2).sum(1)
                s_map = F.interpolate(f.pow(2).sum(1, keepdim=True), teacher_map.shape[-2:],
                                      mode="bilinear", align_corners=False)[:, 0]
                qs, qt = (F.normalize(m.flatten(1), dim=1) for m in (s_map, teacher_map))
                cos[s] += (qs * qt).sum(1).tolist()
    return {f"val/agreement/{s}": sum(v) / len(v) for s, v in cos.items()}


def test_atx_train_at_into_a_timm_vit(tmp_path):
    torch.manual_seed(1)
    teacher_pt = tmp_path / "teacher.pt"
    torch.save(build_model("wrn", num_classes=10, in_channels=1, depth=10, width=1).state_dict(),
               teacher_pt)
    cfg = compose_cfg([*VIT_RUN, f"teacher.checkpoint={teacher_pt}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = train(cfg, run_dir)
    assert (run_dir / "attention.png").is_file()
    lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for s, _ in PAIRS_28:
        at = header.index(f"train/at/{s}_step")
        values = [float(r.split(",")[at]) for r in lines[1:] if r.split(",")[at]]
        assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values), s
    # the logged agreement is that of the saved student's ViT maps with the teacher's
    student_state = torch.load(run_dir / "student.pt", weights_only=True)
    expected = agreement_by_hand(cfg, student_state, torch.load(teacher_pt, weights_only=True))
    for key, value in expected.items():
        assert 0 < value < 1 and metrics[key] == pytest.approx(value, rel=1e-5), key
