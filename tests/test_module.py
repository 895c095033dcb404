"""DistillModule: the teacher stays frozen through a real fit; only the student learns."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from atx.checkpoints import load_weights
from atx.errors import AtxError
from atx.features import LayerTaps, check_layer_names
from atx.losses import Objective, Schedule
from atx.models import build_model
from atx.module import Agreement, DistillModule, FinetuneConf, TeacherEvalMaps
from atx.speed import SpeedConf
from atx.terms import AttentionTransfer, CrossEntropy, KnowledgeDistillation

PAIRS = [("group1", "group1"), ("group2", "group2"), ("group3", "group3")]


def tiny_module(train_teacher_bn: bool = True, **options) -> DistillModule:
    torch.manual_seed(0)
    student = build_model("wrn", num_classes=10, depth=10, width=1)
    teacher = build_model("wrn", num_classes=10, depth=10, width=2)
    if train_teacher_bn:  # give the teacher non-trivial running statistics
        teacher.train()
        with torch.no_grad():
            teacher(torch.randn(16, 3, 16, 16) * 3 + 1)
    objective = Objective(
        [
            CrossEntropy(Schedule(0.1)),
            KnowledgeDistillation(Schedule(0.9)),
            AttentionTransfer(Schedule(1000.0), PAIRS),
        ]
    )
    return DistillModule(student, objective, 10, teacher=teacher, **options)


def loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)



def quiet_trainer(tmp_path, **options) -> L.Trainer:
    """A CPU Trainer without logger, progress bar or model summary."""
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **options)

def test_teacher_frozen_through_fit(tmp_path):
    module = tiny_module()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    trainer.fit(module, loader(), loader())
    assert not module.teacher.training and all(not m.training for m in module.teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    for k, v in module.teacher.state_dict().items():  # weights and BN running stats
        assert torch.equal(v, teacher_before[k]), k
    changed = [
        k for k, v in module.student.state_dict().items() if not torch.equal(v, student_before[k])
    ]
    assert any("running_mean" in k for k in changed) and any("weight" in k for k in changed)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.student.parameters()}
    module.train()  # user code calling train() keeps the teacher in eval
    assert module.student.training and not module.teacher.training


def test_checkpoint_is_student_sized_and_reloads(tmp_path):
    module = tiny_module()
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    keys = torch.load(path, weights_only=True)["state_dict"].keys()
    assert keys and all(k.startswith(("student.", "objective.")) for k in keys)
    fresh = build_model("wrn", num_classes=10, depth=10, width=1)
    load_weights(fresh, path, "student")  # the student part of a Lightning checkpoint
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, module.student.state_dict()[k])


def test_a_training_step_trains_only_the_student():
    module = tiny_module()
    x, y = next(iter(loader()))
    loss = module.training_step((x, y), 0)  # no Trainer attached: nothing is logged
    assert loss.requires_grad and loss.ndim == 0
    assert module.train_sums.last["loss"] == loss.detach() and module.train_sums.images == len(y)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)
    assert module.student_taps.outputs() == {} and module.teacher_taps.outputs() == {}


def test_layer_taps_release_and_name_errors():
    model = build_model("wrn", num_classes=10, depth=10, width=1)
    taps = LayerTaps(model, ["group2", "group3.0.conv1"])
    model(torch.randn(2, 3, 16, 16))
    feats = taps.outputs()
    assert feats["group2"].shape == (2, 32, 8, 8) and feats["group3.0.conv1"].shape[1] == 64
    assert taps.outputs() == {}  # released after reading
    taps.remove()
    model(torch.randn(1, 3, 16, 16))
    assert taps.outputs() == {}
    message = r"student has no layer named 'grop2' \(did you mean 'group2'"
    with pytest.raises(AtxError, match=message):
        check_layer_names(model, ["grop2"], "student")


def test_finetune_freezes_bn_and_named_layers(tmp_path):
    """Section 4.2.1: BN layers fixed and the first group frozen, through a real fit."""
    torch.manual_seed(0)
    student = build_model("wrn", num_classes=10, depth=10, width=1)
    objective = Objective([CrossEntropy(Schedule(1.0))])
    finetune = FinetuneConf(frozen_layers=["conv0", "group1"], freeze_bn=True)
    module = DistillModule(student, objective, 10, finetune=finetune)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, loader(), loader())
    after = student.state_dict()
    for k, v in after.items():
        fixed = k.startswith(("conv0", "group1")) or ".bn" in k or k.startswith("bn.")
        assert torch.equal(v, before[k]) == fixed, k
    bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bns) and student.group2.training
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in student.parameters() if p.requires_grad}
    with pytest.raises(AtxError, match="student has no layer named 'layer1'"):
        DistillModule(student, objective, 10, finetune=FinetuneConf(frozen_layers=["layer1"]))


def _validate(module: DistillModule, tmp_path) -> dict[str, float]:
    trainer = quiet_trainer(tmp_path)
    (metrics,) = trainer.validate(module, loader(32), verbose=False)
    return metrics


def test_attention_agreement_is_one_for_the_teacher_itself_and_rises_with_at(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("wrn", num_classes=10, depth=10, width=2)
    twin = build_model("wrn", num_classes=10, depth=10, width=2)
    twin.load_state_dict(teacher.state_dict())
    twin.eval()  # the same function as the frozen teacher
    same = DistillModule(twin, Objective([CrossEntropy(Schedule(1.0))]), 10, teacher=teacher,
                         agreement=Agreement(PAIRS))
    same.train = lambda mode=True: same  # keep the twin in eval mode during validate
    metrics = _validate(same, tmp_path)
    for group, _ in PAIRS:
        assert metrics[f"val/agreement/{group}"] == pytest.approx(1.0, abs=1e-5)
        assert metrics[f"val/at_distance/{group}"] == pytest.approx(0.0, abs=1e-8)

    student = build_model("wrn", num_classes=10, depth=10, width=1)
    objective = Objective([CrossEntropy(Schedule(1.0)), AttentionTransfer(Schedule(3e3), PAIRS)])
    module = DistillModule(student, objective, 10, teacher=teacher, agreement=Agreement(PAIRS))
    before = _validate(module, tmp_path)
    assert all(before[f"val/agreement/{g}"] < 0.99 for g, _ in PAIRS)  # a random student
    trainer = quiet_trainer(tmp_path, max_steps=12, enable_checkpointing=False,
                            limit_val_batches=0)
    trainer.fit(module, loader(32))
    after = _validate(module, tmp_path)
    for group, _ in PAIRS:
        assert after[f"val/agreement/{group}"] > before[f"val/agreement/{group}"] + 0.01, group
        assert after[f"val/at_distance/{group}"] < before[f"val/at_distance/{group}"], group


class EvalRecord(L.Callback):
    """Every evaluation's agreement metrics (the sanity check's too), the teacher forwards run
    while evaluating, and how many batches the cache holds after each evaluation."""

    def __init__(self, module: DistillModule) -> None:
        self.metrics: list[dict[str, float]] = []
        self.cached: list[int] = []
        self.teacher_evals = 0
        module.teacher.register_forward_hook(self._count)
        self.module = module

    def _count(self, *_) -> None:
        self.teacher_evals += not self.module.trainer.training

    def on_validation_end(self, trainer, pl_module) -> None:  # after the epoch's metrics
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if "agreement" in k or "at_distance" in k}
        assert len(metrics) == 2 * len(PAIRS), metrics
        self.metrics.append(metrics)
        self.cached.append(len(pl_module.teacher_eval_maps.maps))


def _fit_recording(tmp_path, cache_mib: int, shuffle_val: bool = False):
    module = tiny_module(agreement=Agreement(PAIRS),
                         speed=SpeedConf(teacher_eval_cache_mib=cache_mib))
    record = EvalRecord(module)
    val = loader(32)
    if shuffle_val:
        val = DataLoader(val.dataset, batch_size=8, shuffle=True,
                         generator=torch.Generator().manual_seed(5))
    trainer = quiet_trainer(tmp_path / str(cache_mib), max_epochs=3, limit_train_batches=2,
                            enable_checkpointing=False, callbacks=[record])
    trainer.fit(module, loader(), val)
    return module, record, trainer


def test_the_teachers_eval_maps_are_computed_once_and_agree_bit_for_bit(tmp_path):
    """The frozen teacher runs on each evaluation batch once per fit (the sanity check's two,
    then the other two); the student still trains, and every evaluation's agreement metrics
    equal, bit for bit, those of a run recomputing the teacher (speed.teacher_eval_cache_mib=0).
    A validate call after the fit runs the teacher again and keeps nothing."""
    cached, with_cache, trainer = _fit_recording(tmp_path, 1024)
    _, without, _ = _fit_recording(tmp_path, 0)
    assert without.teacher_evals == 2 + 3 * 4  # sanity check + 3 epochs of 4 batches
    assert with_cache.teacher_evals == 4 and with_cache.cached == [2, 4, 4, 4]
    assert without.cached == [0, 0, 0, 0]
    assert len(with_cache.metrics) == 4 and with_cache.metrics == without.metrics
    assert with_cache.metrics[1] != with_cache.metrics[-1]  # the student moved
    assert not cached.teacher_eval_maps.maps  # released at the end of the fit
    trainer.validate(cached, loader(32), verbose=False)
    assert with_cache.teacher_evals == 4 + 4 and with_cache.cached[-1] == 0
    assert with_cache.metrics[-1] == with_cache.metrics[-2]  # the same student, recomputed


@pytest.mark.filterwarnings("ignore:.*shuffling enabled.*")
def test_a_shuffled_eval_loader_turns_the_teacher_cache_off(tmp_path):
    """Batches that are not the ones cached (a shuffled loader) are caught by their labels and
    pixels: the cache turns itself off and the metrics are those of the recomputing run."""
    _, with_cache, _ = _fit_recording(tmp_path, 1024, shuffle_val=True)
    _, without, _ = _fit_recording(tmp_path, 0, shuffle_val=True)
    assert with_cache.cached[0] == 2 and with_cache.cached[-1] == 0
    assert with_cache.teacher_evals > 4 and with_cache.metrics == without.metrics


def test_the_teacher_cache_checks_each_image_and_stays_within_its_limit():
    cache = TeacherEvalMaps(1)
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([1, 1])
    x[0] = 1.0
    cache.put(("val", 0), x, y, [torch.zeros(2, 256, 256)])  # 512 KiB: kept
    assert cache.get(("val", 0), x, y) is not None
    assert cache.get(("val", 0), x.flip(0), y) is None  # the same labels and total, reordered
    assert not cache.on
    cache.reset()
    cache.put(("val", 0), x, y, [torch.zeros(2, 256, 256)])
    cache.put(("val", 1), x, y, [torch.zeros(2, 256, 256)])  # past 1 MiB: the cache is off
    assert not cache.on and cache.get(("val", 0), x, y) is None
    cache.reset()  # the next fit starts on again
    assert cache.on and not cache.maps
