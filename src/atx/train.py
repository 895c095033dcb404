"""The Hydra entry point, console script ``atx-train``: compose conf/, validate, fit, export.

    atx-train                                   # default job (conf/train.yaml)
    atx-train model=wrn_16_1 distill=at teacher=wrn_16_2 teacher.checkpoint=outputs/...
    atx-train -m distill.at.beta=500,1000 distill.at.p=1,2

Each run writes into its Hydra run dir: ``.hydra/`` (the composed config), ``csv/`` metrics,
``checkpoints/`` (last + best, every ``checkpoint.every_n_steps`` steps; student only),
``student.pt`` (the deliverable: a plain state dict), ``metrics.json`` and, when a teacher was
used, ``attention.png``; ``.atx/`` and ``wandb_id.txt`` mark which run owns the dir
(``atx.run_dir``). ``atx-train resume=<run dir>`` continues an interrupted run (``atx.resume``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from atx import build
from atx.callbacks import AttentionFigures, EpochTimes, HeldOutSelection, SameRunOnEveryRank
from atx.checkpoints import STUDENT_FILE
from atx.checks import check_config
from atx.cluster import (
    check_launcher_matches_trainer,
    check_sweep_strategy,
    cluster_plugins,
    gpu_of_this_job,
)
from atx.config import composition_error_line, register
from atx.errors import AtxError
from atx.loggers import (
    RunLabels,
    build_loggers,
    config_key,
    finish_wandb,
    flatten,
    run_labels,
)
from atx.module import HELDOUT
from atx.resume import (
    PreemptionHandover,
    checkpoint_callbacks,
    configured_teacher,
    interrupted,
    with_atomic_io,
)
from atx.run_dir import claim_run_dir, expand_resume_argv
from atx.speed import configure_allocator

register()
# the frozen teacher is in eval mode on purpose; lightning's own deprecation noise is not ours
warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _conf_dir() -> tuple[Path, str]:
    """conf/ as shipped in the package, ``atx.conf`` (an editable install maps it to the
    checkout's conf/), and Hydra's name for it; an editable install made before that mapping
    existed still reads the checkout's conf/."""
    spec = importlib.util.find_spec(CONF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        path = Path(__file__).resolve().parents[2] / "conf"
        return path, str(path)
    return Path(list(spec.submodule_search_locations)[0]), f"pkg://{CONF_PACKAGE}"


CONF_PACKAGE = "atx.conf"
CONF_DIR, CONF_SOURCE = _conf_dir()  # users add their own with hydra.searchpath=[file://...]


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``atx-train <overrides>`` composes, outside the command line (benchmarks,
    tests), with ``HydraConfig`` set so ``${hydra:...}`` resolves."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_sweep(cfg: DictConfig, launcher: DictConfig) -> None:
    """The checks of a sweep's job (``-m``): how its ranks start, under which launcher."""
    check_sweep_strategy(cfg, launcher.get("_target_", ""))
    check_launcher_matches_trainer(OmegaConf.to_container(launcher, resolve=True),
                                   OmegaConf.to_container(cfg.trainer, resolve=True))


def train(
    cfg: DictConfig, run_dir: Path, labels: RunLabels | None = None, claim: bool = False
) -> dict[str, float]:
    """Validate ``cfg``, fit the student, export it; returns the final validation metrics.
    ``claim``: decide fresh / resume / skip / refuse for ``run_dir`` first (``atx.run_dir``)."""
    check_config(cfg)
    owner = claim_run_dir(cfg, run_dir) if claim else None
    if owner is not None and owner.finished is not None:
        print(f"atx: '{run_dir}' has finished already: skipped", file=sys.stderr)
        return {k: v for k, v in owner.finished.items() if k.startswith(("val/", f"{HELDOUT}/"))}
    configure_allocator(cfg.speed.allocator)  # before data and models take memory
    run = build.build_run(cfg)
    flat_config = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    if run.pairs:  # the layer groups as module names (a preset such as "all" resolved)
        flat_config["layers.student"] = ",".join(s for s, _ in run.pairs)
        flat_config["layers.teacher"] = ",".join(t for _, t in run.pairs)
    loggers = build_loggers(cfg, run_dir, labels or RunLabels(), flat_config,
                            owner.wandb_id if owner else None)
    # data.val_split > 0: the best epoch is chosen on held-out training images, not the test set
    selection = HeldOutSelection() if getattr(run.data, "val_split", 0) > 0 else None
    callbacks = run_callbacks(cfg, run, run_dir, selection, flat_config)
    kwargs = run.trainer_kwargs
    kwargs["plugins"] = with_atomic_io(kwargs.get("plugins", cluster_plugins()))
    try:
        trainer = L.Trainer(**kwargs, default_root_dir=run_dir, logger=loggers, callbacks=callbacks)
    except (MisconfigurationException, ValueError) as e:  # Lightning's own trainer.* checks
        raise AtxError(f"trainer: {str(e).splitlines()[0]}") from e
    for logger in loggers:
        logger.log_hyperparams(flat_config)
    preemption = PreemptionHandover()  # a Slurm/submitit preemption saves first, then requeues
    try:
        trainer.fit(run.module, datamodule=run.data, weights_only=True,
                    ckpt_path=owner.checkpoint if owner else None)
    except SIGTERMException:
        finish_wandb(loggers)
        preemption.hand_over()
        raise interrupted(trainer, run_dir) from None
    finally:
        preemption.restore()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("val/", f"{HELDOUT}/"))}
    if trainer.is_global_zero:
        export(cfg, run, run_dir, trainer, callbacks[0], selection, metrics, loggers)
    finish_wandb(loggers)
    return metrics


