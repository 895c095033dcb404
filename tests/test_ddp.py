"""DDP with 2 CPU processes (gloo): ranks stay in sync and match one process on the same global
batches, for a CNN student under CE + KD + activation AT + grad-AT at once (beta means the same
on 1 or N devices; grad-AT's double backward) and for a ViT student's AT from a CNN teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_steps_script.py")


def launch(out: Path, devices: int, kind: str) -> subprocess.Popen[str]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(devices), kind],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str]) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", ["cnn", "vit_at"])
def test_ddp_two_ranks_equal_each_other_and_one_process(tmp_path, kind):
    runs = [launch(tmp_path / "ddp", 2, kind), launch(tmp_path / "single", 1, kind)]
    try:
        for process in runs:  # at the same time: independent processes
            finish(process)
    finally:  # none left running when one fails or times out
        for process in runs:
            process.kill()
    rank0, rank1 = weights(tmp_path / "ddp" / "rank0.pt"), weights(tmp_path / "ddp" / "rank1.pt")
    single = weights(tmp_path / "single" / "rank0.pt")
    start = weights(tmp_path / "single" / "rank0_initial.pt")
    ddp_start = weights(tmp_path / "ddp" / "rank0_initial.pt")
    for k in single:
        assert torch.equal(ddp_start[k], start[k]), k  # both runs start from the same student
        assert torch.equal(rank0[k], rank1[k]), k  # ranks in sync
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-10, atol=1e-12)  # beta, mean: same
        # the steps moved every weight far beyond that tolerance: not three no-op steps agreeing
        moved = float((single[k] - start[k]).abs().max())
        assert moved > 1e-6, (k, moved)
