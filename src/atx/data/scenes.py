"""MIT Indoor 67 scenes (Quattoni & Torralba, 2009) as distributed; fine-tuning in §4.2.

``root/Images/<class>/*.jpg`` (the ``indoorCVPR_09`` tarball) with the official split lists
``root/TrainImages.txt`` and ``root/TestImages.txt`` (lines like ``kitchen/int474.jpg``,
relative to ``Images/``; 80 train + 20 test images per class). The 67 classes are the sorted
``Images/`` folders; a sample's label is the folder its list line names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atx.data.folder import ImageFileDataModule
from atx.data.listing import (
    SampleList,
    class_folders,
    missing_file_error,
    read_lines,
    require_images,
)
from atx.errors import AtxError

LIST_FILES = {"train": "TrainImages.txt", "val": "TestImages.txt"}


class ScenesDataModule(ImageFileDataModule):
    """MIT Indoor 67: Resize(256) + RandomCrop(224) + flip for training (as for CUB in §4.2),
    Resize(256) + CenterCrop(224) for the test split."""

    name = "MIT Indoor 67"
    default_train_crop = "random"

    def __init__(self, root: str, **kwargs: Any) -> None:
        """``root`` holds ``Images/`` and the two list files; other options:
        :class:`ImageFileDataModule`."""
        super().__init__(root, **kwargs)

    @property
    def images_dir(self) -> Path:
        return Path(self.root) / "Images"

    def _find_classes(self) -> list[str]:
        if not self.images_dir.is_dir():
            raise AtxError(
                f"{self.name} image folder '{self.images_dir}' not found: expected "
                f"'{self.images_dir}/<class>/*.jpg' (the indoorCVPR_09 tarball); fix data.root"
            )
        classes = class_folders(self.images_dir)
        if not classes:
            raise AtxError(f"no class folders in '{self.images_dir}'; extract indoorCVPR_09 there")
        return classes

    def _find_samples(self) -> tuple[SampleList, SampleList]:
        classes = self.classes
        files = require_images(self.images_dir, classes, "add its images or remove the folder")
        label_of = {c: i for i, c in enumerate(classes)}
        splits = []
        for split in ("train", "val"):
            list_file = Path(self.root) / LIST_FILES[split]
            rel_paths, labels = [], []
            for n, line in read_lines(list_file, f"{self.name} {split}"):
                rel = line.replace("\\", "/").lstrip("/")
                cls = rel.split("/", 1)[0]
                if "/" not in rel or cls not in label_of:
                    raise AtxError(
                        f"'{list_file}' line {n} names '{rel}', which is not in a class folder of "
                        f"'{self.images_dir}'; use the list file of this copy"
                    )
                if rel not in files:
                    raise missing_file_error(list_file, n, rel, self.images_dir)
                rel_paths.append(rel)
                labels.append(label_of[cls])
            if not rel_paths:
                raise AtxError(f"'{list_file}' lists no images; restore the official file")
            splits.append(SampleList.build(self.images_dir, rel_paths, labels))
        return splits[0], splits[1]
