"""Common corruptions: the 15 corruptions RobustBench averages over, the published
CIFAR-10-C / CIFAR-100-C layout, and corruptions generated for datasets without one.

The layout (Hendrycks & Dietterich's, read by RobustBench): a folder with one
``<corruption>.npy`` per corruption, uint8 of shape ``(5 n, H, W, C)`` = 5 severities of
the same ``n`` test images (severity 1 first), plus ``labels.npy`` ``(5 n,)`` (the ``n``
test labels repeated 5 times).  The first ``m`` points of severity ``s`` are the rows
``[(s - 1) n, (s - 1) n + m)``; the files are memory-mapped, only those rows are read.

Published sets (:data:`PUBLISHED`): ``cifar10`` -> ``<data_dir>/CIFAR-10-C``, ``cifar100``
-> ``<data_dir>/CIFAR-100-C`` (``n`` = 10,000), downloaded from Zenodo on request.

Every other dataset gets its corruptions generated (:func:`generate`) by the package
``imagecorruptions-imaug`` (import name ``imagecorruptions``), seeded per image and cached
on disk in the same layout.  The library takes ``(H, W)`` or ``(H, W, 1 | 3)`` uint8
images of at least 32 x 32 pixels and returns RGB: a smaller image is padded to 32 x 32 by
repeating its border pixels and cropped back afterwards, and a grayscale image (which the
library copies into three equal channels) is turned back into one channel with PIL's
luma conversion ``L = 0.299 R + 0.587 G + 0.114 B``.  Results on generated data are
labelled ``"<dataset> (corruptions generated with imagecorruptions-imaug <version>)"``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import CorruptDatasetError, DatasetError, DatasetNotFoundError
from .source import PathLike, data_root

__all__ = ['CORRUPTIONS', 'SEVERITIES', 'PUBLISHED', 'GENERATOR', 'CorruptedSet', 'published_folder',
           'read_layout', 'open_published', 'generate', 'generator_version', 'corrupt_image', 'parse_corruptions',
           'parse_severities']

#: the 15 corruptions of CIFAR-10-C that RobustBench averages over, in its order
CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
               'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate',
               'jpeg_compression')
SEVERITIES = (1, 2, 3, 4, 5)
#: the package that generates corruptions (its distribution name)
GENERATOR = 'imagecorruptions-imaug'
#: the library's corruptions that draw from their own seeded generator, not numpy's global one
_OWN_SEED = ('glass_blur', 'impulse_noise')
_MIN_SIDE = 32  # the library refuses smaller images


@dataclass(frozen=True)
class _Published:
    folder: str
    url: str


#: dataset -> the published corrupted test set (folder name under the data dir, Zenodo archive)
PUBLISHED: Dict[str, _Published] = {
    'cifar10': _Published('CIFAR-10-C', 'https://zenodo.org/records/2535967/files/CIFAR-10-C.tar'),
    'cifar100': _Published('CIFAR-100-C', 'https://zenodo.org/records/3555552/files/CIFAR-100-C.tar'),
}


@dataclass(frozen=True)
class CorruptedSet:
    """The first ``n`` points of each severity of a folder in the -C layout.

    ``label`` names the data in every result ("CIFAR-10-C", or the generated set's label);
    ``labels`` (n,) int64; ``generated`` is None for a published set, else
    ``{'library', 'version', 'seed'}``.
    """
    folder: Path
    label: str
    n: int
    n_per_severity: int
    labels: np.ndarray
    generated: Optional[Dict[str, object]] = None

    def images(self, corruption: str, severity: int) -> np.ndarray:
        """(n, H, W, C) uint8, memory-mapped rows of ``<corruption>.npy``."""
        start = (int(severity) - 1) * self.n_per_severity
        return _load(self.folder / f'{corruption}.npy')[start:start + self.n]


def parse_corruptions(text: Optional[str]) -> Tuple[str, ...]:
    """``'gaussian_noise,fog'`` -> the named corruptions in :data:`CORRUPTIONS` order; None/'all': all 15."""
    if text is None or str(text).strip().lower() in ('', 'all'):
        return CORRUPTIONS
    names = [t.strip().lower().replace('-', '_') for t in str(text).split(',') if t.strip()]
    unknown = [t for t in names if t not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    return tuple(c for c in CORRUPTIONS if c in names)


def parse_severities(text: Optional[str]) -> Tuple[int, ...]:
    """``'1,3'`` or ``'2-5'`` -> sorted severities in 1..5; None: all five."""
    if text is None or not str(text).strip():
        return SEVERITIES
    out = set()
    try:
        for part in str(text).split(','):
            lo, _, hi = part.strip().partition('-')
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"severities must be integers in 1..5 such as '1,3' or '2-5', got {text!r}") from None
    if not out or not out <= set(SEVERITIES):
        raise ValueError(f"severities must be integers in 1..5 such as '1,3' or '2-5', got {text!r}")
    return tuple(sorted(out))


# ----------------------------------------------------------------------------- the layout

def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode='r', allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CorruptDatasetError(f"{path}: not a readable .npy array ({error})") from error


def _read_labels(folder: Path, n: Optional[int], clean_labels: Optional[np.ndarray]) -> Tuple[np.ndarray, int]:
    """The first ``n`` labels (all: None) and the points per severity, after checking that
    ``labels.npy`` holds the same labels for every severity (and the clean split's, when given)."""
    path = folder / 'labels.npy'
    if not path.is_file():
        raise DatasetNotFoundError(f"{path.absolute()} is missing: a corruption folder holds labels.npy (the test "
                                   f"labels repeated once per severity) next to the <corruption>.npy files")
    labels = _load(path)
    if labels.ndim != 1 or labels.dtype.kind not in 'iu' or len(labels) % len(SEVERITIES):
        raise CorruptDatasetError(f"{path}: expected an integer array of shape (5 n,), got {labels.dtype} "
                                  f"{labels.shape}")
    per = len(labels) // len(SEVERITIES)
    n = per if n is None else n
    if per < n:
        raise ValueError(f"{folder}: {per} points per severity, asked for the first {n}")
    blocks = np.asarray(labels).reshape(len(SEVERITIES), per)
    bad = [s + 1 for s in range(1, len(SEVERITIES)) if not np.array_equal(blocks[s], blocks[0])]
    if bad:
        raise CorruptDatasetError(f"{path}: the labels of severity {', '.join(map(str, bad))} differ from those of "
                                  f"severity 1 (each severity must repeat the same test labels)")
    first = blocks[0, :n].astype(np.int64)
    clean = None if clean_labels is None else np.asarray(clean_labels)[:n]
    if clean is not None and not np.array_equal(first[:len(clean)], clean):
        wrong = int(np.argmax(first[:len(clean)] != clean))
        raise CorruptDatasetError(f"{path}: the labels do not match the clean test split (first difference at point "
                                  f"{wrong}: {first[wrong]} vs {clean[wrong]}); the folder belongs to another "
                                  f"dataset or split")
    return first, per


def read_layout(folder: PathLike, corruptions: Sequence[str], n: Optional[int], image_shape: Tuple[int, int, int], *,
                label: str, clean_labels: Optional[np.ndarray] = None,
                generated: Optional[Dict[str, object]] = None) -> CorruptedSet:
    """Check ``folder`` (the -C layout) for ``corruptions`` and return its first ``n`` points.

    ``n``: None for all the points of a severity; ``image_shape``: (H, W, C) of one image.  Raises :class:`DatasetNotFoundError` for a
    missing folder or file, :class:`CorruptDatasetError` for a wrong shape, dtype or labels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"corruption folder {folder.absolute()} not found")
    labels, per = _read_labels(folder, n, clean_labels)
    expected = (len(SEVERITIES) * per, *image_shape)
    for corruption in corruptions:
        path = folder / f'{corruption}.npy'
        if not path.is_file():
            raise DatasetNotFoundError(f"corruption {corruption!r} missing: {path.absolute()} not found (choose "
                                       f"the corruptions present with --corruptions)")
        array = _load(path)
        if array.dtype != np.uint8 or array.shape != expected:
            raise CorruptDatasetError(f"{path}: expected uint8 {expected} (5 severities x {per} images of "
                                      f"{image_shape}, as labels.npy says), got {array.dtype} {array.shape}")
    return CorruptedSet(folder, label, len(labels), per, labels, generated)


def published_folder(dataset: str, data_dir: Optional[PathLike]) -> Path:
    """``<data_dir>/CIFAR-10-C`` (or ``CIFAR-100-C``): where the published set is looked for."""
    return data_root(data_dir) / PUBLISHED[dataset].folder


def open_published(dataset: str, data_dir: Optional[PathLike], corruptions: Sequence[str], n: Optional[int],
                   image_shape: Tuple[int, int, int], *, folder: Optional[PathLike] = None,
                   clean_labels: Optional[np.ndarray] = None, download: bool = False) -> CorruptedSet:
    """The published corrupted test set of ``dataset`` (a key of :data:`PUBLISHED`), from
    ``folder`` (default :func:`published_folder`); downloaded from Zenodo if ``download``."""
    pub = PUBLISHED[dataset]
    folder = Path(folder) if folder is not None else published_folder(dataset, data_dir)
    if not folder.is_dir() and download:
        _download(pub, folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{pub.folder} not found: looked for {folder.absolute()}.\nExpected the published layout: that folder "
            f"holding one <corruption>.npy per corruption (uint8, 5 severities x 10000 images of {image_shape}) "
            f"and labels.npy.\nGet it with --download when online (it fetches {pub.url} and unpacks it into "
            f"{folder.parent.absolute()}), or unpack that archive there yourself, or point --corruption-dir at "
            f"the folder.")
    return read_layout(folder, corruptions, n, image_shape, label=pub.folder, clean_labels=clean_labels)


def _download(pub: _Published, folder: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(pub.url, download_root=str(folder.parent), extract_root=str(folder.parent))
    except Exception as error:  # network errors come in many types
        raise DatasetNotFoundError(f"downloading {pub.url} into {folder.parent.absolute()} failed: {error}") \
            from error
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{pub.url} was unpacked into {folder.parent.absolute()} but holds no "
                                   f"{folder.name}/ folder")


# ----------------------------------------------------------------------------- generation

def generator_version() -> str:
    """The installed version of :data:`GENERATOR` (a clear error when it is missing)."""
    from importlib import metadata
    try:
        return metadata.version(GENERATOR)
    except metadata.PackageNotFoundError:
        raise DatasetError(f"generating corruptions needs the package {GENERATOR} (pip install {GENERATOR})") \
            from None


def _image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A 32-bit seed of its own for every (seed, corruption, severity, image index)."""
    digest = hashlib.sha256(f'{seed}/{corruption}/{severity}/{index}'.encode()).digest()
    return int.from_bytes(digest[:4], 'little')


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One (H, W, C) uint8 image (C = 1 or 3) corrupted by the library, same shape and dtype.

    The library draws from numpy's global generator (and ``glass_blur`` / ``impulse_noise``
    from a ``seed`` argument): both are seeded with ``seed``; the caller restores the
    global state.  Images under 32 pixels a side are edge-padded, then cropped back.
    """
    from imagecorruptions import corrupt
    from PIL import Image
    h, w, c = image.shape
    pad_h, pad_w = max(0, _MIN_SIDE - h), max(0, _MIN_SIDE - w)
    padded = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode='edge')
    np.random.seed(seed)
    kwargs = {'seed': seed} if corruption in _OWN_SEED else {}
    out = corrupt(padded[..., 0] if c == 1 else padded, severity=severity, corruption_name=corruption, **kwargs)
    if c == 1:  # the library returns three channels
        out = np.asarray(Image.fromarray(out).convert('L'))[..., None]
    return np.ascontiguousarray(out[pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w])


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file beside ``path``, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}.', suffix='.npy.partial')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _corruption_file(images: np.ndarray, corruption: str, seed: int) -> np.ndarray:
    """(5 n, H, W, C): every image at every severity (numpy's global state restored afterwards)."""
    state = np.random.get_state()
    try:
        return np.stack([corrupt_image(image, corruption, s, _image_seed(seed, corruption, s, i))
                         for s in SEVERITIES for i, image in enumerate(images)])
    finally:
        np.random.set_state(state)


def generate(images: np.ndarray, labels: np.ndarray, *, name: str, display_name: str, cache: PathLike, seed: int,
             corruptions: Sequence[str], log=None) -> CorruptedSet:
    """Corrupt ``images`` (uint8 (n, C, H, W)) with ``corruptions`` at every severity, cached.

    The cache folder is ``<cache>/<name>-n<n>-seed<seed>-<library>-<version>-<digest>`` (the
    digest is of the clean images and labels) in the -C layout; a corruption already there is
    reused, a missing one generated and written atomically.  ``name`` says dataset and split.
    """
    version = generator_version()
    images = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 2, 3, 1))
    labels = np.asarray(labels, dtype=np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:12]
    folder = Path(cache) / f'{name}-n{len(images)}-seed{seed}-{GENERATOR}-{version}-{digest}'
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / 'labels.npy').is_file():
        _save_atomic(folder / 'labels.npy', np.tile(labels, len(SEVERITIES)))
    for corruption in corruptions:
        if not (folder / f'{corruption}.npy').is_file():
            if log is not None:
                log(f"[corruptions] generating {corruption} for {len(images)} images x {len(SEVERITIES)} severities")
            _save_atomic(folder / f'{corruption}.npy', _corruption_file(images, corruption, seed))
    label = f"{display_name} (corruptions generated with {GENERATOR} {version})"
    return read_layout(folder, corruptions, len(images), images.shape[1:], label=label, clean_labels=labels,
                       generated={'library': GENERATOR, 'version': version, 'seed': int(seed)})
