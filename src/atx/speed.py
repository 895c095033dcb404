"""Speed switches of a run (config ``speed``, :class:`SpeedConf`) and the CPU allocator.

None of them changes what is trained beyond float rounding (tests/test_speed.py checks them):

* ``channels_last``: student, teacher and every batch in NHWC layout (faster convolutions on
  CPUs with oneDNN and on tensor-core GPUs).
* ``compile``: ``nn.Module.compile()`` of student and teacher, in place, so checkpoints keep
  their keys. Not with input-gradient terms (grad-AT, symmetry, min-l2): ``torch.compile``
  cannot double-backward, so those runs stay eager with a warning.
  ``compile_mode`` picks torch's mode: ``reduce_overhead`` (CUDA graphs) or ``max_autotune``
  for the small, launch-bound WRNs on a GPU.
* ``teacher_precision`` / ``teacher_inference_mode``: the teacher's forward under autocast to
  bf16/fp16 and ``torch.inference_mode``. Its outputs are only targets: the attention maps and
  transfer losses are computed from them in float32 (``atx.attention.spatial_map``). The grad-AT
  teacher path needs J_t = dL/dx, so it keeps full precision and autograd.
* ``teacher_eval_cache_mib``: during a fit, the frozen teacher's attention maps of each
  evaluation batch (for the agreement metrics) are kept from the batch's first pass, up to this
  many MiB on the batches' device, so later evaluations run only the student
  (``atx.module.TeacherEvalMaps``, tested in tests/test_module.py); the values are the same bit
  for bit. 0 turns it off.
* ``allocator``: glibc keeps freed memory instead of returning it to the OS, so the teacher's
  activations, freed after every forward, are not page-faulted back in on the next step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atx.options import Choice


class TeacherPrecision(Choice):
    """Autocast dtype of the teacher's forward: the run's own, bfloat16 or float16."""

    same = "same"
    bf16 = "bf16"
    fp16 = "fp16"


class CompileMode(Choice):
    """``torch.compile`` mode (torch's name with "-" for "_"). On a GPU the small WRNs are
    launch-bound: ``reduce_overhead`` replays each step as CUDA graphs, ``max_autotune`` also
    autotunes the kernels (a long first compile); ``default`` is the plain compile."""

    default = "default"
    reduce_overhead = "reduce_overhead"
    max_autotune = "max_autotune"
    max_autotune_no_cudagraphs = "max_autotune_no_cudagraphs"


TEACHER_DTYPES = {"same": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SpeedConf:
    """Speed switches (config ``speed``); none changes what is trained beyond float rounding."""

    channels_last: bool = False  # NHWC memory layout for student, teacher and batches
    compile: bool = False  # torch.compile student and teacher (eager for input-gradient terms)
    compile_mode: CompileMode = CompileMode.default  # GPU: reduce_overhead = CUDA graphs
    teacher_precision: TeacherPrecision = TeacherPrecision.same  # autocast dtype of the teacher
    teacher_inference_mode: bool = False  # teacher under torch.inference_mode, not no_grad
    allocator: bool = True  # CPU: glibc mallopt so freed activations are reused, not re-faulted
    teacher_eval_cache_mib: int = 1024  # the teacher's eval-batch maps kept up to this; 0: off

# glibc malloc.h: mallopt parameters and the values the issue measured (MALLOC_*_ env vars)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # blocks below 32 MiB come from the heap, not fresh mmaps
TRIM_THRESHOLD = 4 * 1024**3  # free heap memory is returned to the OS only above 4 GiB
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}
ALLOCATOR_SWITCH = "ATX_MALLOC"  # ATX_MALLOC=0 leaves glibc's defaults, whatever the config
COMPILE_FALLBACK = (
    "speed.compile=true ignored: input-gradient terms (grad-AT, symmetry, min-l2) need a double"
    " backward, which torch.compile cannot do; student and teacher run eager"
)


def configure_allocator(enabled: bool = True) -> str:
    """Make glibc keep freed memory for reuse: ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and
    ``mallopt(M_TRIM_THRESHOLD, 4 GiB)``, the runtime equivalent of the ``MALLOC_*_`` env vars.

    Returns what was done: ``"mallopt"``; ``"env"`` (the env vars were set before the process
    started: left alone); ``"off"`` (``enabled`` false or ``ATX_MALLOC=0``); ``"unavailable"``
    (not glibc). Calling it again is harmless.
    """
    if not enabled or os.environ.get(ALLOCATOR_SWITCH) == "0":
        return "off"
    if any(k in os.environ for k in MALLOC_ENV):
        return "env"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unavailable"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the trim threshold does not fit a C int: mallopt takes an int, so cap it at 2^31 - 1
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)) == 1
    return "mallopt" if ok else "unavailable"


def prepare_models(
    student: nn.Module, teacher: nn.Module | None, conf: SpeedConf, needs_input_grad: bool
) -> None:
    """Apply ``channels_last`` and ``compile`` to both networks, in place."""
    nets = [m for m in (student, teacher) if m is not None]
    if conf.channels_last:
        for m in nets:
            m.to(memory_format=torch.channels_last)
    if conf.compile:
        if needs_input_grad:
            warnings.warn(COMPILE_FALLBACK, stacklevel=2)
            return
        mode = str(conf.compile_mode).replace("_", "-")
        for m in nets:
            m.compile(mode=None if mode == "default" else mode)


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """An image batch in NHWC memory layout when ``channels_last`` (other tensors as they are)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextmanager
def teacher_forward(conf: SpeedConf, device_type: str) -> Iterator[None]:
    """Context of the teacher's forward when no gradient flows through it: ``no_grad`` or
    ``inference_mode``, under autocast to the chosen precision (``same``: the run's own)."""
    grad_off = torch.inference_mode() if conf.teacher_inference_mode else torch.no_grad()
    dtype = TEACHER_DTYPES[str(conf.teacher_precision)]
    with grad_off:
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device_type, dtype=dtype):
                yield
