"""The batched CIFAR pipeline: augmentation semantics against the per-image torchvision path,
the uint8 disk cache, the data benchmark script and a CLI run using them (device-resident data:
test_data_device.py).

All on CPU tensors; the statistical checks use seeded generators and tolerances that a wrong
offset range, a biased offset or a wrong flip rate would exceed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layouts import write_cifar10, write_image_folder
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

import atx.data.base as data_base
from atx.data import CIFAR10DataModule, random_crop_flip
from atx.data.augment import crop_flip
from atx.data.cache import DIR_NAME

REPO = Path(__file__).parents[1]
PAD, SIZE = 4, 32
N_OFFSETS = 2 * PAD + 1


def coords(b: int, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    """uint8 batch whose channel 0 holds each pixel's row and channel 1 its column."""
    rows = torch.arange(h).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(b, h, w)
    return torch.stack([rows, cols], 1).to(torch.uint8)


def recover(out: torch.Tensor, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets ``dy, dx`` and flips of every sample of an augmented :func:`coords` batch, read
    back by matching rows/columns against the reflect-padded windows (all samples at once)."""
    n = out.shape[-1]
    table = torch.from_numpy(np.pad(np.arange(n), pad, mode="reflect"))
    windows = torch.stack([table[d : d + n] for d in range(2 * pad + 1)])  # (2p+1, n)
    row, col = out[:, 0, :, 0].long(), out[:, 1, 0, :].long()
    hit_y = (row[:, None, :] == windows[None]).all(-1)
    hit_x = (col[:, None, :] == windows[None]).all(-1)
    hit_xf = (col[:, None, :] == windows.flip(1)[None]).all(-1)
    found = hit_y.sum(1) == 1
    found &= (hit_x.sum(1) + hit_xf.sum(1)) == 1
    assert bool(found.all()), "an output is not a reflect-padded crop (optionally flipped)"
    assert bool((out[:, 0] == out[:, 0, :, :1]).all() and (out[:, 1] == out[:, 1, :1, :]).all())
    flips = hit_xf.any(1)
    dx = torch.where(flips, hit_xf.float().argmax(1), hit_x.float().argmax(1))
    return hit_y.float().argmax(1), dx, flips


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (the test fails for one draw in 1000 of a correct
# sampler; with fixed seeds it is deterministic): df = 8 and df = 80
CHI2_DF8, CHI2_DF80 = 26.12, 124.84


# --- augmentation semantics -------------------------------------------------------------------
def test_known_offsets_match_reflect_pad_then_crop() -> None:
    """Every (dy, dx, flip) equals F.pad(mode="reflect") + slicing (+ flip), on uint8 data."""
    x = torch.randint(0, 256, (N_OFFSETS**2 * 2, 3, SIZE, SIZE), dtype=torch.uint8)
    grid = torch.cartesian_prod(torch.arange(N_OFFSETS), torch.arange(N_OFFSETS))  # (81, 2)
    offsets = grid.repeat(2, 1).T.contiguous()  # every offset pair, unflipped then flipped
    flips = torch.arange(len(x)) >= N_OFFSETS**2
    out = crop_flip(x, PAD, offsets, flips)
    padded = F.pad(x.float(), (PAD,) * 4, mode="reflect").to(torch.uint8)
    for i in range(len(x)):
        dy, dx = offsets[:, i].tolist()
        ref = padded[i, :, dy : dy + SIZE, dx : dx + SIZE]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref), (dy, dx, bool(flips[i]))
    assert torch.equal(crop_flip(x, PAD, torch.full((2, len(x)), PAD)), x)  # centre = identity


def test_known_offsets_match_torchvision_per_image_path() -> None:
    """Same pixels as torchvision's PIL path: pad(reflect) -> crop(top, left) -> hflip."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (24, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    offsets = torch.randint(0, N_OFFSETS, (2, len(x)), generator=gen)
    flips = torch.rand(len(x), generator=gen) < 0.5
    out = crop_flip(x, PAD, offsets, flips)
    for i in range(len(x)):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        img = TF.crop(TF.pad(img, PAD, padding_mode="reflect"), *offsets[:, i].tolist(), SIZE, SIZE)
        img = TF.hflip(img) if flips[i] else img
        assert torch.equal(TF.pil_to_tensor(img), out[i])


def test_offsets_uniform_and_flip_half() -> None:
    """Offsets uniform over the 2*pad+1 values per axis and jointly; flips ~ Bernoulli(0.5)."""
    n = 18_000
    out = random_crop_flip(coords(n), PAD, generator=torch.Generator().manual_seed(0))
    dy, dx, flips = recover(out)
    assert int(dy.min()) == int(dx.min()) == 0 and int(dy.max()) == int(dx.max()) == 2 * PAD
    for axis in (dy, dx):
        assert chi_square(np.bincount(axis.numpy(), minlength=N_OFFSETS)) < CHI2_DF8
    joint = np.bincount((dy * N_OFFSETS + dx).numpy(), minlength=N_OFFSETS**2)
    assert chi_square(joint) < CHI2_DF80
    rate = flips.float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / n) ** 0.5  # 4 standard errors
    # flips independent of the offsets: half of each column offset is flipped
    for d in range(N_OFFSETS):
        assert abs(flips[dx == d].float().mean().item() - 0.5) < 0.08


