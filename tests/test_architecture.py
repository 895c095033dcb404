"""The parts of ``src/atx`` and the imports allowed between them (docs/architecture.md): a walk
of every import statement, function-level ones included, fails on an edge running back up."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "atx"

# each module of src/atx in exactly one part; a package (data, models) is one part
PARTS = {
    "floor": {"errors", "files", "options"},
    "method": {"attention", "gradient_attention", "losses", "terms"},
    "models": {"models", "features"},
    "data": {"data"},
    "training": {"module", "optim", "speed", "numerics", "callbacks", "figures", "train_log"},
    "persistence": {"checkpoints", "resume", "run_dir"},
    "run": {"config", "checks", "build", "train", "loggers", "cluster", "search"},
    "tools": {"report", "visualize", "study", "paper", "sensitivity"},
}
# what each part may import besides itself
ALLOWED = {
    "floor": set(),
    "method": {"floor"},
    "models": {"floor"},
    "data": {"floor"},
    "training": {"floor", "method", "models", "data"},
    "persistence": {"floor", "data"},
    "run": {"floor", "method", "models", "data", "training", "persistence"},
    "tools": {"floor", "method", "models", "data", "training", "persistence", "run"},
}


def is_conf(module: str) -> bool:
    """``atx.conf``: the YAML presets shipped as a package, not code."""
    return module == "atx.conf" or module.startswith("atx.conf.")


def part_of(module: str) -> str:
    top = module.split(".")[1] if module.startswith("atx.") else module
    return next(part for part, members in PARTS.items() if top in members)


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        if name != "atx" and not is_conf(name):
            found[name] = path
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names |= {base} if base != "atx" else {f"atx.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("atx.") and not is_conf(n)}


def test_every_module_is_in_one_part() -> None:
    tops = {name.split(".")[1] for name in modules()}
    listed = [m for members in PARTS.values() for m in members]
    assert sorted(listed) == sorted(set(listed)), "a module is listed in two parts"
    assert tops == set(listed)


def test_no_import_runs_against_the_layers() -> None:
    bad = []
    for name, path in modules().items():
        mine = part_of(name)
        for target in imported(path):
            theirs = part_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not bad, "; ".join(bad)


def test_the_walk_sees_a_forbidden_edge(tmp_path: Path) -> None:
    """Positive control: an import of the run layer from the method layer is caught."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from atx.build import build_run\n")
    assert imported(path) == {"atx.build"}
    assert "run" not in ALLOWED[part_of("atx.losses")]
