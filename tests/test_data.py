"""Dataset builders, including the real torchvision loaders on tiny fixtures in their file formats."""

import pickle

import numpy as np
import pytest
import torch
import torchvision

from fba.errors import DataError
from fba.tasks.classification.data import DATASETS, make_patches


def _check(train, test, info, channels, size):
    image, label, index = train[3]
    assert image.shape == (channels, size, size) and image.dtype == torch.float32
    assert 0 <= label < info.num_classes and index == 3
    assert info.num_train == len(train) and len(test) > 0


def test_digits():
    train, test, info = DATASETS.get("digits")()
    assert (len(train), len(test), info.num_classes, info.in_channels) == (1437, 360, 10, 1)
    _check(train, test, info, 1, 8)


def test_patches_are_deterministic_balanced_and_labelled_by_photo():
    a = make_patches(6, 3)
    b = make_patches(6, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    train_x, train_y, test_x, test_y = a
    assert train_x.shape == (60, 3, 32, 32) and train_x.dtype == torch.uint8
    assert torch.bincount(train_y).tolist() == [6] * 10 and torch.bincount(test_y).tolist() == [3] * 10
    train, test, info = DATASETS.get("patches")(per_class_train=6, per_class_test=3)
    _check(train, test, info, 3, 32)


@pytest.fixture
def trust_fixture_checksums(monkeypatch):
    # The fixtures are real-format files with made-up pixels, so their checksums differ
    # from the published ones; everything after the checksum is torchvision's real code.
    import importlib

    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.SVHN, torchvision.datasets.STL10):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
        module = importlib.import_module(cls.__module__)
        if hasattr(module, "check_integrity"):
            monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)


def _write_cifar(root, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.randint(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_fixture(tmp_path, trust_fixture_checksums):
    _write_cifar(tmp_path)
    train, test, info = DATASETS.get("cifar10")(root=str(tmp_path))
    assert len(train) == 30 and len(test) == 6
    _check(train, test, info, 3, 32)


def test_cifar10_corrupt_file_is_a_clear_error(tmp_path, trust_fixture_checksums):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="CIFAR-10 not found or corrupt"):
        DATASETS.get("cifar10")(root=str(tmp_path))


def test_svhn_fixture(tmp_path, trust_fixture_checksums):
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    for split, n in (("train", 7), ("test", 4)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.randint(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": rng.randint(1, 11, (n, 1))})
    train, test, info = DATASETS.get("svhn")(root=str(tmp_path))
    assert len(train) == 7
    _check(train, test, info, 3, 32)


def test_stl10_fixture(tmp_path, trust_fixture_checksums):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for split, n in (("train", 5), ("test", 4)):
        rng.randint(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        rng.randint(1, 11, n, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    train, test, info = DATASETS.get("stl10")(root=str(tmp_path))
    assert info.num_classes == 10 and len(train) == 5
    _check(train, test, info, 3, 96)


def test_imagenet_folder_fixture(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 50, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.JPEG")
    train, test, info = DATASETS.get("imagenet")(root=str(tmp_path), image_size=32)
    assert info.num_classes == 3 and len(train) == 6
    _check(train, test, info, 3, 32)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10", "imagenet"])
def test_missing_files_are_a_clear_error(tmp_path, name):
    with pytest.raises(DataError) as info:
        DATASETS.get(name)(root=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)
