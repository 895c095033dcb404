"""Tiny copies of the official dataset layouts (temporary re-export)."""
from test_data import write_cifar10, write_cifar100, write_fashion, write_image_folder  # noqa: F401
