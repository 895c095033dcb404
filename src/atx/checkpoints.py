"""Load model weights safely from what atx writes: a run dir, a student export or a Lightning ckpt.

Every file goes through ``torch.load(..., weights_only=True)``: a checkpoint carrying a pickled
object is refused, never executed.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from atx.errors import AtxError
from atx.files import is_state_dict, read_tensors

STUDENT_FILE = "student.pt"


def resolve_weights_path(path: str | Path) -> Path:
    """A run directory means its exported ``student.pt``; a file is taken as it is."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / STUDENT_FILE
    if not p.is_file():
        raise AtxError(
            f"checkpoint '{path}' not found: give a run directory holding {STUDENT_FILE},"
            " a student .pt export or a Lightning .ckpt"
        )
    return p


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a plain state dict, or the student part of a Lightning checkpoint."""
    p = resolve_weights_path(path)
    obj = read_tensors(p, "checkpoint")
    if isinstance(obj, dict) and "state_dict" in obj:  # Lightning checkpoint of a DistillModule
        obj = {
            k[len("student.") :]: v
            for k, v in obj["state_dict"].items()
            if k.startswith("student.")
        }
    if not is_state_dict(obj):
        raise AtxError(f"checkpoint '{p}' holds no state dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path, who: str) -> None:
    """Load ``path`` into ``model`` exactly; a mismatch is one line saying what differs."""
    load_state(model, load_state_dict(path), path, who)


def load_state(model: nn.Module, state: dict[str, Tensor], path: str | Path, who: str) -> None:
    """Load ``state`` (read from ``path``) into ``model`` exactly, as :func:`load_weights`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), first: {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[0]}")
        raise AtxError(
            f"{who} checkpoint '{path}' does not fit the configured {who} model ("
            + "; ".join(parts)
            + f"); check {who}'s architecture options"
        )
    model.load_state_dict(state)
