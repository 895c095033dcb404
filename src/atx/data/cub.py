"""Caltech-UCSD Birds-200-2011 (Wah et al., 2011) as extracted from the official release (§4.2).

``root`` is the ``CUB_200_2011/`` folder (or the folder holding it) with ``images/<class>/
<file>.jpg`` and the list files ``images.txt`` (id path), ``image_class_labels.txt`` (id label
1..200), ``train_test_split.txt`` (id is_train), ``bounding_boxes.txt`` (id x y w h, floats)
and ``classes.txt`` (id name): 5,994 train / 5,794 test images. The paper crops each image to
its bounding box, rescales it to 256 on one side and takes a random 224 crop (training) or the
centre crop (evaluation); ``crop_to_bbox=False`` keeps whole images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atx.data.folder import ImageFileDataModule
from atx.data.listing import SampleList, missing_file_error, read_list_file, require_images
from atx.errors import AtxError

FOLDER = "CUB_200_2011"


class CUBDataModule(ImageFileDataModule):
    """CUB-200-2011: bounding-box crop, Resize(256) + RandomCrop(224) + flip for training,
    Resize(256) + CenterCrop(224) for the test split."""

    name = "CUB-200-2011"
    default_train_crop = "random"

    def __init__(self, root: str, crop_to_bbox: bool = True, **kwargs: Any) -> None:
        """``crop_to_bbox``: crop every image to its box first (the paper); other options:
        :class:`ImageFileDataModule`."""
        super().__init__(root, **kwargs)
        self.crop_to_bbox = crop_to_bbox

    @property
    def base(self) -> Path:
        """``root``, or ``root/CUB_200_2011`` when the release folder sits inside ``root``."""
        root = Path(self.root)
        if not (root / "images.txt").is_file() and (root / FOLDER / "images.txt").is_file():
            return root / FOLDER
        return root

    def _find_classes(self) -> list[str]:
        path = self.base / "classes.txt"
        rows = read_list_file(path, 2, f"{self.name} class")
        ids = [fields[0] for _, fields in rows]
        if ids != [str(i) for i in range(1, len(rows) + 1)]:
            raise AtxError(f"'{path}' must number its classes 1, 2, 3, ... in order; restore it")
        return [fields[1] for _, fields in rows]

    def _by_id(self, name: str, columns: int, ids: list[str]) -> dict[str, tuple[int, list[str]]]:
        """``{image id: (line, values)}`` of a per-image list file covering every id."""
        path = self.base / name
        table = {fields[0]: (n, fields[1:]) for n, fields in read_list_file(path, columns, name)}
        for image_id in ids:
            if image_id not in table:
                raise AtxError(
                    f"'{path}' has no line for image id {image_id} of images.txt; restore the "
                    f"official file"
                )
        return table

    def _find_samples(self) -> tuple[SampleList, SampleList]:
        base, classes = self.base, self.classes
        images_dir = base / "images"
        images_file = base / "images.txt"
        images = read_list_file(images_file, 2, f"{self.name} image")
        ids = [fields[0] for _, fields in images]
        labels = self._by_id("image_class_labels.txt", 2, ids)
        is_train = self._by_id("train_test_split.txt", 2, ids)
        boxes = self._by_id("bounding_boxes.txt", 5, ids) if self.crop_to_bbox else None

        files = require_images(images_dir, classes, "restore it from the official release")
        out: dict[bool, tuple[list[str], list[int], list[list[float]]]] = {
            True: ([], [], []),
            False: ([], [], []),
        }
        for n, (image_id, rel) in images:
            if rel not in files:
                raise missing_file_error(images_file, n, rel, images_dir)
            line, (label_text,) = labels[image_id]
            label = int(label_text) - 1 if label_text.isdigit() else -1
            if not 0 <= label < len(classes) or rel.split("/", 1)[0] != classes[label]:
                raise AtxError(
                    f"'{base / 'image_class_labels.txt'}' line {line} gives image '{rel}' label "
                    f"{label_text}, which is not its folder's class in classes.txt; restore the "
                    f"official list files"
                )
            line, (flag,) = is_train[image_id]
            if flag not in ("0", "1"):
                raise AtxError(
                    f"'{base / 'train_test_split.txt'}' line {line} has is_train={flag!r}, "
                    f"expected 0 or 1; restore the official file"
                )
            split = flag == "1"
            paths, ys, bbs = out[split]
            paths.append(rel)
            ys.append(label)
            if boxes is not None:
                try:
                    bbs.append([float(v) for v in boxes[image_id][1]])
                except ValueError:
                    raise AtxError(
                        f"'{base / 'bounding_boxes.txt'}' line {boxes[image_id][0]} holds a "
                        f"value that is not a number; restore the official file"
                    ) from None
        for split, what in ((True, "training"), (False, "test")):
            if not out[split][0]:
                raise AtxError(
                    f"'{base / 'train_test_split.txt'}' marks no {what} images; restore it"
                )
        return tuple(  # type: ignore[return-value]
            SampleList.build(images_dir, p, y, b if self.crop_to_bbox else None)
            for p, y, b in (out[True], out[False])
        )
