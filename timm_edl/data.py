"""Datasets for training (``timm-edl train``) and evaluation (``timm-edl eval``).

Every dataset yields ``(image, label)`` pairs where ``image`` is a float tensor
of shape ``(C, H, W)`` with values in ``[0, 1]`` and ``label`` an ``int``. There
is no normalisation here: EDLNets normalise their inputs internally, so that
attacks work in pixel space, where the epsilon of an L-inf ball is defined.

Known datasets (``DATASETS``):

``cifar10``, ``cifar100`` (the default of every user-facing command)
    The real CIFAR data in torchvision's layout,
    ``<data_dir>/cifar-10-batches-py`` and ``<data_dir>/cifar-100-python``.
    Downloaded only when asked (``download=True``).
``fashion-mnist``
    The official idx files: Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist``) or torchvision's layout
    ``<data_dir>/FashionMNIST/raw``.
``fashion-mnist-small``
    A real, class-balanced subset of Fashion-MNIST (5,000 train / 1,000 test
    images) shipped inside the package; needs no data at all.
``cifar10-jpeg``
    A lossy (JPEG re-encoded) copy of CIFAR-10 read straight from
    ``train.tar.gz`` / ``test.tar.gz``. Results on it must be labelled
    ``"CIFAR-10-JPEG"`` (``DatasetInfo.display_name``), never "CIFAR-10".
``imagefolder``
    Any ``<data_dir>/<split>/<class>/*.{jpg,jpeg,png}`` tree (custom fine-tuning).
``tiny-imagenet``
    The official ``tiny-imagenet-200`` layout, including its annotated val split.

Splits are ``"train"`` and ``"test"``; ``"val"``/``"validation"`` are accepted
as names of the held-out split, which for tiny-imagenet (whose official test
split has no labels) and image folders without ``test/`` is read from ``val/``.

``n_ex`` always selects the *first* ``n_ex`` examples in the dataset's fixed
order, never a random sample (the RobustBench protocol).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

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
    "eval_transforms",
    "make_loader",
    "cache_dir",
    "read_idx",
]

PathLike = Union[str, os.PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_DATASET = "cifar10"
#: Where datasets are looked for (and downloaded to) when no ``data_dir`` is given.
DEFAULT_DATA_DIR = Path(os.environ.get("TIMM_EDL_DATA_DIR", ".data"))
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Debian package providing ``DEBIAN_FASHION_MNIST_DIR``.
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

_PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "_data"
# A source checkout of this project sits next to the project's shared/ folder,
# which holds the CIFAR-10-JPEG archives; looked at after the data_dir.
_CHECKOUT_SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# --------------------------------------------------------------------------- errors


class DatasetError(Exception):
    """Base class of every dataset error; its message is meant for the end user."""


class UnknownDatasetError(DatasetError, ValueError):
    """The dataset name is not in ``DATASETS``."""


class InvalidSplitError(DatasetError, ValueError):
    """The split is neither ``train`` nor ``test`` (nor a synonym)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data is not on disk; the message says where it looked and how to get it."""


class CorruptDatasetError(DatasetError, ValueError):
    """The data is on disk but unreadable (truncated archive, bad pickle, ...)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """What a model, a trainer or a report needs to know about a dataset.

    ``display_name`` is the label every output must carry (e.g. "CIFAR-10-JPEG"
    for the lossy copy). ``input_size`` is ``(C, H, W)`` as in timm's configs.
    Fields that depend on the files on disk (class names and size of an image
    folder, the WordNet ids of tiny-imagenet) are ``None`` in ``DATASETS`` and
    filled in by :func:`dataset_info` / ``dataset.info``.
    """

    name: str
    display_name: str
    num_classes: Optional[int]
    in_chans: int
    input_size: Optional[Tuple[int, int, int]]
    class_names: Optional[Tuple[str, ...]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    default_eps_linf: Optional[float]
    lossy: bool = False
    horizontal_flip: bool = True
    description: str = ""


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)


