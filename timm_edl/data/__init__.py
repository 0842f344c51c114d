"""Datasets for training (``timm-edl train``) and evaluation (``timm-edl eval``).

Every dataset yields ``(image, label)`` pairs where ``image`` is a float tensor
of shape ``(C, H, W)`` with values in ``[0, 1]`` and ``label`` an ``int``. There
is no normalisation here: EDLNets normalise their inputs internally, so that
attacks work in pixel space, where the epsilon of an L-inf ball is defined.

Known datasets (``DATASETS``), one module each:

``cifar10``, ``cifar100`` (the default of every user-facing command; ``cifar.py``)
    The real CIFAR data in torchvision's layout,
    ``<data_dir>/cifar-10-batches-py`` and ``<data_dir>/cifar-100-python``.
    Downloaded only when asked (``download=True``).
``fashion-mnist`` (``fashion_mnist.py``)
    The official idx files: Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist``) or torchvision's layout
    ``<data_dir>/FashionMNIST/raw``.
``fashion-mnist-small`` (``fashion_mnist.py``)
    A real, class-balanced subset of Fashion-MNIST (5,000 train / 1,000 test
    images) shipped inside the package; needs no data at all.
``cifar10-jpeg`` (``cifar10_jpeg.py``)
    A lossy (JPEG re-encoded) copy of CIFAR-10 read straight from
    ``train.tar.gz`` / ``test.tar.gz``. Results on it must be labelled
    ``"CIFAR-10-JPEG"`` (``DatasetInfo.display_name``), never "CIFAR-10".
``imagefolder`` (``image_folder.py``)
    Any ``<data_dir>/<split>/<class>/*.{jpg,jpeg,png}`` tree (custom fine-tuning).
``tiny-imagenet`` (``tiny_imagenet.py``)
    The official ``tiny-imagenet-200`` layout, including its annotated val split.

Splits are ``"train"`` and ``"test"``; ``"val"``/``"validation"`` are accepted
as names of the held-out split, which for tiny-imagenet (whose official test
split has no labels) and image folders without ``test/`` is read from ``val/``.

``n_ex`` always selects the *first* ``n_ex`` examples in the dataset's fixed
order, never a random sample (the RobustBench protocol).

The registry and the functions that open datasets are in ``registry.py``, the
``Dataset`` classes and transforms in ``datasets.py``, normalisation statistics
and class names in ``constants.py``.
"""
from .cifar10_jpeg import cache_dir
from .constants import CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES
from .datasets import (
    DatasetInfo,
    ImageClassificationDataset,
    ImageFileDataset,
    InMemoryImageDataset,
    Transform,
    train_transforms,
)
from .errors import (
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
    InvalidSplitError,
    UnknownDatasetError,
)
from .fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    DEBIAN_FASHION_MNIST_PACKAGE,
    FASHION_MNIST_SMALL_FILE,
    read_idx,
)
from .registry import DATASETS, DEFAULT_DATASET, dataset_info, get_dataset, list_datasets, load_tensors
from .source import DEFAULT_DATA_DIR, PathLike

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DEFAULT_DATA_DIR",
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetInfo",
    "DatasetError",
    "UnknownDatasetError",
    "InvalidSplitError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "ImageClassificationDataset",
    "InMemoryImageDataset",
    "ImageFileDataset",
    "list_datasets",
    "dataset_info",
    "get_dataset",
    "load_tensors",
    "train_transforms",
    "cache_dir",
    "read_idx",
]
