"""The training step's loss, terms and error: summed on the device over each epoch, handed to
Lightning's loggers on the steps they write and as batch-weighted means at the epoch's end.

Lightning's ``self.log`` does its bookkeeping on the host for every name on every step, and a
step has a name per loss term; on the small networks of the paper that bookkeeping costs about
as much as a term itself. Here a step costs one stack and one add on the device. The names and
values are those ``self.log(..., on_step=True, on_epoch=True)`` gives: ``train/<name>_step`` on
the logged steps (every ``trainer.log_every_n_steps``) and ``train/<name>_epoch``, the mean
weighted by batch size, once an epoch. (``DistillModule`` also logs the step's loss alone every
step, as ``train/loss``, for the progress bar and callbacks.)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor


class EpochSums:
    """Batch-weighted sums of one epoch's step values (the same names every step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: Tensor | None = None
        self.images = 0
        self.last: dict[str, Tensor] = {}  # the latest step's values

    @torch.no_grad()
    def add(self, values: dict[str, Tensor], batch_size: int) -> None:
        # float32, or float64 where a value is (as Lightning keeps them)
        wide = any(v.dtype == torch.float64 for v in values.values())
        step = torch.stack([v.detach().to(torch.float64 if wide else torch.float32)
                            for v in values.values()])
        if self.sums is None:
            self.names, self.sums = tuple(values), step * batch_size
        elif tuple(values) != self.names:
            raise ValueError(f"a step logged {sorted(values)}, earlier steps {sorted(self.names)}")
        else:
            self.sums += step * batch_size
        self.images += batch_size
        self.last = dict(zip(self.names, step, strict=True))

    def means(self) -> dict[str, Tensor]:
        if self.sums is None:
            return {}
        return dict(zip(self.names, self.sums / self.images, strict=True))

    def state_dict(self) -> dict[str, Any]:
        sums = None if self.sums is None else self.sums.detach().cpu().clone()
        return {"names": list(self.names), "sums": sums, "images": self.images}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Start from a checkpoint's sums (the steps of an epoch before its interruption)."""
        if "names" not in state:
            state = _from_lightning_sums(state)
        self.reset()
        if state["sums"] is not None:
            self.names, self.images = tuple(state["names"]), int(state["images"])
            self.sums = state["sums"].to(device)


def _from_lightning_sums(old: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
    """Checkpoints of earlier atx versions kept Lightning's own running sums of ``self.log``
    (``training_step.train/<name>`` -> value and image count)."""
    names = [k.removeprefix("training_step.train/") for k in old]
    if not names:
        return {"names": [], "sums": None, "images": 0}
    return {"names": names, "sums": torch.stack([v["value"].float() for v in old.values()]),
            "images": int(next(iter(old.values()))["count"])}


def loggers_write_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's values to the loggers (its own rule:
    every ``log_every_n_steps``, the last step of a stopping run, every step of a fast dev
    run; private API, kept in this one place)."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
