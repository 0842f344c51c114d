"""The training data with a seeded order and augmentation, and the validation subset.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and the augmentation
of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)`` (the same with any number of
data-loader workers), so a resumed run sees exactly the data of an uninterrupted one.

``data_on_device: true`` replaces the data loader by :class:`DeviceBatches`: the training
images as one uint8 tensor on the device, batched in the same order, each batch cropped and
flipped on the device by a generator seeded with ``(seed, e, b)`` (batch ``b`` of epoch ``e``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, TensorDataset
from torchvision import transforms as T

from .. import data as D
from .config import ConfigError, TrainConfig

__all__ = ['mix_seed', 'EpochShuffleSampler', 'SeededView', 'DeviceBatches', 'TrainData', 'prepare_data']

HOLDOUT_SEED = 20250202  # fixed: the hold-out set does not change with the run's seed


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix-style; stable across Python runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler):
    """Yields ``(epoch, i)`` keys; the order of epoch ``e`` depends only on ``(seed, e)``."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 1, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return iter([(epoch, i) for i in order])


class SeededView(Dataset):
    """``indices`` of ``base`` with per-(epoch, sample) seeded augmentation.

    Indexed by the ``(epoch, i)`` keys of :class:`EpochShuffleSampler`; returns
    ``(image, label, index into base)``.
    """

    def __init__(self, base: Dataset, indices: List[int], transform, seed: int):
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key
        index = self.indices[i]
        image, label = self.base[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, 2, epoch, index))
                image = self.transform(image)
        return image, label, index


class DeviceBatches:
    """Training batches served from one uint8 tensor ``(N, C, H, W)`` on the device.

    Epoch ``e`` visits the images in :class:`EpochShuffleSampler`'s order in batches of
    ``batch_size`` (the last partial one dropped); process ``r`` of ``W`` gets batches
    ``r, r + W, ...`` (as accelerate shards a batch sampler). With ``pad`` > 0 each image is
    cropped at an offset ``(dy, dx)`` drawn uniformly from ``{0..2 pad}^2`` out of its
    zero-padded copy (torchvision's ``RandomCrop(padding=pad)``), then flipped left-right with
    probability ``flip_p``; the draws come from a device generator seeded by ``(seed, e, b)``.
    Yields ``(x, y, index)``: x float32 ``(B, C, H, W)`` in [0, 1] and y on the device, the
    dataset indices on the CPU.  Nothing is read back to the host.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch_size: int,
                 seed: int, device: torch.device, *, pad: int = 0, flip_p: float = 0.0, rank: int = 0,
                 world: int = 1):
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.indices = indices.cpu()
        self.batch_size, self.seed, self.pad, self.flip_p = batch_size, seed, pad, flip_p
        self.rank, self.world = rank, world
        self.sampler = EpochShuffleSampler(len(self.labels), seed)
        self.padded = F.pad(self.images, (pad,) * 4) if pad else self.images
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return (len(self.labels) // self.batch_size) // self.world

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's batches of ``epoch`` from its ``skip``-th on."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long)
        on_device = order.to(self.labels.device)
        for k in range(skip, len(self)):
            b = k * self.world + self.rank
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            self.generator.manual_seed(mix_seed(self.seed, 2, epoch, b))
            yield self.crop_and_flip(on_device[rows]), self.labels[on_device[rows]], self.indices[order[rows]]

    def crop_and_flip(self, rows: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The images ``rows`` cropped and flipped as the class docstring says, as float32."""
        g = self.generator if generator is None else generator
        n, (c, h, w), p, dev = len(rows), self.images.shape[1:], self.pad, self.images.device
        if p:
            dy, dx = (torch.randint(0, 2 * p + 1, (n, 1), generator=g, device=dev) for _ in range(2))
            ys = (dy + torch.arange(h, device=dev))[:, None, :, None]
            xs = (dx + torch.arange(w, device=dev))[:, None, None, :]
            x = self.padded[rows[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], ys, xs]
        else:
            x = self.images[rows]
        if self.flip_p:
            flip = torch.rand(n, generator=g, device=dev) < self.flip_p
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.float().div_(255)


def _crop_and_flip(transform) -> Tuple[int, float]:
    """``(pad, flip probability)`` of the loader path's :func:`timm_edl.data.train_transforms`,
    read from the transform itself so that both paths crop the same way."""
    pad, flip_p = 0, 0.0
    for t in getattr(transform, 'transforms', ()):
        if isinstance(t, T.RandomCrop):
            if t.fill != 0 or t.padding_mode != 'constant' or not isinstance(t.padding, int):
                raise ValueError(f"data_on_device reproduces zero-padded crops only, not {t!r}")
            pad = t.padding
        elif isinstance(t, T.RandomHorizontalFlip):
            flip_p = float(t.p)
        else:
            raise ValueError(f"data_on_device cannot reproduce the transform {t!r}")
    return pad, flip_p


