"""Compose the real config in tests exactly as ``atx-train <overrides>`` does."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from atx.train import CONF_DIR


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The composed config (``HydraConfig`` set too, so ``${hydra:...}`` resolves)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
