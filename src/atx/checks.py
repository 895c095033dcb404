"""Value and cross-field checks of a composed config, run before any data or model is touched.

Keys, types and choices are the schema's (``atx.config``, at composition); what is left is
checked here, once: numbers in range, the loss terms' own checks (``Term.check``), trainer
values Lightning would reject late, and device counts this machine cannot give. Every failure
is one ``AtxError`` line naming the key and the fix.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from atx.cluster import check_sync_batchnorm
from atx.config import check_schema_keys, train_schema
from atx.errors import AtxError
from atx.losses import TERMS
from atx.optim import LRSchedule, OptimName, Recipe
from atx.options import accepted_kwargs, check_keys, check_milestones, check_number


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before data or models are touched."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if k != "teacher.checkpoint"]
    if missing:
        raise AtxError(f"config value '{missing[0]}' is not set: pass {missing[0]}=<value>")
    check_schema_keys(cfg, train_schema())
    check_distill(cfg.distill)
    check_optim(cfg.optim, cfg.trainer.get("max_epochs"))
    check_run_options(cfg)
    allowed = accepted_kwargs(L.Trainer) - {"logger", "callbacks", "default_root_dir"}
    check_keys(cfg.trainer, allowed, "trainer")
    check_trainer(cfg.trainer)
    check_sync_batchnorm(cfg.trainer)


def check_distill(d: DictConfig) -> None:
    """Each loss term checks its own options."""
    for name, term in TERMS.items():
        if term.Conf is not None:
            term.check(d[name], f"distill.{name}")


def check_optim(o: DictConfig, max_epochs: Any = None) -> None:
    """Optimiser and lr-schedule settings torch would only reject at the first step (or never);
    ``max_epochs`` (trainer.max_epochs) is where a cosine schedule ends."""
    check_number(o.lr, "optim.lr", 0.0, strict=True)
    check_number(o.momentum, "optim.momentum", 0.0)
    check_number(o.weight_decay, "optim.weight_decay", 0.0)
    check_number(o.gamma, "optim.gamma", 0.0, strict=True)
    check_milestones(o.milestones, "optim.milestones")
    for key in ("beta1", "beta2"):
        if not 0 <= o[key] < 1:
            raise AtxError(f"optim.{key}={o[key]} must lie in [0, 1)")
    check_number(o.eps, "optim.eps", 0.0, strict=True)
    check_number(o.min_lr, "optim.min_lr", 0.0)
    check_number(o.warmup_epochs, "optim.warmup_epochs", 0, hint=" (0: no warm-up)")
    if not 0 < o.warmup_start_factor <= 1:
        raise AtxError(f"optim.warmup_start_factor={o.warmup_start_factor} must lie in (0, 1]")
    sgd = OptimName(o.name) is OptimName.sgd
    if o.nesterov and not sgd:
        raise AtxError(f"optim.nesterov=true is an SGD option: drop it for optim.name={o.name}")
    if o.nesterov and o.momentum == 0:
        raise AtxError("optim.nesterov=true needs optim.momentum > 0")
    if Recipe(o.recipe) is Recipe.authors:
        for key, value in (("name", "sgd"), ("schedule", "step"), ("warmup_epochs", 0)):
            if str(o[key]) != str(value):
                raise AtxError(
                    f"optim.recipe=authors is the authors' SGD step decay and needs"
                    f" optim.{key}={value}, not {o[key]} (or set optim.recipe=standard)"
                )
    epochs = max_epochs if _is_int(max_epochs) and max_epochs >= 1 else None
    cosine = LRSchedule(o.schedule) is LRSchedule.cosine
    if cosine and epochs is None:
        raise AtxError("optim.schedule=cosine ends at trainer.max_epochs: set trainer.max_epochs")
    if cosine and not o.min_lr < o.lr:
        raise AtxError(f"optim.min_lr={o.min_lr} must be below optim.lr={o.lr} for a cosine")
    if epochs is not None and 0 < o.warmup_epochs and epochs <= o.warmup_epochs:
        raise AtxError(
            f"optim.warmup_epochs={o.warmup_epochs} must be below trainer.max_epochs={epochs}"
            " (the warm-up would never end)"
        )


def check_run_options(cfg: DictConfig) -> None:
    """Top-level options: figures, the policy for non-finite losses (``atx.numerics``), the
    teacher's evaluation cache."""
    for key in ("figure_images", "figure_every_n_epochs"):
        if cfg[key] < 0:
            raise AtxError(f"{key}={cfg[key]} must be >= 0 (0 turns it off)")
    if cfg.speed.teacher_eval_cache_mib < 0:
        raise AtxError(f"speed.teacher_eval_cache_mib={cfg.speed.teacher_eval_cache_mib} must be"
                       " >= 0 (0 turns the cache off)")
    for key in ("nan_skip_limit", "jobs_per_gpu"):
        if cfg[key] < 1:
            raise AtxError(f"{key}={cfg[key]} must be >= 1")
    devices = device_count(cfg.trainer.get("devices", "auto"))
    if cfg.nan_policy == "skip" and ((devices or 1) > 1 or cfg.trainer.get("num_nodes", 1) > 1):
        raise AtxError(
            "nan_policy=skip works on one device only (Lightning cannot skip a step under DDP):"
            " use nan_policy=stop or trainer.devices=1"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (None: 'auto' or -1, i.e. all there are)."""
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if _is_int(devices):
        return None if devices == -1 else devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": device ids
        return len([d for d in devices.split(",") if d.strip()])
    if devices == "auto":
        return None
    raise AtxError(f"trainer.devices={devices!r} is not a count, a list of ids or auto")


def check_trainer(t: DictConfig) -> None:
    """Values of the Trainer group Lightning would reject late (or never): epochs, and more
    devices than this machine has (CPU: processes beyond its cores)."""
    for key in ("max_epochs", "max_steps", "num_nodes", "log_every_n_steps"):
        if t.get(key) is not None and not _is_int(t[key]):
            raise AtxError(f"trainer.{key}={t[key]!r} must be an integer")
    epochs, steps = t.get("max_epochs"), t.get("max_steps", -1)
    if epochs is not None and epochs < 1 and not (epochs == -1 and steps > 0):
        raise AtxError(f"trainer.max_epochs={epochs} must be >= 1 (or -1 with trainer.max_steps>0)")
    wanted = device_count(t.get("devices", "auto"))
    accelerator = str(t.get("accelerator", "auto")).lower()
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if have == 0:
            raise AtxError(
                f"trainer.accelerator={t.accelerator} but this machine has no CUDA GPU: use"
                " trainer=cpu (or trainer.accelerator=cpu)"
            )
        if wanted is not None and wanted > have:
            raise AtxError(
                f"trainer.devices={t.devices} asks for {wanted} GPUs but this machine has {have}:"
                f" set trainer.devices<={have}"
            )
    elif accelerator == "cpu" and wanted is not None:
        cores = os.cpu_count() or 1  # the node's cores (a Slurm rank may be bound to fewer)
        if wanted > cores:
            raise AtxError(
                f"trainer.devices={t.devices} asks for {wanted} CPU processes but this machine"
                f" has {cores} cores: set trainer.devices<={cores}"
            )
