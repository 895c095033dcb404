"""Every override the README documents composes as written, for every preset it names.

The ``atx-train ...`` commands of the README's bash blocks and inline spans go through
composition and atx's start-up checks (``check_config``, and ``check_sweep`` for ``-m``; each
value of a swept preset choice once). Single options in the prose and tables
(``model.weights_path=``, ``data.decoder=pil``, ``model.depth``) are composed with the presets
named in the same table row, or else with every preset of their group that defines them.
"""

from __future__ import annotations

import copy
import inspect
import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from atx.checks import check_config
from atx.config import train_schema
from atx.models import _entry
from atx.options import accepted_kwargs
from atx.train import CONF_DIR, check_sweep

README = Path(__file__).parents[1] / "README.md"
GROUPS = [*sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name[0] != "_"),
          "hydra/launcher"]
CODE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# the section that documents refused overrides (distill=atkd, distill.at.beta=abc, ...)
ERROR_EXAMPLES = re.compile(r"^### What is checked at start-up\n.*?(?=^#)", re.S | re.M)
PLACEHOLDER = re.compile(r"<|\.\.\.|…")
ROOT_KEYS = {*typing.get_type_hints(train_schema()), "hydra"}


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def is_override(token: str) -> bool:
    """``key=value`` of the config, or a preset choice spelled out (not ``distill=``)."""
    key, eq, value = token.partition("=")
    if not eq or PLACEHOLDER.search(key) or " " in token:
        return False
    if key in GROUPS:
        return bool(value) and not PLACEHOLDER.search(value)
    return key.lstrip("+").split(".")[0] in ROOT_KEYS


def is_key(token: str) -> bool:
    """A dotted config key without a value (``model.depth``)."""
    dotted = re.fullmatch(r"[a-z_0-9]+(\.[a-z_0-9]+)+", token)
    return bool(dotted) and token.split(".")[0] in ROOT_KEYS


def concrete(token: str) -> str:
    """A placeholder value (``<run dir>``, ``...``, empty) becomes a plain string."""
    key, _, value = token.partition("=")
    return f"{key}=x" if not value or PLACEHOLDER.search(value) else token


def prose_spans(text: str) -> Iterator[tuple[list[str], str]]:
    """``(presets named in the same table row, span)`` for the inline code outside code blocks
    (spans may wrap lines; ``<placeholder>`` -> ``x``; ``a.{b,c}`` -> ``a.b`` and ``a.c``)."""
    paragraphs: list[str] = [""]
    for line in ERROR_EXAMPLES.sub("", CODE.sub("", text)).splitlines():
        if line.startswith("|") or not line.strip():  # a table row is a paragraph of its own
            paragraphs += [line, ""]
        else:
            paragraphs[-1] += " " + line
    for paragraph in paragraphs:
        row: list[str] = []
        for cell in paragraph.split("|") if paragraph.startswith("|") else []:
            group = None
            for span in re.findall(r"`([^`]+)`", cell):  # `model=resnet18`, `resnet34`
                choice = span.split("=", 1)
                if len(choice) == 2 and choice[0] in GROUPS:
                    group = choice[0]
                if group and (CONF_DIR / group / f"{choice[-1]}.yaml").is_file():
                    row.append(f"{group}={choice[-1]}")
        for span in re.findall(r"`([^`]+)`", paragraph):
            span = re.sub(r"<[^>]*>", "x", span)
            braces = re.fullmatch(r"([^{]*)\{([^}]*)\}", span)
            for one in [braces[1] + b for b in braces[2].split(",")] if braces else [span]:
                yield row, one


def readme_commands(text: str) -> list[list[str]]:
    """The tokens after ``atx-train`` of every command, and spans of several overrides
    (``model=torchvision model.arch=x``); ``resume=`` (needs a run) and commands naming a preset
    by a placeholder are left out."""
    lines = [ln.split("atx-train ", 1)[1] for lang, block in CODE.findall(text) if lang == "bash"
             for ln in block.replace("\\\n", " ").splitlines() if "atx-train " in ln]
    for _, span in prose_spans(text):
        if span.startswith("atx-train "):
            lines.append(span.split(" ", 1)[1])
        elif len(span.split()) > 1 and all(is_override(t) for t in span.split()):
            lines.append(span)
    commands = [shlex.split(line, comments=True) for line in lines]
    return [c for c in commands if not any(t.startswith("resume=") or placeholder_choice(t)
                                           for t in c)]