def test_same_distribution_as_torchvision_random_crop_flip() -> None:
    """Offset and flip histograms of atx and of RandomCrop(32, 4, reflect) + RandomHorizontalFlip
    applied per image are homogeneous (chi-square two-sample test)."""
    n = 2_000
    torch.manual_seed(1)
    tv = transforms.Compose(
        [transforms.RandomCrop(SIZE, padding=PAD, padding_mode="reflect"),
         transforms.RandomHorizontalFlip()]
    )
    base = coords(1)[0]
    ref = torch.stack([tv(base) for _ in range(n)])
    ours = random_crop_flip(coords(n), PAD, generator=torch.Generator().manual_seed(2))
    (ty, tx, tf), (oy, ox, of) = recover(ref), recover(ours)
    for a, b in ((ty, oy), (tx, ox)):
        table = np.stack([np.bincount(a.numpy(), minlength=N_OFFSETS),
                          np.bincount(b.numpy(), minlength=N_OFFSETS)])
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        assert ((table - expected) ** 2 / expected).sum() < CHI2_DF8
    assert abs(tf.float().mean().item() - of.float().mean().item()) < 0.07


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentation_keeps_the_device_and_dtype(dtype: torch.dtype) -> None:
    """A batch on another device than the generator's (meta here: no GPU needed) is augmented
    there: the draws and every index follow the batch, nothing lands on the host."""
    x = coords(8).to("meta", dtype)
    out = random_crop_flip(x, PAD, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.device.type == "meta" and out.shape == x.shape
    for flips in (None, torch.ones(8, dtype=torch.bool, device="meta")):
        offsets = torch.zeros(2, 8, dtype=torch.long, device="meta")
        assert crop_flip(x, PAD, offsets, flips).device.type == "meta"


# --- disk cache --------------------------------------------------------------------------------
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    decode = data_base._decode
    monkeypatch.setattr(data_base, "_decode", lambda p, *a: calls.append(p) or decode(p, *a))
    return calls


@pytest.fixture()
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fallback cache dir, inside tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "atx"


def test_cache_decodes_once_then_reads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 2, "test": 1})
    calls = count_decodes(monkeypatch)
    first = CIFAR10DataModule(str(root))
    first.setup()
    assert len(calls) == 30 and first.cache_file is not None
    assert first.cache_file.parent == root / DIR_NAME and first.cache_file.is_file()
    second = CIFAR10DataModule(str(root), train_subset=5)
    second.setup()
    assert len(calls) == 30  # nothing decoded again
    assert second.cache_file == first.cache_file and second.classes == first.classes
    full = CIFAR10DataModule(str(root))
    full.setup()
    for key in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(full, key), getattr(first, key))
    assert not user_cache.exists()
    # data.cache=false: decodes, writes nothing
    off = CIFAR10DataModule(str(root), cache=False)
    off.setup()
    assert len(calls) == 60 and off.cache_file is None and torch.equal(off.x_val, first.x_val)


def test_changed_dataset_invalidates_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 2, "test": 1})
    dm = CIFAR10DataModule(str(root))
    dm.setup()
    old = dm.cache_file
    calls = count_decodes(monkeypatch)
    new_image = np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)
    Image.fromarray(new_image).save(root / "train" / "cat" / "zzz.png")  # one image more
    changed = CIFAR10DataModule(str(root))
    changed.setup()
    assert len(calls) == 31 and len(changed.x_train) == 21
    assert changed.cache_file != old and not old.exists()  # the stale cache is replaced
    cat = changed.classes.index("cat")
    assert torch.equal(changed.x_train[changed.y_train == cat][-1], torch.full((3, 32, 32), 7))
    # rewriting an image in place (new size and mtime) also changes the key
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "train" / "cat" / "zzz.png")
    again = CIFAR10DataModule(str(root))
    again.setup()
    assert len(calls) == 62 and again.cache_file != changed.cache_file
    assert int(again.x_train[again.y_train == cat][-1].max()) == 0


