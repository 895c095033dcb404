"""Data modules on one core (:mod:`atx.data.core`): datasets decoded once into uint8 tensors and
augmented batch-wise on the device (:mod:`atx.data.base`), or image files decoded in DataLoader
workers (:mod:`atx.data.folder`)."""

from atx.data.augment import denormalize, normalize, random_crop_flip
from atx.data.base import TensorImageDataModule, load_image_folder
from atx.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from atx.data.cub import CUBDataModule
from atx.data.fashion_mnist import FashionMNISTDataModule, read_idx
from atx.data.folder import ImageFileDataModule
from atx.data.imagenet import ImageNetDataModule
from atx.data.scenes import ScenesDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUBDataModule",
    "FashionMNISTDataModule",
    "ImageFileDataModule",
    "ImageNetDataModule",
    "ScenesDataModule",
    "TensorImageDataModule",
    "denormalize",
    "load_image_folder",
    "normalize",
    "random_crop_flip",
    "read_idx",
]