def placeholder_choice(token: str) -> bool:
    """``experiment=<name>``: a preset no test can compose."""
    key, _, value = token.partition("=")
    return key in GROUPS and (value == "x" or bool(PLACEHOLDER.search(value)))


def readme_options(text: str) -> list[tuple[list[str], str]]:
    """``(presets of the same table row, option)`` for every single option in the prose; a
    sweep (``distill.at.mode=sum,max``) gives each of its values."""
    found = []
    for row, span in prose_spans(text):
        if is_override(span):
            o = OverridesParser.create().parse_overrides([concrete(span)])[0]
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else []
            found += [(row, f"{o.get_key_element()}={v}") for v in values] or [(row, span)]
        elif is_key(span):
            found.append((row, span))
    return found


def top(token: str) -> str:
    """The config group a token sets: ``trainer`` for ``trainer=ddp`` and ``trainer.devices=4``."""
    return re.split(r"[./=]", token.lstrip("+"), maxsplit=1)[0]


def plan_jobs(commands: list[list[str]]) -> list[tuple[list[str], bool]]:
    """``(overrides, multirun)`` to check: each command with its sweeps at their first value,
    then each further value of a swept preset choice once. Fragments (``atx-train ... X``, not
    swept) that set no group in common are checked together."""
    jobs: list[tuple[list[str], bool]] = []
    bins: list[tuple[set[str], list[str]]] = []
    seen: set[str] = set()
    for command in commands:
        multirun = "-m" in command
        tokens = [concrete(t) for t in command if t not in ("-m", "...")]
        parsed = OverridesParser.create().parse_overrides(tokens)
        first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
                 if o.is_sweep_override() else t
                 for t, o in zip(tokens, parsed, strict=True)]
        seen.update(first)
        if "..." in command and not multirun:
            groups = {top(t) for t in first}
            where = next((b for b in bins if not b[0] & groups), None)
            if where is None:
                bins.append(where := (set(), []))
            where[0].update(groups), where[1].extend(first)
        elif (first, multirun) not in jobs:
            jobs.append((first, multirun))
        for i, o in enumerate(parsed):
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else []
            for value in values[1:] if o.get_key_element() in GROUPS else []:
                choice = f"{o.get_key_element()}={value}"
                if choice not in seen:
                    seen.add(choice)
                    jobs.append(([*first[:i], choice, *first[i + 1 :]], multirun))
    return [*jobs, *((overrides, False) for _, overrides in bins)]


@pytest.fixture(scope="module")
def composer() -> Iterator[object]:
    """``compose(overrides) -> (cfg, hydra node)``, as atx-train composes (8 GPUs pretended:
    the GPU commands are checked too)."""
    cuda = (mock.patch("torch.cuda.is_available", return_value=True),
            mock.patch("torch.cuda.device_count", return_value=8))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), cuda[0], cuda[1]:

        def run(overrides: list[str]) -> tuple[DictConfig, DictConfig]:
            try:
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
            except Exception as e:
                raise AssertionError(f"atx-train {' '.join(overrides)}: {e}") from None
            HydraConfig.instance().set_config(cfg)  # as Hydra's run_job: the job gets a copy
            job = copy.deepcopy(cfg)
            with open_dict(job):
                del job["hydra"]
            return job, HydraConfig.get()

        yield run


def test_extraction_finds_the_documented_overrides() -> None:
    text = README.read_text()
    commands = readme_commands(text)
    options = readme_options(text)
    assert len(commands) >= 30
    assert ["trainer=ddp", "trainer.devices=4", "..."] in commands
    assert (["model=resnet18", "model=resnet34"], "model.weights_path=") in options
    assert (["data=cub"], "data.crop_to_bbox=false") in options
    assert ([], "data.decoder=pil") in options
    assert not any("atkd" in o for _, o in options)  # the refused examples are left out
    assert plan_jobs([["-m", "experiment=e", "distill=none,at", "seed=0,1"], ["-m", "distill=at"],
                      ["...", "speed=fast"], ["trainer=ddp", "..."], ["...", "speed.compile=true"],
                      ["-m", "distill=at"]]) == [
        (["experiment=e", "distill=none", "seed=0"], True),
        (["experiment=e", "distill=at", "seed=0"], True), (["distill=at"], True),
        (["speed=fast", "trainer=ddp"], False), (["speed.compile=true"], False)]


