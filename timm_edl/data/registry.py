"""The dataset registry: names to sources, and the API that opens them.

``DATASETS`` (name -> :class:`DatasetInfo`), the name and split synonyms, and
:func:`list_datasets`, :func:`get_dataset`, :func:`load_tensors`, :func:`dataset_info`.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .cifar import CIFAR10_INFO, CIFAR100_INFO, load_cifar10, load_cifar100
from .cifar10_jpeg import CIFAR10_JPEG_INFO, load_cifar10_jpeg
from .datasets import (
    DatasetInfo, ImageClassificationDataset, ImageFileDataset, InMemoryImageDataset, Transform,
    with_image_size,
)
from .errors import DatasetError, InvalidSplitError, UnknownDatasetError
from .fashion_mnist import (
    FASHION_MNIST_INFO, FASHION_MNIST_SMALL_INFO, load_fashion_mnist, load_fashion_mnist_small,
)
from .image_folder import IMAGE_FOLDER_INFO, image_folder_info, load_image_folder
from .source import PathLike, Source
from .tiny_imagenet import TINY_IMAGENET_INFO, load_tiny_imagenet, tiny_imagenet_info

DEFAULT_DATASET = "cifar10"

Loader = Callable[[Optional[PathLike], str, bool], Source]

# name -> (what is known without reading files, loader(data_dir, split, download))
_SOURCES: Dict[str, Tuple[DatasetInfo, Loader]] = {
    "cifar10": (CIFAR10_INFO, load_cifar10),
    "cifar100": (CIFAR100_INFO, load_cifar100),
    "cifar10-jpeg": (CIFAR10_JPEG_INFO, load_cifar10_jpeg),
    "fashion-mnist": (FASHION_MNIST_INFO, load_fashion_mnist),
    "fashion-mnist-small": (FASHION_MNIST_SMALL_INFO, load_fashion_mnist_small),
    "tiny-imagenet": (TINY_IMAGENET_INFO, load_tiny_imagenet),
    "imagefolder": (IMAGE_FOLDER_INFO, load_image_folder),
}
# Datasets whose DatasetInfo depends on the files on disk.
_INFO_FROM_DISK: Dict[str, Callable[[Optional[PathLike]], DatasetInfo]] = {
    "imagefolder": image_folder_info,
    "tiny-imagenet": tiny_imagenet_info,
}

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {name: info for name, (info, _) in _SOURCES.items()})

_NAME_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "cifar-10-jpeg": "cifar10-jpeg",
    "fashionmnist": "fashion-mnist",
    "tiny-imagenet-200": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet",
    "image-folder": "imagefolder",
    "folder": "imagefolder",
}
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "test": "test", "val": "test", "valid": "test", "validation": "test", "eval": "test",
}


def list_datasets() -> List[str]:
    """Names accepted by :func:`get_dataset`, in registry order."""
    return list(DATASETS)


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _NAME_ALIASES.get(key, key)
    if key not in DATASETS:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def _canonical_split(split: str) -> str:
    key = str(split).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise InvalidSplitError(
            f"unknown split {split!r}; use 'train' or 'test' "
            f"(accepted synonyms: {', '.join(sorted(_SPLIT_ALIASES))})")
    return _SPLIT_ALIASES[key]


def _first(n_ex: Optional[int], available: int, what: str) -> int:
    """How many leading examples ``n_ex`` selects, with a clear error when too many."""
    if n_ex is None:
        return available
    n_ex = int(n_ex)
    if n_ex <= 0:
        raise ValueError(f"n_ex must be positive, got {n_ex}")
    if n_ex > available:
        raise ValueError(f"n_ex={n_ex} but {what} has only {available} examples")
    return n_ex


def get_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: Optional[PathLike] = None,
    split: str = "train",
    *,
    transform: Optional[Transform] = None,
    download: bool = False,
    n_ex: Optional[int] = None,
    image_size: Optional[int] = None,
) -> ImageClassificationDataset:
    """Open split ``split`` of dataset ``name`` (see :mod:`timm_edl.data` for sources).

    Args:
        name: a key of ``DATASETS`` (case, ``_`` vs ``-`` and a few aliases are forgiven).
        data_dir: where to look; ``None`` means ``DEFAULT_DATA_DIR``. Ignored by
            ``fashion-mnist-small``; required by ``imagefolder``.
        split: ``"train"`` or ``"test"`` (``"val"`` is a synonym of ``"test"``).
        transform: applied to each ``[0, 1]`` float tensor, e.g. :func:`train_transforms`.
        download: fetch cifar10/cifar100/fashion-mnist through torchvision when
            absent (needs network). Never implied.
        n_ex: keep only the first ``n_ex`` examples, in order.
        image_size: resize (shorter side) and centre-crop every image to this size.

    The returned dataset's ``info`` is the fully resolved :class:`DatasetInfo`.

    Raises:
        UnknownDatasetError, InvalidSplitError, DatasetNotFoundError,
        CorruptDatasetError (all subclasses of :class:`DatasetError`).
    """
    key = _canonical_name(name)
    split = _canonical_split(split)
    _, load = _SOURCES[key]
    source = load(data_dir, split, download)
    info = with_image_size(source.info, image_size)
    what = f"{info.display_name} {split} split"
    if source.images is not None:
        count = _first(n_ex, len(source.images), what)
        # np.require copies read-only or strided arrays (torch wants writable memory).
        images = torch.from_numpy(np.require(source.images[:count], requirements=["C", "W"]))
        labels = torch.from_numpy(source.labels[:count].astype(np.int64))
        return InMemoryImageDataset(images, labels, info, transform, image_size)
    count = _first(n_ex, len(source.samples), what)
    return ImageFileDataset(source.samples[:count], info, transform, image_size)


def load_tensors(
    name: str = DEFAULT_DATASET,
    data_dir: Optional[PathLike] = None,
    split: str = "test",
    n_ex: Optional[int] = None,
    *,
    download: bool = False,
    image_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_ex`` examples of a split as ``(x, y)`` for evaluation.

    ``x`` is a float32 tensor ``(N, C, H, W)`` in ``[0, 1]``, ``y`` a long tensor
    ``(N,)``, both in dataset order (no shuffling, as in RobustBench).
    """
    dataset = get_dataset(name, data_dir, split, download=download, n_ex=n_ex,
                          image_size=image_size)
    if isinstance(dataset, InMemoryImageDataset) and image_size is None:
        return dataset.images.float().div_(255), dataset.labels.clone()
    images = [dataset[i][0] for i in range(len(dataset))]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DatasetError(
            f"{dataset.info.display_name} images have different sizes {sorted(shapes)[:3]}...; "
            "pass image_size to resize them")
    return torch.stack(images), dataset.labels.clone()


def dataset_info(
    name: str = DEFAULT_DATASET,
    data_dir: Optional[PathLike] = None,
    *,
    image_size: Optional[int] = None,
) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``, resolved from disk where it depends on the files.

    Only ``imagefolder`` (class names, image size) and ``tiny-imagenet`` (WordNet
    ids) read anything, and then only folder names, metadata and one image.
    """
    key = _canonical_name(name)
    info = _INFO_FROM_DISK[key](data_dir) if key in _INFO_FROM_DISK else DATASETS[key]
    return with_image_size(info, image_size)
