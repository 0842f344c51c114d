"""Robust validation during training: clean and PGD-k accuracy on the validation subset."""
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
    out the processes' shares.  The attack's random start has a fixed seed per process."""
    generator = torch.Generator(device=accelerator.device).manual_seed(mix_seed(cfg.seed, 3, accelerator.process_index))
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
            robust = model(x_adv).argmax(dim=-1) == y
            hits.append(accelerator.gather_for_metrics(torch.stack([clean, robust], dim=1).long()))
    model.train(was_training)
    hits = torch.cat(hits)
    clean, robust = hits.sum(dim=0).tolist()
    return {'clean_top1': 100.0 * clean / len(hits), 'robust_top1': 100.0 * robust / len(hits)}
