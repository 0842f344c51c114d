"""Adversarial training and fine-tuning of EDLNets on accelerate (the library behind
``timm-edl train``, whose command line is :mod:`timm_edl.cli.train`).

Usage::

    from timm_edl.train import load_config, train
    result = train(load_config('recipes/cpu_fashion_mnist_pgd.yaml', ['--epochs', '2']))

    timm-edl train --config recipes/edlnet_resnet18_cifar10_pgd.yaml [--key value ...]
    accelerate launch -m timm_edl.train --config recipes/... [--key value ...]
"""
from __future__ import annotations

from .config import ConfigError, TrainConfig, load_config
from .trainer import RunDirError, TrainResult, latest_checkpoint, train

__all__ = ['train', 'TrainConfig', 'TrainResult', 'ConfigError', 'RunDirError', 'load_config', 'latest_checkpoint']
