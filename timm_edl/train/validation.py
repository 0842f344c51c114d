"""Robust validation during training: clean, PGD-k and (with ``sigma``) noisy accuracy on the
validation subset."""
from __future__ import annotations

from functools import partial
from typing import Dict

import torch
import torch.nn as nn

from ..attacks import pgd_attack
from .config import TrainConfig
from .data import mix_seed

__all__ = ['validate']


def validate(model: nn.Module, loader, cfg: TrainConfig, eps: float, accelerator) -> Dict[str, float]:
    """Clean and PGD-``val_attack_steps`` top-1 (%) of ``model`` over ``loader``, a loader
    prepared by accelerate: every process attacks its own batches, and
    ``gather_for_metrics`` collects the per-sample results without the padding that evens
    out the processes' shares.  The attack's random start has a fixed seed per process.

    With ``cfg.sigma > 0`` also ``noisy_top1``: the top-1 on ``x + sigma * n``, ``n ~ N(0, I)``
    of the shape of ``x`` (unclipped), one draw per image from a generator with a fixed seed per
    process, so every validation (and the EMA's) sees the same noise."""
    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, 3, accelerator.process_index))
    noise = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, 5, accelerator.process_index))
    attack = partial(pgd_attack, eps=eps, norm=cfg.norm, steps=cfg.val_attack_steps,
                     step_size=cfg.val_attack_step_size, random_start=True, generator=generator)
    was_training = model.training
    model.eval()
    hits = []
    with accelerator.autocast():
        for x, y in loader:
            clean = model(x).argmax(dim=-1) == y
            with torch.enable_grad():
                x_adv = attack(model, x, y)
            columns = [clean, model(x_adv).argmax(dim=-1) == y]
            if cfg.sigma > 0:
                n = torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
                columns.append(model(x + cfg.sigma * n).argmax(dim=-1) == y)
            hits.append(accelerator.gather_for_metrics(torch.stack(columns, dim=1).long()))
    model.train(was_training)
    hits = torch.cat(hits)
    names = ('clean_top1', 'robust_top1', 'noisy_top1')
    return {name: 100.0 * count / len(hits) for name, count in zip(names, hits.sum(dim=0).tolist())}
