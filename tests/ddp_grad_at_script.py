"""Run by test_gradient_ddp.py: a few grad-AT steps with a real Trainer, 1 process or DDP (2
CPU processes, gloo), in float64 on a fixed dataset; every rank saves its final student weights.

    python tests/ddp_grad_at_script.py <out dir> <devices>
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from atx.losses import CrossEntropy, GradientAT, Objective, Schedule
from atx.models import build_model
from atx.module import DistillModule

GLOBAL_BATCH = 8


class SaveWeights(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, module) -> None:
        torch.save(module.student.state_dict(), self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, devices: int) -> None:
    torch.manual_seed(0)
    # the paper's grad-AT network: NIN without batch norm (so per-rank batches are exact)
    student = build_model("nin", num_classes=10, variant="thin", batch_norm=False)
    teacher = build_model("nin", num_classes=10, variant="thin", batch_norm=False)
    objective = Objective([CrossEntropy(Schedule(1.0)), GradientAT(Schedule(50.0))])
    module = DistillModule(student, objective, 10, teacher=teacher).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g, dtype=torch.float64),
                         torch.randint(0, 10, (32,), generator=g))  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[SaveWeights(out)],
        limit_val_batches=0, precision="64-true",
    )  # fmt: skip
    sampler = None
    if devices > 1:  # rank r gets samples r, r+devices, ...: the same global batches as 1 process
        sampler = DistributedSampler(data, num_replicas=devices, rank=trainer.global_rank,
                                     shuffle=False)  # fmt: skip
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
