"""Callbacks hooked into the Trainer: attention-map figures during training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L


class AttentionFigures(L.Callback):
    """Every ``every_n_epochs`` validation epochs, on rank 0: draw the teacher's and the
    student's attention maps of a fixed set of validation images (``atx.visualize``), save
    ``<folder>/epoch_<E>.png`` and log it to every logger that takes images (W&B), so a run's
    attention can be watched converging."""

    def __init__(self, folder: Path, every_n_epochs: int, n_images: int,
                 pairs: Sequence[tuple[str, str]], data: Any) -> None:  # fmt: skip
        self.folder, self.every, self.n_images = Path(folder), every_n_epochs, n_images
        self.pairs, self.data = list(pairs), data

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not trainer.is_global_zero or epoch % self.every:
            return
        from atx.visualize import save_attention_figure  # matplotlib only when needed

        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_attention_figure(self.folder / f"epoch_{epoch:03d}.png", self.data,
                                     self.n_images, {
            "teacher": (module.teacher, [t for _, t in self.pairs]),
            "student": (module.student, [s for s, _ in self.pairs]),
        }, title=f"epoch {epoch}: teacher vs student attention")  # fmt: skip
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="attention_during_training", images=[str(path)],
                                 step=trainer.global_step)  # fmt: skip
