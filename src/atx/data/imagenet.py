"""ImageNet (ILSVRC-2012) in the ImageFolder layout of torchvision / fb.resnet.torch (§4.2).

``root/train/<wnid>/*.JPEG`` (1.28M images) and ``root/val/<wnid>/*.JPEG`` (50k; the official
validation tarball is flat and must first be sorted into class folders, e.g. with
``valprep.sh``). Classes are the sorted wnid folders (the label order of torchvision's
pretrained weights) and must be the same in both splits. Scanning uses one ``os.scandir`` per
class folder in a thread pool and never opens an image. Top-5 error is logged by
:class:`~atx.module.DistillModule` whenever there are more than 10 classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atx.data.folder import ImageFileDataModule
from atx.data.listing import SampleList, check_same_classes, class_folders, scan_class_folders
from atx.errors import AtxError


class ImageNetDataModule(ImageFileDataModule):
    """ImageNet: RandomResizedCrop(224) + flip for training, Resize(256) + CenterCrop(224)
    for validation, as the authors' ``imagenet.py``: fb.resnet.torch's crops without its colour
    jitter and lighting (PCA) noise (and the presets' SGD has no Nesterov momentum)."""

    name = "ImageNet"
    default_train_crop = "random_resized"

    def __init__(self, root: str, **kwargs: Any) -> None:
        """``root`` holds ``train/`` and ``val/``; other options: :class:`ImageFileDataModule`."""
        super().__init__(root, **kwargs)

    def _split_dir(self, split: str) -> Path:
        path = Path(self.root) / split
        if not path.is_dir():
            raise AtxError(
                f"{self.name} split folder '{path}' not found: expected '{self.root}/train/"
                f"<wnid>/*.JPEG' and '{self.root}/val/<wnid>/*.JPEG'; fix data.root"
            )
        return path

    def _find_classes(self) -> list[str]:
        train_dir = self._split_dir("train")
        classes = class_folders(train_dir)
        if not classes:
            raise AtxError(
                f"no class folders in '{train_dir}'; expected '{train_dir}/<wnid>/*.JPEG'"
            )
        return classes

    def _find_samples(self) -> tuple[SampleList, SampleList]:
        train_dir, val_dir = self._split_dir("train"), self._split_dir("val")
        val_classes = class_folders(val_dir)
        if not val_classes:
            raise AtxError(
                f"no class folders in '{val_dir}': the official validation images come flat; "
                f"sort them into '{val_dir}/<wnid>/' folders (e.g. with valprep.sh)"
            )
        check_same_classes(self.classes, val_classes, train_dir, val_dir)
        return scan_class_folders(train_dir, self.classes), scan_class_folders(
            val_dir, self.classes
        )