def test_corrupt_cache_is_ignored_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 1, "test": 1})
    dm = CIFAR10DataModule(str(root))
    dm.setup()
    path = dm.cache_file
    calls = count_decodes(monkeypatch)
    for garbage in (path.read_bytes()[:100], b"not a torch file"):
        path.write_bytes(garbage)
        with pytest.warns(UserWarning, match="ignoring the unreadable data cache"):
            rebuilt = CIFAR10DataModule(str(root))
            rebuilt.setup()
        assert torch.equal(rebuilt.x_train, dm.x_train) and rebuilt.cache_file == path
    assert len(calls) == 40
    # a readable torch file of the wrong shape of content is not trusted either
    torch.save({"x_train": torch.zeros(1)}, path)
    with pytest.warns(UserWarning, match="not an atx dataset cache"):
        CIFAR10DataModule(str(root)).setup()
    assert len(calls) == 60
    CIFAR10DataModule(str(root)).setup()
    assert len(calls) == 60  # the rebuilt file is good


def test_unwritable_data_dir_falls_back_to_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 1, "test": 1})
    (root / DIR_NAME).write_text("a file where the cache folder would go")  # mkdir fails
    calls = count_decodes(monkeypatch)
    dm = CIFAR10DataModule(str(root))
    with pytest.warns(UserWarning, match="cannot write the data cache beside the data"):
        dm.setup()
    assert dm.cache_file is not None and dm.cache_file.parent == user_cache
    CIFAR10DataModule(str(root)).setup()
    assert len(calls) == 20  # read back from the user cache
    # nowhere to write: one warning, the data still loads
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / DIR_NAME / "sub"))
    with pytest.warns(UserWarning, match="could not write the data cache"):
        nowhere = CIFAR10DataModule(str(root))
        nowhere.setup()
    assert nowhere.cache_file is None and torch.equal(nowhere.x_train, dm.x_train)


def test_fast_layouts_are_not_cached(tmp_path: Path, user_cache: Path) -> None:
    write_cifar10(tmp_path / "cifar")
    dm = CIFAR10DataModule(str(tmp_path / "cifar"))
    dm.setup()
    assert dm.cache_file is None and not (tmp_path / "cifar" / DIR_NAME).exists()
    assert not user_cache.exists()


# --- the benchmark script and the CLI ----------------------------------------------------------
def test_bench_data_quick_mode_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_data.py"), "--quick", "--json", str(out),
         "--options", "channels_last"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    data = json.loads(out.read_text())
    rows = {r["path"]: r for r in data["loaders"]}
    assert {"pil w0", "atx host", "atx device"} <= set(rows)
    assert all(r["images_per_s"] > 0 and r["images"] > 0 for r in rows.values())
    epochs = {r["path"]: r for r in data["epoch"]}  # every training path timed one epoch
    assert set(epochs) == {"atx", "per-image w0", "atx channels_last"}
    assert all(r["epoch_s"] > 0 and r["images"] == 64 for r in epochs.values())
    assert epochs["atx channels_last"]["overrides"][-1] == "speed.channels_last=true"
    assert "x the PIL loader" in result.stdout
    assert "atx pipeline epoch vs the fastest per-image epoch (per-image w0)" in result.stdout
    assert "speed-up of channels_last: " in result.stdout


def test_bench_data_refuses_gpu_options_on_the_cpu(capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # its parts: scripts/benchlib
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    assert bench_data.parse_args(["--device", "cuda"]).options == list(bench_data.EPOCH_OPTIONS)
    assert bench_data.parse_args([]).options == []
    with pytest.raises(SystemExit) as exit_info:
        bench_data.parse_args(["--epoch-only", "--options", "16-mixed", "compile"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--options 16-mixed need --device cuda" in err
    assert "Traceback" not in err


def test_cli_trains_with_cache_and_device_resident_data(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_image_folder(root, {"train": 2, "test": 1})
    cmd = [
        sys.executable, "-m", "atx.train", "data=cifar10", f"data.root={root}", "data.cache=true",
        "data.device_resident=true", "data.batch_size=8", "model.depth=10",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "figure_images=0",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert len(list((root / DIR_NAME).glob("cifar-10-*.pt"))) == 1
    dm = CIFAR10DataModule(str(root))
    dm.setup()
    assert dm.cache_file is not None and dm.cache_file.parent == root / DIR_NAME
