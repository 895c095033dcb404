"""Shared test settings: W&B off unless a test asks for offline mode, quiet Lightning; under
pytest-xdist (``make test`` runs one worker per core) one compute thread per worker and per
process it starts, so the workers share the cores instead of oversubscribing them."""

import logging
import os
import warnings

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
