"""Which validation images the attention figures show: spread over the classes.

The first images of a dataset in file order are often of one class (an image-folder CIFAR-10
starts with eight airplanes). :func:`spread_over_classes` takes the first image of every class,
in class order, then the second of every class, and so on: deterministic, so every run of a
dataset shows the same images and figures of different runs compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def spread_over_classes(labels: Tensor | np.ndarray | Sequence[int], n: int) -> list[int]:
    """Indices of ``n`` images (all there are, if fewer), round-robin over the classes in
    class order, each class's images in dataset order."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten().cpu()
    if len(y) == 0 or n <= 0:
        return []
    by_class = torch.argsort(y, stable=True)  # dataset order within each class
    counts = torch.bincount(y[by_class])
    rank = torch.arange(len(y)) - (torch.cumsum(counts, 0) - counts)[y[by_class]]
    round_robin = torch.argsort(rank * len(counts) + y[by_class], stable=True)
    return by_class[round_robin][:n].tolist()
