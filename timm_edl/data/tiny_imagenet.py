"""Tiny-ImageNet in the official ``tiny-imagenet-200`` layout (held-out split: ``val/``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from .constants import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD
from .datasets import DatasetInfo
from .errors import CorruptDatasetError, DatasetNotFoundError
from .source import IMAGE_EXTENSIONS, PathLike, Source, bullets, data_root

# class_names (the WordNet ids) are read from wnids.txt.
TINY_IMAGENET_INFO = DatasetInfo(
    name="tiny-imagenet", display_name="Tiny-ImageNet", num_classes=200, in_chans=3,
    input_size=(3, 64, 64), class_names=None,
    mean=TINY_IMAGENET_MEAN, std=TINY_IMAGENET_STD, default_eps_linf=8 / 255,
    description="tiny-imagenet-200 layout (train/<wnid>/images, val/val_annotations.txt)")


def _tiny_imagenet_root(data_dir: Optional[PathLike]) -> Path:
    root = data_root(data_dir)
    candidates = [root / "tiny-imagenet-200", root]
    for candidate in candidates:
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise DatasetNotFoundError(
        f"Tiny-ImageNet not found: looked for wnids.txt in\n{bullets(candidates)}\n"
        "Unpack the official tiny-imagenet-200.zip into the data dir (layout: wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt). "
        "It cannot be downloaded by timm-edl.")


def _tiny_imagenet_classes(root: Path) -> Tuple[str, ...]:
    # Sorted like torchvision's ImageFolder on train/, the usual class order.
    wnids = sorted({line.strip() for line in (root / "wnids.txt").read_text().splitlines()
                    if line.strip()})
    if len(wnids) != TINY_IMAGENET_INFO.num_classes:
        raise CorruptDatasetError(
            f"{root / 'wnids.txt'}: {len(wnids)} classes, expected "
            f"{TINY_IMAGENET_INFO.num_classes}")
    return tuple(wnids)


def tiny_imagenet_info(data_dir: Optional[PathLike]) -> DatasetInfo:
    """``TINY_IMAGENET_INFO`` with the WordNet ids of ``wnids.txt`` as class names."""
    classes = _tiny_imagenet_classes(_tiny_imagenet_root(data_dir))
    return dataclasses.replace(TINY_IMAGENET_INFO, class_names=classes)


def load_tiny_imagenet(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """The ``split`` as image files (``test`` reads ``val/``, whose labels are known)."""
    root = _tiny_imagenet_root(data_dir)
    classes = _tiny_imagenet_classes(root)
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    if split == "train":
        samples = []
        for wnid in classes:
            image_folder = root / "train" / wnid / "images"
            if not image_folder.is_dir():
                raise DatasetNotFoundError(f"Tiny-ImageNet: missing {image_folder.absolute()}")
            files = sorted(p for p in image_folder.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS)
            samples += [(str(p), class_index[wnid]) for p in files]
    else:
        # The official test split has no labels: the held-out split is val/,
        # whose labels live in val_annotations.txt (file, wnid, bounding box).
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DatasetNotFoundError(
                f"Tiny-ImageNet val split: missing {annotations.absolute()}")
        samples = []
        for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in class_index:
                raise CorruptDatasetError(
                    f"{annotations}:{line_number}: expected '<file>\\t<wnid>\\t...', got {line!r}")
            path = root / "val" / "images" / fields[0]
            if not path.is_file():
                raise DatasetNotFoundError(f"Tiny-ImageNet val image missing: {path.absolute()}")
            samples.append((str(path), class_index[fields[1]]))
    info = dataclasses.replace(TINY_IMAGENET_INFO, class_names=classes)
    return Source(info, samples=samples)
