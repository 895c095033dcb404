"""The loggers of a run (CSV, W&B) and how a run shows up in a W&B dashboard.

One W&B run per job, grouped by what it trains: the group is a short hash of the resolved
config without the seed (and without the keys that say where or how it runs), so the seeds of
one configuration are one line with a band in the dashboard, whether they ran as one sweep or
were launched one by one; the seed is in the run's name. Sweep jobs are named after the keys the
sweep varies (an Optuna search's too), carry the sweep dir (and the study) as config keys, and
every run is tagged with the presets its config was composed from. Its config is logged as flat
keys a dashboard can filter on, and the run is finished at the end of the job: Lightning's
``WandbLogger`` never finishes its run, and a new logger silently reuses ``wandb.run``, so
without it every job of a multirun would log into the first job's run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from atx import build
from atx.run_dir import MAY_CHANGE


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"at": {"beta": 1}}}`` -> ``{"distill.at.beta": 1}`` (dashboard filters)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


# left out of a run's group: the seed, the name, and the keys a run may change when it resumes
# (where data and logs are, progress bars...) -- but more epochs or another teacher file train
# something else
UNGROUPED = ("seed", "name",
             *(k for k in MAY_CHANGE if k not in ("trainer.max_epochs", "teacher.checkpoint")))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_key(config: dict[str, Any], leave_out: tuple[str, ...] = UNGROUPED) -> str:
    """8 hex digits of a hash of the resolved ``config`` without the ``leave_out`` keys: equal
    exactly when every other value is equal (key order and int/float spelling aside)."""
    flat = {k: v for k, v in flatten(config).items() if not _under(k, leave_out)}
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_group(cfg: DictConfig) -> str:
    """The W&B group of a run: its name (readable) and the key of its config without the seed."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return f"{cfg.name}-{config_key(config)}"


@dataclass
class RunLabels:
    """How a run shows up in W&B besides its group: sweep jobs are named from their overrides,
    ``config`` says which sweep (and Optuna study) a job belongs to; ``tags`` name the presets."""

    name: str | None = None
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


# overrides that say where things are, not what is compared: left out of W&B run names
UNNAMED = ("hydra.", "hydra/", "trainer.enable_", "logger", "data.root", "teacher.checkpoint",
           "seed=")


def run_labels(hc: Any, cfg: DictConfig) -> RunLabels:
    """W&B name, tags and sweep keys of the Hydra job ``hc`` (``HydraConfig.get()``)."""
    choices = hc.runtime.choices
    tags = [f"{g}:{choices[g]}" for g in ("experiment", "distill", "model", "teacher", "data")
            if choices.get(g) not in (None, "null")]
    if hc.mode != RunMode.MULTIRUN:
        return RunLabels(tags=tags)
    swept = swept_keys(Path(hc.sweep.dir) / "multirun.yaml")
    shown = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(UNNAMED)
             and (swept is None or o.lstrip("+~").split("=")[0] in swept)]
    sweep: dict[str, Any] = {"atx.sweep_dir": str(hc.sweep.dir)}
    study = hc.sweeper.get("study_name")  # an Optuna search (Hydra's own sweeper has none)
    if study:
        sweep["atx.study"] = study
        tags.append(f"study:{study}"[:64])  # W&B's limit for a tag
    return RunLabels(" ".join([cfg.name, *shown]), tags, sweep)


def swept_keys(multirun_yaml: Path) -> set[str] | None:
    """The keys a sweep varies, read from the ``multirun.yaml`` Hydra writes into the sweep
    dir: its sweep overrides (``distill.at.beta=500,1000`` -> ``distill.at.beta``) and an
    Optuna search space (``hydra.sweeper.params``); ``None`` if it is not there."""
    if not multirun_yaml.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_node = OmegaConf.load(multirun_yaml).hydra
    given = [str(o) for o in hydra_node.overrides.task]
    params = hydra_node.sweeper.get("params") or {}
    given += [f"{k}={v}" for k, v in params.items()]
    parsed = OverridesParser.create().parse_overrides(given)
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def build_loggers(
    cfg: DictConfig, run_dir: Path, labels: RunLabels, flat_config: dict[str, Any],
    wandb_id: str | None = None,
) -> list[Any]:
    loggers = []
    for key, node in (cfg.logger or {}).items():
        extra: dict[str, Any] = {"save_dir": str(run_dir)}
        if node._target_.endswith("WandbLogger"):
            group = node.get("group") or run_group(cfg)
            extra["group"] = group
            if node.get("name") == cfg.name:  # the default name, ${name}: add what varies
                extra["name"] = f"{labels.name or cfg.name} seed={cfg.seed}"
            extra["tags"] = [*(node.get("tags") or []), *labels.tags]
            extra["config"] = {**flat_config, **labels.config, "atx.group": group}
            if wandb_id:  # the run dir's W&B run, continued when the run resumes
                extra.update(id=wandb_id, resume="allow")
        loggers.append(build.instantiate_checked(node, f"logger.{key}", **extra))
    return loggers


def finish_wandb(loggers: list[Any]) -> None:
    """End the W&B run so the next job of a multirun starts its own run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
