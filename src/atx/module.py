"""DistillModule: a student trained with an Objective, optionally from a frozen teacher."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from atx.attention import MapMode, map_agreement, spatial_map
from atx.features import LayerTaps, check_layer_names
from atx.gradient_attention import input_gradient
from atx.losses import Objective, StepOutputs
from atx.numerics import NanGuard
from atx.optim import OptimConf, configure_optimizers
from atx.speed import SpeedConf, prepare_models, teacher_forward, to_layout
from atx.train_log import EpochSums, loggers_write_this_step

HELDOUT = "heldout"  # metric prefix of the held-out training images (data.val_split)
TRAIN_ERROR = "error"  # the train error is logged as an epoch mean only: train/error


@dataclass
class FinetuneConf:
    """Fine-tuning a pretrained student (paper Section 4.2.1): BN fixed, early layers frozen."""

    freeze_bn: bool = False  # every BN layer of the student in eval mode, its affine params fixed
    frozen_layers: list[str] = field(default_factory=list)  # module names, e.g. [conv1, layer1]


@dataclass
class Agreement:
    """(student, teacher) layer pairs whose attention agreement is measured on the test split,
    with the map function F^p_mode it uses."""

    pairs: Sequence[tuple[str, str]] = ()
    p: float = 2.0
    mode: MapMode | str = "sum"


class TeacherEvalMaps:
    """The frozen teacher's attention maps of each evaluation batch of a fit, kept from the
    batch's first pass (the sanity check or the first evaluation): evaluation batches come in
    the same order every epoch, so later evaluations run the student alone. A batch is known by
    its place and checked by its labels and each image's pixel sum; one that differs, or a
    cache that would pass ``limit_mib``, turns the cache off (the teacher runs again)."""

    def __init__(self, limit_mib: int) -> None:
        self.limit_mib = limit_mib
        self.maps: dict[tuple, tuple[Tensor, Tensor, list[Tensor]]] = {}
        self.reset()

    def reset(self, on: bool = True) -> None:
        """Empty; kept from now on if ``on`` (and the limit is above 0)."""
        self.maps.clear()
        self.size, self.on = 0, on and self.limit_mib > 0

    def get(self, key: tuple, x: Tensor, y: Tensor) -> list[Tensor] | None:
        if key not in self.maps:
            return None
        labels, pixels, maps = self.maps[key]
        if torch.equal(labels, y) and torch.equal(pixels, _pixels(x)):  # False on other shapes
            return maps
        self.reset(on=False)  # not the batch it was: this loader's order is not fixed
        return None

    def put(self, key: tuple, x: Tensor, y: Tensor, maps: list[Tensor]) -> None:
        if not self.on:
            return
        size = sum(m.numel() * m.element_size() for m in (y, *maps))
        if self.size + size > self.limit_mib * 2**20:
            self.reset(on=False)
            return
        self.maps[key] = (y.clone(), _pixels(x), maps)
        self.size += size


def _pixels(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1, dtype=torch.float64)  # one sum per image


@contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Batch norm keeps using batch statistics (train mode) but its running statistics are
    left untouched: the extra flipped pass of the symmetry norm must not move them twice."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def full_precision(x: Tensor) -> Tensor:
    """A detached copy of ``x`` in at least float32 (input gradients are not taken in 16 bit)."""
    x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def eval_metrics(num_classes: int) -> nn.ModuleDict:
    """Loss, image count, top-1 (and top-5 above 10 classes) accuracy of one evaluation set:
    sums over images, reduced across ranks at ``compute`` (no mean of means)."""
    metrics = {"loss": MeanMetric(), "images": SumMetric(),
               "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 10:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the teacher is a fixed function."""
    model.eval()
    model.requires_grad_(False)
    return model


