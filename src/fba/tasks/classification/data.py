"""Classification datasets: built-in offline sets, torchvision sets, ImageNet folders.

Every dataset yields ``(image, label, index)``; the index feeds the long-term bank.

Built-in (no files, no network; DESIGN section 7):
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits, 1 channel, a fixed stratified
  80/20 split.
- ``patches``: 32x32 RGB patches cut from ten photos bundled with scikit-image, label =
  source photo. Each photo is cut into a 4x4 grid of blocks; a quarter of the blocks (a
  diagonal pattern) are test regions, the rest train regions, and a patch lies wholly in
  one kind, so train and test pixels never overlap.
Real (files under ``data.root``; ``download`` is off by default):
- ``cifar10``, ``svhn``, ``stl10`` (torchvision), ``imagenet`` (``root/train``, ``root/val``
  class folders).
Augmentations follow the reference recipes in ``reference/baselines.md``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fba.errors import DataError
from fba.registry import Registry


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int


DATASETS: Registry[Callable[..., tuple[Dataset, Dataset, DataInfo]]] = Registry("dataset")

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Indexed(Dataset):
    """Wrap a dataset of ``(image, label)`` so that items are ``(image, label, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.base[index]
        return image, int(label), index


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` with labels, transformed per sample."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index


def _tensor_transform(mean, std, augment: list | None):
    from torchvision.transforms import v2

    return v2.Compose([*(augment or []), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _pil_transform(mean, std, augment: list | None):
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), *(augment or []), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _crop_flip(size: int, padding: int, flip: bool, padding_mode: str = "reflect") -> list:
    from torchvision.transforms import v2

    ops: list = [v2.RandomCrop(size, padding=padding, padding_mode=padding_mode)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return ops


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


@DATASETS.register("digits")
def digits(root: str = "", download: bool = False, augment: bool = True, **_: Any):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    mean, std = _channel_stats(images[train_idx])
    aug = _crop_flip(8, 1, flip=False, padding_mode="constant") if augment else None
    train = TensorImages(images[train_idx], labels[train_idx], _tensor_transform(mean, std, aug))
    test = TensorImages(images[test_idx], labels[test_idx], _tensor_transform(mean, std, None))
    return train, test, DataInfo(10, 1, 8, len(train))


PATCH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
                "stereo_motorcycle", "brick", "grass", "gravel")


def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    image = getattr(skdata, name)()
    if isinstance(image, tuple):  # stereo pairs: take the left view
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _resize_short_side(image: np.ndarray, short: int) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    scale = short / min(t.shape[-2:])
    size = (round(t.shape[-2] * scale), round(t.shape[-1] * scale))
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return t[0].round().clamp(0, 255).to(torch.uint8)


def make_patches(per_class_train: int, per_class_test: int, size: int = 32, short_side: int = 256,
                 grid: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut the ``patches`` dataset: returns train images, train labels, test images, test labels."""
    rng = np.random.RandomState(seed)
    splits: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for label, name in enumerate(PATCH_PHOTOS):
        photo = _resize_short_side(_photo(name), short_side)
        height, width = photo.shape[-2:]
        block_h, block_w = height / grid, width / grid

        def region(y: int, x: int) -> str | None:
            kinds = {("test" if (int(yy // block_h) + int(xx // block_w)) % grid == 0 else "train")
                     for yy in (y, y + size - 1) for xx in (x, x + size - 1)}
            return kinds.pop() if len(kinds) == 1 else None

        for kind, wanted in (("train", per_class_train), ("test", per_class_test)):
            found = 0
            while found < wanted:
                y, x = rng.randint(0, height - size + 1), rng.randint(0, width - size + 1)
                if region(y, x) == kind:
                    splits[kind][0].append(photo[:, y:y + size, x:x + size])
                    splits[kind][1].append(label)
                    found += 1
    return (torch.stack(splits["train"][0]), torch.tensor(splits["train"][1]),
            torch.stack(splits["test"][0]), torch.tensor(splits["test"][1]))


@DATASETS.register("patches")
def patches(root: str = "", download: bool = False, augment: bool = True, per_class_train: int = 500,
            per_class_test: int = 100, **_: Any):
    train_x, train_y, test_x, test_y = make_patches(per_class_train, per_class_test)
    mean, std = _channel_stats(train_x)
    aug = _crop_flip(32, 4, flip=True) if augment else None
    train = TensorImages(train_x, train_y, _tensor_transform(mean, std, aug))
    test = TensorImages(test_x, test_y, _tensor_transform(mean, std, None))
    return train, test, DataInfo(len(PATCH_PHOTOS), 3, 32, len(train))


def _torchvision_pair(label: str, make: Callable[[Any, str, Callable, bool], Dataset], root: str, download: bool,
                      mean, std, train_augment: list | None, image_size: int):
    """Train and test splits of a 10-class torchvision dataset, indexed, with clear errors.

    ``make(datasets_module, split, transform, download)`` builds one split.
    """
    from torchvision import datasets

    try:
        train = make(datasets, "train", _pil_transform(mean, std, train_augment), download)
        test = make(datasets, "test", _pil_transform(mean, std, None), download)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as error:
        # torchvision raises RuntimeError("Dataset not found or corrupted"); damaged files
        # surface as unpickling, decoding or shape errors.
        hint = "" if download else " (or set data.download=true to fetch it)"
        raise DataError(f"{label} not found or corrupt under {Path(root).resolve()}: {error}{hint}") from None
    return Indexed(train), Indexed(test), DataInfo(10, 3, image_size, len(train))


@DATASETS.register("cifar10")
def cifar10(root: str = "./data", download: bool = False, augment: bool = True, **_: Any):
    return _torchvision_pair(
        "CIFAR-10", lambda ds, split, tf, dl: ds.CIFAR10(root, train=split == "train", transform=tf, download=dl),
        root, download, CIFAR_MEAN, CIFAR_STD, _crop_flip(32, 4, True) if augment else None, 32)


@DATASETS.register("svhn")
def svhn(root: str = "./data", download: bool = False, augment: bool = True, **_: Any):
    return _torchvision_pair(
        "SVHN", lambda ds, split, tf, dl: ds.SVHN(root, split=split, transform=tf, download=dl),
        root, download, CIFAR_MEAN, CIFAR_STD, _crop_flip(32, 2, False, "constant") if augment else None, 32)


@DATASETS.register("stl10")
def stl10(root: str = "./data", download: bool = False, augment: bool = True, **_: Any):
    half = (0.5, 0.5, 0.5)
    return _torchvision_pair(
        "STL-10", lambda ds, split, tf, dl: ds.STL10(root, split=split, transform=tf, download=dl),
        root, download, half, half, _crop_flip(96, 4, True) if augment else None, 96)


@DATASETS.register("imagenet")
def imagenet(root: str = "./data/imagenet", download: bool = False, augment: bool = True, image_size: int = 224, **_: Any):
    from torchvision import datasets
    from torchvision.transforms import v2

    for split in ("train", "val"):
        if not (Path(root) / split).is_dir():
            raise DataError(f"ImageNet folder {Path(root, split).resolve()} not found: expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    train_aug = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if augment else \
        [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    test_aug = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    try:
        train = datasets.ImageFolder(str(Path(root) / "train"), transform=_pil_transform(IMAGENET_MEAN, IMAGENET_STD, train_aug))
        test = datasets.ImageFolder(str(Path(root) / "val"), transform=_pil_transform(IMAGENET_MEAN, IMAGENET_STD, test_aug))
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"ImageNet under {Path(root).resolve()}: {error}") from None
    return Indexed(train), Indexed(test), DataInfo(len(train.classes), 3, image_size, len(train))
