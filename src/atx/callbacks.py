"""Callbacks hooked into the Trainer: attention-map figures during training, the epoch chosen
on the held-out training images (``data.val_split``), epoch times, and the check that every DDP
rank trains the same run."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from atx.errors import AtxError
from atx.files import replace_atomically

RANKS_FILE = "ranks.json"  # what each DDP rank trains, written by rank 0 (SameRunOnEveryRank)


class AttentionFigures(L.Callback):
    """Every ``every_n_epochs`` validation epochs, on rank 0: draw the teacher's and the
    student's attention maps of a fixed set of validation images (``atx.visualize``), save
    ``<folder>/epoch_<E>.png`` and log it to every logger that takes images (W&B), so a run's
    attention can be watched converging."""

    def __init__(self, folder: Path, every_n_epochs: int, n_images: int,
                 pairs: Sequence[tuple[str, str]], data: Any) -> None:
        self.folder, self.every, self.n_images = Path(folder), every_n_epochs, n_images
        self.pairs, self.data = list(pairs), data

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not trainer.is_global_zero or epoch % self.every:
            return
        from atx.figures import save_attention_figure  # matplotlib only when needed

        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_attention_figure(self.folder / f"epoch_{epoch:03d}.png", self.data,
                                     self.n_images, {
            "teacher": (module.teacher, [t for _, t in self.pairs]),
            "student": (module.student, [s for s, _ in self.pairs]),
        }, title=f"epoch {epoch}: teacher vs student attention")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="attention_during_training", images=[str(path)],
                                 step=trainer.global_step)


class HeldOutSelection(L.Callback):
    """After every validation: the held-out error, the test error and the epoch, kept in the
    checkpoints (a resumed run remembers earlier epochs). :meth:`summary` gives the test error
    at the epoch of the lowest held-out error, the first of equals as ``ModelCheckpoint``
    keeps, so it is the test error of ``best-epoch<N>.ckpt``."""

    KEYS = ("heldout/error", "val/error", "val/error_top5")

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # runs before ModelCheckpoint (Lightning orders checkpoint callbacks last), so the
        # checkpoint saved for this epoch holds it
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "heldout/error" not in metrics:
            return
        row = {k: float(metrics[k]) for k in self.KEYS if k in metrics}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **row})

    def summary(self) -> dict[str, float]:
        """``selected/*`` (the epoch chosen on held-out error, 0-based as in the CSV and the
        checkpoint name, and its test errors) and ``best/val_error`` (lowest test error)."""
        if not self.history:
            return {}
        chosen = self.history[0]
        for row in self.history[1:]:
            if row["heldout/error"] < chosen["heldout/error"]:
                chosen = row
        out = {"selected/epoch": chosen["epoch"], "selected/step": chosen["step"],
               "selected/heldout_error": chosen["heldout/error"],
               "selected/test_error": chosen["val/error"],
               "best/val_error": min(r["val/error"] for r in self.history)}
        if "val/error_top5" in chosen:
            out["selected/test_error_top5"] = chosen["val/error_top5"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]


class EpochTimes(L.Callback):
    """Wall seconds of each training epoch of this launch, the evaluation inside it apart
    (``metrics.json``: ``epoch_seconds``, ``eval_seconds``); CUDA work is waited for at each
    mark, so a GPU epoch is timed to its last kernel."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self._epoch = self._eval = 0.0
        self._eval_total = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch, self._eval_total = self._now(), 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._eval = self._now()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_total += self._now() - self._eval

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_seconds.append(round(self._now() - self._epoch, 4))
        self.eval_seconds.append(round(self._eval_total, 4))


class SameRunOnEveryRank(L.Callback):
    """DDP: every rank must train the same run (a sweeper or launcher that handed ranks different
    values would train a mix). At the start of the fit the ranks exchange the key of the config
    each one composed and their loss terms' weights and layer pairs; rank 0 writes them to
    ``ranks.json`` in the run dir, and ranks that differ stop the run with one line."""

    def __init__(self, run_dir: Path, config_key: str) -> None:
        self.run_dir, self.config_key = Path(run_dir), config_key

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        objective = module.objective  # type: ignore[attr-defined]
        mine = {"config": self.config_key, "weights": objective.weights(0),
                "pairs": [list(p) for p in objective.pairs]}
        ranks: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            data = json.dumps([{"rank": i, **r} for i, r in enumerate(ranks)], indent=2).encode()
            replace_atomically(self.run_dir / RANKS_FILE, lambda f: f.write(data))
        for rank, other in enumerate(ranks[1:], start=1):
            if other != ranks[0]:
                what = next(k for k in other if other[k] != ranks[0][k])
                raise AtxError(
                    f"DDP rank {rank} was given another run than rank 0 (its {what}"
                    f" differs, see {self.run_dir / RANKS_FILE}): start every rank with the"
                    " same overrides and no per-process values in the config"
                )
