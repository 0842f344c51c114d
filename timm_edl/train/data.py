"""The training data with a seeded order and augmentation, and the validation subset.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and the augmentation
of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)`` (the same with any number of
data-loader workers), so a resumed run sees exactly the data of an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, TensorDataset

from .. import data as D
from .config import ConfigError, TrainConfig

__all__ = ['mix_seed', 'EpochShuffleSampler', 'SeededView', 'TrainData', 'prepare_data']

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


@dataclass
class TrainData:
    """The dataset's description and the (not yet prepared) loaders of a run."""
    info: D.DatasetInfo
    train_loader: DataLoader
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
    transform = D.train_transforms(info, augment=cfg.augment) if cfg.augment else None
    view = SeededView(base, train_idx, transform, cfg.seed)
    sampler = EpochShuffleSampler(len(view), cfg.seed)
    if len(view) < cfg.batch_size * accelerator.num_processes:
        raise ConfigError(f"{len(view)} training images are fewer than one global batch "
                          f"({cfg.batch_size} x {accelerator.num_processes} processes)")
    pin = accelerator.device.type == 'cuda'
    train_loader = DataLoader(view, batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                              num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0, pin_memory=pin)
    val_loader = None
    if x_val is not None:
        # its own generator: iterating it leaves the global RNG (saved with the state) alone
        val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=cfg.val_batch_size, shuffle=False,
                                pin_memory=pin, generator=torch.Generator())
    return TrainData(info, train_loader, sampler, val_loader)
