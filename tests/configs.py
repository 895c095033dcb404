"""Compose the real config in tests exactly as ``atx-train <overrides>`` does."""

from atx.train import compose_config as compose_cfg

__all__ = ["compose_cfg"]
