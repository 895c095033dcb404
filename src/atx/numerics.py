"""Non-finite losses: stop the run naming the step, the term and the layer group, or skip the
step (config ``nan_policy``).

The check runs in ``training_step`` before the loss is returned, so no backward pass and no
optimiser step ever sees a NaN: the weights, and every checkpoint written from them, stay the
last good ones. It costs one device sync per step (``bool`` of the summed loss); the terms are
only inspected once the sum is not finite (a NaN or inf in any weighted term makes it so).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from atx.errors import AtxError
from atx.options import Choice


class NonFiniteLoss(AtxError):
    """A loss term became NaN or inf during training."""


def split_term(name: str) -> tuple[str, str | None]:
    """``"at/group2"`` -> ``("at", "group2")``; ``"kd"`` -> ``("kd", None)``."""
    term, _, group = name.partition("/")
    return term, group or None


def _value(t: Tensor) -> str:
    return "nan" if bool(torch.isnan(t).any()) else "inf"


def describe_nonfinite(loss: Tensor, parts: Mapping[str, Tensor]) -> str:
    """Which term (and layer group) is not finite; every further one is listed after it."""
    bad = [(k, v) for k, v in parts.items() if not bool(torch.isfinite(v).all())]
    if not bad:
        return (
            f"the weighted sum is {_value(loss)} though every term is finite: the term weights"
            " (distill.*.beta, their schedules) are too large"
        )
    name, value = bad[0]
    term, group = split_term(name)
    where = f"term '{term}' of layer group '{group}'" if group else f"term '{term}'"
    more = f" (also not finite: {', '.join(k for k, _ in bad[1:])})" if len(bad) > 1 else ""
    return f"{where} is {_value(value)}{more}"


class NanPolicy(Choice):
    """What a non-finite loss does: stop the run (naming step, term and group), or skip it."""

    stop = "stop"
    skip = "skip"


class NanGuard:
    """``policy="stop"``: the first non-finite loss raises :class:`NonFiniteLoss`.
    ``policy="skip"``: the step is dropped (nothing back-propagated, no optimiser step) and
    counted; ``limit`` non-finite steps in a row raise anyway."""

    def __init__(self, policy: NanPolicy | str = "stop", limit: int = 10) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.policy, self.limit = NanPolicy(policy), limit
        self.skipped = 0  # steps skipped in this run (this process)
        self.in_a_row = 0

    def __call__(
        self, loss: Tensor, parts: Mapping[str, Tensor], step: int, epoch: int, batch: int
    ) -> bool:
        """True: skip this step. Raises when the run must stop."""
        if bool(torch.isfinite(loss)):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        where = f"step {step} (epoch {epoch}, batch {batch})"
        what = describe_nonfinite(loss, parts)
        if self.policy == "stop":
            raise NonFiniteLoss(
                f"non-finite loss at {where}: {what}; stopped before the optimiser step, so the"
                " checkpoints hold the last good weights; lower optim.lr or the term's beta,"
                " check the teacher, or set nan_policy=skip"
            )
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{self.in_a_row} non-finite losses in a row (nan_skip_limit={self.limit}), the"
                f" last at {where}: {what}; {self.skipped} step(s) skipped before; the"
                " checkpoints hold the last good weights; lower optim.lr or the term's beta"
            )
        self.skipped += 1
        return True
