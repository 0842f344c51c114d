"""Tests of timm_edl.data: every dataset source, its errors and the n_ex protocol."""
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from timm_edl import data as D
from conftest import CIFAR10_JPEG_DIR, require_cifar10_jpeg, require_fashion_mnist
from timm_edl.data import cifar10_jpeg, fashion_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- registry


def test_unknown_dataset_lists_known_names():
    with pytest.raises(D.UnknownDatasetError) as excinfo:
        D.get_dataset("mnist")
    message = str(excinfo.value)
    for name in ("cifar10", "cifar10-jpeg", "fashion-mnist-small", "tiny-imagenet", "imagefolder"):
        assert name in message


def test_wrong_split_is_rejected():
    with pytest.raises(D.InvalidSplitError, match="'dev'"):
        D.get_dataset("fashion-mnist-small", split="dev")


def test_names_are_normalised_and_registry_is_consistent():
    assert D.get_dataset("Fashion_MNIST_Small", split="test").info.name == "fashion-mnist-small"
    assert D.dataset_info("CIFAR-10").name == "cifar10"
    assert D.DEFAULT_DATASET == "cifar10"
    for name, info in D.DATASETS.items():
        assert info.name == name
        if info.class_names is not None:
            assert len(info.class_names) == len(set(info.class_names)) == info.num_classes
    assert D.DATASETS["cifar10-jpeg"].display_name == "CIFAR-10-JPEG"
    assert D.DATASETS["cifar10-jpeg"].lossy and not D.DATASETS["cifar10"].lossy


# --------------------------------------------------------------------------- embedded subset


