"""Run-dir state an in-process ``claim_run_dir`` / ``train`` leaves behind in the test process."""

from __future__ import annotations

from atx import run_dir


def release_locks() -> None:
    """Close the run-dir locks this process holds, as if the run's process had ended."""
    while run_dir._held_locks:
        run_dir._held_locks.pop().close()
