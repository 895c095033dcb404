"""Large-image data modules (paper §4.2): ImageNet, CUB-200-2011 and MIT Indoor 67 read from
tiny copies of their official layouts in ``tmp_path``; errors (a real Trainer on each:
test_data_large_train.py)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from layouts import (
    BACKGROUND,
    CUB_CLASSES,
    PALETTE,
    SCENES_CLASSES,
    write_cub,
    write_imagenet,
    write_jpeg,
    write_scenes,
)
from PIL import Image

from atx.data import CUBDataModule, ImageNetDataModule, ScenesDataModule
from atx.data.folder import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, read_image
from atx.errors import AtxError

WNIDS = ("n01440764", "n01443537", "n01484850")
SMALL = {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 4}


def colour_labels(x: torch.Tensor) -> list[int]:
    """The PALETTE index nearest to each uint8 image's mean colour."""
    means = x.float().mean(dim=(2, 3))
    dist = torch.cdist(means, torch.tensor(PALETTE, dtype=torch.float32))
    return dist.argmin(1).tolist()


def blue_fraction(x: torch.Tensor) -> float:
    """Share of pixels near BACKGROUND (pure blue) in a uint8 batch."""
    diff = (x.float() - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().amax(1)
    return float((diff < 60).float().mean())


@pytest.fixture
def imagenet(tmp_path: Path) -> Path:
    write_imagenet(tmp_path / "imagenet")
    return tmp_path / "imagenet"


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    write_cub(tmp_path / "CUB_200_2011")
    return tmp_path / "CUB_200_2011"


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    write_scenes(tmp_path / "indoor67")
    return tmp_path / "indoor67"


# --- each layout ------------------------------------------------------------------------------
def test_imagenet_layout(imagenet: Path) -> None:
    (imagenet / "train" / WNIDS[0] / "._n01440764_0.JPEG").write_bytes(b"macOS resource fork")
    (imagenet / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    dm = ImageNetDataModule(str(imagenet), **SMALL)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 32)  # before setup
    assert dm.classes == list(WNIDS)
    assert (dm.mean, dm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6
    assert dm.train_set.samples.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dm.train_set.samples.path(0) == str(imagenet / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert colour_labels(x) == y.tolist()  # every crop carries its own class's colour
    xf, yf = dm.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and torch.equal(yf, y)
    assert torch.allclose(dm.denormalize(xf), x, atol=1)
    batches = list(dm.val_dataloader())
    assert [len(b[1]) for b in batches] == [4, 2] and len(list(dm.train_dataloader())) == 2
    xv, yv = dm.val_images(4)  # spread over the classes: images 0, 2, 4, 1 of [0, 0, 1, 1, 2, 2]
    assert xv.dtype == torch.uint8 and xv.shape == (4, 3, 32, 32) and yv.tolist() == [0, 1, 2, 0]
    assert torch.equal(xv, torch.cat([b[0] for b in batches])[[0, 2, 4, 1]])
    assert colour_labels(xv) == yv.tolist()
    assert dm.test_dataloader().dataset is dm.val_set


def test_scenes_layout_full_size_crops(scenes: Path) -> None:
    write_jpeg(scenes / "Images" / "office" / "unlisted.jpg", PALETTE[0])  # not in any list
    dm = ScenesDataModule(str(scenes), batch_size=3, num_workers=0)
    assert dm.classes == list(SCENES_CLASSES) and dm.num_classes == 3
    assert (dm.image_size, dm.resize_size, dm.train_crop) == (224, 256, "random")
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.uint8
    assert colour_labels(x) == y.tolist()
    xv, yv = dm.val_images(5)  # only 3 test images
    assert xv.shape == (3, 3, 224, 224) and yv.tolist() == [0, 1, 2] == colour_labels(xv)
    xf, _ = dm.on_after_batch_transfer((xv, yv), 0)
    assert xf.shape == (3, 3, 224, 224) and xf.dtype == torch.float32
    mean = torch.tensor(PALETTE[0]) / 255
    expected = (mean - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(xf[0].mean(dim=(1, 2)), expected, atol=0.1)


def test_cub_layout_labels_and_splits(cub: Path) -> None:
    dm = CUBDataModule(str(cub), **SMALL)
    assert dm.classes == list(CUB_CLASSES) and dm.num_classes == 3 and dm.crop_to_bbox
    dm.setup()
    assert dm.train_set.samples.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert dm.val_set.samples.labels.tolist() == [0, 1, 2]
    assert dm.train_set.samples.boxes.shape == (6, 4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and colour_labels(x) == y.tolist()
    # root may also be the folder holding CUB_200_2011/ (where the tarball was extracted)
    dm2 = CUBDataModule(str(cub.parent), **SMALL)
    dm2.setup()
    assert dm2.val_set.samples.path(0) == dm.val_set.samples.path(0)


def test_cub_bounding_box_crop(cub: Path) -> None:
    """Inside its box each image is its class colour, outside blue: cropping removes the blue."""
    cropped = CUBDataModule(str(cub), crop_to_bbox=True, **SMALL)
    whole = CUBDataModule(str(cub), crop_to_bbox=False, **SMALL)
    xc, yc = cropped.val_images(3)
    xw, yw = whole.val_images(3)
    assert torch.equal(yc, yw) and colour_labels(xc) == yc.tolist()
    assert blue_fraction(xc) < 0.01 and blue_fraction(xw) > 0.2
    assert whole.val_set.samples.boxes is None
    # training crops are taken inside the box too
    cropped.setup()
    x, _ = next(iter(cropped.train_dataloader()))
    assert blue_fraction(x) < 0.01
    # the raw box crop: the box (10, 8, 30, 24) of image 3 is exactly its size
    assert cropped.val_set.load(0).shape == (3, 24, 30)
    assert whole.val_set.load(0).shape == (3, 48, 64)


def test_subsets_are_seeded(imagenet: Path) -> None:
    def paths(seed: int) -> tuple[list[bytes], list[bytes]]:
        dm = ImageNetDataModule(str(imagenet), train_subset=4, val_subset=2, seed=seed, **SMALL)
        dm.setup()
        assert len(dm.train_set) == 4 and len(dm.val_set) == 2
        xv, yv = dm.val_images(2)
        assert colour_labels(xv) == yv.tolist() == sorted(dm.val_set.samples.labels.tolist())
        return list(dm.train_set.samples.paths), list(dm.val_set.samples.paths)

    assert paths(0) == paths(0) and paths(0) != paths(1)
    with pytest.raises(AtxError, match=r"data.train_subset=10 exceeds the 9 images"):
        ImageNetDataModule(str(imagenet), train_subset=10, **SMALL).setup()
    with pytest.raises(AtxError, match=r"data.val_subset must be a positive count"):
        ImageNetDataModule(str(imagenet), val_subset=0)


def test_workers_deliver_the_same_batches(scenes: Path) -> None:
    kwargs = {**SMALL, "num_workers": 1}
    dm = ScenesDataModule(str(scenes), **kwargs)
    dm.setup()
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.prefetch_factor == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. no pin_memory warning without CUDA
        warnings.simplefilter("error", DeprecationWarning)  # torchvision's io one is filtered
        x, y = next(iter(loader))
    assert torch.equal(x, dm.val_images(3)[0]) and y.tolist() == [0, 1, 2]


def test_decoders_agree(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path, PALETTE[2], box=(5, 5, 20, 20))
    tv, pil = read_image(str(path), "torchvision"), read_image(str(path), "pil")
    assert tv.shape == pil.shape == (3, 48, 64) and tv.dtype == pil.dtype == torch.uint8
    assert (tv.float() - pil.float()).abs().mean() < 2
    grey, png = tmp_path / "grey.jpg", tmp_path / "disguised.JPEG"
    Image.new("L", (10, 8), 77).save(grey)
    Image.new("RGB", (10, 8), (1, 2, 3)).save(png, format="PNG")  # ImageNet has such a file
    for decoder in ("torchvision", "pil"):
        assert read_image(str(grey), decoder).shape == (3, 8, 10)
        assert read_image(str(png), decoder)[:, 0, 0].tolist() == [1, 2, 3]


# --- unreadable images --------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_corrupt_image_is_an_error_naming_the_file(imagenet: Path, decoder: str) -> None:
    bad = imagenet / "val" / WNIDS[1] / "ILSVRC2012_val_10000.JPEG"
    _truncate(bad)
    dm = ImageNetDataModule(str(imagenet), decoder=decoder, **SMALL)
    dm.setup()  # scanning never opens images
    with pytest.raises(CorruptImageError, match=rf"cannot decode image '{bad}' \(.*\); replace"):
        list(dm.val_dataloader())
    garbage = imagenet / "val" / WNIDS[0] / "ILSVRC2012_val_00000.JPEG"
    garbage.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CorruptImageError, match=rf"cannot decode image '{garbage}'"):
        dm.val_images(1)


def test_corrupt_image_in_a_worker_is_one_line(imagenet: Path) -> None:
    bad = imagenet / "train" / WNIDS[2] / f"{WNIDS[2]}_1.JPEG"
    _truncate(bad)
    dm = ImageNetDataModule(str(imagenet), **{**SMALL, "num_workers": 1})
    dm.setup()
    with pytest.raises(AtxError) as info:
        list(dm.train_dataloader())
    message = str(info.value)
    # free the loader's iterator now: collected later in a reference cycle, torch's worker
    # shutdown waits its 5 s timeout
    info.value.__traceback__ = None
    del info
    assert "\n" not in message and message.startswith(f"cannot decode image '{bad}'")
    assert "truncated" in message.lower()


def test_skip_mode_replaces_counts_and_warns(imagenet: Path) -> None:
    bad = imagenet / "val" / WNIDS[0] / "ILSVRC2012_val_00001.JPEG"
    _truncate(bad)
    dm = ImageNetDataModule(str(imagenet), on_corrupt="skip", **SMALL)
    dm.setup()
    with pytest.warns(UserWarning, match=rf"skipped: cannot decode image '{bad}'"):
        x, y = dm.val_images(6)  # samples 0, 2, 4, 1, 3, 5 (spread over the classes)
    # sample 1 was replaced by sample 2 (the next one) with its own label, never a wrong one
    assert y.tolist() == [0, 1, 2, 1, 1, 2] and colour_labels(x) == y.tolist()
    assert dm.skipped_images == 1
    with pytest.warns(UserWarning, match="1 unreadable ImageNet images were skipped"):
        dm.teardown("fit")
    for f in (imagenet / "val").rglob("*.JPEG"):
        f.write_bytes(b"junk")
    with pytest.raises(CorruptImageError, match="17 unreadable images in a row"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm.val_images(1)


def test_too_many_pixels_is_refused(imagenet: Path) -> None:
    dm = ImageNetDataModule(str(imagenet), max_pixels=64 * 47, **SMALL)
    with pytest.raises(CorruptImageError, match=r"is 64x48 = 3072 pixels, above the limit of 3008"):
        dm.val_images(1)


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ImageNetDataModule, CUBDataModule, ScenesDataModule])
def test_missing_root(tmp_path: Path, cls: type) -> None:
    dm = cls(str(tmp_path / "nowhere"))
    with pytest.raises(AtxError, match=r"'.*nowhere' does not exist .*set data.root="):
        dm.num_classes  # noqa: B018
    with pytest.raises(AtxError, match="does not exist"):
        dm.setup()


def test_imagenet_split_errors(imagenet: Path) -> None:
    shutil.rmtree(imagenet / "val" / WNIDS[2])
    with pytest.raises(
        AtxError,
        match=rf"class folders differ .*only in train: \['{WNIDS[2]}'\], only in val: \[\]; ",
    ):
        ImageNetDataModule(str(imagenet), **SMALL).setup()
    (imagenet / "val" / "n09999999").mkdir()
    with pytest.raises(AtxError, match=rf"only in train: \['{WNIDS[2]}'\], only in val: \['n09"):
        ImageNetDataModule(str(imagenet), **SMALL).setup()
    shutil.rmtree(imagenet / "val")
    (imagenet / "val").mkdir()
    (imagenet / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(AtxError, match=r"no class folders in '.*val': .*valprep.sh"):
        ImageNetDataModule(str(imagenet), **SMALL).setup()
    shutil.rmtree(imagenet / "val")
    with pytest.raises(AtxError, match=r"split folder '.*/val' not found"):
        ImageNetDataModule(str(imagenet), **SMALL).setup()
    shutil.rmtree(imagenet / "train")
    with pytest.raises(AtxError, match=r"split folder '.*/train' not found"):
        ImageNetDataModule(str(imagenet), **SMALL).num_classes  # noqa: B018


def test_empty_class_folder(imagenet: Path, scenes: Path, cub: Path) -> None:
    for f in (imagenet / "train" / WNIDS[1]).iterdir():
        f.unlink()
    with pytest.raises(AtxError, match=rf"class folder '.*train/{WNIDS[1]}' has no images"):
        ImageNetDataModule(str(imagenet), **SMALL).setup()
    (scenes / "Images" / "gym").mkdir()
    with pytest.raises(AtxError, match=r"class folder '.*Images/gym' has no images"):
        ScenesDataModule(str(scenes), **SMALL).setup()
    shutil.rmtree(cub / "images" / CUB_CLASSES[2])
    (cub / "images" / CUB_CLASSES[2]).mkdir()
    with pytest.raises(AtxError, match=rf"class folder '.*{CUB_CLASSES[2]}' has no images"):
        CUBDataModule(str(cub), **SMALL).setup()


@pytest.mark.parametrize(
    "name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
)
def test_cub_missing_list_file(cub: Path, name: str) -> None:
    (cub / name).unlink()
    with pytest.raises(AtxError, match=rf"list file '.*/{name}' is missing; put the official"):
        CUBDataModule(str(cub), **SMALL).setup()


def test_cub_list_file_errors(cub: Path) -> None:
    (cub / "bounding_boxes.txt").unlink()
    CUBDataModule(str(cub), crop_to_bbox=False, **SMALL).setup()  # boxes not needed
    with pytest.raises(AtxError, match=r"'.*/bounding_boxes.txt' is missing"):
        CUBDataModule(str(cub), **SMALL).setup()
    write_cub(cub)  # restore
    lines = (cub / "images.txt").read_text().splitlines()
    lines[4] = "5 002.Laysan_Albatross/gone.jpg"
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        AtxError,
        match=r"'.*images.txt' line 5 names '002.Laysan_Albatross/gone.jpg', which does not "
        r"exist in '.*images'; restore the image",
    ):
        CUBDataModule(str(cub), **SMALL).setup()
    write_cub(cub)
    (cub / "image_class_labels.txt").write_text("1 2\n")
    with pytest.raises(AtxError, match=r"image_class_labels.txt' has no line for image id 2"):
        CUBDataModule(str(cub), **SMALL).setup()
    write_cub(cub)
    labels = (cub / "image_class_labels.txt").read_text().replace("1 1\n", "1 3\n", 1)
    (cub / "image_class_labels.txt").write_text(labels)
    with pytest.raises(AtxError, match=r"line 1 gives image '001.*' label 3, which is not its"):
        CUBDataModule(str(cub), **SMALL).setup()
    write_cub(cub)
    (cub / "bounding_boxes.txt").write_text("1 2 3\n")
    with pytest.raises(AtxError, match=r"bounding_boxes.txt' line 1 has 3 fields, expected 5"):
        CUBDataModule(str(cub), **SMALL).setup()


def test_scenes_list_file_errors(scenes: Path) -> None:
    (scenes / "TestImages.txt").unlink()
    with pytest.raises(AtxError, match=r"list file '.*/TestImages.txt' is missing"):
        ScenesDataModule(str(scenes), **SMALL).setup()
    write_scenes(scenes)
    with open(scenes / "TrainImages.txt", "a") as f:
        f.write("kitchen/int999.jpg\n")
    with pytest.raises(
        AtxError,
        match=r"TrainImages.txt' line 7 names 'kitchen/int999.jpg', which does not exist in "
        r"'.*Images'",
    ):
        ScenesDataModule(str(scenes), **SMALL).setup()
    write_scenes(scenes)
    with open(scenes / "TrainImages.txt", "a") as f:
        f.write("casino/int1.jpg\n")
    with pytest.raises(AtxError, match=r"names 'casino/int1.jpg', which is not in a class folder"):
        ScenesDataModule(str(scenes), **SMALL).setup()
    shutil.rmtree(scenes / "Images")
    with pytest.raises(AtxError, match=r"image folder '.*/Images' not found"):
        ScenesDataModule(str(scenes), **SMALL).setup()


def test_bad_options() -> None:
    with pytest.raises(AtxError, match=r"data.resize_size=200 is below data.image_size=224"):
        ImageNetDataModule("x", resize_size=200)
    with pytest.raises(AtxError, match=r"data.decoder='cv2' is unknown"):
        CUBDataModule("x", decoder="cv2")
    with pytest.raises(AtxError, match=r"data.on_corrupt='ignore' is unknown"):
        ScenesDataModule("x", on_corrupt="ignore")
    with pytest.raises(AtxError, match=r"data.train_crop='center' is unknown"):
        ScenesDataModule("x", train_crop="center")
