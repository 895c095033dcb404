"""The loggers of a run (CSV, W&B) and how a run shows up in a W&B dashboard.

One W&B run per job: grouped by sweep dir, named after the keys the sweep varies, tagged with
the presets the config was composed from, its config logged as flat keys a dashboard can filter
on, and finished at the end of the job: Lightning's ``WandbLogger`` never finishes its run, and
a new logger silently reuses ``wandb.run``, so without it every job of a multirun would log
into the first job's run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from atx import build


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"at": {"beta": 1}}}`` -> ``{"distill.at.beta": 1}`` (dashboard filters)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


@dataclass
class RunLabels:
    """How a run shows up in W&B: sweep jobs are grouped by sweep dir and named from their
    overrides; every run is tagged with the presets it was composed from."""

    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


# overrides that say where things are, not what is compared: left out of W&B run names
UNNAMED = ("hydra.", "hydra/", "trainer.enable_", "logger", "data.root", "teacher.checkpoint")


def run_labels(hc: Any, cfg: DictConfig) -> RunLabels:
    """W&B group, name and tags of the Hydra job ``hc`` (``HydraConfig.get()``)."""
    choices = hc.runtime.choices
    tags = [f"{g}:{choices[g]}" for g in ("experiment", "distill", "model", "teacher", "data")
            if choices.get(g) not in (None, "null")]
    if hc.mode != RunMode.MULTIRUN:
        return RunLabels(tags=tags)
    swept = swept_keys(Path(hc.sweep.dir) / "multirun.yaml")
    shown = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(UNNAMED)
             and (swept is None or o.lstrip("+~").split("=")[0] in swept)]
    return RunLabels(str(hc.sweep.dir), " ".join([cfg.name, *shown]), tags)


def swept_keys(multirun_yaml: Path) -> set[str] | None:
    """The keys a sweep varies, read from the ``multirun.yaml`` Hydra writes into the sweep
    dir (``distill.at.beta=500,1000`` -> ``distill.at.beta``); ``None`` if it is not there."""
    if not multirun_yaml.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.load(multirun_yaml).hydra.overrides.task
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def build_loggers(
    cfg: DictConfig, run_dir: Path, labels: RunLabels, flat_config: dict[str, Any],
    wandb_id: str | None = None,
) -> list[Any]:
    loggers = []
    for key, node in (cfg.logger or {}).items():
        extra: dict[str, Any] = {"save_dir": str(run_dir)}
        if node._target_.endswith("WandbLogger"):
            if node.get("group") is None and labels.group:
                extra["group"] = labels.group
            if labels.name and node.get("name") == cfg.name:  # the default name: ${name}
                extra["name"] = labels.name
            extra["tags"] = [*(node.get("tags") or []), *labels.tags]
            extra["config"] = flat_config
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
