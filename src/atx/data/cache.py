"""A uint8 tensor cache beside the data, so a slow per-image decode happens once.

The decoded dataset (uint8 images, labels, class names) is saved with ``torch.save`` under
``<root>/.atx-cache/<dataset>-<fingerprint>.pt``, or under ``$XDG_CACHE_HOME/atx`` (default
``~/.cache/atx``) when the data folder cannot be written. The fingerprint hashes the listing of
the source files (relative names, sizes, modification times) and the decode settings, so adding,
removing or rewriting a file makes a new cache. Files are written atomically (temporary file,
then ``os.replace``) and read with ``torch.load(weights_only=True)``; an unreadable or malformed
cache file is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atx.errors import reason
from atx.files import replace_atomically

FORMAT = 1  # bump when the stored layout changes: old files then stop matching
DIR_NAME = ".atx-cache"
TENSOR_KEYS = ("x_train", "y_train", "x_val", "y_val")


def fingerprint(root: Path, files: Iterable[Path], *settings: object) -> str:
    """Hex digest of ``(relative name, size, mtime_ns)`` of each file plus ``settings``."""
    h = hashlib.sha256(repr((FORMAT, settings)).encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/atx``, by default ``~/.cache/atx``: where caches go when the data
    folder is read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "atx"


def cache_name(dataset: str, key: str) -> str:
    """``cifar-10-<key>.pt`` for dataset name ``CIFAR-10``."""
    return f"{re.sub(r'[^a-z0-9]+', '-', dataset.lower()).strip('-')}-{key}.pt"


def candidates(root: Path, name: str) -> list[Path]:
    """Where a cache file of that name is looked for, in order."""
    return [root / DIR_NAME / name, user_cache_dir() / name]


def read(path: Path) -> dict[str, Any] | None:
    """The cached dataset, or None (with a warning) when the file is unreadable or malformed."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(data, dict)
            and all(isinstance(data.get(k), Tensor) for k in TENSOR_KEYS)
            and isinstance(data.get("classes"), list)
            and all(isinstance(c, str) for c in data["classes"])
        )
        if not ok:
            raise ValueError("not an atx dataset cache")
    except Exception as err:  # truncated, corrupt, foreign: never trust it, rebuild instead
        warnings.warn(
            f"ignoring the unreadable data cache '{path}' ({reason(err)}); "
            f"decoding the dataset again",
            stacklevel=2,
        )
        return None
    return data


def write(data: dict[str, Any], root: Path, name: str) -> Path | None:
    """Save ``data`` atomically beside the data (else in the user cache dir); the path or None.

    Writing beside the data also removes older caches of the same dataset there.
    """
    errors = []
    for folder in (root / DIR_NAME, user_cache_dir()):
        target = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            replace_atomically(target, lambda f: torch.save(data, f))
        except OSError as err:
            errors.append(f"{folder}: {err.strerror or err}")
            continue
        if errors:
            warnings.warn(
                f"cannot write the data cache beside the data ({errors[0]}); cached the decoded "
                f"dataset in '{target}' instead",
                stacklevel=2,
            )
        if folder == root / DIR_NAME:
            stale = re.compile(re.escape(name.rsplit("-", 1)[0]) + r"-[0-9a-f]{20}\.pt")
            for old in folder.iterdir():
                if old.name != name and stale.fullmatch(old.name):
                    old.unlink(missing_ok=True)
        return target
    warnings.warn(
        f"could not write the data cache ({'; '.join(errors)}); the dataset will be decoded "
        f"again next time (set data.cache=false to skip the attempt)",
        stacklevel=2,
    )
    return None
