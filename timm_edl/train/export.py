"""Hub-ready exports of a run's model (``best/``, ``final/``) and the numbers they carry."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

from .. import data as D
from ..hub import export as hub_export
from ..results import normalize_result
from .config import TrainConfig

__all__ = ['export_model', 'eval_results']


def export_model(model: nn.Module, folder: Path, eval_results: Optional[Dict[str, Any]], *,
                 label_names: Optional[List[str]] = None, tag: Optional[str] = None) -> str:
    """Write a Hub-ready folder with :func:`timm_edl.hub.export` (model.safetensors, config.json,
    README.md card).  Returns the exporter used."""
    # a contiguous CPU copy without accelerate's mixed-precision forward (the training model keeps it)
    plain = extract_model_from_parallel(copy.deepcopy(model), keep_fp32_wrapper=False, keep_torch_compile=False)
    plain = plain.cpu().eval().to(memory_format=torch.contiguous_format)
    kwargs: Dict[str, Any] = dict(eval_results=eval_results, overwrite=True)
    if label_names is not None and len(label_names) == getattr(plain, 'num_classes', -1):
        plain.pretrained_cfg = dict(plain.pretrained_cfg, label_names=tuple(label_names))
        kwargs['label_names'] = list(label_names)
    arch = getattr(plain, 'pretrained_cfg', {}).get('architecture')
    if arch and tag and arch.startswith('edlnet_'):
        kwargs['model_name'] = f'{arch}.{tag}'
    hub_export(plain, folder, **kwargs)
    return 'timm_edl.hub.export'


def eval_results(cfg: TrainConfig, info: D.DatasetInfo, metrics: Dict[str, Any], use_ema: bool,
                 eps: float) -> Optional[Dict[str, Any]]:
    """The validation numbers as an entry of the evaluation-result schema (:mod:`timm_edl.results`).

    They are training-time numbers (PGD-k, one restart, on the validation subset), labelled
    with their split; a full evaluation (``timm-edl eval``) should replace them before publishing.
    With ``sigma > 0`` the accuracy under noise (one draw) is written in the footnote.
    """
    prefix = 'ema_' if use_ema else ''
    clean, robust = metrics.get(f'{prefix}clean_top1'), metrics.get(f'{prefix}robust_top1')
    if clean is None:
        return None
    noisy = metrics.get(f'{prefix}noisy_top1')
    footnote = None if noisy is None else (
        f"Trained with Gaussian noise of std {cfg.sigma:g} on its inputs (randomized smoothing); accuracy of this "
        f"base classifier on the same points under one draw of that noise: {noisy:.2f} %.")
    return normalize_result({
        'dataset': info.name,
        'split': 'train-holdout' if cfg.val_split == 'holdout' else 'test',
        'n_ex': cfg.val_n_ex,
        'clean_acc': clean / 100.0,
        'pgd_acc': robust / 100.0,
        'threat_model': cfg.norm,
        'eps': eps,
        'pgd_steps': cfg.val_attack_steps,
        'pgd_restarts': 1,
        'footnote': footnote,
    }, 'validation metrics')
