"""Image folders: any ``<data_dir>/<split>/<class>/*.{jpg,jpeg,png}`` tree."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.utils.misc import natural_key

from .datasets import DatasetInfo
from .errors import DatasetError, DatasetNotFoundError
from .source import IMAGE_EXTENSIONS, PathLike, Source

# Class names, their number and the image size come from the folder.
IMAGE_FOLDER_INFO = DatasetInfo(
    name="imagefolder", display_name="ImageFolder", num_classes=None, in_chans=3,
    input_size=None, class_names=None,
    mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
    default_eps_linf=4 / 255,
    description="any <data_dir>/<split>/<class>/*.{jpg,jpeg,png} tree")

_SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "val", "validation", "valid")}


def _find_split_folder(root: Path, split: str) -> Optional[Path]:
    return next((root / n for n in _SPLIT_FOLDERS[split] if (root / n).is_dir()), None)


def _class_folders(folder: Path) -> List[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=natural_key)


def _image_folder_root(data_dir: Optional[PathLike]) -> Path:
    if data_dir is None:
        raise DatasetNotFoundError(
            "the imagefolder dataset needs a data_dir (--data-dir) holding "
            "train/<class>/*.jpg and test/<class>/*.jpg (or val/)")
    return Path(data_dir)


def _image_folder_classes(root: Path) -> List[str]:
    """Class names from the train split (falling back to the held-out split)."""
    folder = _find_split_folder(root, "train") or _find_split_folder(root, "test")
    if folder is None:
        raise DatasetNotFoundError(
            f"no split folders in {root.absolute()}: looked for "
            f"{', '.join(_SPLIT_FOLDERS['train'] + _SPLIT_FOLDERS['test'])}; expected "
            "<data_dir>/<split>/<class>/*.{jpg,jpeg,png}")
    classes = _class_folders(folder)
    if not classes:
        raise DatasetNotFoundError(f"no class folders in {folder.absolute()}")
    return classes


def _index_image_folder(root: Path, split: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    split_folder = _find_split_folder(root, split)
    if split_folder is None:
        raise DatasetNotFoundError(
            f"image folder {root.absolute()} has no {split} split: looked for "
            f"{', '.join(str(root.absolute() / n) for n in _SPLIT_FOLDERS[split])}")
    classes = _image_folder_classes(root)
    unknown = sorted(set(_class_folders(split_folder)) - set(classes))
    if unknown:
        raise DatasetError(
            f"{split_folder.absolute()} has classes missing from the train split: "
            f"{', '.join(unknown[:10])}")
    samples, _ = find_images_and_targets(
        str(split_folder), types=IMAGE_EXTENSIONS,
        class_to_idx={name: i for i, name in enumerate(classes)})
    if not samples:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under "
            f"{split_folder.absolute()}")
    return samples, classes


def image_folder_info(data_dir: Optional[PathLike]) -> DatasetInfo:
    """``IMAGE_FOLDER_INFO`` with the class names and image size of the folder's train split."""
    root = _image_folder_root(data_dir)
    classes = _image_folder_classes(root)
    split_folder = _find_split_folder(root, "train") or _find_split_folder(root, "test")
    samples, _ = find_images_and_targets(
        str(split_folder), types=IMAGE_EXTENSIONS,
        class_to_idx={name: i for i, name in enumerate(classes)})
    return _resolve_folder_info(IMAGE_FOLDER_INFO, classes, samples)


def _resolve_folder_info(base: DatasetInfo, classes: Sequence[str],
                         samples: Sequence[Tuple[str, int]]) -> DatasetInfo:
    input_size = base.input_size
    if samples and input_size is None:
        with Image.open(samples[0][0]) as image:
            width, height = image.size
        input_size = (base.in_chans, height, width)
    return dataclasses.replace(base, num_classes=len(classes), class_names=tuple(classes),
                               input_size=input_size)


def load_image_folder(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """The ``split`` as image files; class indices follow the train split's folders."""
    root = _image_folder_root(data_dir)
    samples, classes = _index_image_folder(root, split)
    return Source(_resolve_folder_info(IMAGE_FOLDER_INFO, classes, samples), samples=samples)
