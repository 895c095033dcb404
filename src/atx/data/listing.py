"""Which image files a dataset holds: class folders, their images, and official list files.

Listing never opens an image: one ``os.scandir`` per folder (in a thread pool, which helps on
network file systems), names sorted. Both kinds of DataModule list through here: the in-memory
image folders of :mod:`atx.data.base` (:func:`list_image_folder`) and the file lists of
:mod:`atx.data.folder` (:func:`scan_class_folders`, :class:`SampleList` and the list-file
readers used by CUB and Scenes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atx.errors import AtxError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def is_image_name(name: str, hidden: bool = False) -> bool:
    """An image file name (by extension); dot-files (macOS ``._*`` forks, ...) only if
    ``hidden``."""
    if name.startswith(".") and not hidden:
        return False
    dot = name.rfind(".")  # pathlib's suffix rule, without building a path per file
    return 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_EXTENSIONS


def class_folders(split_dir: str | os.PathLike[str], hidden: bool = False) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir``; hidden ones only if ``hidden``."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and (hidden or not e.name.startswith(".")))


def image_names(folder: str | os.PathLike[str], hidden: bool = False) -> list[str]:
    """Sorted image file names in ``folder`` (no stat, no PIL)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if is_image_name(e.name, hidden))


def scan_images(
    split_dir: str | os.PathLike[str],
    classes: Sequence[str],
    threads: int = 16,
    hidden: bool = False,
) -> list[list[str]]:
    """:func:`image_names` of ``split_dir/<class>`` for each of ``classes``, in that order."""
    split_dir = Path(split_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(classes)))) as pool:
        return list(pool.map(lambda c: image_names(split_dir / c, hidden), classes))


def check_same_classes(
    first: Sequence[str],
    other: Sequence[str],
    first_dir: Path,
    other_dir: Path,
    limit: int | None = 5,
    fix: str = "make the two splits hold the same class folders",
) -> None:
    """AtxError naming the folders that are only in one of two splits (at most ``limit`` of
    each; None: all)."""
    if list(first) == list(other):
        return

    def names(only: list[str]) -> str:
        if limit is None:
            return str(only)
        return f"{only[:limit]}{'...' if len(only) > limit else ''}"

    only_first = sorted(set(first) - set(other))
    only_other = sorted(set(other) - set(first))
    raise AtxError(
        f"class folders differ between '{first_dir}' and '{other_dir}': only in "
        f"{first_dir.name}: {names(only_first)}, only in {other_dir.name}: {names(only_other)}; "
        f"{fix}"
    )


# --- the in-memory image folders (atx.data.base) ----------------------------------------------
def list_image_folder(
    root: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "test"),
    num_classes: int | None = None,
    name: str = "dataset",
) -> tuple[list[str], list[list[tuple[Path, int]]]]:
    """``(classes, [[(path, label), ...] per split])`` of ``root/<split>/<class>/*.png|jpg|jpeg``.

    Class order is the sorted folder names, which must be identical in every split. Hidden
    folders and files are listed too: this layout always has, and its errors and cache keys
    stay as they were.
    """
    root = Path(root)
    listings: list[list[tuple[Path, int]]] = []
    classes: list[str] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise AtxError(
                f"{name} image folder '{split_dir}' not found: expected '{split_dir}/<class>/' "
                f"folders next to '{root / splits[0]}'; add it or fix data.root"
            )
        found = class_folders(split_dir, hidden=True)
        if split == splits[0]:
            classes = found
            if not classes:
                raise AtxError(f"no class folders in '{split_dir}'; add '{split_dir}/<class>/'")
            if num_classes is not None and len(classes) != num_classes:
                raise AtxError(
                    f"'{split_dir}' has {len(classes)} class folders, {name} needs "
                    f"{num_classes}; point data.root at a {name} copy"
                )
        check_same_classes(classes, found, root / splits[0], split_dir, None, "make them match")
        files: list[tuple[Path, int]] = []
        names = scan_images(split_dir, classes, hidden=True)
        for label, (cls, cls_names) in enumerate(zip(classes, names, strict=True)):
            if not cls_names:
                raise AtxError(
                    f"class folder '{split_dir / cls}' has no .png/.jpg/.jpeg images; "
                    f"add images or remove the folder (in every split)"
                )
            files += [(split_dir / cls / n, label) for n in cls_names]
        listings.append(files)
    return classes, listings


