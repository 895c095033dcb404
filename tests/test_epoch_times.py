"""metrics.json records each training epoch's wall seconds and the evaluation inside it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from cli import FAST
from configs import compose_cfg

from atx.train import train

# cli.FAST's tiny run, 2 epochs of 2 batches of 16 and one validation batch
RUN = [*FAST, "trainer.max_epochs=2", "trainer.num_sanity_val_steps=0", "data.train_subset=32",
       "data.val_subset=16", "logger=csv", "figure_images=0"]


class Slow(L.Callback):
    """Known delays: 0.2 s after every training batch and after every validation batch."""

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(0.2)

    def on_validation_batch_end(self, *args: object) -> None:
        time.sleep(0.2)


def test_epoch_and_eval_seconds(tmp_path: Path, monkeypatch) -> None:
    import atx.train as atx_train

    real = atx_train.run_callbacks
    monkeypatch.setattr(atx_train, "run_callbacks", lambda *a: [*real(*a), Slow()])
    train(compose_cfg(RUN), tmp_path)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    epochs, evals = summary["epoch_seconds"], summary["eval_seconds"]
    assert len(epochs) == len(evals) == 2
    for epoch, evaluation in zip(epochs, evals, strict=True):
        assert 0.2 <= evaluation < epoch  # the validation (1 batch of 16) inside the epoch
        assert epoch - evaluation >= 2 * 0.2  # 2 batches of 16, each followed by 0.2 s
