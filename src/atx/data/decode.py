"""Image files to uint8 tensors: the checked decoders and the per-sample dataset of the workers.

* :func:`read_image` (:mod:`atx.data.folder`, in DataLoader workers): ``torchvision.io.
  decode_image`` by default (JPEG incl. grey and CMYK, PNG, WebP, GIF), falling back to PIL for
  other formats; ``decoder="pil"`` uses PIL only (docs/benchmarks.md compares the two).
  ``decode_image`` is deprecated since torchvision 0.29 (moving to TorchCodec): its warning is
  silenced around the call and PIL takes over where it is gone. The header is read first and
  images above ``max_pixels`` are refused (a decompression-bomb guard covering both decoders);
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled: truncated files are errors.
* :func:`decode_fixed` (:mod:`atx.data.base`, decoded once): PIL, the size and mode must match.
* :class:`ImageFileDataset`: read, decode, box-crop (:func:`crop_box`) and transform one sample;
  ``on_corrupt="skip"`` serves the next readable sample instead (with *its* label).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import v2

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; still the fastest here
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without image io: PIL decodes everything
    decode_image = None  # type: ignore[assignment]

from atx.data.listing import SampleList
from atx.errors import AtxError

# Our own decompression-bomb limit, checked from the header for both decoders: 2**26 px (67 MP,
# ~200 MB as uint8 RGB) is far above any image of ImageNet, CUB or Scenes. PIL's process-wide
# ``Image.MAX_IMAGE_PIXELS`` is left as it is (other libraries share it); its bomb warning is
# superseded by this check.
MAX_IMAGE_PIXELS = 2**26
MAX_SKIPS = 16  # consecutive unreadable files before even on_corrupt="skip" gives up
TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class CorruptImageError(AtxError):
    """An image file that cannot be read or decoded; the message names the file.

    Raised inside a DataLoader worker, PyTorch re-raises it in the main process as
    ``CorruptImageError("Caught CorruptImageError in DataLoader worker ...<traceback>")``;
    the constructor keeps only the original one-line message, so the user sees one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__} "):
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def read_image(
    path: str, decoder: str = "torchvision", max_pixels: int = MAX_IMAGE_PIXELS
) -> Tensor:
    """Decode ``path`` to a uint8 RGB tensor ``(3, H, W)``; :class:`CorruptImageError` if not.

    The header is parsed by PIL first (no pixel decoding) to refuse images above
    ``max_pixels``; then ``decoder`` decodes ("torchvision": ``decode_image``, PIL as fallback
    for formats it lacks or when torchvision has no image io; "pil": PIL only). Truncated files
    are errors with either decoder (PIL's ``LOAD_TRUNCATED_IMAGES`` is never enabled).
    """
    fix = "replace or delete the file (or set data.on_corrupt=skip)"
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as err:
        raise CorruptImageError(
            f"cannot read image '{path}' ({err.strerror or err}); {fix}"
        ) from None
    with warnings.catch_warnings():
        # our max_pixels check supersedes PIL's bomb warning; torchvision 0.29 deprecates its
        # image io in favour of TorchCodec but it still works (and PIL takes over once it is gone)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        try:
            header = Image.open(io.BytesIO(data))
            width, height = header.size
        except Image.DecompressionBombError as err:
            raise CorruptImageError(f"image '{path}' is too large ({err}); {fix}") from None
        except Exception as err:  # UnidentifiedImageError, SyntaxError, ValueError, ...
            raise CorruptImageError(
                f"cannot decode image '{path}' ({type(err).__name__}: {err}); {fix}"
            ) from None
        if width * height > max_pixels:
            raise CorruptImageError(
                f"image '{path}' is {width}x{height} = {width * height} pixels, above the limit "
                f"of {max_pixels} (data.max_pixels); shrink the file or raise data.max_pixels"
            )
        error: Exception | None = None
        if decoder == "torchvision" and decode_image is not None:
            try:
                x = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
                return x[0] if x.dim() == 4 else x  # animated GIF: first frame
            except RuntimeError as err:  # a format torchvision lacks, or a damaged file
                error = err
        try:
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise OSError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; cannot trust PIL")
            with header:
                return v2.functional.pil_to_tensor(header.convert("RGB"))
        except Exception as err:
            first = error or err
            reason = (str(first).strip().splitlines() or [""])[-1]
            reason = re.sub(r"^[\w.]+, \S+:\d+, ", "", reason)  # torchvision's C++ location
            raise CorruptImageError(
                f"cannot decode image '{path}' ({type(first).__name__}: {reason}); {fix}"
            ) from None


