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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from atx import build
from atx.callbacks import AttentionFigures, HeldOutSelection
from atx.checkpoints import STUDENT_FILE
from atx.cluster import (
    check_launcher_matches_trainer,
    check_sweep_strategy,
    check_sync_batchnorm,
    cluster_plugins,
    gpu_of_this_job,
    sync_batchnorm,
)
from atx.config import check_schema_keys, composition_error_line, register
from atx.errors import AtxError
from atx.loggers import RunLabels, build_loggers, finish_wandb, flatten, run_labels
from atx.module import HELDOUT, DistillModule
from atx.numerics import NanGuard
from atx.resume import (
    PreemptionHandover,
    checkpoint_callbacks,
    configured_teacher,
    interrupted,
    with_atomic_io,
)
from atx.run_dir import claim_run_dir, expand_resume_argv
from atx.speed import check_speed, configure_allocator

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


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before data or models are touched."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if k != "teacher.checkpoint"]
    if missing:
        raise AtxError(f"config value '{missing[0]}' is not set: pass {missing[0]}=<value>")
    check_schema_keys(cfg)
    build.check_distill(cfg.distill)
    build.check_optim(cfg.optim)
    build.check_run_options(cfg)
    check_speed(cfg.speed)
    allowed = build.accepted_kwargs(L.Trainer) - {"logger", "callbacks", "default_root_dir"}
    build.check_keys(cfg.trainer, allowed, "trainer")
    build.check_trainer(cfg.trainer)
    check_sync_batchnorm(cfg.trainer)


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
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build.build_data(cfg)
    student = build.build_network(cfg.model, "model", data.num_classes, data.in_channels)
    plan = build.plan_layers(cfg)
    teacher = None
    if build.needs_teacher(cfg.distill, plan) or build.teacher_given(cfg):
        # a given teacher is loaded even for a plain/KD student: attention agreement is logged
        teacher = build.build_teacher(cfg, data.num_classes, data.in_channels)
    pairs = (plan.at or plan.fact or build.preset_pairs(cfg)) if teacher is not None else []
    fact_channels: list[tuple[int, int]] = []
    if plan.student_layers:
        shape = (data.in_channels, data.image_size, data.image_size)
        s_shapes = build.probe_shapes(student, plan.student_layers, shape, "student")
        t_shapes = build.probe_shapes(teacher, plan.teacher_layers, shape, "teacher")
        fact_channels = build.check_pair_shapes(
            plan, s_shapes, t_shapes, cfg.distill.at.interpolate
        )
    if teacher is not None:  # its weights, once every layer name and shape is checked
        build.load_teacher(cfg, teacher, data)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.pop("sync_batchnorm", False):  # the student's BN only, never the teacher's
        student = sync_batchnorm(student)
    objective = build.build_objective(
        cfg.distill, plan, fact_channels, trainer_kwargs.get("max_epochs") or 1
    )
    module = DistillModule(
        student,
        objective,
        data.num_classes,
        OmegaConf.to_object(cfg.optim),
        teacher,
        plan.student_layers,
        plan.teacher_layers,
        cfg.finetune.frozen_layers,
        cfg.finetune.freeze_bn,
        agreement_pairs=pairs,
        agreement_map=(cfg.distill.at.p, cfg.distill.at.mode),
        speed=OmegaConf.to_object(cfg.speed),
        nan_guard=NanGuard(cfg.nan_policy, cfg.nan_skip_limit),
    )

    # fresh seed after every model is built: the data order and augmentation of a run do not
    # depend on whether a teacher or adapters were built (baseline vs AT see the same batches)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    flat_config = flatten(OmegaConf.to_container(cfg, resolve=True))
    if pairs:  # the layer groups as module names (a preset such as "all" resolved)
        flat_config["layers.student"] = ",".join(s for s, _ in pairs)
        flat_config["layers.teacher"] = ",".join(t for _, t in pairs)
    loggers = build_loggers(cfg, run_dir, labels or RunLabels(), flat_config,
                            owner.wandb_id if owner else None)  # fmt: skip
    # data.val_split > 0: the best epoch is chosen on held-out training images, not the test set
    selection = HeldOutSelection() if getattr(data, "val_split", 0) > 0 else None
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
        *checkpoint_callbacks(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                              configured_teacher(cfg)),  # fmt: skip
    ]
    if selection is not None:
        callbacks.append(selection)
    if pairs and cfg.figure_images > 0 and cfg.figure_every_n_epochs > 0:
        callbacks.append(AttentionFigures(run_dir / "attention", cfg.figure_every_n_epochs,
                                          cfg.figure_images, pairs, data))  # fmt: skip
    trainer_kwargs.setdefault("plugins", cluster_plugins())
    trainer_kwargs["plugins"] = with_atomic_io(trainer_kwargs["plugins"])
    try:
        trainer = L.Trainer(
            **trainer_kwargs, default_root_dir=run_dir, logger=loggers, callbacks=callbacks
        )
    except (MisconfigurationException, ValueError) as e:  # Lightning's own trainer.* checks
        raise AtxError(f"trainer: {str(e).splitlines()[0]}") from e
    for logger in loggers:
        logger.log_hyperparams(flat_config)
    preemption = PreemptionHandover()  # a Slurm/submitit preemption saves first, then requeues
    try:
        trainer.fit(module, datamodule=data, weights_only=True,
                    ckpt_path=owner.checkpoint if owner else None)  # fmt: skip
    except SIGTERMException:
        finish_wandb(loggers)
        preemption.hand_over()
        raise interrupted(trainer, run_dir) from None
    finally:
        preemption.restore()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("val/", f"{HELDOUT}/"))}  # fmt: skip
    if trainer.is_global_zero:
        torch.save(student.state_dict(), run_dir / STUDENT_FILE)
        epochs, best = fit_progress(trainer, callbacks[0], selection)
        summary = {
            "name": cfg.name,
            "epochs": epochs,
            "world_size": trainer.world_size,
            **metrics,
            "best/val_error": float(best) if best is not None else None,
            **(selection.summary() if selection else {}),  # best/val_error: still the test's
        }
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        if pairs and cfg.figure_images > 0:
            from atx.visualize import save_attention_figure  # matplotlib only when needed

            figure = save_attention_figure(
                run_dir / "attention.png",
                data,
                cfg.figure_images,
                {
                    "teacher": (teacher, [t for _, t in pairs]),
                    "student": (student, [s for s, _ in pairs]),
                },
                title=f"{cfg.name}: teacher vs student attention",
            )
            for logger in loggers:
                if hasattr(logger, "log_image"):  # W&B
                    logger.log_image(key="attention", images=[str(figure)])
    finish_wandb(loggers)
    return metrics


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
