"""Run the real ``atx-train`` command in a subprocess, from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# a WRN-10-1 student on 64 Fashion-MNIST images for one epoch
FAST = [
    "model.depth=10",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.train_subset=64",
    "data.val_subset=32",
    "data.batch_size=16",
    "figure_images=2",
]


def atx_train(
    args: list[str], env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "atx.train", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parents[1],
    )
