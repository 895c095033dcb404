"""Behaviour pinned by ``scripts/golden.py write``: loss values and gradients, short real runs,
and the composed experiment presets. A refactor that changes any of them fails here; rewrite
the golden file only for a change of behaviour that is meant (and say so in the commit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import golden  # noqa: E402

WANT = json.loads((Path(__file__).parent / "golden" / "golden.json").read_text())


def close(got: object, want: object, rel: float) -> bool:
    """Nested lists/dicts of floats equal within ``rel`` (another CPU may round differently)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            close(got[k], want[k], rel) for k in want
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            close(g, w, rel) for g, w in zip(got, want, strict=True)
        )
    if isinstance(want, float):
        return isinstance(got, float) and got == pytest.approx(want, rel=rel, abs=1e-9)
    return got == want


def test_loss_values_and_gradients() -> None:
    got = golden.loss_values()
    assert got.keys() == WANT["losses"].keys()
    for name, want in WANT["losses"].items():
        assert close(got[name], want, 1e-6), name


def test_experiment_presets_compose_to_the_same_config() -> None:
    got = golden.preset_configs()
    assert got.keys() == WANT["configs"].keys()
    for name, want in WANT["configs"].items():
        assert got[name] == want, name


def test_short_runs_end_in_the_same_weights(tmp_path: Path) -> None:
    got = golden.run_values(tmp_path)
    assert got.keys() == WANT["runs"].keys()
    for name, want in WANT["runs"].items():
        assert got[name]["val/error"] == want["val/error"], name
        assert close(got[name]["sums"], want["sums"], 1e-4), name
