"""A real Trainer on each large-image data module (paper §4.2: ImageNet, CUB-200-2011, MIT
Indoor 67), through the CLI config path: a ResNet-18 student distilled (AT on layer3/layer4)
from a ResNet-18 teacher checkpoint, on tiny copies of the official layouts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from configs import compose_cfg
from layouts import write_cub, write_imagenet, write_scenes

from atx.build import build_data, build_network
from atx.models import build_model
from atx.train import train

LAST2 = ("layer3", "layer4")  # the resnet18 "last2" preset: the AT pairs of this run


# --- a real Trainer through the CLI config path ------------------------------------------------


def evaluate(cfg, student_state: dict, teacher_state: dict) -> dict[str, float]:
    """val/ error, loss and image count of ``student_state`` on the test split, and per group
    its attention agreement with ``teacher_state`` (cosine and code distance of the
    normalised F^2_sum maps), from forward hooks on layer3/layer4."""
    data = build_data(cfg)
    data.setup()
    nets, feats = {}, {}
    for who, node, state in (("s", cfg.model, student_state), ("t", cfg.teacher, teacher_state)):
        nets[who] = build_network(node, who, data.num_classes, data.in_channels).eval()
        nets[who].load_state_dict(state)
        for layer in LAST2:
            nets[who].get_submodule(layer).register_forward_hook(
                lambda _m, _i, out, k=(who, layer): feats.__setitem__(k, out))
    wrong, loss, n, cos, dist = 0, 0.0, 0, {g: [] for g in LAST2}, {g: [] for g in LAST2}
    with torch.no_grad():
        for batch in data.val_dataloader():
            x, y = data.on_after_batch_transfer(batch, 0)
            assert x.shape[-2:] == (64, 64) and x.dtype == torch.float32
            logits = nets["s"](x)
            nets["t"](x)
            wrong += int((logits.argmax(1) != y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            for g in LAST2:
                qs, qt = (F.normalize(feats[w, g].pow(2).sum(1).flatten(1), dim=1) for w in "st")
                cos[g] += (qs * qt).sum(1).tolist()
                dist[g] += (qs - qt).pow(2).mean(1).tolist()
    out = {"val/error": 100 * wrong / n, "val/loss": loss / n, "val/images": float(n)}
    for g in LAST2:
        out[f"val/agreement/{g}"] = sum(cos[g]) / n
        out[f"val/at_distance/{g}"] = sum(dist[g]) / n
    return out


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    """A random 3-class ResNet-18 state dict standing in for a fine-tuned teacher (seed 1: the
    student starts from seed 0, so its attention is not the teacher's to begin with)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_model("resnet18", num_classes=3, in_channels=3).state_dict(), path)
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning OpenMP threads make a
    ResNet-18 step ~10x slower (measured 2.8 s vs 0.2 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("data", "writer"),
    [("imagenet", write_imagenet), ("cub", write_cub), ("scenes", write_scenes)],
)
def test_trainer_fits_teacher_to_student(tmp_path: Path, teacher_pt: Path, data, writer) -> None:
    writer(tmp_path / data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_cfg(
        [
            f"data={data}",
            f"data.root={tmp_path / data}",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.image_size=64",
            "data.resize_size=72",
            "model=resnet18",
            "teacher=resnet18",
            f"teacher.checkpoint={teacher_pt}",
            "distill=at",
            "distill.at.student_layers=last2",
            "trainer.max_steps=2",
            "optim.lr=0.001",  # lr 0.1 on batches of 4 (BN) sends the loss to ~1e13 in 2 steps
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "trainer.num_sanity_val_steps=0",
            "logger=csv",
            "figure_images=2",
        ]
    )
    metrics = train(cfg, run_dir)
    for name in ("student.pt", "metrics.json", "attention.png", "csv/metrics.csv"):
        assert (run_dir / name).is_file(), name
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    at_columns = {c.split("_")[0] for c in header if c.startswith("train/at/")}
    assert at_columns == {"train/at/layer3", "train/at/layer4"}, header  # last2, each step
    # the fit: the saved student moved off its seeded start (2 SGD steps) ...
    L.seed_everything(cfg.seed, verbose=False)
    start = build_network(cfg.model, "model", 3, 3).state_dict()
    state = torch.load(run_dir / "student.pt", weights_only=True)
    assert state["fc.weight"].shape == (3, 512)
    assert not torch.equal(state["conv1.weight"], start["conv1.weight"])
    # ... and the validation metrics are those of that student, and of its attention against
    # the checkpoint's teacher on 64 px crops, recomputed here outside the Trainer
    want = evaluate(cfg, state, torch.load(teacher_pt, weights_only=True))
    assert want["val/images"] == metrics["val/images"] > 0
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
