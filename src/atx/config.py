"""The config schema (typed dataclasses registered with Hydra) and start-up validation.

The schema makes a misspelt key in the shell *or* in a preset file fail while Hydra composes
the config. Groups whose keys depend on the class they build (data, model, teacher, trainer,
logger) are checked against that class's signature by ``atx.train`` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import atx.terms  # noqa: F401  (registers the built-in loss terms)
from atx.losses import TERMS
from atx.module import FinetuneConf
from atx.numerics import NanPolicy
from atx.optim import OptimConf
from atx.options import did_you_mean, unknown_option
from atx.speed import SpeedConf


@dataclass
class CheckpointConf:
    """Checkpoints in ``<run>/checkpoints``: last + best at every epoch end, and these."""

    every_n_steps: int = 1000  # also save every N training steps, mid-epoch (0: off)
    keep_last: int = 2  # step checkpoints kept (the newest)


@dataclass
class TrainConf:
    name: str = "run"
    seed: int = 0
    data: Any = MISSING
    model: Any = MISSING
    teacher: Any = None
    distill: Any = None  # the loss terms' options: replaced by distill_schema() in register()
    optim: OptimConf = field(default_factory=OptimConf)
    finetune: FinetuneConf = field(default_factory=FinetuneConf)
    speed: SpeedConf = field(default_factory=SpeedConf)
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    figure_images: int = 8  # validation images in the attention-map figures (0: no figures)
    figure_every_n_epochs: int = 20  # also log the figure every N epochs (0: only at the end)
    debug: bool = False  # true: show the full traceback of configuration errors
    nan_policy: NanPolicy = NanPolicy.stop  # a NaN/inf loss: stop (name step, term, group) | skip
    nan_skip_limit: int = 10  # skip: stop anyway after this many non-finite steps in a row
    jobs_per_gpu: int = 1  # local parallel sweeps: runs sharing one GPU (packed small runs)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    resume: str | None = None  # a run dir: continue that run from its newest checkpoint


def distill_schema() -> type:
    """``distill``: one field per registered loss term with options, named after the term."""
    fields = [
        (name, term.Conf, field(default_factory=term.Conf))
        for name, term in TERMS.items()
        if term.Conf is not None
    ]
    return dataclasses.make_dataclass("DistillConf", fields)


def train_schema() -> type:
    """TrainConf with the ``distill`` of the terms registered now."""
    distill = distill_schema()
    fields = [("distill", distill, field(default_factory=distill))]
    return dataclasses.make_dataclass("TrainConf", fields, bases=(TrainConf,))


def check_schema_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Every key of the composed config under a schema'd group must be in the schema: Hydra
    lets ``+distill.at.bta=3`` from the shell add a key it would refuse without the ``+``."""
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            raise unknown_option(str(key), hints, prefix.rstrip("."))
        if dataclasses.is_dataclass(hints[key]):
            check_schema_keys(node[key], hints[key], f"{prefix}{key}.")


def composition_error_line(error: BaseException) -> str:
    """Hydra's multi-line composition error (unknown key or wrong type from the shell, unknown
    preset) as one line, with a close match where there is one."""
    text = str(error).split("Config search path:")[0]
    options = [ln.strip() for ln in text.splitlines() if ln.startswith("\t")]
    head = [ln.strip().rstrip(".:") for ln in text.splitlines() if ln.strip()]
    head = [ln.removeprefix("Error merging override ") for ln in head]
    head = [ln for ln in head if ln not in options]
    cause = error.__cause__
    if cause is not None:  # an OmegaConf error: unknown key or a value of the wrong type
        schema = getattr(cause, "object_type", None)
        key, full_key = str(getattr(cause, "key", "")), str(getattr(cause, "full_key", ""))
        is_schema = dataclasses.is_dataclass(schema)
        fields = [f.name for f in dataclasses.fields(schema)] if is_schema else []
        where = full_key.rpartition(".")[0]
        hint = did_you_mean(key, fields, f"{where}." if where else "")
        line = f"{head[0]}: {str(cause).splitlines()[0]}{hint}"
        if not fields and len(head) > 1:  # a free-form group (trainer, data): + adds a key
            line += f"; {head[1][0].lower()}{head[1][1:]}"
        return line
    missing = re.search(r"Could not find '[^/']+/([^']+)'", text)
    hint = did_you_mean(missing.group(1), options) if missing else ""
    rest = f"; {head[-1].lower()}: {', '.join(options)}" if options and len(head) > 1 else ""
    return f"{head[0]}{hint}{rest}" if options else "; ".join(head)


def register() -> type:
    """Store the schema as ``atx_schema`` (first entry of conf/train.yaml's defaults), with a
    ``distill`` field for every term registered by now; returns it."""
    schema = train_schema()
    ConfigStore.instance().store(name="atx_schema", node=schema)
    return schema
