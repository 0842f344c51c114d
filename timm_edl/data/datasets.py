"""``DatasetInfo``, the ``Dataset`` classes that carry it, and the training transforms."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from .errors import CorruptDatasetError

Transform = Callable[[torch.Tensor], torch.Tensor]


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


def with_image_size(info: DatasetInfo, image_size: Optional[int]) -> DatasetInfo:
    """``info`` with ``input_size`` set to ``(C, image_size, image_size)`` (unchanged if ``None``)."""
    if image_size is None:
        return info
    return dataclasses.replace(info, input_size=(info.in_chans, int(image_size), int(image_size)))


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
