"""Bad configs fail at start-up with one line naming the key and the fix.

Every case of the table composes the real config and runs ``atx.train.train`` in-process; a
case must fail before any image is decoded and before anything is written into the run dir.
Hydra's own composition errors (unknown key, wrong type, unknown preset) go through the same
one-line formatter the CLI uses. A few cases run the real ``atx-train`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from configs import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from atx.checks import check_config
from atx.config import composition_error_line, train_schema
from atx.data.base import TensorImageDataModule
from atx.errors import AtxError
from atx.models import build_model
from atx.options import Choice
from atx.train import train

TINY = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=8",
    "data.train_subset=16",
    "data.val_subset=8",
    "logger=csv",
    "figure_images=2",
]
CORES = os.cpu_count()
GPUS = torch.cuda.device_count()
NO_GPU = "this machine has no CUDA GPU: use trainer=cpu"


def gpu_message(wanted: int) -> str:
    return NO_GPU if GPUS == 0 else f"asks for {wanted} GPUs but this machine has {GPUS}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """Teacher files for the default data (Fashion-MNIST: 10 classes, 1 channel) and broken
    ones: 100 classes, 3 channels, a NaN weight."""
    tmp = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for key, classes, channels in (("t", 10, 1), ("t100", 100, 1), ("t_rgb", 10, 3)):
        model = build_model("wrn", num_classes=classes, in_channels=channels, depth=10, width=2)
        torch.save(model.state_dict(), tmp / f"{key}.pt")
        paths[key] = str(tmp / f"{key}.pt")
    state = build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2).state_dict()
    state["group2.0.conv0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp / "t_nan.pt")
    paths["t_nan"] = str(tmp / "t_nan.pt")
    return paths


T = ["teacher=wrn_16_2", "teacher.depth=10", "teacher.checkpoint={t}"]
AT = ["distill=at", *T]

BAD: list[tuple[str, list[str], str]] = [
    # -- Hydra composition: unknown keys, wrong types, unknown presets --------------------------
    ("unknown key", ["distill.at.bta=3"],
     "Could not override 'distill.at.bta': Key 'bta' not in 'ATConf'"
     " (did you mean 'distill.at.beta'?)"),
    ("unknown optim key", ["optim.lrr=0.1"],
     "Key 'lrr' not in 'OptimConf' (did you mean 'optim.lr'?)"),
    ("key added with +", ["+distill.at.bta=3"],
     "unknown option 'distill.at.bta' (did you mean 'distill.at.beta'?); valid options:"),
    ("top-level key added with +", ["+figure_image=3"],
     "unknown option 'figure_image' (did you mean 'figure_images'?)"),
    ("wrong type", ["distill.at.beta=abc"],
     "distill.at.beta=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("wrong type list", ["optim.milestones=x"], "optim.milestones=x: Invalid value assigned"),
    ("unknown model preset", ["model=wrn_16_9"],
     "Could not find 'model/wrn_16_9' (did you mean 'wrn_16_2'?); available options in 'model':"
     " nin_thin, nin_wide"),
    ("unknown distill preset", ["distill=atkd"],
     "Could not find 'distill/atkd' (did you mean 'at_kd'?)"),
    # -- keys of classes built from config (checked against signatures) --------------------
    ("unknown model name", ["model.name=wrm"], "model: unknown model 'wrm'"),
    ("unknown teacher name", ["distill=kd", *T, "teacher.name=wrm"],
     "teacher: unknown model 'wrm'; known models: "),
    ("unknown model option", ["+model.depht=16"],
     "unknown option 'model.depht' (did you mean 'model.depth'?); valid options: depth, dropout,"),
    ("unknown data option", ["+data.batchsize=3"],
     "unknown option 'data.batchsize' (did you mean 'data.batch_size'?)"),
    ("unknown trainer option", ["+trainer.max_epoch=3"],
     "unknown option 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
    ("trainer wrong type", ["trainer.max_epochs=abc"],
     "trainer.max_epochs='abc' must be an integer"),
    ("unknown torchvision weights file", ["model=resnet18", "model.weights_path=/nope/r18.pt"],
     "weights file '/nope/r18.pt' not found"),
    # -- the teacher ------------------------------------------------------------------------
    ("AT without teacher", ["distill=at"], "need a teacher: add teacher="),
    ("F-ActT without teacher", ["distill=fact"], "need a teacher: add teacher="),
    ("teacher checkpoint unset", ["distill=kd", "teacher=wrn_16_2"],
     "teacher.checkpoint is not set"),
    ("teacher checkpoint missing",
     ["distill=at", "teacher=wrn_16_2", "teacher.checkpoint=/nope/run"],
     "checkpoint '/nope/run' not found: give a run directory"),
    ("teacher architecture", ["distill=at", *T, "teacher.depth=16"],
     "teacher checkpoint '{t}' does not fit the configured teacher model"),
    ("teacher classes", ["distill=kd", *T, "teacher.checkpoint={t100}"],
     "teacher.checkpoint '{t100}' is for 100 classes (fc.weight is (100, 128)) but"
     " Fashion-MNIST has 10: give a teacher trained on Fashion-MNIST"),
    ("grad-AT teacher input", ["distill=grad_at", *T, "teacher.checkpoint={t_rgb}"],
     "teacher.checkpoint '{t_rgb}' is for 3 image channels (conv0.weight is (16, 3, 3, 3)) but"
     " Fashion-MNIST has 1"),
    ("teacher with NaN", [*AT, "teacher.checkpoint={t_nan}"],
     "teacher.checkpoint '{t_nan}' holds NaN/inf values in 'group2.0.conv0.weight'"),
    # -- distillation values ----------------------------------------------------------------
    ("negative beta", ["distill=at", "distill.at.beta=-1"],
     "distill.at.beta=-1.0 must be a finite number >= 0 (0 turns it off)"),
    ("infinite beta", ["distill=fact", "distill.fact.beta=inf"],
     "distill.fact.beta=inf must be a finite number >= 0"),
    ("p zero", ["distill=at", "distill.at.p=0"], "distill.at.p=0.0 must be a finite number > 0"),
    ("map mode", ["distill=at", "distill.at.mode=mean"],
     "distill.at.mode=mean: Invalid value 'mean', expected one of [sum, max]"),
    ("kd alpha", ["distill=kd", "distill.kd.alpha=1.5"], "distill.kd.alpha=1.5 must lie in [0, 1]"),
    ("kd temperature", ["distill=kd", "distill.kd.temperature=0"],
     "distill.kd.temperature=0.0 must be a finite number > 0"),
    ("kd scale", ["distill=kd", "distill.kd.scale=mean"],
     "distill.kd.scale=mean: Invalid value 'mean', expected one of [batchmean, jan2017]"),
    ("schedule kind", ["distill=at_kd", "distill.at.schedule.kind=cosine"],
     "distill.at.schedule.kind=cosine: Invalid value 'cosine', expected one of [constant, step,"
     " linear]"),
    ("schedule milestones", ["distill=at_kd", "distill.at.schedule.milestones=[5,2]"],
     "distill.at.schedule.milestones=[5, 2] must be strictly increasing epochs >= 0"),
    # -- layer groups -----------------------------------------------------------------------
    ("layer lists of different length",
     [*AT, "distill.at.student_layers=[group1,group2]", "distill.at.teacher_layers=[group3]"],
     "distill.at: 2 student layers ['group1', 'group2'] but 1 teacher layers ['group3']; give"
     " distill.at.student_layers and distill.at.teacher_layers of equal length"),
    ("student layer name", [*AT, "distill.at.student_layers=[grup1]",
                            "distill.at.teacher_layers=[group1]"],
     "student has no layer named 'grup1' (did you mean 'group1'"),
    ("teacher layer name lists the valid names", [*AT, "distill.at.student_layers=[group1]",
                                                  "distill.at.teacher_layers=[block1]"],
     "teacher has no layer named 'block1'; its top-level layers are: conv0, group1, group2,"
     " group3, bn, relu, pool, fc"),
    ("layer preset", [*AT, "distill.at.student_layers=most"],
     "distill.at.student_layers='most' is not a layer preset of model 'wrn' (presets: all,"
     " last2, last)"),
    ("spatial size without interpolation", [*AT, "distill.at.student_layers=[group1]",
                                            "distill.at.teacher_layers=[group2]"],
     "student layer 'group1' is 28x28 but teacher layer 'group2' is 14x14; set"
     " distill.at.interpolate=true or pair layers of equal resolution"),
    ("F-ActT spatial size", ["distill=fact", *T, "distill.fact.student_layers=[group1]",
                             "distill.fact.teacher_layers=[group3]"],
     "distill.fact: student layer 'group1' is 28x28 but teacher layer 'group3' is 7x7; pair"),
    # -- optimiser, data, trainer, run options -----------------------------------------------
    ("lr zero", ["optim.lr=0"], "optim.lr=0.0 must be a finite number > 0"),
    ("lr milestones", ["optim.milestones=[60,30]"],
     "optim.milestones=[60, 30] must be strictly increasing epochs >= 0"),
    ("nesterov without momentum", ["optim.nesterov=true", "optim.momentum=0"],
     "optim.nesterov=true needs optim.momentum > 0"),
    ("optimiser recipe", ["optim.recipe=paper"],
     "optim.recipe=paper: Invalid value 'paper', expected one of [standard, authors]"),
    ("batch size", ["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    ("negative held-out split", ["data.val_split=-1"],
     "data.val_split=-1 must be a whole number of training images to hold out, at least 0"),
    ("held-out split below the classes", ["data.val_split=5"],
     "data.val_split=5 is below the 10 classes of Fashion-MNIST"),
    ("dataset root", ["data.root=/nope/fashion"],
     "data.root='/nope/fashion' does not exist: set data.root=<folder holding Fashion-MNIST>"),
    ("cifar root", ["data=cifar10", "data.root=/nope/cifar"],
     "data.root='/nope/cifar' does not exist"),
    ("max epochs", ["trainer.max_epochs=0"], "trainer.max_epochs=0 must be >= 1"),
    ("figure images", ["figure_images=-1"], "figure_images=-1 must be >= 0 (0 turns it off)"),
    ("teacher eval cache", ["speed.teacher_eval_cache_mib=-1"],
     "speed.teacher_eval_cache_mib=-1 must be >= 0 (0 turns the cache off)"),
    ("ddp preset on this machine", ["trainer=ddp"], gpu_message(2)),
    ("more GPUs than exist", ["trainer.accelerator=gpu", f"trainer.devices={GPUS + 1}"],
     gpu_message(GPUS + 1)),
    ("more CPU processes than cores", ["trainer.strategy=ddp", f"trainer.devices={CORES + 1}"],
     f"trainer.devices={CORES + 1} asks for {CORES + 1} CPU processes but this machine has"
     f" {CORES} cores: set trainer.devices<={CORES}"),
    ("precision (Lightning's own check)", ["trainer.precision=17"],
     "trainer: Precision 17 is invalid. Allowed precision values:"),
    ("nan policy", ["nan_policy=halt"],
     "nan_policy=halt: Invalid value 'halt', expected one of [stop, skip]"),
    ("nan skip on several devices",
     ["nan_policy=skip", "trainer.strategy=ddp", "trainer.devices=2"],
     "nan_policy=skip works on one device only"),
]


# Cases Hydra itself refuses while composing; every other case passes composition and fails
# in atx's start-up checks with an AtxError.
COMPOSITION = {"unknown key", "unknown optim key", "wrong type", "wrong type list",
               "unknown model preset", "unknown distill preset", "map mode", "kd scale",
               "schedule kind", "optimiser recipe", "nan policy"}


def first_error(overrides: list[str], run_dir: Path) -> tuple[type[Exception], str]:
    """Where a bad config fails and its one-line message, in-process (what atx-train prints
    after ``atx: error:``)."""
    own = {o.split("=")[0] for o in overrides}  # a preset of these groups sets its own values
    tiny = [o for o in TINY if not ("trainer" in own and o == "trainer.accelerator=cpu")]
    tiny += [] if "model" in own else ["model.depth=10"]
    try:
        cfg = compose_cfg(tiny + overrides)
    except ConfigCompositionException as e:
        return ConfigCompositionException, composition_error_line(e)
    with pytest.raises(AtxError) as info:
        train(cfg, run_dir)
    return AtxError, str(info.value)


def has_whole(message: str, text: str) -> bool:
    """``message`` is in ``text`` and neither begins nor ends in the middle of a word there
    ('p=0.0 must' does not match inside 'p=0.05 must', 'group1' not inside 'group10')."""
    left = r"(?<!\w)" if re.match(r"\w", message[:1]) else ""
    right = r"(?!\w)" if re.match(r"\w", message[-1:]) else ""
    return re.search(left + re.escape(message) + right, text) is not None


@pytest.mark.parametrize(("case", "overrides", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_config_is_one_clear_line_before_anything_is_loaded(
    tmp_path, monkeypatch, ckpts, case, overrides, message
):
    def no_data(*_args, **_kwargs):
        raise AssertionError("images were decoded before the config error was found")

    monkeypatch.setattr(TensorImageDataModule, "setup", no_data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kind, text = first_error([o.format(**ckpts) for o in overrides], run_dir)
    assert kind is (ConfigCompositionException if case in COMPOSITION else AtxError), kind
    assert has_whole(message.format(**ckpts), text), text
    assert "\n" not in text
    assert list(run_dir.iterdir()) == []  # no logger, checkpoint or W&B file was started


def is_choice(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Choice)


def schema_leaves(schema: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf option of the config schema with its type, e.g. ('optim.lr', float)."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out += schema_leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


# A value no option of that type accepts: numbers must be finite, the int options here are
# counts >= 0, words come from a fixed list, milestones are epochs >= 0.
INVALID: dict[Any, Any] = {float: float("nan"), int: -1, str: "bogus", list[int]: [-1]}
# Options where every value of their type is valid: free names and seeds; step checkpoints
# are off for every value <= 0.
FREE = {"name", "seed", "checkpoint.every_n_steps", "checkpoint.keep_last"}
CHECKED = [(k, t) for k, t in schema_leaves(train_schema()) if t in INVALID and k not in FREE]
# options with a fixed set of values (atx.options.Choice): refused while Hydra composes
CHOICES = [(k, t) for k, t in schema_leaves(train_schema()) if is_choice(t)]


@pytest.fixture(scope="module")
def default_cfg() -> DictConfig:
    return compose_cfg(["trainer.accelerator=cpu"])


@pytest.mark.parametrize(("key", "kind"), CHECKED, ids=[k for k, _ in CHECKED])
def test_every_number_and_choice_of_the_schema_is_checked_at_start_up(default_cfg, key, kind):
    """Read from the schema, not from the table above: a new number or choice option that
    start-up does not check fails here, before a run would use the bad value."""
    cfg = default_cfg.copy()
    OmegaConf.update(cfg, key, INVALID[kind], force_add=False)
    with pytest.raises(AtxError) as info:
        check_config(cfg)
    text = str(info.value)
    assert re.match(rf"{re.escape(key)}=\S", text) and "\n" not in text, text  # names the key


def test_the_walk_leaves_out_only_options_with_no_invalid_value_of_their_type():
    """Every other schema option is walked above: bools, the resume path (checked when read),
    and the free-form groups and layer lists (checked against classes and models, table)."""
    leaves = schema_leaves(train_schema())
    skipped = {t for k, t in leaves if t not in INVALID and k not in FREE and not is_choice(t)}
    assert skipped <= {bool, Any, list[str], str | None}, skipped


@pytest.mark.parametrize(("key", "kind"), CHOICES, ids=[k for k, _ in CHOICES])
def test_every_choice_of_the_schema_is_refused_while_composing(key, kind):
    """A bad value of a choice fails in Hydra's composition, as one line listing the values."""
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([f"{key}=bogus"])
    line = composition_error_line(info.value)
    values = ", ".join(kind.values())
    assert line == f"{key}=bogus: Invalid value 'bogus', expected one of [{values}]"


# -- the real command line ---------------------------------------------------------------------
def atx_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "atx.train", *args, f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
    )


def test_cli_prints_exactly_one_line_and_exits_2(tmp_path):
    """A composition error (Hydra's own message is several lines); start-up check errors go
    the same way (tests/test_untrusted.py, tests/test_cli.py)."""
    result = atx_train(["distill.at.beta=abc"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith(
        "atx: error: distill.at.beta=abc: Value 'abc' of type 'str'"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_debug_shows_the_traceback(tmp_path):
    result = atx_train(["distill.at.bta=3", "debug=true"], tmp_path)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "atx: error:" not in result.stderr