def run_callbacks(
    cfg: DictConfig, run: build.Run, run_dir: Path, selection: HeldOutSelection | None,
    flat_config: dict[str, Any],
) -> list[Any]:
    """Best + last checkpoints (first: :func:`export` reads it), the lr, step checkpoints,
    epoch times, the DDP ranks' agreement, the held-out selection and the attention figures."""
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch}",
            monitor=f"{HELDOUT}/error" if selection else "val/error",
            mode="min",
            auto_insert_metric_name=False,
        ),
        # last.ckpt at every epoch end: Lightning 2.6's save_last=True writes it only at epochs
        # that saved a best-epoch file, and a resume starts from the newest checkpoint
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None),
        LearningRateMonitor(logging_interval="epoch"),
        EpochTimes(),
        SameRunOnEveryRank(run_dir, config_key(flat_config, leave_out=())),
        *checkpoint_callbacks(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                              configured_teacher(cfg)),
    ]
    if selection is not None:
        callbacks.append(selection)
    if run.pairs and cfg.figure_images > 0 and cfg.figure_every_n_epochs > 0:
        callbacks.append(AttentionFigures(run_dir / "attention", cfg.figure_every_n_epochs,
                                          cfg.figure_images, run.pairs, run.data))
    return callbacks


def export(
    cfg: DictConfig,
    run: build.Run,
    run_dir: Path,
    trainer: L.Trainer,
    best: ModelCheckpoint,
    selection: HeldOutSelection | None,
    metrics: dict[str, float],
    loggers: list[Any],
) -> None:
    """Rank 0, after the fit: ``student.pt``, ``metrics.json`` and the attention figure."""
    torch.save(run.student.state_dict(), run_dir / STUDENT_FILE)
    epochs, best_score = fit_progress(trainer, best, selection)
    summary = {
        "name": cfg.name,
        "epochs": epochs,
        "world_size": trainer.world_size,
        **metrics,
        "best/val_error": float(best_score) if best_score is not None else None,
        **(selection.summary() if selection else {}),  # best/val_error: still the test's
        **next(({"epoch_seconds": c.epoch_seconds, "eval_seconds": c.eval_seconds}
                for c in trainer.callbacks if isinstance(c, EpochTimes)), {}),
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if run.pairs and cfg.figure_images > 0:
        from atx.figures import save_attention_figure  # matplotlib only when needed

        figure = save_attention_figure(
            run_dir / "attention.png",
            run.data,
            cfg.figure_images,
            {
                "teacher": (run.teacher, [t for _, t in run.pairs]),
                "student": (run.student, [s for s, _ in run.pairs]),
            },
            title=f"{cfg.name}: teacher vs student attention",
        )
        for logger in loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="attention", images=[str(figure)])


def fit_progress(
    trainer: L.Trainer, checkpoint: ModelCheckpoint, selection: HeldOutSelection | None = None
) -> tuple[int, Any]:
    """Epochs trained and the best score of ``checkpoint``. With ``ddp_spawn`` the fit ran in
    worker processes and this process's trainer never saw it (its ``global_step`` stays 0):
    read them (and the history of ``selection``) from the last checkpoint rank 0 wrote instead."""
    last = Path(str(checkpoint.dirpath)) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
    spawned = type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"
    if not spawned or not last.is_file():
        return trainer.current_epoch, checkpoint.best_model_score
    state = torch.load(last, map_location="cpu", weights_only=True)
    if selection is not None:
        selection.load_state_dict(state.get("callbacks", {}).get(selection.state_key, {}))
    for key, callback in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and callback.get("monitor") == checkpoint.monitor:
            return state["epoch"] + 1, callback.get("best_model_score")
    return state["epoch"] + 1, None


@hydra.main(version_base="1.3", config_path=CONF_SOURCE, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        if multirun:
            check_sweep(cfg, hc.launcher)
        with gpu_of_this_job(cfg, hc):
            metrics = train(cfg, Path(hc.runtime.output_dir), run_labels(hc, cfg), claim=True)
    except AtxError as e:
        if cfg.get("debug", False):
            raise
        print(f"atx: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    # what a Hydra sweeper optimises: the held-out error when there is one, never the test error
    return metrics.get("heldout/error", metrics.get("val/error"))


def main() -> None:
    """Console script ``atx-train``. Hydra's own composition errors (unknown key or wrong type
    from the shell, unknown preset) are one ``atx: error:`` line too; ``debug=true`` (or
    ``HYDRA_FULL_ERROR=1``) shows the traceback instead."""
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        re.fullmatch(r"\+*debug=(true|True|1)", a) for a in sys.argv[1:]
    )
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing several lines
    sys.argv[1:] = expand_resume_argv(sys.argv[1:])  # resume=<dir>: that run's overrides
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if debug:
            raise
        print(f"atx: error: {composition_error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
