"""Fashion-MNIST: the official idx files, and the embedded subset ``fashion-mnist-small``."""
from __future__ import annotations

import dataclasses
import gzip
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .constants import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .datasets import DatasetInfo
from .errors import CorruptDatasetError, DatasetNotFoundError
from .source import PathLike, Source, bullets, data_root, torchvision_download

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Debian package providing ``DEBIAN_FASHION_MNIST_DIR``.
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SMALL_FILE = Path(__file__).resolve().parents[1] / "_data" / "fashion_mnist_small.npz"

FASHION_MNIST_INFO = DatasetInfo(
    name="fashion-mnist", display_name="Fashion-MNIST", num_classes=10, in_chans=1,
    input_size=(1, 28, 28), class_names=FASHION_MNIST_CLASSES,
    mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, default_eps_linf=0.1,
    horizontal_flip=False,
    description=f"Fashion-MNIST idx files (Debian {DEBIAN_FASHION_MNIST_PACKAGE} or "
                "torchvision layout <data_dir>/FashionMNIST/raw)")
FASHION_MNIST_SMALL_INFO = dataclasses.replace(
    FASHION_MNIST_INFO, name="fashion-mnist-small", display_name="Fashion-MNIST-small",
    description="embedded Fashion-MNIST subset: first 500 train / 100 test images per class")

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST format), gzipped or not."""
    # Not torchvision.datasets.mnist.read_sn3_pascalvincent_tensor: it opens the
    # path with plain open() (Debian ships only .gz files) and checks the header
    # with assert statements, so a corrupt file gives no message, or none at all
    # under python -O.
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise CorruptDatasetError(f"{path}: unreadable ({error})") from error
    if len(raw) < 4:
        raise CorruptDatasetError(f"{path}: too short for an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise CorruptDatasetError(f"{path}: not an unsigned-byte idx file")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise CorruptDatasetError(f"{path}: header says {shape} but the data size differs")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist_dirs(data_dir: Optional[PathLike]) -> List[Path]:
    root = data_root(data_dir)
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, DEBIAN_FASHION_MNIST_DIR]


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """Fashion-MNIST's ``split`` from the first folder that holds both idx files."""
    image_stem, label_stem = _FASHION_MNIST_FILES[split]

    def locate() -> Optional[Tuple[Path, Path]]:
        for directory in _fashion_mnist_dirs(data_dir):
            image_file, label_file = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
            if image_file and label_file:
                return image_file, label_file
        return None

    found = locate()
    if found is None and download:
        torchvision_download("FashionMNIST", data_root(data_dir), split)
        found = locate()
    if found is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST ({split} split) not found: looked for {image_stem}[.gz] and "
            f"{label_stem}[.gz] in\n{bullets(_fashion_mnist_dirs(data_dir))}\n"
            f"Get it with `apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}` (Debian/Ubuntu; "
            f"installs {DEBIAN_FASHION_MNIST_DIR}), or --download (download=True) when online "
            f"(torchvision layout <data_dir>/FashionMNIST/raw). "
            f"'fashion-mnist-small' is an embedded subset that needs no files.")
    image_file, label_file = found
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise CorruptDatasetError(
            f"{image_file} / {label_file}: shapes {images.shape} / {labels.shape} are not "
            "Fashion-MNIST's (N, 28, 28) / (N,)")
    return Source(FASHION_MNIST_INFO, images=images[:, None], labels=labels.astype(np.int64))


def load_fashion_mnist_small(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """The embedded subset's ``split``; ``data_dir`` and ``download`` are ignored."""
    del data_dir, download  # shipped with the package
    if not FASHION_MNIST_SMALL_FILE.is_file():
        raise DatasetNotFoundError(
            f"the embedded subset {FASHION_MNIST_SMALL_FILE} is missing from this installation "
            "of timm-edl; reinstall the package (it ships timm_edl/_data/*.npz)")
    try:
        with np.load(FASHION_MNIST_SMALL_FILE) as arrays:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    except (OSError, ValueError, KeyError, zlib.error) as error:
        raise CorruptDatasetError(f"{FASHION_MNIST_SMALL_FILE}: unreadable ({error!r})") from error
    return Source(FASHION_MNIST_SMALL_INFO, images=images[:, None], labels=labels.astype(np.int64))