@pytest.mark.parametrize("split,count", [("train", 5000), ("test", 1000)])
def test_embedded_subset_shapes_range_and_balance(split, count):
    dataset = D.get_dataset("fashion-mnist-small", split=split)
    assert len(dataset) == count
    assert dataset.info.input_size == (1, 28, 28) and dataset.info.num_classes == 10
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int)
    x, y = D.load_tensors("fashion-mnist-small", split=split)
    assert x.shape == (count, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [count // 10] * 10


def test_embedded_subset_is_small_and_documented():
    assert D.FASHION_MNIST_SMALL_FILE.stat().st_size <= 5 * 1024 * 1024
    readme = (D.FASHION_MNIST_SMALL_FILE.parent / "README.md").read_text()
    assert "dataset-fashion-mnist" in readme and "MIT" in readme
    assert (D.FASHION_MNIST_SMALL_FILE.parent / "make_fashion_mnist_small.py").is_file()


def test_embedded_subset_matches_debian_files(tmp_path):
    require_fashion_mnist()
    with np.load(D.FASHION_MNIST_SMALL_FILE) as arrays:
        subset = {key: arrays[key] for key in arrays.files}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = D.read_idx(D.DEBIAN_FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = D.read_idx(D.DEBIAN_FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        indices = subset[f"{split}_indices"]
        assert np.all(np.diff(indices) > 0), "original order must be kept"
        np.testing.assert_array_equal(subset[f"{split}_images"], images[indices])
        np.testing.assert_array_equal(subset[f"{split}_labels"], labels[indices])
        # "first k per class": no image of a class is skipped before the last one taken
        per_class = len(indices) // 10
        for c in range(10):
            np.testing.assert_array_equal(
                indices[subset[f"{split}_labels"] == c], np.flatnonzero(labels == c)[:per_class])
    # the full dataset through the API (data_dir empty: falls back to Debian's files)
    full = D.get_dataset("fashion-mnist", tmp_path, split="test")
    small = D.get_dataset("fashion-mnist-small", split="test")
    assert len(full) == 10000
    assert torch.equal(full.images[torch.from_numpy(subset["test_indices"]).long()], small.images)


def test_n_ex_takes_the_first_examples_in_order():
    full = D.get_dataset("fashion-mnist-small", split="test")
    first = D.get_dataset("fashion-mnist-small", split="test", n_ex=37)
    assert len(first) == 37
    assert torch.equal(first.labels, full.labels[:37])
    assert torch.equal(first.images, full.images[:37])
    x, y = D.load_tensors("fashion-mnist-small", split="test", n_ex=5)
    assert torch.equal(y, full.labels[:5])
    assert torch.equal(x, full.images[:5].float() / 255)
    # the subset keeps the official order: the test file starts with 9, 2, 1, 1, 6
    assert full.labels[:5].tolist() == [9, 2, 1, 1, 6]
    with pytest.raises(ValueError, match="only 1000"):
        D.get_dataset("fashion-mnist-small", split="test", n_ex=1001)
    with pytest.raises(ValueError):
        D.get_dataset("fashion-mnist-small", split="test", n_ex=0)


# --------------------------------------------------------------------------- transforms / loader


def test_train_transforms_crop_and_flip_policy():
    fashion = D.train_transforms(D.DATASETS["fashion-mnist"])
    cifar = D.train_transforms(D.DATASETS["cifar10"])
    fashion_steps = [type(t).__name__ for t in fashion.transforms]
    cifar_steps = [type(t).__name__ for t in cifar.transforms]
    assert fashion_steps == ["RandomCrop"] and cifar_steps == ["RandomCrop", "RandomHorizontalFlip"]
    assert fashion.transforms[0].padding == cifar.transforms[0].padding == 4
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    out = cifar(image)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert D.train_transforms(D.DATASETS["cifar10"], augment=False)(image) is image


def test_loader_yields_augmented_batches():
    info = D.DATASETS["fashion-mnist-small"]
    dataset = D.get_dataset(info.name, split="train", n_ex=64,
                            transform=D.train_transforms(info))
    x, y = next(iter(DataLoader(dataset, batch_size=32, shuffle=True)))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 1


# --------------------------------------------------------------------------- CIFAR-10-JPEG


@pytest.fixture(scope="module")
def jpeg_test_split(tmp_path_factory):
    """The real CIFAR-10-JPEG test split, decoded once into a private cache dir."""
    require_cifar10_jpeg()
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMM_EDL_CACHE_DIR", str(cache))
        dataset = D.get_dataset("cifar10-jpeg", CIFAR10_JPEG_DIR, split="test")
        cached = D.get_dataset("cifar10-jpeg", CIFAR10_JPEG_DIR, split="test")
    return dataset, cached, cache


def test_cifar10_jpeg_test_split_counts_order_and_label(jpeg_test_split):
    dataset, _, _ = jpeg_test_split
    assert len(dataset) == 10000
    assert dataset.info.display_name == "CIFAR-10-JPEG" and dataset.info.lossy
    assert dataset.info.class_names == D.CIFAR10_CLASSES
    assert dataset.images.shape == (10000, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert torch.bincount(dataset.labels).tolist() == [1000] * 10
    # classes interleaved in CIFAR-10 order, so every prefix is balanced
    assert dataset.labels[:20].tolist() == list(range(10)) * 2
    assert torch.bincount(dataset.labels[:100]).tolist() == [10] * 10


def test_cifar10_jpeg_pixels_match_the_archive_member(jpeg_test_split):
    dataset, _, _ = jpeg_test_split
    with tarfile.open(CIFAR10_JPEG_DIR / "test.tar.gz", "r:gz") as tar:
        data = tar.extractfile("test/automobile/0001.jpg").read()
    expected = np.array(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    # position 11 = second round (k=1) of the interleaving, class 1 (automobile)
    assert dataset.labels[11] == 1
    np.testing.assert_array_equal(dataset.images[11].numpy(), expected)
    image, label = dataset[11]
    assert label == 1 and torch.allclose(image, torch.from_numpy(expected).float() / 255)


def test_cifar10_jpeg_second_load_comes_from_the_cache(jpeg_test_split):
    dataset, cached, cache = jpeg_test_split
    cache_files = list((cache / "cifar10-jpeg").glob("test-*.npz"))
    assert len(cache_files) == 1
    assert not list((cache / "cifar10-jpeg").glob("*.partial*"))
    assert torch.equal(dataset.images, cached.images) and torch.equal(dataset.labels, cached.labels)


def test_cifar10_jpeg_default_location_and_n_ex(jpeg_test_split, monkeypatch, tmp_path):
    dataset, _, cache = jpeg_test_split
    monkeypatch.setenv("TIMM_EDL_CACHE_DIR", str(cache))
    # an unrelated data_dir falls back to the checkout's shared/ folder
    x, y = D.load_tensors("CIFAR-10-JPEG", tmp_path, split="test", n_ex=25)
    assert x.shape == (25, 3, 32, 32) and y.tolist() == dataset.labels[:25].tolist()
    assert torch.equal(x, dataset.images[:25].float() / 255)
    assert list(tmp_path.iterdir()) == [], "nothing may be written into the data dir"


def test_cifar10_jpeg_corrupt_archive(tmp_path, monkeypatch):
    require_cifar10_jpeg()
    monkeypatch.setenv("TIMM_EDL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar10_jpeg, "_CHECKOUT_SHARED_DATA_DIR", tmp_path / "nowhere")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "test.tar.gz").write_bytes(b"this is not a gzip file" * 100)
    with pytest.raises(D.CorruptDatasetError, match="test.tar.gz"):
        D.get_dataset("cifar10-jpeg", garbage, split="test")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    with open(CIFAR10_JPEG_DIR / "test.tar.gz", "rb") as f:
        (truncated / "test.tar.gz").write_bytes(f.read(200_000))
    with pytest.raises(D.CorruptDatasetError, match="test.tar.gz"):
        D.get_dataset("cifar10-jpeg", truncated, split="test")
    # a SHA256SUMS beside the archive is enforced
    (truncated / "SHA256SUMS").write_text(f"{'0' * 64}  test.tar.gz\n")
    with pytest.raises(D.CorruptDatasetError, match="does not match"):
        D.get_dataset("cifar10-jpeg", truncated, split="test")
    with pytest.raises(D.DatasetNotFoundError, match="train.tar.gz"):
        D.get_dataset("cifar10-jpeg", truncated, split="train")


# --------------------------------------------------------------------------- CIFAR (torchvision layout)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar_images(count, offset):
    """uint8 rows of 3072 = R plane, G plane, B plane (CIFAR's row format)."""
    rows = np.zeros((count, 3072), dtype=np.uint8)
    for i in range(count):
        rows[i, 0] = offset + i          # R at (0, 0)
        rows[i, 1024 + 33] = 100 + i     # G at (1, 1)
        rows[i, 2048 + 1023] = 200 + i   # B at (31, 31)
    return rows


@pytest.fixture
def fake_cifar10(tmp_path):
    """A tiny cifar-10-batches-py in the official pickle format (bytes keys)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(1, 6):
        labels = [(3 * b + i) % 10 for i in range(4)]
        _write_pickle(folder / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels,
            b"data": _fake_cifar_images(4, offset=10 * b),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(4)],
        })
    _write_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [9, 8, 7, 6, 5, 4],
        b"data": _fake_cifar_images(6, offset=0),
        b"filenames": [f"test_{i}.png".encode() for i in range(6)],
    })
    _write_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": 4,
        b"label_names": [name.encode() for name in D.CIFAR10_CLASSES],
        b"num_vis": 3072,
    })
    return tmp_path


def test_cifar10_torchvision_layout_loads(fake_cifar10):
    train = D.get_dataset("cifar10", fake_cifar10, split="train")
    assert len(train) == 20 and train.info.display_name == "CIFAR-10"
    expected_labels = [(3 * b + i) % 10 for b in range(1, 6) for i in range(4)]
    assert train.labels.tolist() == expected_labels
    image, label = train[5]  # batch 2, image 1
    assert image.shape == (3, 32, 32) and label == expected_labels[5]
    assert image[0, 0, 0] == pytest.approx(21 / 255)
    assert image[1, 1, 1] == pytest.approx(101 / 255)
    assert image[2, 31, 31] == pytest.approx(201 / 255)
    x, y = D.load_tensors("cifar10", fake_cifar10, split="test")
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [9, 8, 7, 6, 5, 4]
    first = D.get_dataset("cifar10", fake_cifar10, split="train", n_ex=7)
    assert first.labels.tolist() == expected_labels[:7]


def test_cifar100_torchvision_layout_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, count in (("train", 5), ("test", 3)):
        _write_pickle(folder / split, {
            b"fine_labels": [99 - i for i in range(count)],
            b"coarse_labels": [0] * count,
            b"data": _fake_cifar_images(count, offset=0),
        })
    _write_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in D.CIFAR100_CLASSES]})
    dataset = D.get_dataset("cifar100", tmp_path, split="test")
    assert dataset.labels.tolist() == [99, 98, 97] and dataset.info.num_classes == 100


def test_cifar10_missing_data_error_names_the_path(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as excinfo:
        D.get_dataset("cifar10", tmp_path, split="test")
    assert isinstance(excinfo.value, FileNotFoundError)
    message = str(excinfo.value)
    assert str((tmp_path / "cifar-10-batches-py").absolute()) in message
    assert "test_batch" in message and "--download" in message


def test_cifar10_corrupt_batch(fake_cifar10):
    (fake_cifar10 / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(D.CorruptDatasetError, match="test_batch"):
        D.get_dataset("cifar10", fake_cifar10, split="test")


# --------------------------------------------------------------------------- Fashion-MNIST files


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(raw / "t10k-images-idx3-ubyte", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([4, 2, 7]))
    x, y = D.load_tensors("fashion-mnist", tmp_path, split="test")
    assert y.tolist() == [4, 2, 7]
    assert torch.equal(x, torch.from_numpy(images[:, None]).float() / 255)


def test_fashion_mnist_missing_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(D.DatasetNotFoundError) as excinfo:
        D.get_dataset("fashion-mnist", tmp_path, split="train")
    message = str(excinfo.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str((tmp_path / "FashionMNIST" / "raw").absolute()) in message


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(D.CorruptDatasetError, match="bad-idx3-ubyte"):
        D.read_idx(path)


# --------------------------------------------------------------------------- image folders


def _save_png(path, color, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")  # lossless, whatever the suffix


def test_imagefolder_layout(tmp_path):
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "zebra": (0, 0, 255)}
    for split, count in (("train", 3), ("val", 2)):
        for name, color in colors.items():
            for i in range(count):
                _save_png(tmp_path / split / name / f"{i}.png", color)
    info = D.dataset_info("imagefolder", tmp_path)
    assert info.class_names == ("cat", "dog", "zebra") and info.num_classes == 3
    assert info.input_size == (3, 8, 8)
    train = D.get_dataset("imagefolder", tmp_path, split="train")
    assert len(train) == 9 and sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    test = D.get_dataset("imagefolder", tmp_path, split="test")  # read from val/
    assert len(test) == 6
    for i in range(len(test)):
        image, label = test[i]
        expected = torch.tensor(colors[info.class_names[label]], dtype=torch.float32) / 255
        assert torch.allclose(image[:, 0, 0], expected)
    x, y = D.load_tensors("imagefolder", tmp_path, split="test", n_ex=4, image_size=4)
    assert x.shape == (4, 3, 4, 4) and torch.equal(y, test.labels[:4])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="data_dir"):
        D.get_dataset("imagefolder", None)
    _save_png(tmp_path / "train" / "cat" / "0.png", (1, 2, 3))
    with pytest.raises(D.DatasetNotFoundError, match="no test split"):
        D.get_dataset("imagefolder", tmp_path, split="test")
    _save_png(tmp_path / "test" / "lion" / "0.png", (1, 2, 3))
    with pytest.raises(D.DatasetError, match="lion"):
        D.get_dataset("imagefolder", tmp_path, split="test")


@pytest.fixture
def fake_tiny_imagenet(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{9000000 - 7 * i:08d}" for i in range(200)]  # listed unsorted
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    shade = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    for wnid in wnids[:3]:
        for i in range(2):
            _save_png(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                      (shade[wnid], 0, 0), size=(64, 64))
    for wnid in wnids[3:]:
        (root / "train" / wnid / "images").mkdir(parents=True)
    val_wnids = [wnids[5], wnids[0], wnids[199], wnids[5]]
    lines = []
    for i, wnid in enumerate(val_wnids):
        _save_png(root / "val" / "images" / f"val_{i}.JPEG", (shade[wnid], 0, 0), size=(64, 64))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, sorted(wnids), val_wnids


def test_tiny_imagenet_layout(fake_tiny_imagenet):
    data_dir, sorted_wnids, val_wnids = fake_tiny_imagenet
    train = D.get_dataset("tiny-imagenet", data_dir, split="train")
    assert train.info.class_names == tuple(sorted_wnids) and train.info.num_classes == 200
    assert len(train) == 6
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 64, 64)
        assert image[0, 0, 0] == pytest.approx(label / 255)
    val = D.get_dataset("tiny-imagenet", data_dir, split="val")
    expected = [sorted_wnids.index(w) for w in val_wnids]
    assert val.labels.tolist() == expected  # annotation-file order
    assert [val[i][0][0, 0, 0].item() * 255 for i in range(4)] == pytest.approx(expected)
    x, y = D.load_tensors("tiny-imagenet", data_dir, split="test", n_ex=2)
    assert x.shape == (2, 3, 64, 64) and y.tolist() == expected[:2]


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="wnids.txt"):
        D.get_dataset("tiny-imagenet", tmp_path, split="test")