def _cifar10_like(name: str, display_name: str, **overrides) -> DatasetInfo:
    fields = dict(
        name=name, display_name=display_name, num_classes=10, in_chans=3,
        input_size=(3, 32, 32), class_names=CIFAR10_CLASSES,
        mean=_CIFAR10_MEAN, std=_CIFAR10_STD, default_eps_linf=8 / 255,
    )
    fields.update(overrides)
    return DatasetInfo(**fields)


def _fashion_like(name: str, display_name: str, **overrides) -> DatasetInfo:
    fields = dict(
        name=name, display_name=display_name, num_classes=10, in_chans=1,
        input_size=(1, 28, 28), class_names=FASHION_MNIST_CLASSES,
        mean=_FASHION_MEAN, std=_FASHION_STD, default_eps_linf=0.1,
        horizontal_flip=False,
    )
    fields.update(overrides)
    return DatasetInfo(**fields)


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({
    "cifar10": _cifar10_like(
        "cifar10", "CIFAR-10",
        description="CIFAR-10, torchvision layout <data_dir>/cifar-10-batches-py"),
    "cifar100": DatasetInfo(
        name="cifar100", display_name="CIFAR-100", num_classes=100, in_chans=3,
        input_size=(3, 32, 32), class_names=CIFAR100_CLASSES,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), default_eps_linf=8 / 255,
        description="CIFAR-100 (fine labels), torchvision layout <data_dir>/cifar-100-python"),
    "cifar10-jpeg": _cifar10_like(
        "cifar10-jpeg", "CIFAR-10-JPEG", lossy=True,
        description="lossy JPEG copy of CIFAR-10 read from train.tar.gz/test.tar.gz; "
                    "never report its numbers as CIFAR-10"),
    "fashion-mnist": _fashion_like(
        "fashion-mnist", "Fashion-MNIST",
        description=f"Fashion-MNIST idx files (Debian {DEBIAN_FASHION_MNIST_PACKAGE} or "
                    "torchvision layout <data_dir>/FashionMNIST/raw)"),
    "fashion-mnist-small": _fashion_like(
        "fashion-mnist-small", "Fashion-MNIST-small",
        description="embedded Fashion-MNIST subset: first 500 train / 100 test images per class"),
    "tiny-imagenet": DatasetInfo(
        name="tiny-imagenet", display_name="Tiny-ImageNet", num_classes=200, in_chans=3,
        input_size=(3, 64, 64), class_names=None,
        mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821), default_eps_linf=8 / 255,
        description="tiny-imagenet-200 layout (train/<wnid>/images, val/val_annotations.txt)"),
    "imagefolder": DatasetInfo(
        name="imagefolder", display_name="ImageFolder", num_classes=None, in_chans=3,
        input_size=None, class_names=None,
        mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
        default_eps_linf=4 / 255,
        description="any <data_dir>/<split>/<class>/*.{jpg,jpeg,png} tree"),
})

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
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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


# --------------------------------------------------------------------------- datasets


