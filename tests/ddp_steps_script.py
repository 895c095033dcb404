"""Run by test_ddp.py: a few distillation steps with a real Trainer, 1 process or DDP (2 CPU
processes, gloo), in float64 on a fixed dataset; every rank saves its initial and final student
weights.

    python tests/ddp_steps_script.py <out dir> <devices> <cnn|vit_at>

``cnn``: a NIN student with every gradient path at once: CE, KD, activation AT on three groups
and grad-AT (its double backward through DDP).

``vit_at``: a tiny timm ViT student learning from a NIN teacher's attention (AT on a block's
tokens and on its self-attention, resized to the teacher's maps) plus KD.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import DistillModule
from atx.optim import OptimConf
from atx.terms import AttentionTransfer, CrossEntropy, GradientAT, KnowledgeDistillation

GLOBAL_BATCH = 8


class SaveWeights(L.Callback):
    """Each rank's student before the first step and after the last."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, module) -> None:
        self._save(module, f"rank{trainer.global_rank}_initial.pt")

    def on_train_end(self, trainer, module) -> None:
        self._save(module, f"rank{trainer.global_rank}.pt")

    def _save(self, module: L.LightningModule, name: str) -> None:
        torch.save(module.student.state_dict(), self.out / name)


def objective(kind: str) -> Objective:
    if kind == "vit_at":
        pairs = [("blocks.1", "block2"), ("blocks.1.attn", "block1")]
        return Objective([CrossEntropy(Schedule(0.1)), KnowledgeDistillation(Schedule(0.9)),
                          AttentionTransfer(Schedule(1000.0), pairs, interpolate=True)])
    pairs = [(b, b) for b in ("block1", "block2", "block3")]
    return Objective([CrossEntropy(Schedule(0.1)), KnowledgeDistillation(Schedule(0.9)),
                      AttentionTransfer(Schedule(1000.0), pairs), GradientAT(Schedule(50.0))])


def main(out: Path, devices: int, kind: str) -> None:
    torch.manual_seed(0)
    # the paper's grad-AT network: NIN without batch norm (so per-rank batches are exact)
    student = build_model("nin", num_classes=10, variant="thin", batch_norm=False)
    if kind == "vit_at":  # layer norm only: per-rank batches are exact too
        vit = {"depth": 2, "embed_dim": 16, "num_heads": 2}
        student = build_model("timm", 10, 3, arch="vit_tiny_patch16_224", img_size=8,
                              patch_size=2, options=vit)
    teacher = build_model("nin", num_classes=10, variant="thin", batch_norm=False)
    # lr 0.01: NIN without BN diverges at 0.1 (the Table 3 presets use 0.01)
    module = DistillModule(student, objective(kind), 10, OptimConf(lr=0.01), teacher=teacher)
    module = module.double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g, dtype=torch.float64),
                         torch.randint(0, 10, (32,), generator=g))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[SaveWeights(out)],
        limit_val_batches=0, precision="64-true",
    )
    sampler = None
    if devices > 1:  # rank r gets samples r, r+devices, ...: the same global batches as 1 process
        sampler = DistributedSampler(data, num_replicas=devices, rank=trainer.global_rank,
                                     shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