# --- the file lists of atx.data.folder ---------------------------------------------------------
@dataclass
class SampleList:
    """The samples of one split: paths (bytes, relative to ``base``), labels, optional boxes.

    numpy arrays rather than lists of tuples: 1.28M ImageNet paths take ~40 MB in one block,
    and forked DataLoader workers do not touch per-object refcounts (no copy-on-read growth).
    """

    base: str
    paths: np.ndarray  # dtype "S": os.fsencode'd paths relative to base
    labels: np.ndarray  # int64
    boxes: np.ndarray | None = None  # float32 (N, 4): x, y, w, h in pixels

    @classmethod
    def build(
        cls,
        base: str | os.PathLike[str],
        rel_paths: Sequence[str],
        labels: Sequence[int],
        boxes: Sequence[Sequence[float]] | None = None,
    ) -> SampleList:
        return cls(
            str(base),
            np.array([os.fsencode(p) for p in rel_paths], dtype=np.bytes_),
            np.asarray(labels, dtype=np.int64).reshape(-1),
            None if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.base, os.fsdecode(self.paths[i]))

    def take(self, idx: np.ndarray) -> SampleList:
        boxes = None if self.boxes is None else self.boxes[idx]
        return SampleList(self.base, self.paths[idx], self.labels[idx], boxes)


def scan_class_folders(
    split_dir: str | os.PathLike[str], classes: Sequence[str], threads: int = 16
) -> SampleList:
    """``split_dir/<class>/*.jpg|jpeg|png`` for the given ``classes`` (label = list position).

    File names are sorted within a class. A class folder without images is an AtxError.
    """
    split_dir = Path(split_dir)
    rel: list[str] = []
    labels: list[int] = []
    listings = scan_images(split_dir, classes, threads)
    for label, (cls, names) in enumerate(zip(classes, listings, strict=True)):
        if not names:
            raise AtxError(
                f"class folder '{split_dir / cls}' has no images (.jpg/.jpeg/.png); add its "
                f"images or remove the folder (from every split)"
            )
        rel += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    return SampleList.build(split_dir, rel, labels)


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-blank lines of a list file.

    A missing file is an AtxError naming it.
    """
    if not path.is_file():
        raise AtxError(
            f"{what} list file '{path}' is missing; put the official file there or fix data.root"
        )
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def read_list_file(path: Path, columns: int, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` rows of a whitespace-separated list file, ``columns`` fields
    each; an AtxError names the file when it is missing and the line when a row is malformed."""
    rows = []
    for n, line in read_lines(path, what):
        fields = line.split()
        if len(fields) != columns:
            raise AtxError(
                f"'{path}' line {n} has {len(fields)} fields, expected {columns}: "
                f"{line[:80]!r}; restore the official file"
            )
        rows.append((n, fields))
    return rows


def existing_files(images_dir: Path, folders: Sequence[str], threads: int = 16) -> set[str]:
    """``"<folder>/<name>"`` of every file in the given sub-folders of ``images_dir``
    (one ``os.scandir`` each; a missing folder contributes nothing)."""

    def names(folder: str) -> list[str]:
        try:
            with os.scandir(images_dir / folder) as it:
                return [f"{folder}/{e.name}" for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders)))) as pool:
        return {p for listing in pool.map(names, folders) for p in listing}


def missing_file_error(list_file: Path, line: int, rel: str, images_dir: Path) -> AtxError:
    """The error for a list-file line naming an image that is not there."""
    return AtxError(
        f"'{list_file}' line {line} names '{rel}', which does not exist in '{images_dir}'; "
        f"restore the image or use the list file of this copy"
    )


def require_images(images_dir: Path, classes: Sequence[str], fix: str) -> set[str]:
    """The files under ``images_dir``'s class folders (``existing_files``); every class
    folder must hold at least one image."""
    files = existing_files(images_dir, classes)
    with_images = {p.split("/", 1)[0] for p in files if p.lower().endswith(IMAGE_EXTENSIONS)}
    for cls in classes:
        if cls not in with_images:
            raise AtxError(
                f"class folder '{images_dir / cls}' has no images (.jpg/.jpeg/.png); {fix}"
            )
    return files
