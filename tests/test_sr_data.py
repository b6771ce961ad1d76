"""SR datasets on tiny fixtures written as real PNGs in the DIV2K and Set5 layouts, and photos-sr."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fba.errors import ConfigError, DataError
from fba.tasks.image_files import read_image, read_image_folder, save_image
from fba.tasks.super_resolution.data import (
    PHOTOS_SR_TRAIN, PHOTOS_SR_VAL, SR_DATASETS, bicubic_downscale, bicubic_upscale,
)


def _write(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _blocky_pair(seed: int, lr_h: int, lr_w: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Random LR and its nearest-neighbour HR: every HR s x s block is one LR pixel, so any
    misaligned crop or an augmentation applied to only one side is visible exactly."""
    lr = np.random.RandomState(seed).randint(0, 256, (lr_h, lr_w, 3), dtype=np.uint8)
    return lr, lr.repeat(scale, axis=0).repeat(scale, axis=1)


def _nearest_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr[None], scale_factor=scale, mode="nearest")[0]


def _div2k(root, scale=2, train_ids=(1, 2), val_ids=(801,), size=20, edsr_layout=False):
    """DIV2K layout with size x size LR images and their blocky HR (plus one odd HR row/column)."""
    for i in train_ids + val_ids:
        lr, hr = _blocky_pair(i, size, size, scale)
        hr = np.pad(hr, ((0, 1), (0, 1), (0, 0)))  # not a multiple of scale: cropped away
        split = "train" if i <= 800 or edsr_layout else "valid"
        _write(root / f"DIV2K_{split}_HR" / f"{i:04d}.png", hr)
        _write(root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}" / f"{i:04d}x{scale}.png", lr)


def test_div2k_fixture_patches_are_aligned_and_augmented_consistently(tmp_path):
    _div2k(tmp_path, scale=2)
    train, val, info = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2, patch_size=8, patches_per_epoch=40)
    assert (info.scale, info.in_channels, info.num_train, info.num_train_images, info.num_val_images) == (2, 3, 40, 2, 1)
    assert len(train) == 40 and len(val) == 1 and val.names == ["0801"]
    lr_images = [torch.from_numpy(_blocky_pair(i, 20, 20, 2)[0]).permute(2, 0, 1).float() / 255 for i in (1, 2)]
    seen = set()
    for i in range(40):
        lr, hr, index = train[i]
        assert index == i and lr.dtype == torch.float32 and lr.shape == (3, 8, 8) and hr.shape == (3, 16, 16)
        assert 0 <= lr.min() and lr.max() <= 1
        assert torch.equal(_nearest_up(lr, 2), hr)  # aligned, and the same flips/rotation on both
        # The patch is (a flipped/transposed copy of) a window of image i % 2, never of the other.
        source = lr_images[i % 2]
        windows = source.unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 8, 8)
        variants = [lr, lr.flip(-1), lr.flip(-2), lr.flip(-1).flip(-2)]
        variants += [v.transpose(-2, -1) for v in variants]
        matches = [k for k, v in enumerate(variants) if (windows == v).flatten(1).all(1).any()]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 2  # several of the 8 dihedral transforms occur


def test_div2k_patches_are_reproducible_with_torch_seed_and_plain_without_augment(tmp_path):
    _div2k(tmp_path, scale=3, size=12)
    train, _, _ = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=3, patch_size=5, patches_per_epoch=6)
    def epoch(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(train, batch_size=3, shuffle=True, num_workers=0)
        return [t for batch in loader for t in batch]

    first = epoch(7)
    lr, hr, index = first[:3]
    assert lr.shape == (3, 3, 5, 5) and hr.shape == (3, 3, 15, 15)
    assert sorted(index.tolist() + first[5].tolist()) == list(range(6))
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(7)))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch(8)))

    plain, _, _ = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=3, patch_size=12, augment=False,
                                           patches_per_epoch=2)
    source = torch.from_numpy(_blocky_pair(1, 12, 12, 3)[0]).permute(2, 0, 1).float() / 255
    assert torch.equal(plain[0][0], source)  # whole image as the patch: no flip, no rotation


def test_div2k_validation_images_are_whole_or_centre_cropped(tmp_path):
    _div2k(tmp_path, scale=2, val_ids=(801, 802))
    _, val, info = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2)
    assert info.num_val_images == 2 and val.names == ["0801", "0802"]
    lr, hr, index = val[1]
    assert index == 1 and lr.shape == (3, 20, 20) and hr.shape == (3, 40, 40)  # HR 41x41 cropped to 2 x LR
    assert torch.equal(_nearest_up(lr, 2), hr)
    _, cropped, _ = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2, eval_crop=13)
    lr_c, hr_c, _ = cropped[1]
    assert lr_c.shape == (3, 6, 6) and hr_c.shape == (3, 12, 12)  # at most 13, a multiple of 2
    assert torch.equal(lr_c, lr[:, 7:13, 7:13]) and torch.equal(hr_c, hr[:, 14:26, 14:26])


