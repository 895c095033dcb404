"""Files a run shares with other processes: written whole or not at all, exclusive locks, and
tensor files read without running any code they might carry.

A crash (or SIGKILL) while writing never leaves a truncated file under the real name, and a
reader that runs at the same time (another rank, a relaunched job) sees the old file or the new
one. Locks are ``flock`` locks held for as long as the returned file stays open.
"""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from atx.errors import AtxError, reason


def replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write`` into ``.<name>.tmp<pid>`` beside ``path``, flush it to disk, rename it over
    ``path``; on any error the temporary is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def try_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on ``path`` (created if missing), or None if another process holds it.
    The lock lasts until the returned file is closed (or the process ends)."""
    handle = open(path, "a+")  # noqa: SIM115 (held open: that is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def read_tensors(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``: a file carrying a pickled object is refused,
    never executed; any unreadable file is one line naming ``what`` (e.g. "weights file")."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AtxError(
            f"refused to load {what} '{path}': it is not a plain tensor checkpoint"
            f" (weights_only=True rejected it: {reason(e)})"
        ) from e  # torch's whole text: debug=true
    except Exception as e:  # truncated or not a torch file at all
        raise AtxError(f"cannot read {what} '{path}': {reason(e)}") from e


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
