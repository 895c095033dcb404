"""atx as a real package: the wheel ships conf/ as ``atx.conf``, and an ``atx-train`` installed
from it (not the editable checkout) trains from any directory, users' config folders included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from cli import FAST

from atx.checkpoints import STUDENT_FILE as STUDENT

ROOT = Path(__file__).parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run(cmd: list[str | Path], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=180,
                            **kwargs)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the checkout (the build writes build/ and egg-info there)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".atx-cache")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", out, src])
    (path,) = out.glob("atx-*.whl")
    return path


def test_the_editable_install_reads_the_checkouts_conf() -> None:
    from atx.train import CONF_DIR, CONF_SOURCE

    assert CONF_SOURCE == "pkg://atx.conf", "an editable install from before atx.conf: make install"
    assert CONF_DIR == ROOT / "conf"  # edits in conf/ take effect at once


def test_the_wheel_holds_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    package, conf = ROOT / "src" / "atx", ROOT / "conf"
    modules = {f"atx/{p.relative_to(package)}" for p in package.rglob("*.py")}
    configs = {f"atx/conf/{p.relative_to(conf)}" for p in conf.rglob("*.yaml")}
    assert modules - names == set(), "add the subpackage to pyproject's packages"
    assert configs - names == set() and "atx/conf/train.yaml" in names


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_an_installed_wheel_trains_from_anywhere_with_a_users_config(wheel, tmp_path) -> None:
    """A fresh venv that reuses this one's dependencies (a .pth file, no torch install) gets the
    wheel; its atx-train runs a one-epoch job from a folder outside the checkout, with a
    preset from the user's own config folder (hydra.searchpath)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "atx_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", wheel])
    where = run([python, "-c", "import atx, importlib.util as u; print(atx.__file__);"
                 " print(u.find_spec('atx.conf').submodule_search_locations[0])"])
    package, conf = where.stdout.split()
    assert Path(package).is_relative_to(venv) and Path(conf).is_relative_to(venv), where.stdout

    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nname: from_my_conf\nseed: 3\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([venv / "bin" / "atx-train", *FAST, "logger=csv", "figure_images=0",
         f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=mine",
         "hydra.run.dir=run"], cwd=work, env={**env, "OMP_NUM_THREADS": "1"})
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["name"] == "from_my_conf" and metrics["epochs"] == 1
    assert (work / "run" / "csv" / "metrics.csv").is_file() and (work / "run" / STUDENT).is_file()