class DistillModule(L.LightningModule):
    """Student + frozen teacher + Objective (CE, KD, AT, F-ActT, grad-AT, symmetry, min-l2).

    Only the student (and any learned loss adapters) is optimised and checkpointed; the
    teacher stays in eval mode, runs under ``torch.no_grad()`` (or, for grad-AT, with
    gradients w.r.t. its input only) and is left out of checkpoints (it is rebuilt from its
    own file).
    """

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        num_classes: int,
        optim: OptimConf | None = None,
        teacher: nn.Module | None = None,
        *,
        speed: SpeedConf | None = None,
        finetune: FinetuneConf | None = None,
        agreement: Agreement | None = None,
        nan_guard: NanGuard | None = None,
    ) -> None:
        """The layers tapped are those the objective's terms pair, plus ``agreement.pairs``.
        ``finetune``: frozen student modules and BN (Section 4.2.1): kept in eval mode, not
        trained. ``speed``: layout, compilation and teacher precision (``atx.speed``)."""
        super().__init__()
        if objective.needs_teacher and teacher is None:
            raise ValueError("the objective has terms that learn from a teacher: pass teacher=")
        self.student = student
        finetune = finetune or FinetuneConf()
        check_layer_names(student, finetune.frozen_layers, "student")
        modules = dict(student.named_modules())
        self.fixed_modules = [modules[n] for n in finetune.frozen_layers]
        if finetune.freeze_bn:
            bns = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self.fixed_modules += bns
        for m in self.fixed_modules:
            freeze(m)
        self.objective = objective
        self.teacher = freeze(teacher) if teacher is not None else None
        self.optim = optim or OptimConf()
        agreement = agreement or Agreement()
        self.agreement_pairs = [tuple(p) for p in agreement.pairs] if teacher is not None else []
        self.agreement_map = (agreement.p, agreement.mode)
        pairs = [*objective.pairs, *self.agreement_pairs]
        student_layers = list(dict.fromkeys(s for s, _ in pairs))
        teacher_layers = list(dict.fromkeys(t for _, t in pairs))
        self.student_taps = (
            LayerTaps(student, student_layers, "student") if student_layers else None
        )
        self.teacher_taps = (
            LayerTaps(teacher, teacher_layers, "teacher")
            if teacher is not None and teacher_layers
            else None
        )
        self.agreement = nn.ModuleDict({
            f"{kind}_{i}": MeanMetric() for i in range(len(self.agreement_pairs))
            for kind in ("cosine", "distance")
        })
        self.strict_loading = False  # checkpoints hold no teacher weights
        self.speed = speed or SpeedConf()
        self.nan_guard = nan_guard or NanGuard()  # a NaN/inf loss stops the run (or is skipped)
        prepare_models(student, self.teacher, self.speed, objective.needs_input_grad)
        # the test split (logged as val/ or test/) and the held-out training images (heldout/)
        self.eval_metrics = nn.ModuleDict({k: eval_metrics(num_classes) for k in ("test", HELDOUT)})
        self.teacher_eval_maps = TeacherEvalMaps(self.speed.teacher_eval_cache_mib)
        self.train_sums = EpochSums()  # train/* step values and epoch means

    def setup(self, stage: str) -> None:
        # kept for one fit; a validate or test call passes once
        self.teacher_eval_maps.reset(on=stage == "fit")
        self.train_sums.reset()

    def teardown(self, stage: str) -> None:
        self.teacher_eval_maps.reset()  # no maps held on the device after the fit

    # -- the frozen teacher -------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        for m in self.fixed_modules:
            m.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }

    # -- steps ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        x = to_layout(x, self.speed.channels_last)
        out = self._student_outputs(x, y)
        if self.objective.needs_teacher:  # a teacher kept only for validation metrics stays idle
            self._add_teacher_outputs(out, x, y)
        loss, parts = self.objective(out, epoch=self.current_epoch)
        if self.nan_guard(loss, parts, self.global_step, self.current_epoch, batch_idx):
            return None  # skipped: no backward, no optimiser step (nan_policy=skip)
        error = (out.logits.argmax(dim=1) != y).float().mean() * 100
        self.train_sums.add({"loss": loss, **parts, TRAIN_ERROR: error}, len(y))  # atx.train_log
        if self._trainer is None:
            return loss  # called by hand: nothing to log to
        self.log("train/loss", loss, prog_bar=True, logger=False)  # bar and callbacks: every step
        if loggers_write_this_step(self.trainer):
            self.log_dict({f"train/{k}_step": v for k, v in self.train_sums.last.items()
                           if k != TRAIN_ERROR})
        return loss

    def _student_outputs(self, x: Tensor, y: Tensor) -> StepOutputs:
        """Student logits and tapped features; its input gradients when a term needs them
        (with graph: double backprop, Eq. 5), computed in float32 with autocast off."""
        obj = self.objective
        if not obj.needs_input_grad:
            logits = self.student(x)
            feats = self.student_taps.outputs() if self.student_taps else {}
            return StepOutputs(logits, y, student_features=feats)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = full_precision(x).requires_grad_(True)
            logits = self.student(x)
            feats = self.student_taps.outputs() if self.student_taps else {}
            grad = input_gradient(logits, y, x, create_graph=True)
            flipped = None
            if obj.needs_flipped_input_grad:
                x_flip = x.detach().flip(-1).requires_grad_(True)
                with bn_stats_frozen(self.student):  # running stats move once per step
                    logits_flip = self.student(x_flip)
                if self.student_taps:
                    self.student_taps.outputs()
                flipped = input_gradient(logits_flip, y, x_flip, create_graph=True)
        return StepOutputs(logits, y, student_features=feats, input_grad=grad,
                           flipped_input_grad=flipped)

    def _add_teacher_outputs(self, out: StepOutputs, x: Tensor, y: Tensor) -> None:
        """Teacher logits and features without grad; J_t (no graph) when grad-AT needs it."""
        if self.objective.needs_teacher_input_grad:
            with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                x_t = full_precision(x).requires_grad_(True)
                logits = self.teacher(x_t)
                out.teacher_input_grad = input_gradient(logits, y, x_t).detach()
            out.teacher_logits = logits.detach()
        else:  # no_grad or inference_mode, in the teacher's precision (atx.speed)
            with teacher_forward(self.speed, x.device.type):
                out.teacher_logits = self.teacher(x)
        feats = self.teacher_taps.outputs() if self.teacher_taps else {}
        out.teacher_features = {k: v.detach() for k, v in feats.items()}

    def on_train_epoch_end(self) -> None:
        means = self.train_sums.means()
        self.log_dict({f"train/{k}" if k == TRAIN_ERROR else f"train/{k}_epoch": v
                       for k, v in means.items()})
        self.train_sums.reset()
        if self.nan_guard.policy == "skip":
            self.log("train/skipped_steps", float(self.nan_guard.skipped))

    def on_train_epoch_start(self) -> None:
        weights = self.objective.weights(self.current_epoch)
        self.log_dict({f"weight/{k}": float(v) for k, v in weights.items()})

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int) -> None:
        x, y = batch
        x = to_layout(x, self.speed.channels_last)
        logits = self.student(x)
        student_feats = self.student_taps.outputs() if self.student_taps else {}
        metrics = self.eval_metrics[HELDOUT if stage == HELDOUT else "test"]
        metrics["loss"].update(nn.functional.cross_entropy(logits.float(), y), weight=len(y))
        metrics["images"].update(len(y))
        for key in ("top1", "top5"):
            if key in metrics:
                metrics[key].update(logits, y)
        if self.agreement_pairs and stage != HELDOUT:  # agreement: on the test split only
            teacher_maps = self._teacher_eval_maps(x, y, (stage, batch_idx))
            for i, ((s, _), t_map) in enumerate(zip(self.agreement_pairs, teacher_maps,
                                                    strict=True)):
                s_map = spatial_map(student_feats[s], *self.agreement_map)
                cosine, distance = map_agreement(s_map, t_map)
                self.agreement[f"cosine_{i}"].update(cosine)
                self.agreement[f"distance_{i}"].update(distance)

    def _teacher_eval_maps(self, x: Tensor, y: Tensor, key: tuple) -> list[Tensor]:
        """The teacher's map F(A) of each agreement pair for this evaluation batch."""
        maps = self.teacher_eval_maps.get(key, x, y)
        if maps is None:
            with torch.no_grad():
                self.teacher(x)
            feats = self.teacher_taps.outputs()
            maps = [spatial_map(feats[t], *self.agreement_map) for _, t in self.agreement_pairs]
            self.teacher_eval_maps.put(key, x, y, maps)
        return maps

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.eval_metrics[HELDOUT if stage == HELDOUT else "test"]
        self.log(f"{stage}/error", (1 - metrics["top1"].compute()) * 100, prog_bar=True)
        self.log(f"{stage}/loss", metrics["loss"].compute())
        self.log(f"{stage}/images", metrics["images"].compute())  # each image once
        if "top5" in metrics:
            self.log(f"{stage}/error_top5", (1 - metrics["top5"].compute()) * 100)
        for metric in metrics.values():
            metric.reset()
        if stage == HELDOUT:
            return
        for i, (s, _) in enumerate(self.agreement_pairs):  # attention agreement per group
            for kind, key in (("cosine", "agreement"), ("distance", "at_distance")):
                metric = self.agreement[f"{kind}_{i}"]
                self.log(f"{stage}/{key}/{s}", metric.compute())
                metric.reset()

    def on_validation_epoch_start(self) -> None:
        """Under DDP, every rank evaluates with rank 0's BN statistics: the reported error is
        that of the student rank 0 saves (the ranks' running stats differ by their last batch)."""
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for buffer in self.student.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Loader 0 is the test split (``val/``); loader 1, when ``data.val_split`` > 0, the
        held-out training images (``heldout/``)."""
        self._eval_step(batch, HELDOUT if dataloader_idx == 1 else "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        # logged here, outside the steps, so the names carry no /dataloader_idx_N suffix
        self._eval_epoch_end("val")
        loaders = self.trainer.val_dataloaders  # the same on every rank: all join the sync
        if isinstance(loaders, list | tuple) and len(loaders) > 1:
            self._eval_epoch_end(HELDOUT)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in [*self.student.parameters(), *self.objective.parameters()]
                  if p.requires_grad]
        return configure_optimizers(params, self.optim, self.trainer.max_epochs)  # atx.optim
