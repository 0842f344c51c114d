"""What every data source shares: the ``Source`` it returns and where it looks for files.

A source is a function ``load(data_dir, split, download) -> Source`` in one of
the per-dataset modules; ``registry.py`` maps dataset names to them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .datasets import DatasetInfo
from .errors import DatasetNotFoundError

PathLike = Union[str, os.PathLike]

#: Where datasets are looked for (and downloaded to) when no ``data_dir`` is given.
DEFAULT_DATA_DIR = Path(os.environ.get("TIMM_EDL_DATA_DIR", ".data"))
#: Suffixes of the image files read from folders (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Source:
    """What a loader found: either in-memory arrays or a list of image files."""

    info: DatasetInfo
    images: Optional[np.ndarray] = None  # uint8 (N, C, H, W)
    labels: Optional[np.ndarray] = None  # integer (N,)
    samples: Optional[List[Tuple[str, int]]] = None  # (image path, label)


def data_root(data_dir: Optional[PathLike]) -> Path:
    """``data_dir``, or ``DEFAULT_DATA_DIR`` when it is ``None``."""
    return Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR


def bullets(paths: Sequence[PathLike]) -> str:
    """The absolute ``paths`` as an indented list, for error messages."""
    return "\n".join(f"  - {Path(p).absolute()}" for p in paths)


def torchvision_download(class_name: str, root: Path, split: str) -> None:
    """Download ``torchvision.datasets.<class_name>``'s ``split`` into ``root``."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        dataset_class(root=str(root), train=(split == "train"), download=True)
    except Exception as error:  # network errors come in many types
        raise DatasetNotFoundError(
            f"downloading {class_name} into {root.absolute()} failed: {error}") from error