class ImageClassificationDataset(Dataset):
    """``(image, label)`` pairs; ``image`` is a float ``(C, H, W)`` tensor in ``[0, 1]``.

    ``transform`` (e.g. :func:`train_transforms`) receives that tensor and may be
    reassigned after construction. ``image_size`` resizes the shorter side and
    centre-crops to a square before ``transform`` runs. ``labels`` holds every
    label as a long tensor, in order.
    """

    def __init__(
        self,
        info: DatasetInfo,
        labels: torch.Tensor,
        transform: Optional[Transform] = None,
        image_size: Optional[int] = None,
    ):
        self.info = info
        self.labels = labels
        self.transform = transform
        self._resize = _resize_transform(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.load_image(index)
        if self._resize is not None:
            image = self._resize(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def load_image(self, index: int) -> torch.Tensor:
        """The stored image ``index`` as a float ``(C, H, W)`` tensor in ``[0, 1]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.display_name!r}, n={len(self)}, "
                f"input_size={self.info.input_size})")


class InMemoryImageDataset(ImageClassificationDataset):
    """Images held in memory as one ``uint8`` tensor of shape ``(N, C, H, W)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 transform: Optional[Transform] = None, image_size: Optional[int] = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("images must be a uint8 (N, C, H, W) tensor with one label each")
        super().__init__(info, labels, transform, image_size)
        self.images = images

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index].float().div_(255)


class ImageFileDataset(ImageClassificationDataset):
    """Images decoded from files on demand; ``samples`` is a list of ``(path, label)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], info: DatasetInfo,
                 transform: Optional[Transform] = None, image_size: Optional[int] = None):
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        super().__init__(info, labels, transform, image_size)
        self.samples = list(samples)
        self._pil_mode = "L" if info.in_chans == 1 else "RGB"

    def load_image(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                pixels = pil_to_tensor(image.convert(self._pil_mode))
        except (UnidentifiedImageError, OSError) as error:
            raise CorruptDatasetError(f"cannot decode image {path}: {error}") from error
        return pixels.float().div_(255)


def _resize_transform(image_size: Optional[int]) -> Optional[Transform]:
    if image_size is None:
        return None
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose([T.Resize(int(image_size), antialias=True), T.CenterCrop(int(image_size))])


def _with_image_size(info: DatasetInfo, image_size: Optional[int]) -> DatasetInfo:
    if image_size is None:
        return info
    return dataclasses.replace(info, input_size=(info.in_chans, int(image_size), int(image_size)))


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


# --------------------------------------------------------------------------- public API


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
    """Open split ``split`` of dataset ``name`` (see the module docstring for sources).

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
    source = _SOURCES[key](data_dir, split, download)
    info = _with_image_size(source.info, image_size)
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
    info = DATASETS[key]
    if key == "imagefolder":
        info = _image_folder_info(data_dir)
    elif key == "tiny-imagenet":
        info = dataclasses.replace(
            info, class_names=_tiny_imagenet_classes(_tiny_imagenet_root(data_dir)))
    return _with_image_size(info, image_size)


def train_transforms(info: DatasetInfo, augment: bool = True) -> Transform:
    """Training augmentation on ``[0, 1]`` tensors: random crop and horizontal flip.

    The crop pads by 1/8 of the side (4 pixels for 32x32 and 28x28 images, as
    in the usual CIFAR recipe). No flip where ``info.horizontal_flip`` is false
    (Fashion-MNIST). No normalisation: the models normalise internally.
    With ``augment=False`` the transform is the identity.
    """
    if not augment:
        return T.Compose([])
    if info.input_size is None:
        raise ValueError(f"{info.display_name}: input size unknown; resolve it with "
                         "dataset_info(name, data_dir) or pass image_size")
    height, width = info.input_size[1:]
    padding = max(1, (height + 4) // 8)  # side / 8, rounded: 4 for 28 and 32, 8 for 64
    steps: List[Transform] = [T.RandomCrop((height, width), padding=padding)]
    if info.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps)


def eval_transforms(info: DatasetInfo) -> Transform:
    """Evaluation transform: the identity (images are already ``[0, 1]`` tensors)."""
    return T.Compose([])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A plain :class:`~torch.utils.data.DataLoader`; ``seed`` fixes the shuffling order.

    (timm's ``create_loader`` targets PIL pipelines with normalisation and
    prefetching on GPU; these datasets already yield unnormalised tensors.)
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, generator=generator, pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def cache_dir() -> Path:
    """Where decoded archives are cached: ``$TIMM_EDL_CACHE_DIR`` or ``~/.cache/timm-edl``."""
    explicit = os.environ.get("TIMM_EDL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "timm-edl"


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """What a loader found: either in-memory arrays or a list of image files."""

    info: DatasetInfo
    images: Optional[np.ndarray] = None  # uint8 (N, C, H, W)
    labels: Optional[np.ndarray] = None  # integer (N,)
    samples: Optional[List[Tuple[str, int]]] = None


def _data_root(data_dir: Optional[PathLike]) -> Path:
    return Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR


def _bullets(paths: Sequence[Path]) -> str:
    return "\n".join(f"  - {Path(p).absolute()}" for p in paths)


# CIFAR ----------------------------------------------------------------------

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


def _load_cifar(key: str, data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
    # The batches are read here rather than through torchvision.datasets.CIFAR10,
    # which md5-checks every file on each construction and so rejects any copy
    # that is not byte-identical to the official one (subsets, test fixtures).
    layout = _CIFAR_LAYOUT[key]
    info = DATASETS[key]
    root = _data_root(data_dir)
    folder = root / layout["folder"]
    batch_names = layout[split]
    missing = [name for name in batch_names if not (folder / name).is_file()]
    if missing and download:
        _torchvision_download(layout["torchvision_class"], root, split)
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
               "(label its results CIFAR-10-JPEG)." if key == "cifar10" else ""))
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
    return _Source(info, images=np.concatenate(images), labels=labels)


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


def _torchvision_download(class_name: str, root: Path, split: str) -> None:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        dataset_class(root=str(root), train=(split == "train"), download=True)
    except Exception as error:  # network errors come in many types
        raise DatasetNotFoundError(
            f"downloading {class_name} into {root.absolute()} failed: {error}") from error


# Fashion-MNIST -----------------------------------------------------------------

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST format), gzipped or not."""
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
    root = _data_root(data_dir)
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, DEBIAN_FASHION_MNIST_DIR]


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
    info = DATASETS["fashion-mnist"]
    image_stem, label_stem = _FASHION_MNIST_FILES[split]

    def locate() -> Optional[Tuple[Path, Path]]:
        for directory in _fashion_mnist_dirs(data_dir):
            image_file, label_file = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
            if image_file and label_file:
                return image_file, label_file
        return None

    found = locate()
    if found is None and download:
        _torchvision_download("FashionMNIST", _data_root(data_dir), split)
        found = locate()
    if found is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST ({split} split) not found: looked for {image_stem}[.gz] and "
            f"{label_stem}[.gz] in\n{_bullets(_fashion_mnist_dirs(data_dir))}\n"
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
    return _Source(info, images=images[:, None], labels=labels.astype(np.int64))


FASHION_MNIST_SMALL_FILE = _PACKAGE_DATA_DIR / "fashion_mnist_small.npz"


def _load_fashion_mnist_small(data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
    del data_dir, download  # shipped with the package
    info = DATASETS["fashion-mnist-small"]
    if not FASHION_MNIST_SMALL_FILE.is_file():
        raise DatasetNotFoundError(
            f"the embedded subset {FASHION_MNIST_SMALL_FILE} is missing from this installation "
            "of timm-edl; reinstall the package (it ships timm_edl/_data/*.npz)")
    try:
        with np.load(FASHION_MNIST_SMALL_FILE) as arrays:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    except (OSError, ValueError, KeyError, zlib.error) as error:
        raise CorruptDatasetError(f"{FASHION_MNIST_SMALL_FILE}: unreadable ({error!r})") from error
    return _Source(info, images=images[:, None], labels=labels.astype(np.int64))


# CIFAR-10-JPEG -------------------------------------------------------------------

# Bump when the decoded layout or order changes, so stale caches are ignored.
_CIFAR10_JPEG_CACHE_VERSION = 1


def _cifar10_jpeg_dirs(data_dir: Optional[PathLike]) -> List[Path]:
    root = _data_root(data_dir)
    return [root, root / "cifar10-jpeg", _CHECKOUT_SHARED_DATA_DIR / "cifar10-jpeg"]


def _load_cifar10_jpeg(data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
    info = DATASETS["cifar10-jpeg"]
    archive_name = f"{split}.tar.gz"
    candidates = _cifar10_jpeg_dirs(data_dir)
    archive = next((d / archive_name for d in candidates if (d / archive_name).is_file()), None)
    if archive is None:
        raise DatasetNotFoundError(
            f"CIFAR-10-JPEG ({split} split) not found: looked for {archive_name} in\n"
            f"{_bullets(candidates)}\n"
            "Point --data-dir at the folder holding train.tar.gz and test.tar.gz (gzip'd tars of "
            "<split>/<class>/NNNN.jpg). It cannot be downloaded"
            + ("; for the real data use --dataset cifar10 --download." if download else "."))
    digest = _sha256(archive)
    _check_against_sha256sums(archive, digest)
    cache_file = (cache_dir() / "cifar10-jpeg"
                  / f"{split}-{digest[:16]}-v{_CIFAR10_JPEG_CACHE_VERSION}.npz")
    cached = _read_cache(cache_file)
    if cached is None:
        cached = _decode_cifar10_jpeg(archive, split)
        _write_cache(cache_file, cached)
    images, labels = cached
    return _Source(info, images=images, labels=labels.astype(np.int64))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# Image folders ------------------------------------------------------------------

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
        str(split_folder), types=_IMAGE_EXTENSIONS,
        class_to_idx={name: i for i, name in enumerate(classes)})
    if not samples:
        raise DatasetNotFoundError(
            f"no images ({', '.join(_IMAGE_EXTENSIONS)}) in class folders under "
            f"{split_folder.absolute()}")
    return samples, classes


def _image_folder_info(data_dir: Optional[PathLike]) -> DatasetInfo:
    root = _image_folder_root(data_dir)
    classes = _image_folder_classes(root)
    split_folder = _find_split_folder(root, "train") or _find_split_folder(root, "test")
    samples, _ = find_images_and_targets(
        str(split_folder), types=_IMAGE_EXTENSIONS,
        class_to_idx={name: i for i, name in enumerate(classes)})
    return _resolve_folder_info(DATASETS["imagefolder"], classes, samples)


def _resolve_folder_info(base: DatasetInfo, classes: Sequence[str],
                         samples: Sequence[Tuple[str, int]]) -> DatasetInfo:
    input_size = base.input_size
    if samples and input_size is None:
        with Image.open(samples[0][0]) as image:
            width, height = image.size
        input_size = (base.in_chans, height, width)
    return dataclasses.replace(base, num_classes=len(classes), class_names=tuple(classes),
                               input_size=input_size)


def _load_image_folder(data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
    root = _image_folder_root(data_dir)
    samples, classes = _index_image_folder(root, split)
    return _Source(_resolve_folder_info(DATASETS["imagefolder"], classes, samples), samples=samples)


# Tiny-ImageNet ---------------------------------------------------------------------


def _tiny_imagenet_root(data_dir: Optional[PathLike]) -> Path:
    root = _data_root(data_dir)
    candidates = [root / "tiny-imagenet-200", root]
    for candidate in candidates:
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise DatasetNotFoundError(
        f"Tiny-ImageNet not found: looked for wnids.txt in\n{_bullets(candidates)}\n"
        "Unpack the official tiny-imagenet-200.zip into the data dir (layout: wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt). "
        "It cannot be downloaded by timm-edl.")


def _tiny_imagenet_classes(root: Path) -> Tuple[str, ...]:
    # Sorted like torchvision's ImageFolder on train/, the usual class order.
    wnids = sorted({line.strip() for line in (root / "wnids.txt").read_text().splitlines()
                    if line.strip()})
    if len(wnids) != DATASETS["tiny-imagenet"].num_classes:
        raise CorruptDatasetError(
            f"{root / 'wnids.txt'}: {len(wnids)} classes, expected "
            f"{DATASETS['tiny-imagenet'].num_classes}")
    return tuple(wnids)


def _load_tiny_imagenet(data_dir: Optional[PathLike], split: str, download: bool) -> _Source:
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
                           if p.suffix.lower() in _IMAGE_EXTENSIONS)
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
    info = dataclasses.replace(DATASETS["tiny-imagenet"], class_names=classes)
    return _Source(info, samples=samples)


_SOURCES: Dict[str, Callable[[Optional[PathLike], str, bool], _Source]] = {
    "cifar10": lambda data_dir, split, download: _load_cifar("cifar10", data_dir, split, download),
    "cifar100": lambda data_dir, split, download: _load_cifar("cifar100", data_dir, split, download),
    "cifar10-jpeg": _load_cifar10_jpeg,
    "fashion-mnist": _load_fashion_mnist,
    "fashion-mnist-small": _load_fashion_mnist_small,
    "imagefolder": _load_image_folder,
    "tiny-imagenet": _load_tiny_imagenet,
}
