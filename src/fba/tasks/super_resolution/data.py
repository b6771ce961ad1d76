"""Super-resolution datasets: DIV2K folders, benchmark folders (Set5 style), built-in photos.

Every item is ``(lr, hr, index)`` with float32 images in [0, 1]:
- training items are aligned random patches, ``lr`` ``(3, p, p)`` and ``hr`` ``(3, p*s, p*s)``
  for a patch size ``p`` and scale ``s``, randomly flipped (horizontally, vertically) and
  transposed (a 90-degree rotation up to a flip) as in EDSR. Randomness comes from torch's
  global generator, so ``torch.manual_seed`` makes a run reproducible (DataLoader workers
  are seeded from it too). An epoch is ``patches_per_epoch`` items and item ``i`` is cut
  from image ``i % num_images`` (EDSR's "repeat"), so a shuffled epoch visits every image
  equally often;
- validation items are whole images: HR cropped (top-left) to a multiple of ``s`` and LR
  of exactly ``HR / s``, optionally centre-cropped to at most ``eval_crop`` HR pixels a side
  (a multiple of ``s``, cut on the LR grid so both stay aligned) to keep CPU evaluation
  fast. ``val_set.names[i]`` is the image's name (file stem) for writing outputs.

Builders (registry :data:`SR_DATASETS`), all called as
``builder(root, scale, patch_size=48, augment=True, patches_per_epoch=1600, eval_crop=None,
download=False, **ignored) -> (train_set, val_set, SRDataInfo)``:

- ``div2k``: ``root/DIV2K_train_HR/0001.png``..``0800.png`` with
  ``root/DIV2K_train_LR_bicubic/X{s}/0001x{s}.png``; validation ``root/DIV2K_valid_HR/0801.png``..
  ``0900.png`` with ``root/DIV2K_valid_LR_bicubic/X{s}/0801x{s}.png``, or, as the EDSR code
  arranges it, 0801-0900 inside the training folders. ``root/DIV2K/...`` is accepted too. The
  image ids found on disk are used. Images are decoded on access; ``cache_size`` decoded
  pairs (default 8) are kept per process. fba cannot download DIV2K.
- ``benchmark``: validation only, returns ``(None, val_set, info)``. ``root`` holds HR images
  (png/jpg/bmp/tif) directly, or ``root/HR/baby.png`` with ``root/LR_bicubic/X{s}/babyx{s}.png``
  (the EDSR benchmark layout). Without LR files, LR is made by :func:`bicubic_downscale`.
- ``photos-sr``: built in and offline. HR images are the photos bundled with scikit-image
  and scikit-learn, cropped to a multiple of ``s``, LR made by :func:`bicubic_downscale`;
  all are held in memory. Train and validation photos are disjoint:

  ===========  ===================================================================
  train (12)   astronaut 512x512, coffee 400x600, rocket 427x640, flower 427x640
               (scikit-learn), hubble_deep_field 872x1000, retina 1411x1411,
               immunohistochemistry 512x512, camera 512x512 (grey), brick 512x512
               (grey), grass 512x512 (grey), gravel 512x512 (grey), coins 303x384 (grey)
  val (3)      chelsea 300x451 (a cat: fur, whiskers), china 427x640 (scikit-learn:
               a temple among trees), stereo_motorcycle left view 500x741 (metal, text)
  ===========  ===================================================================

  (sizes H x W before cropping to a multiple of ``s``; grey photos are repeated to RGB.)
  ``eval_crop`` defaults to None (whole images); the default CPU config passes 256.

Helpers: :func:`bicubic_downscale` (the LR degradation), :func:`bicubic_upscale` (the
bicubic baseline), :func:`read_image`, :func:`read_image_folder` (for ``fba eval`` on a
folder of LR images) and :func:`save_image`.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fba.errors import ConfigError, DataError
from fba.registry import Registry
from fba.tasks.image_files import IMAGE_SUFFIXES, image_size, list_images, read_image

__all__ = [
    "SRDataInfo", "SR_DATASETS", "SRTrainPatches", "SRValImages", "SRPairs", "bicubic_downscale",
    "bicubic_upscale", "read_image", "read_image_folder", "save_image", "PHOTOS_SR_TRAIN", "PHOTOS_SR_VAL",
]

DEFAULT_PATCHES_PER_EPOCH = 1600  # 100 batches of 16, EDSR's batch size

PHOTOS_SR_TRAIN = ("astronaut", "coffee", "rocket", "flower", "hubble_deep_field", "retina",
                   "immunohistochemistry", "camera", "brick", "grass", "gravel", "coins")
PHOTOS_SR_VAL = ("chelsea", "china", "stereo_motorcycle")


@dataclass(frozen=True)
class SRDataInfo:
    """What the task and model need to know about an SR dataset."""

    scale: int
    in_channels: int
    num_train: int  #: items per training epoch (= patches_per_epoch), 0 without a train set
    num_train_images: int
    num_val_images: int


#: name -> ``builder(root, scale, patch_size, augment, patches_per_epoch, eval_crop, download, **ignored)``
#: returning ``(train_set or None, val_set, SRDataInfo)``.
SR_DATASETS: Registry[Callable[..., tuple[Any, Any, SRDataInfo]]] = Registry("dataset")


# --------------------------------------------------------------------------- resampling

def _to_unit_float(image: Tensor) -> Tensor:
    """float32 in [0, 1]; uint8 images are taken to be on 0..255."""
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


def _as_batch(image: Tensor, scale: int, name: str) -> tuple[Tensor, bool]:
    if not isinstance(scale, numbers.Integral) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"{name}: scale must be a positive int, got {scale!r}")
    if image.dim() == 3:
        return image[None], True
    if image.dim() == 4:
        return image, False
    raise ValueError(f"{name}: expected a (C, H, W) or (N, C, H, W) image, got shape {tuple(image.shape)}")


def bicubic_downscale(hr: Tensor, scale: int) -> Tensor:
    """The LR degradation: antialiased bicubic downscaling, rounded to 8-bit levels.

    ``hr``: ``(3, H, W)`` or ``(N, 3, H, W)``, float in [0, 1] (uint8 0..255 is accepted) ->
    float32 ``(..., H // scale, W // scale)`` in [0, 1] on 8-bit levels, as the LR would be
    after saving it as a PNG. HR is first cropped (top-left) to a multiple of ``scale`` so the
    sampling grid is exactly ``scale`` HR pixels per LR pixel, the standard HR/LR pairing.
    """
    x, single = _as_batch(_to_unit_float(hr), scale, "bicubic_downscale")
    height, width = (x.shape[-2] // scale) * scale, (x.shape[-1] // scale) * scale
    if height == 0 or width == 0:
        raise ValueError(f"bicubic_downscale: image of {x.shape[-2]}x{x.shape[-1]} is smaller than the scale {scale}")
    x = x[..., :height, :width]
    lr = F.interpolate(x, size=(height // scale, width // scale), mode="bicubic", antialias=True, align_corners=False)
    lr = (lr.clamp(0, 1) * 255).round() / 255
    return lr[0] if single else lr


def bicubic_upscale(lr: Tensor, scale: int) -> Tensor:
    """Plain bicubic upsampling (the bicubic baseline): ``(..., H, W)`` -> ``(..., H*s, W*s)`` in [0, 1].

    ``lr``: ``(3, H, W)`` or ``(N, 3, H, W)`` float in [0, 1]; the output is clamped, not rounded
    (the metrics round).
    """
    x, single = _as_batch(_to_unit_float(lr), scale, "bicubic_upscale")
    sr = F.interpolate(x, size=(x.shape[-2] * scale, x.shape[-1] * scale), mode="bicubic",
                       align_corners=False).clamp(0, 1)
    return sr[0] if single else sr


# --------------------------------------------------------------------------- image files

# --------------------------------------------------------------------------- datasets

ImageSource = Union[Path, Tensor]  # a file to decode, or a uint8 (3, H, W) tensor in memory


@dataclass(frozen=True)
class _Pair:
    name: str
    hr: ImageSource
    lr: ImageSource | None  # None: made from HR by bicubic_downscale


def _check_sizes(pair: _Pair, hr_size: tuple[int, int], lr_size: tuple[int, int], scale: int) -> None:
    wanted = (hr_size[0] // scale, hr_size[1] // scale)
    if lr_size != wanted:
        lr_name = pair.lr if isinstance(pair.lr, Path) else f"the LR of {pair.name}"
        raise DataError(f"{lr_name}: LR image is {lr_size[1]}x{lr_size[0]} (WxH) but its HR "
                        f"{pair.hr if isinstance(pair.hr, Path) else pair.name} is {hr_size[1]}x{hr_size[0]}, "
                        f"so x{scale} LR must be {wanted[1]}x{wanted[0]}")
    if min(wanted) == 0:
        raise DataError(f"{pair.hr if isinstance(pair.hr, Path) else pair.name}: image of {hr_size[1]}x{hr_size[0]} "
                        f"is smaller than the scale {scale}")


def _size_of(source: ImageSource) -> tuple[int, int]:
    return image_size(source) if isinstance(source, Path) else (source.shape[-2], source.shape[-1])


class SRPairs:
    """Aligned uint8 LR/HR image pairs, decoded lazily with a small per-process LRU cache.

    ``pair(i)`` -> ``(lr (3, h, w), hr (3, h*s, w*s))`` uint8; HR is cropped top-left to a
    multiple of ``s``. Sizes of files are checked from their headers when built, so a
    mismatched pair fails before training starts.
    """

    def __init__(self, pairs: Sequence[_Pair], scale: int, cache_size: int = 8, check: bool = True) -> None:
        self.pairs = list(pairs)
        self.scale = int(scale)
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        if check:
            for pair in self.pairs:
                hr_size = _size_of(pair.hr)
                lr_size = _size_of(pair.lr) if pair.lr is not None else (hr_size[0] // scale, hr_size[1] // scale)
                _check_sizes(pair, hr_size, lr_size, scale)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def names(self) -> list[str]:
        return [pair.name for pair in self.pairs]

    def describe(self, index: int) -> str:
        """The file (or built-in name) of pair ``index``, for error messages."""
        hr = self.pairs[index].hr
        return str(hr) if isinstance(hr, Path) else self.pairs[index].name

    def pair(self, index: int) -> tuple[Tensor, Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        spec = self.pairs[index]
        hr = read_image(spec.hr) if isinstance(spec.hr, Path) else spec.hr
        if spec.lr is None:
            lr = (bicubic_downscale(hr, self.scale) * 255).round().to(torch.uint8)
        else:
            lr = read_image(spec.lr) if isinstance(spec.lr, Path) else spec.lr
        # Re-check on the decoded pixels: cheap, and catches files changed after building.
        _check_sizes(spec, tuple(hr.shape[-2:]), tuple(lr.shape[-2:]), self.scale)  # type: ignore[arg-type]
        hr = hr[:, : lr.shape[-2] * self.scale, : lr.shape[-1] * self.scale]
        if self.cache_size:
            self._cache[index] = (lr, hr)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return lr, hr


class SRTrainPatches(Dataset):
    """Random aligned patches: item ``i`` -> ``(lr (3, p, p), hr (3, p*s, p*s), i)`` float32 in [0, 1].

    The epoch has ``length`` items; item ``i`` comes from image ``i % num_images``.
    """

    def __init__(self, pairs: SRPairs, patch_size: int, augment: bool, length: int) -> None:
        self.pairs, self.patch_size, self.augment, self.length = pairs, patch_size, augment, length
        self.scale = pairs.scale

    def __len__(self) -> int:
        return self.length

    @property
    def num_images(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"patch index {index} out of range for {self.length} patches per epoch")
        image = index % len(self.pairs)
        lr, hr = self.pairs.pair(image)
        p, s = self.patch_size, self.scale
        height, width = lr.shape[-2:]
        if height < p or width < p:
            raise DataError(f"{self.pairs.describe(image)}: LR image of {width}x{height} is smaller than "
                            f"the {p}x{p} training patch (lower data.patch_size)")
        y = int(torch.randint(0, height - p + 1, ()).item())
        x = int(torch.randint(0, width - p + 1, ()).item())
        lr = lr[:, y:y + p, x:x + p]
        hr = hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
        if self.augment:
            hflip, vflip, rot90 = torch.randint(0, 2, (3,)).tolist()
            # The same flips/transpose on both keep the pair aligned; the 8 results are the
            # dihedral group of the square, EDSR's augmentation.
            if hflip:
                lr, hr = lr.flip(-1), hr.flip(-1)
            if vflip:
                lr, hr = lr.flip(-2), hr.flip(-2)
            if rot90:
                lr, hr = lr.transpose(-2, -1), hr.transpose(-2, -1)
        return lr.float().div(255).contiguous(), hr.float().div(255).contiguous(), index


class SRValImages(Dataset):
    """Whole validation images: item ``i`` -> ``(lr (3, h, w), hr (3, h*s, w*s), i)`` float32 in [0, 1].

    With ``eval_crop`` the pair is centre-cropped on the LR grid so HR is at most
    ``eval_crop`` (rounded down to a multiple of ``s``) pixels a side. ``names[i]`` is the
    image's name.
    """

    def __init__(self, pairs: SRPairs, eval_crop: int | None = None) -> None:
        self.pairs, self.eval_crop, self.scale = pairs, eval_crop, pairs.scale

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def names(self) -> list[str]:
        return self.pairs.names

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"image index {index} out of range for {len(self.pairs)} validation images")
        lr, hr = self.pairs.pair(index)
        if self.eval_crop:
            s, side = self.scale, self.eval_crop // self.scale
            height, width = lr.shape[-2:]
            ch, cw = min(height, side), min(width, side)
            y, x = (height - ch) // 2, (width - cw) // 2
            lr = lr[:, y:y + ch, x:x + cw]
            hr = hr[:, y * s:(y + ch) * s, x * s:(x + cw) * s]
        return lr.float().div(255).contiguous(), hr.float().div(255).contiguous(), index


# --------------------------------------------------------------------------- builders

def _check_args(scale: Any, patch_size: Any, patches_per_epoch: Any, eval_crop: Any) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    if not positive_int(scale):
        raise ConfigError(f"scale must be a positive integer (2, 3, 4, ...), got {scale!r}")
    if not positive_int(patch_size):
        raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
    if not positive_int(patches_per_epoch):
        raise ConfigError(f"patches_per_epoch must be a positive integer, got {patches_per_epoch!r}")
    if eval_crop is not None and not (positive_int(eval_crop) and eval_crop >= scale):
        raise ConfigError(f"eval_crop must be None or an integer >= scale ({scale}), got {eval_crop!r}")


def _lr_lookup(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in list_images(folder)}


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DataError(f"folder {path} not found; expected {layout}")


def _div2k_pairs(hr_dir: Path, lr_dir: Path, ids: range, scale: int) -> list[_Pair]:
    lr_files = _lr_lookup(lr_dir)
    pairs = []
    for hr in list_images(hr_dir):
        if not (hr.stem.isdigit() and int(hr.stem) in ids):
            continue
        lr = lr_files.get(f"{hr.stem}x{scale}")
        if lr is None:
            raise DataError(f"LR image {lr_dir / f'{hr.stem}x{scale}.png'} for {hr} not found")
        pairs.append(_Pair(hr.stem, hr, lr))
    return pairs


@SR_DATASETS.register("div2k")
def div2k(root: str = "./data", scale: int = 2, patch_size: int = 48, augment: bool = True,
          patches_per_epoch: int = DEFAULT_PATCHES_PER_EPOCH, eval_crop: int | None = None,
          download: bool = False, cache_size: int = 8, **_: Any) -> tuple[SRTrainPatches, SRValImages, SRDataInfo]:
    """DIV2K: train on 0001-0800, validate on 0801-0900 (see the module docstring for the layout)."""
    _check_args(scale, patch_size, patches_per_epoch, eval_crop)
    if download:
        raise DataError("fba cannot download DIV2K (it runs offline): fetch DIV2K_train_HR, DIV2K_train_LR_bicubic, "
                        "DIV2K_valid_HR and DIV2K_valid_LR_bicubic from https://data.vision.ee.ethz.ch/cvl/DIV2K/, "
                        "unzip them into one folder and set data.root to it (and data.download=false)")
    base = Path("./data" if root is None else root)
    if not (base / "DIV2K_train_HR").is_dir() and (base / "DIV2K" / "DIV2K_train_HR").is_dir():
        base = base / "DIV2K"  # EDSR's data layout: <dir_data>/DIV2K/DIV2K_train_HR
    layout = (f"{base}/DIV2K_train_HR/0001.png..0800.png, {base}/DIV2K_train_LR_bicubic/X{scale}/0001x{scale}.png.., "
              f"{base}/DIV2K_valid_HR/0801.png..0900.png and {base}/DIV2K_valid_LR_bicubic/X{scale}/0801x{scale}.png..")
    train_hr, train_lr = base / "DIV2K_train_HR", base / "DIV2K_train_LR_bicubic" / f"X{scale}"
    _require_dir(train_hr, layout)
    _require_dir(train_lr, layout)
    train_pairs = _div2k_pairs(train_hr, train_lr, range(1, 801), scale)
    if not train_pairs:
        raise DataError(f"no training images 0001-0800 in {train_hr}; expected {layout}")
    valid_hr, valid_lr = base / "DIV2K_valid_HR", base / "DIV2K_valid_LR_bicubic" / f"X{scale}"
    if valid_hr.is_dir():
        _require_dir(valid_lr, layout)
        val_pairs = _div2k_pairs(valid_hr, valid_lr, range(801, 901), scale)
    else:  # EDSR puts 0801-0900 next to the training images
        val_pairs = _div2k_pairs(train_hr, train_lr, range(801, 901), scale)
    if not val_pairs:
        raise DataError(f"no validation images 0801-0900 in {valid_hr} or {train_hr}; expected {layout}")
    train = SRTrainPatches(SRPairs(train_pairs, scale, cache_size), patch_size, augment, patches_per_epoch)
    val = SRValImages(SRPairs(val_pairs, scale, cache_size), eval_crop)
    return train, val, SRDataInfo(scale, 3, len(train), len(train_pairs), len(val_pairs))


@SR_DATASETS.register("benchmark")
def benchmark(root: str = "./data/benchmark/Set5", scale: int = 2, patch_size: int = 48, augment: bool = True,
              patches_per_epoch: int = DEFAULT_PATCHES_PER_EPOCH, eval_crop: int | None = None,
              download: bool = False, cache_size: int = 0, **_: Any) -> tuple[None, SRValImages, SRDataInfo]:
    """A validation-only folder (Set5, Set14, B100, Urban100, ...): returns ``(None, val_set, info)``."""
    _check_args(scale, patch_size, patches_per_epoch, eval_crop)
    folder = Path("./data/benchmark/Set5" if root is None else root)
    if download:
        raise DataError(f"fba cannot download benchmark sets (it runs offline): put the images in {folder} "
                        f"(or HR/ and LR_bicubic/X{scale}/ there) and set data.download=false")
    layout = f"HR images in {folder}, or {folder}/HR/<name>.png with {folder}/LR_bicubic/X{scale}/<name>x{scale}.png"
    _require_dir(folder, layout)
    hr_dir = folder / "HR" if (folder / "HR").is_dir() else folder
    lr_dir: Path | None = None
    if hr_dir != folder and (folder / "LR_bicubic").is_dir():
        lr_dir = folder / "LR_bicubic" / f"X{scale}"
        if not lr_dir.is_dir():
            warnings.warn(f"{lr_dir} not found: making x{scale} LR images by bicubic downscaling of {hr_dir}",
                          stacklevel=2)
            lr_dir = None
    hr_files = list_images(hr_dir)
    if not hr_files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {hr_dir}; expected {layout}")
    lr_files = _lr_lookup(lr_dir) if lr_dir is not None else {}
    pairs = []
    for hr in hr_files:
        lr = None
        if lr_dir is not None:
            lr = lr_files.get(f"{hr.stem}x{scale}")
            if lr is None:
                raise DataError(f"LR image {lr_dir / f'{hr.stem}x{scale}.png'} for {hr} not found")
        pairs.append(_Pair(hr.stem, hr, lr))
    val = SRValImages(SRPairs(pairs, scale, cache_size), eval_crop)
    return None, val, SRDataInfo(scale, 3, 0, 0, len(pairs))


@functools.lru_cache(maxsize=1)
def _bundled_photos() -> dict[str, Tensor]:
    """The built-in photos as uint8 ``(3, H, W)``, grey ones repeated to RGB (loaded once per process)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in PHOTOS_SR_TRAIN + PHOTOS_SR_VAL:
        if name in ("china", "flower"):
            continue
        image = getattr(skdata, name)()
        if isinstance(image, tuple):  # stereo pairs: the left view
            image = image[0]
        photos[name] = image
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        photos[Path(filename).stem] = image
    out = {}
    for name, image in photos.items():
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out[name] = torch.from_numpy(np.array(image[..., :3], dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return out


def _photo_pairs(names: Sequence[str], scale: int) -> list[_Pair]:
    photos = _bundled_photos()
    pairs = []
    for name in names:
        hr = photos[name]
        hr = hr[:, : hr.shape[-2] // scale * scale, : hr.shape[-1] // scale * scale]
        lr = (bicubic_downscale(hr, scale) * 255).round().to(torch.uint8)
        pairs.append(_Pair(name, hr, lr))
    return pairs


@SR_DATASETS.register("photos-sr")
def photos_sr(root: str = "", scale: int = 2, patch_size: int = 48, augment: bool = True,
              patches_per_epoch: int = DEFAULT_PATCHES_PER_EPOCH, eval_crop: int | None = None,
              download: bool = False, **_: Any) -> tuple[SRTrainPatches, SRValImages, SRDataInfo]:
    """Built-in offline SR set: 12 train / 3 validation photos (module docstring); ``root`` and ``download`` are ignored."""
    _check_args(scale, patch_size, patches_per_epoch, eval_crop)
    train_pairs, val_pairs = _photo_pairs(PHOTOS_SR_TRAIN, scale), _photo_pairs(PHOTOS_SR_VAL, scale)
    # In memory already: no decode cache needed.
    train = SRTrainPatches(SRPairs(train_pairs, scale, cache_size=0), patch_size, augment, patches_per_epoch)
    val = SRValImages(SRPairs(val_pairs, scale, cache_size=0), eval_crop)
    return train, val, SRDataInfo(scale, 3, len(train), len(train_pairs), len(val_pairs))
