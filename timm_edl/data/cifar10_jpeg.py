"""CIFAR-10-JPEG: a lossy copy of CIFAR-10 decoded from ``<split>.tar.gz`` and cached."""
from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .cifar import CIFAR10_INFO
from .constants import CIFAR10_CLASSES
from .errors import CorruptDatasetError, DatasetNotFoundError
from .source import PathLike, Source, bullets, data_root
from ..weights import file_sha256

CIFAR10_JPEG_INFO = dataclasses.replace(
    CIFAR10_INFO, name="cifar10-jpeg", display_name="CIFAR-10-JPEG", lossy=True,
    description="lossy JPEG copy of CIFAR-10 read from train.tar.gz/test.tar.gz; "
                "never report its numbers as CIFAR-10")

# A source checkout of this project sits next to the project's shared/ folder,
# which holds the CIFAR-10-JPEG archives; looked at after the data_dir.
_CHECKOUT_SHARED_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"

# Bump when the decoded layout or order changes, so stale caches are ignored.
_CIFAR10_JPEG_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where decoded archives are cached: ``$TIMM_EDL_CACHE_DIR`` or ``~/.cache/timm-edl``."""
    explicit = os.environ.get("TIMM_EDL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "timm-edl"


def _cifar10_jpeg_dirs(data_dir: Optional[PathLike]) -> List[Path]:
    root = data_root(data_dir)
    return [root, root / "cifar10-jpeg", _CHECKOUT_SHARED_DATA_DIR / "cifar10-jpeg"]


def load_cifar10_jpeg(data_dir: Optional[PathLike], split: str, download: bool) -> Source:
    """The ``split`` as uint8 arrays, decoded once and then read from :func:`cache_dir`."""
    archive_name = f"{split}.tar.gz"
    candidates = _cifar10_jpeg_dirs(data_dir)
    archive = next((d / archive_name for d in candidates if (d / archive_name).is_file()), None)
    if archive is None:
        raise DatasetNotFoundError(
            f"CIFAR-10-JPEG ({split} split) not found: looked for {archive_name} in\n"
            f"{bullets(candidates)}\n"
            "Point --data-dir at the folder holding train.tar.gz and test.tar.gz (gzip'd tars of "
            "<split>/<class>/NNNN.jpg). It cannot be downloaded"
            + ("; for the real data use --dataset cifar10 --download." if download else "."))
    digest = file_sha256(archive)
    _check_against_sha256sums(archive, digest)
    cache_file = (cache_dir() / "cifar10-jpeg"
                  / f"{split}-{digest[:16]}-v{_CIFAR10_JPEG_CACHE_VERSION}.npz")
    cached = _read_cache(cache_file)
    if cached is None:
        cached = _decode_cifar10_jpeg(archive, split)
        _write_cache(cache_file, cached)
    images, labels = cached
    return Source(CIFAR10_JPEG_INFO, images=images, labels=labels.astype(np.int64))


def _check_against_sha256sums(archive: Path, digest: str) -> None:
    """If a SHA256SUMS file sits beside the archive, the archive must match it."""
    sums_file = archive.parent / "SHA256SUMS"
    if not sums_file.is_file():
        return
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == archive.name and parts[0].lower() != digest:
            raise CorruptDatasetError(
                f"{archive}: sha256 {digest} does not match {sums_file} ({parts[0]}); "
                "the archive is damaged or was replaced")


def _decode_cifar10_jpeg(archive: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Decode ``<split>/<class>/NNNN.jpg`` members into uint8 ``(N, 3, 32, 32)`` arrays.

    The archive groups images by class and numbers them in CIFAR's original
    order within each class; that order across classes is lost. So the result
    interleaves the classes: the k-th image of every class (classes in CIFAR-10
    order), then the (k+1)-th, ... Any prefix is therefore class-balanced, which
    keeps "the first n_ex examples" meaningful for evaluation.
    """
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    entries = []  # (number within class, class index, image)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = Path(member.name).parts
                if len(parts) < 3 or parts[-3] != split or not parts[-1].lower().endswith(".jpg"):
                    continue
                class_name, stem = parts[-2], Path(parts[-1]).stem
                if class_name not in class_index or not stem.isdigit():
                    raise CorruptDatasetError(
                        f"{archive}: unexpected member {member.name!r} (expected "
                        f"{split}/<CIFAR-10 class>/NNNN.jpg)")
                data = tar.extractfile(member).read()
                entries.append((int(stem), class_index[class_name], _decode_rgb32(data, member.name)))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise CorruptDatasetError(f"{archive}: damaged or not a .tar.gz ({error})") from error
    if not entries:
        raise CorruptDatasetError(f"{archive}: no {split}/<class>/*.jpg images inside")
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    images = np.stack([image for _, _, image in entries]).transpose(0, 3, 1, 2)
    labels = np.array([label for _, label, _ in entries], dtype=np.uint8)
    return np.ascontiguousarray(images), labels


def _decode_rgb32(data: bytes, member_name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise CorruptDatasetError(f"cannot decode {member_name}: {error}") from error
    if pixels.shape != (32, 32, 3):
        raise CorruptDatasetError(f"{member_name}: size {pixels.shape[:2]}, expected 32x32")
    return pixels


def _read_cache(path: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as arrays:
            return arrays["images"], arrays["labels"]
    except Exception:  # a damaged cache is just a cache miss
        return None


def _write_cache(path: Path, arrays: Tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = arrays
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, images=images, labels=labels)
        os.replace(partial, path)  # atomic: concurrent readers never see half a file
    except OSError as error:
        warnings.warn(f"could not cache decoded CIFAR-10-JPEG at {path}: {error}")
