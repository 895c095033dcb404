"""DDP with 2 CPU processes (gloo): ranks stay in sync and match one process on the same global
batches, for grad-AT (double backward), for activation AT + KD (beta means the same on 1 or N
devices) and for a ViT student's AT from a CNN teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_steps_script.py")


def run(out: Path, devices: int, kind: str) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), kind],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", ["grad_at", "at_kd", "vit_at"])
def test_ddp_two_ranks_equal_each_other_and_one_process(tmp_path, kind):
    run(tmp_path / "ddp", 2, kind)
    run(tmp_path / "single", 1, kind)
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
