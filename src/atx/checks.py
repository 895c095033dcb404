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
from atx.options import accepted_kwargs, check_keys, check_milestones, check_number


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before data or models are touched."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if k != "teacher.checkpoint"]
    if missing:
        raise AtxError(f"config value '{missing[0]}' is not set: pass {missing[0]}=<value>")
    check_schema_keys(cfg, train_schema())
    check_distill(cfg.distill)
    check_optim(cfg.optim)
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


def check_optim(o: DictConfig) -> None:
    """SGD settings torch would only reject at the first step (or never)."""
    check_number(o.lr, "optim.lr", 0.0, strict=True)
    check_number(o.momentum, "optim.momentum", 0.0)
    check_number(o.weight_decay, "optim.weight_decay", 0.0)
    check_number(o.gamma, "optim.gamma", 0.0, strict=True)
    check_milestones(o.milestones, "optim.milestones")
    if o.nesterov and o.momentum == 0:
        raise AtxError("optim.nesterov=true needs optim.momentum > 0")


def check_run_options(cfg: DictConfig) -> None:
    """Top-level options: figures and the policy for non-finite losses (``atx.numerics``)."""
    for key in ("figure_images", "figure_every_n_epochs"):
        if cfg[key] < 0:
            raise AtxError(f"{key}={cfg[key]} must be >= 0 (0 turns it off)")
    if cfg.nan_skip_limit < 1:
        raise AtxError(f"nan_skip_limit={cfg.nan_skip_limit} must be >= 1")
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