def test_every_readme_command_passes_the_start_up_checks(composer) -> None:
    jobs = plan_jobs(readme_commands(README.read_text()))
    assert len(jobs) >= 25
    for overrides, multirun in jobs:
        cfg, hydra_node = composer(overrides)
        check_config(cfg)
        if multirun:
            check_sweep(cfg, hydra_node.launcher)


def defines(group: str, preset: str, key: str) -> bool:
    node = yaml.safe_load((CONF_DIR / group / f"{preset}.yaml").read_text()) or {}
    return key.split(".")[1] in node


def has(cfg: DictConfig, hydra_node: DictConfig, key: str) -> bool:
    """``key`` is in the composed config (``???`` values count too)."""
    node, key = (hydra_node, key[len("hydra.") :]) if key.startswith("hydra.") else (cfg, key)
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(node, parent) if parent else node
    return isinstance(node, DictConfig) and last in node.keys()


def option_units(default: tuple[DictConfig, DictConfig]) -> dict[tuple[str, str], set[str]]:
    """``(group, preset) -> options``: each README option with the presets of its group named in
    its table row, else the default, else every preset of the group that defines it (one for a
    bare key). A preset choice (``speed=fast``) is a unit of its own."""
    units: dict[tuple[str, str], set[str]] = {}
    for row, option in readme_options(README.read_text()):
        key = option.split("=", 1)[0]
        if key in GROUPS:
            units.setdefault((key, option.split("=", 1)[1]), set())
            continue
        group = key.split(".")[0] if (CONF_DIR / key.split(".")[0]).is_dir() else key
        presets_named = [p.split("=", 1)[1] for p in row if p.startswith(group + "=")]
        if not presets_named and group != "hydra" and "." in key and not has(*default, key):
            presets_named = [p for p in presets(group) if defines(group, p, key)]
            assert presets_named, f"README option '{option}': no {group} preset defines it"
            presets_named = presets_named if "=" in option else presets_named[:1]
        for preset in presets_named or [""]:
            units.setdefault((group, preset), set()).add(concrete(option) if "=" in option
                                                         else option)
    return units


def test_every_readme_option_composes_with_its_presets(composer) -> None:
    default = composer([])
    bins: list[dict[str, tuple[str, list[str]]]] = []  # group -> (preset, options): one compose
    for (group, preset), options in option_units(default).items():
        by_key: dict[str, list[str]] = {}
        for option in sorted(options):
            by_key.setdefault(option.split("=", 1)[0], []).append(option)
        for key, given in by_key.items():  # a bare key is checked by an override of it
            by_key[key] = [o for o in given if "=" in o] or given
        for i in range(max(map(len, by_key.values()), default=1)):  # one value of a key each
            unit = [v[i] if i < len(v) else v[0] for v in by_key.values()]
            where = None if group == "experiment" else next(
                (b for b in bins if group not in b and "experiment" not in b), None)
            if where is None:
                bins.append(where := {})
            where[group] = (preset, unit)
    for b in bins:
        overrides = [*(f"{g}={p}" for g, (p, _) in b.items() if p),
                     *(o for _, unit in b.values() for o in unit if "=" in o)]
        job = composer(overrides) if overrides else default
        for key in (o for _, unit in b.values() for o in unit if "=" not in o):
            assert has(*job, key), f"README option '{key}' is not in the config of {overrides}"
    assert 10 <= len(bins) <= 25  # options of different groups share a compose


@pytest.mark.parametrize("group", ["model", "teacher"])
def test_model_presets_list_every_architecture_option(group: str, composer) -> None:
    """So ``model.<option>=`` works from the shell for every model preset (no ``+``)."""
    for preset in presets(group):
        # composed: a teacher preset is its model preset (Hydra defaults) plus the checkpoint
        node = OmegaConf.to_container(composer([f"{group}={preset}"])[0][group])
        params = inspect.signature(_entry(node["name"]).builder).parameters
        options = set(params) - {"num_classes", "in_channels"}
        listed = set(node) - {"name", "checkpoint"}
        assert options - {"arch"} <= listed <= options, f"conf/{group}/{preset}.yaml"


def test_data_presets_hold_only_options_of_their_class() -> None:
    for preset in presets("data"):
        node = yaml.safe_load((CONF_DIR / "data" / f"{preset}.yaml").read_text())
        allowed = accepted_kwargs(get_class(node.pop("_target_")))
        assert set(node) <= allowed and "pin_memory" in node, f"conf/data/{preset}.yaml"
