"""Golden values that pin atx's behaviour across refactors.

    python scripts/golden.py write   # record tests/golden/ from the code as it is now
    python scripts/golden.py check   # compare; weights must match bitwise (same machine)

Three kinds: every loss term's value and input gradients on fixed tensors; short deterministic
Fashion-MNIST runs (``none``, ``at``, ``at_kd``, ``grad_at`` from one tiny teacher): the final
student's weights hash, per-tensor sums and errors; the composed config of each
``conf/experiment/`` preset as resolved YAML. ``tests/test_golden.py`` checks the same values
within float tolerance (another CPU may round differently); ``check`` here demands bitwise equal
weights, which holds on the machine that wrote them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "tests"))
os.environ["WANDB_MODE"] = "disabled"  # as in the tests: the logger config reads it

from configs import compose_cfg  # noqa: E402

from atx.attention import MapMode, at_loss  # noqa: E402
from atx.gradient_attention import grad_at_loss, min_l2_loss, symmetry_loss  # noqa: E402
from atx.losses import fact_loss, kd_loss  # noqa: E402
from atx.train import CONF_DIR, train  # noqa: E402

# a WRN-10-1 on 64 real Fashion-MNIST images, 2 epochs: seconds, and every term moves weights
RUN = [
    "model.depth=10",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "data.train_subset=64",
    "data.val_subset=32",
    "data.batch_size=16",
    "logger=csv",
    "figure_images=0",
]
STUDENTS = ("none", "at", "at_kd", "grad_at")


def _stats(t: Tensor) -> list[float]:
    t = t.double()
    return [t.sum().item(), t.abs().sum().item(), t.norm().item()]


def _loss_case(fn: Callable[..., Tensor], *shapes: tuple[int, ...], **kw: object) -> dict:
    """The loss and the gradient statistics of each input, for inputs drawn from seed 0."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    value = fn(*inputs, **kw)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)  # a teacher may be detached
    return {"value": value.item(), "grads": [None if g is None else _stats(g) for g in grads]}


def loss_values() -> dict[str, dict]:
    feat, small = (4, 6, 8, 8), (4, 3, 4, 4)
    logits, image = (4, 10), (4, 3, 8, 8)
    cases: dict[str, dict] = {}
    for p in (1.0, 2.0, 4.0, 0.5):
        for mode in MapMode.values():
            for reduction in ("code", "paper"):
                cases[f"at_p{p}_{mode}_{reduction}"] = _loss_case(
                    at_loss, feat, feat, p=p, mode=mode, reduction=reduction
                )
    cases["at_interpolate"] = _loss_case(at_loss, feat, small, interpolate=True)
    for scale in ("batchmean", "jan2017"):
        for t in (1.0, 4.0):
            cases[f"kd_{scale}_T{t}"] = _loss_case(
                kd_loss, logits, logits, temperature=t, scale=scale
            )
    cases["fact"] = _loss_case(fact_loss, feat, feat)
    for normalize in (False, True):
        for reduce in (False, True):
            cases[f"grad_at_n{int(normalize)}_r{int(reduce)}"] = _loss_case(
                grad_at_loss, image, image, normalize=normalize, reduce_channels=reduce
            )
    cases["symmetry"] = _loss_case(symmetry_loss, image, image)
    cases["min_l2"] = _loss_case(min_l2_loss, image)
    cases["ce"] = {"value": _ce_value()}
    return cases


def _ce_value() -> float:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    return torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 9, 3])).item()


def _weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    sums = {k: state[k].double().sum().item() for k in sorted(state)}
    return {"sha256": digest.hexdigest(), "sums": sums}


def run_values(work: Path) -> dict[str, dict]:
    """A tiny teacher, then one student per method from it, each in ``work``; on one thread,
    as recorded (another thread count sums in another order: other last bits, amplified by
    training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_values(work)
    finally:
        torch.set_num_threads(threads)


def _run_values(work: Path) -> dict[str, dict]:
    teacher = work / "teacher"
    teacher.mkdir()
    results = {}
    metrics = train(compose_cfg([*RUN, "name=teacher"]), teacher)
    results["teacher"] = {**_weights(teacher / "student.pt"), "val/error": metrics["val/error"]}
    for distill in STUDENTS:
        run = work / distill
        run.mkdir()
        extra = ["teacher=wrn_16_1", "teacher.depth=10", f"teacher.checkpoint={teacher}"]
        extra = [] if distill == "none" else extra
        metrics = train(compose_cfg([*RUN, f"distill={distill}", *extra]), run)
        results[distill] = {**_weights(run / "student.pt"), "val/error": metrics["val/error"]}
    return results


def preset_configs() -> dict[str, str]:
    """Each experiment preset composed and resolved, as YAML (the run name included)."""
    out = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        cfg = compose_cfg([f"experiment={path.stem}"])
        out[path.stem] = OmegaConf.to_yaml(cfg, resolve=True)
    return out


def record() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_values(Path(tmp))
    return {"losses": loss_values(), "runs": runs, "configs": preset_configs()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "check"])
    args = parser.parse_args()
    values = record()
    path = GOLDEN / "golden.json"
    if args.action == "write":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
        return
    want = json.loads(path.read_text())
    differ = [
        f"{kind}/{key}"
        for kind in want
        for key in want[kind]
        if want[kind][key] != values[kind].get(key)
    ]
    for name in differ:
        print(f"differs: {name}")
    print("golden values: all equal" if not differ else f"golden values: {len(differ)} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