def _device_batches(base: D.ImageClassificationDataset, train_idx: List[int], cfg: TrainConfig,
                    accelerator) -> DeviceBatches:
    if not isinstance(base, D.InMemoryImageDataset):
        raise ConfigError(f"data_on_device needs a dataset held in memory as uint8 images (cifar10, cifar100, "
                          f"cifar10-jpeg, fashion-mnist, fashion-mnist-small); {cfg.dataset} is read from files: "
                          f"set data_on_device: false")
    pad, flip_p = _crop_and_flip(D.train_transforms(base.info)) if cfg.augment else (0, 0.0)
    index = torch.tensor(train_idx, dtype=torch.long)
    return DeviceBatches(base.images[index], base.labels[index], index, cfg.batch_size, cfg.seed,
                         accelerator.device, pad=pad, flip_p=flip_p, rank=accelerator.process_index,
                         world=accelerator.num_processes)


@dataclass
class TrainData:
    """The dataset's description and the (not yet prepared) loaders of a run."""
    info: D.DatasetInfo
    train_loader: Union[DataLoader, DeviceBatches]
    sampler: EpochShuffleSampler
    val_loader: Optional[DataLoader]  # None: no validation


def prepare_data(cfg: TrainConfig, accelerator) -> TrainData:
    """Open the training split, hold out the validation subset (or take the first
    ``val_n_ex`` test images) and build both loaders."""
    validate = bool(cfg.val_n_ex and cfg.val_every)
    with accelerator.main_process_first():
        base = D.get_dataset(cfg.dataset, cfg.data_dir, 'train', download=cfg.download, image_size=cfg.image_size)
        info = base.info
        if validate and cfg.val_split == 'test':
            x_val, y_val = D.load_tensors(cfg.dataset, cfg.data_dir, 'test', n_ex=cfg.val_n_ex,
                                          download=cfg.download, image_size=cfg.image_size)
        else:
            x_val = y_val = None
    n = len(base)
    train_idx = list(range(n))
    if validate and cfg.val_split == 'holdout':
        if cfg.val_n_ex >= n:
            raise ConfigError(f"val_n_ex={cfg.val_n_ex} holds out the whole {info.display_name} train split "
                              f"({n} images)")
        # a fixed random subset (independent of `seed`, so runs with different seeds validate on
        # the same images): class-sorted datasets (image folders, Tiny-ImageNet) stay balanced
        held = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))[:cfg.val_n_ex]
        val_idx = sorted(held.tolist())
        held_set = set(val_idx)
        train_idx = [i for i in train_idx if i not in held_set]
        samples = [base[i] for i in val_idx]
        if len({tuple(s[0].shape) for s in samples}) > 1:
            raise ConfigError(f"{info.display_name}: images of different sizes; set image_size")
        x_val = torch.stack([s[0] for s in samples])
        y_val = torch.tensor([s[1] for s in samples], dtype=torch.long)
    if cfg.train_n_ex is not None:
        if cfg.train_n_ex > len(train_idx):
            raise ConfigError(f"train_n_ex={cfg.train_n_ex} but only {len(train_idx)} training images are available")
        train_idx = train_idx[:cfg.train_n_ex]
    if len(train_idx) < cfg.batch_size * accelerator.num_processes:
        raise ConfigError(f"{len(train_idx)} training images are fewer than one global batch "
                          f"({cfg.batch_size} x {accelerator.num_processes} processes)")
    pin = accelerator.device.type == 'cuda'
    if cfg.data_on_device:
        train_loader = _device_batches(base, train_idx, cfg, accelerator)
        sampler = train_loader.sampler
    else:
        transform = D.train_transforms(info, augment=cfg.augment) if cfg.augment else None
        view = SeededView(base, train_idx, transform, cfg.seed)
        sampler = EpochShuffleSampler(len(view), cfg.seed)
        train_loader = DataLoader(view, batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                                  num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                  pin_memory=pin)
    val_loader = None
    if x_val is not None:
        # its own generator: iterating it leaves the global RNG (saved with the state) alone
        val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=cfg.val_batch_size, shuffle=False,
                                pin_memory=pin, generator=torch.Generator())
    return TrainData(info, train_loader, sampler, val_loader)