def test_div2k_edsr_layout_and_nested_root(tmp_path):
    # EDSR keeps 0801-0900 in the training folders, under <dir_data>/DIV2K.
    _div2k(tmp_path / "DIV2K", scale=4, size=6, train_ids=(1, 2, 3), val_ids=(801, 900), edsr_layout=True)
    train, val, info = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=4, patch_size=4, patches_per_epoch=9)
    assert (info.num_train_images, info.num_val_images, len(train)) == (3, 2, 9)
    assert val.names == ["0801", "0900"]
    assert train[5][1].shape == (3, 16, 16) and val[1][1].shape == (3, 24, 24)


def test_div2k_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError, match="cannot download DIV2K"):
        SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2, download=True)


def test_div2k_missing_folders_name_the_path(tmp_path):
    with pytest.raises(DataError) as error:
        SR_DATASETS.get("div2k")(root=str(tmp_path / "nowhere"), scale=2)
    assert str(tmp_path / "nowhere" / "DIV2K_train_HR") in str(error.value) and "0001x2.png" in str(error.value)
    _div2k(tmp_path, scale=2)
    with pytest.raises(DataError) as error:  # X3 LR images were never made
        SR_DATASETS.get("div2k")(root=str(tmp_path), scale=3)
    assert str(tmp_path / "DIV2K_train_LR_bicubic" / "X3") in str(error.value)
    (tmp_path / "DIV2K_valid_LR_bicubic" / "X2" / "0801x2.png").unlink()
    with pytest.raises(DataError, match="0801x2.png"):
        SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2)


def test_corrupt_png_is_a_data_error_naming_the_file(tmp_path):
    _div2k(tmp_path, scale=2)
    bad = tmp_path / "DIV2K_train_HR" / "0002.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError) as error:
        SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    # A truncated file has a valid header, so it fails when decoded, still naming the file.
    _div2k(tmp_path, scale=2)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    train, _, _ = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2, patch_size=4, patches_per_epoch=4)
    train[0]
    with pytest.raises(DataError, match=str(bad)):
        train[1]


