"""CIFAR-10 and CIFAR-100 from torchvision's on-disk layout (Python pickle batches)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .constants import (
    CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_CLASSES, CIFAR100_MEAN, CIFAR100_STD,
)
from .datasets import DatasetInfo
from .errors import CorruptDatasetError, DatasetNotFoundError
from .source import PathLike, Source, data_root, torchvision_download

CIFAR10_INFO = DatasetInfo(
    name="cifar10", display_name="CIFAR-10", num_classes=10, in_chans=3,
    input_size=(3, 32, 32), class_names=CIFAR10_CLASSES,
    mean=CIFAR10_MEAN, std=CIFAR10_STD, default_eps_linf=8 / 255,
    description="CIFAR-10, torchvision layout <data_dir>/cifar-10-batches-py")
CIFAR100_INFO = DatasetInfo(
    name="cifar100", display_name="CIFAR-100", num_classes=100, in_chans=3,
    input_size=(3, 32, 32), class_names=CIFAR100_CLASSES,
    mean=CIFAR100_MEAN, std=CIFAR100_STD, default_eps_linf=8 / 255,
    description="CIFAR-100 (fine labels), torchvision layout <data_dir>/cifar-100-python")

_CIFAR_LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py", meta="batches.meta", label_key="labels",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
        torchvision_class="CIFAR10", archive="cifar-10-python.tar.gz"),
    "cifar100": dict(
        folder="cifar-100-python", meta="meta", label_key="fine_labels",
        train=("train",), test=("test",),
        torchvision_class="CIFAR100", archive="cifar-100-python.tar.gz"),
}


def load_cifar10(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """CIFAR-10's ``split`` from ``<data_dir>/cifar-10-batches-py`` (downloaded if asked)."""
    return _load_cifar(CIFAR10_INFO, data_dir, split, download)


def load_cifar100(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """CIFAR-100's ``split`` (fine labels) from ``<data_dir>/cifar-100-python``."""
    return _load_cifar(CIFAR100_INFO, data_dir, split, download)


def _load_cifar(info: DatasetInfo, data_dir: Optional[PathLike], split: str,
                download: bool) -> Source:
    # The batches are read here rather than through torchvision.datasets.CIFAR10,
    # which md5-checks every file on each construction and so rejects any copy
    # that is not byte-identical to the official one (subsets, test fixtures).
    layout = _CIFAR_LAYOUT[info.name]
    root = data_root(data_dir)
    folder = root / layout["folder"]
    batch_names = layout[split]
    missing = [name for name in batch_names if not (folder / name).is_file()]
    if missing and download:
        torchvision_download(layout["torchvision_class"], root, split)
        missing = [name for name in batch_names if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{info.display_name} ({split} split) not found: looked for "
            f"{', '.join(missing)} in {folder.absolute()}.\n"
            f"Expected torchvision's layout: {root.absolute()}/{layout['folder']}/"
            f"{{{', '.join(layout['train'] + layout['test'])}, {layout['meta']}}}.\n"
            f"Get it with --download (download=True) when online, or unpack the official "
            f"{layout['archive']} into {root.absolute()}, or point --data-dir at the folder "
            f"that contains {layout['folder']}/."
            + ("\nOffline, the lossy copy 'cifar10-jpeg' may be available "
               "(label its results CIFAR-10-JPEG)." if info.name == "cifar10" else ""))
    images, labels = [], []
    for name in batch_names:
        batch = _read_cifar_pickle(folder / name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch[layout["label_key"]], dtype=np.int64)
        except (KeyError, ValueError) as error:
            raise CorruptDatasetError(
                f"{folder / name}: not a CIFAR batch ({error!r}); expected 'data' "
                f"(N x 3072 uint8) and '{layout['label_key']}'") from error
        if len(data) != len(batch_labels):
            raise CorruptDatasetError(
                f"{folder / name}: {len(data)} images but {len(batch_labels)} labels")
        images.append(data)
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise CorruptDatasetError(
            f"{folder}: labels outside 0..{info.num_classes - 1} for {info.display_name}")
    return Source(info, images=np.concatenate(images), labels=labels)


def _read_cifar_pickle(path: Path) -> Dict[str, object]:
    """One CIFAR batch as a dict with ``str`` keys (the files are Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise CorruptDatasetError(f"{path}: unreadable CIFAR pickle ({error!r})") from error
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{path}: expected a dict, found {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