def decode_fixed(path: Path, size: int, mode: str) -> np.ndarray:
    """``path`` decoded by PIL as a uint8 array; it must be ``size`` x ``size`` in ``mode``
    ("L" or "RGB"), else an AtxError naming it (the in-memory layouts are not resized)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.size != (size, size) or im.mode != mode:
                raise AtxError(
                    f"image '{path}' is {im.size[0]}x{im.size[1]} {im.mode}, expected "
                    f"{size}x{size} {mode}; convert or remove it"
                )
            return np.asarray(im, dtype=np.uint8)
    except AtxError:
        raise
    except OSError as err:
        raise AtxError(f"cannot decode image '{path}' ({err}); replace or remove it") from err


def crop_box(x: Tensor, box: Sequence[float]) -> Tensor:
    """Crop ``x (C, H, W)`` to the box ``(x, y, w, h)`` in pixels (floats, outward-rounded,
    clamped to the image, at least one pixel): CUB's bounding boxes (§4.2)."""
    h, w = x.shape[-2:]
    bx, by, bw, bh = (float(v) for v in box)
    x0 = min(max(int(math.floor(bx)), 0), w - 1)
    y0 = min(max(int(math.floor(by)), 0), h - 1)
    x1 = max(min(int(math.ceil(bx + bw)), w), x0 + 1)
    y1 = max(min(int(math.ceil(by + bh)), h), y0 + 1)
    return x[..., y0:y1, x0:x1]


class ImageFileDataset(Dataset):
    """``(uint8 (3, S, S) crop, label)`` per sample: read, decode, box-crop, transform.

    ``on_corrupt="skip"`` replaces an unreadable sample by the next readable one of the list
    and counts it in ``skipped`` (shared memory, one slot per worker, so counts from all
    DataLoader workers reach the main process).
    """

    def __init__(
        self,
        samples: SampleList,
        transform: Callable[[Tensor], Tensor],
        decoder: str = "torchvision",
        on_corrupt: str = "error",
        max_pixels: int = MAX_IMAGE_PIXELS,
        num_workers: int = 0,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.decoder = decoder
        self.on_corrupt = on_corrupt
        self.max_pixels = max_pixels
        self.skipped = torch.zeros(num_workers + 1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Tensor:
        """Sample ``i`` decoded (and box-cropped), before the transform: uint8 (3, H, W)."""
        x = read_image(self.samples.path(i), self.decoder, self.max_pixels)
        if self.samples.boxes is not None:
            x = crop_box(x, self.samples.boxes[i])
        return x

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        for k in range(MAX_SKIPS + 1):
            j = (i + k) % n
            try:
                x = self.load(j)
            except CorruptImageError as err:
                if self.on_corrupt != "skip":
                    raise
                if k == MAX_SKIPS:
                    raise CorruptImageError(
                        f"{MAX_SKIPS + 1} unreadable images in a row from "
                        f"'{self.samples.path(i)}' on; the copy under '{self.samples.base}' "
                        f"is damaged, restore it"
                    ) from None
                slots, info = len(self.skipped), get_worker_info()
                self.skipped[0 if info is None or slots == 1 else 1 + info.id % (slots - 1)] += 1
                warnings.warn(f"skipped: {err}", stacklevel=2)
                continue
            return self.transform(x).contiguous(), int(self.samples.labels[j])
        raise AssertionError("unreachable")