def test_lr_hr_size_mismatch_names_the_file(tmp_path):
    _div2k(tmp_path, scale=2)
    wrong = tmp_path / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png"
    _write(wrong, np.zeros((20, 19, 3), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2)
    assert str(wrong) in str(error.value) and "19x20" in str(error.value)


def test_patch_larger_than_image_is_a_clear_error(tmp_path):
    _div2k(tmp_path, scale=2, size=10)
    train, _, _ = SR_DATASETS.get("div2k")(root=str(tmp_path), scale=2, patch_size=48, patches_per_epoch=2)
    with pytest.raises(DataError, match="smaller than the 48x48 training patch"):
        train[0]


def test_bad_arguments_are_config_errors(tmp_path):
    for kwargs in ({"scale": 0}, {"patch_size": -1}, {"patches_per_epoch": 0}, {"scale": 4, "eval_crop": 3}):
        with pytest.raises(ConfigError):
            SR_DATASETS.get("photos-sr")(**{"scale": 2, **kwargs})


def test_benchmark_set5_layout(tmp_path):
    for name, seed in (("baby", 1), ("bird", 2)):
        lr, hr = _blocky_pair(seed, 9, 7, 3)
        _write(tmp_path / "Set5" / "HR" / f"{name}.png", hr)
        _write(tmp_path / "Set5" / "LR_bicubic" / "X3" / f"{name}x3.png", lr)
    train, val, info = SR_DATASETS.get("benchmark")(root=str(tmp_path / "Set5"), scale=3, unused_option=1)
    assert train is None and (info.num_train, info.num_val_images) == (0, 2) and val.names == ["baby", "bird"]
    lr, hr, index = val[0]
    assert lr.shape == (3, 9, 7) and hr.shape == (3, 27, 21) and torch.equal(_nearest_up(lr, 3), hr)
    with pytest.warns(UserWarning, match="X2 not found"):  # only X3 LR files: x2 LR made by bicubic
        _, val2, _ = SR_DATASETS.get("benchmark")(root=str(tmp_path / "Set5"), scale=2)
    assert val2[1][0].shape == (3, 13, 10)
    (tmp_path / "Set5" / "LR_bicubic" / "X3" / "birdx3.png").unlink()
    with pytest.raises(DataError, match="birdx3.png"):
        SR_DATASETS.get("benchmark")(root=str(tmp_path / "Set5"), scale=3)


def test_benchmark_hr_only_folder_makes_lr_by_bicubic(tmp_path):
    rng = np.random.RandomState(0)
    hr = rng.randint(0, 256, (41, 37, 3), dtype=np.uint8)
    _write(tmp_path / "head.png", hr)
    _write(tmp_path / "zebra.bmp", hr[::-1])
    (tmp_path / "notes.txt").write_text("not an image")
    _, val, info = SR_DATASETS.get("benchmark")(root=str(tmp_path), scale=3)
    assert val.names == ["head", "zebra"] and info.num_val_images == 2
    lr_t, hr_t, _ = val[0]
    expected_hr = torch.from_numpy(hr).permute(2, 0, 1).float()[:, :39, :36] / 255
    assert torch.equal(hr_t, expected_hr) and lr_t.shape == (3, 13, 12)
    assert torch.equal(lr_t, bicubic_downscale(expected_hr, 3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        SR_DATASETS.get("benchmark")(root=str(tmp_path / "empty"), scale=2)


def test_bicubic_downscale_and_upscale():
    hr = torch.rand(3, 30, 25)
    lr = bicubic_downscale(hr, 4)
    assert lr.shape == (3, 7, 6) and lr.dtype == torch.float32
    assert torch.equal(lr, (lr * 255).round() / 255) and 0 <= lr.min() and lr.max() <= 1  # on 8-bit levels
    direct = F.interpolate(hr[None, :, :28, :24], size=(7, 6), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(lr, ((direct.clamp(0, 1) * 255).round() / 255)[0])
    assert bicubic_downscale(hr[None].repeat(2, 1, 1, 1), 2).shape == (2, 3, 15, 12)
    assert torch.equal(bicubic_downscale((hr * 255).round().to(torch.uint8), 4), bicubic_downscale((hr * 255).round() / 255, 4))
    up = bicubic_upscale(lr, 4)
    assert up.shape == (3, 28, 24) and 0 <= up.min() and up.max() <= 1
    flat = torch.full((3, 5, 5), 0.5)
    assert torch.allclose(bicubic_upscale(flat, 3), torch.full((3, 15, 15), 0.5))


def test_read_image_folder_and_save_image(tmp_path):
    image = torch.rand(3, 6, 9)
    save_image(image, tmp_path / "out" / "b.png")
    _write(tmp_path / "out" / "a.jpg", np.zeros((4, 5), dtype=np.uint8))  # grey: converted to RGB
    items = read_image_folder(tmp_path / "out")
    assert [name for name, _ in items] == ["a", "b"] and items[0][1].shape == (3, 4, 5)
    assert torch.equal(items[1][1], (image * 255).round() / 255)
    assert read_image(tmp_path / "out" / "b.png").dtype == torch.uint8
    with pytest.raises(DataError, match="not found"):
        read_image_folder(tmp_path / "missing")


@pytest.fixture(scope="module")
def photos():
    return {s: SR_DATASETS.get("photos-sr")(scale=s, patch_size=16, patches_per_epoch=30) for s in (2, 3, 4)}


def test_photos_sr_splits_are_disjoint_and_sized_by_scale(photos):
    assert not set(PHOTOS_SR_TRAIN) & set(PHOTOS_SR_VAL)
    for s, (train, val, info) in photos.items():
        assert (info.scale, info.num_train, info.num_train_images) == (s, 30, len(PHOTOS_SR_TRAIN))
        assert info.num_val_images == len(val) == len(PHOTOS_SR_VAL) and val.names == list(PHOTOS_SR_VAL)
        train_hr = {tuple(p.hr.shape) for p in train.pairs.pairs}
        for i in range(len(val)):
            lr, hr, _ = val[i]
            assert hr.shape[-2] % s == 0 and hr.shape[-1] % s == 0 and hr.shape[-2:] == (lr.shape[-2] * s, lr.shape[-1] * s)
            assert lr.std() > 0.05  # natural content, not flat
        for p in train.pairs.pairs:
            assert p.hr.shape[-2] % s == 0 and p.hr.shape[-1] % s == 0
        assert len(train_hr) > 1
        lr, hr, index = train[29]
        assert lr.shape == (3, 16, 16) and hr.shape == (3, 16 * s, 16 * s) and index == 29
    # No photo is used on both sides, even under another name (chelsea is also skimage's cat).
    train, val, _ = photos[2]
    val_pixels = {val.pairs.pair(i)[1][:, :8, :8].numpy().tobytes() for i in range(len(val))}
    assert not val_pixels & {train.pairs.pair(i)[1][:, :8, :8].numpy().tobytes() for i in range(len(train.pairs))}


def test_photos_sr_lr_is_bicubic_of_hr_and_eval_crop(photos):
    _, val, _ = photos[3]
    lr, hr, _ = val[0]  # chelsea, 300x451 -> 300x450
    assert hr.shape == (3, 300, 450) and torch.equal(lr, bicubic_downscale(hr, 3))
    _, cropped, _ = SR_DATASETS.get("photos-sr")(scale=3, eval_crop=256)
    for i in range(len(cropped)):
        lr_c, hr_c, _ = cropped[i]
        assert hr_c.shape == (3, 255, 255) and lr_c.shape == (3, 85, 85)
