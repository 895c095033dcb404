"""The training sampler: torch's ``RandomSampler`` order, restartable in the middle of an epoch.

A fresh epoch draws its permutation seed from the global torch RNG exactly as ``RandomSampler``
does, so runs are unchanged by it. A resumed run (``atx.resume``) hands it the interrupted
epoch's seed and how many indices were already trained on: the same permutation comes back and
only the untrained tail is served.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import RandomSampler


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler`` (no replacement) that remembers its epoch seed and can skip ahead."""

    def __init__(self, data_source: object) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.epoch_seed: int | None = None  # seed of the permutation being served
        self.resume_point: tuple[int, int] | None = None  # (seed, indices to skip), used once

    def __iter__(self) -> Iterator[int]:
        if self.resume_point is not None:
            seed, skip = self.resume_point
            self.resume_point = None
        else:  # RandomSampler's own draw: same global-RNG consumption, same order
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        n = len(self.data_source)  # type: ignore[arg-type]
        yield from torch.randperm(n, generator=generator).tolist()[skip:]
