"""The model of a run: creation, initial weights, conversion, parameter groups and the
two-stage EDL schedule.

Two-stage EDL schedule
----------------------
``elastic_from_epoch = k``: before epoch ``k`` every EDL layer is vanilla DL (beta = 1,
frozen: :func:`~timm_edl.layers.set_beta_mode` ``'vanilla'``); from epoch ``k`` on beta is
trained (``'elastic'``), starting from ``elastic_beta_init`` when given (else from 1).
beta is in the optimizer from the start (no weight decay), so releasing it needs no new
optimizer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import timm
from timm.models import parse_model_name, split_model_name_tag

from .. import data as D
from .. import weights
from ..convert import EDL_DEFAULTS, convert_to_edl
from ..layers.edl import edl_layers, set_beta_mode
from .config import ConfigError, TrainConfig

__all__ = ['build_model', 'load_initial_weights', 'param_groups', 'beta_metrics', 'stage_for', 'enter_stage']


def _names_edlnet(model_name: str) -> bool:
    source, name = parse_model_name(model_name)
    return source is None and split_model_name_tag(name)[0].startswith('edlnet_')


def build_model(cfg: TrainConfig, info: D.DatasetInfo, log=print) -> nn.Module:
    """Create the model the config asks for: timm model (+ pretrained weights), optional
    checkpoint, optional conv -> EDL conversion.  Runs on CPU, before accelerate."""
    from ..hub import ModelSpecError, resolve_model
    source, name = parse_model_name(cfg.model)
    if source is None and not timm.is_model(split_model_name_tag(name)[0]):
        edl = ', '.join(timm.list_models('edlnet_*'))
        raise ConfigError(f"unknown model {cfg.model!r}; timm-edl models: {edl} (any timm model name also works)")
    kwargs = dict(cfg.model_kwargs)
    kwargs['num_classes'] = info.num_classes
    kwargs['in_chans'] = info.in_chans
    if _names_edlnet(cfg.model):  # normalise with the dataset's statistics unless told otherwise
        kwargs.setdefault('input_mean', tuple(info.mean))
        kwargs.setdefault('input_std', tuple(info.std))
    try:
        model, _ = resolve_model(cfg.model, model_kwargs=kwargs, pretrained=cfg.pretrained)
    except ModelSpecError as error:
        raise ConfigError(f"model {cfg.model!r} with model_kwargs {sorted(cfg.model_kwargs)}: {error}") from error
    cfg_mean = tuple(getattr(model, 'pretrained_cfg', {}).get('mean', (0.0,)))
    cfg_std = tuple(getattr(model, 'pretrained_cfg', {}).get('std', (1.0,)))
    if any(m != 0 for m in cfg_mean) or any(s != 1 for s in cfg_std):
        raise ConfigError(
            f"model {cfg.model!r} expects normalised inputs (mean={cfg_mean}, std={cfg_std}), but adversarial "
            f"training feeds [0, 1] pixels so that eps is defined in pixel space. Use an edlnet_* model (they "
            f"normalise internally; edl_layers: none gives the conv twin, and a timm ResNet checkpoint loads into "
            f"edlnet_resnet18_in with model_kwargs edl_layers: none).")
    if cfg.checkpoint:
        load_initial_weights(model, cfg.checkpoint, allow_pickle=cfg.allow_pickle, log=log)
    if cfg.convert:
        _convert(model, cfg, log)
    return model


def _convert(model: nn.Module, cfg: TrainConfig, log) -> None:
    had_edl = bool(edl_layers(model))
    convert_to_edl(model, policy=cfg.convert, copy_weights=True, **cfg.convert_kwargs)
    if not edl_layers(model):
        raise ConfigError(f"convert: policy {cfg.convert!r} selected no convolution of {cfg.model!r}")
    if hasattr(model, 'edl_cfg') and hasattr(model, 'edl_layers'):
        if had_edl:
            log("warning: the model had EDL layers before the conversion; its exported config.json "
                "records only the conversion policy")
        # record the converted architecture so exports rebuild it with timm.create_model
        model.edl_layers = cfg.convert
        model.edl_cfg = {**EDL_DEFAULTS, **cfg.convert_kwargs}
        model_args = dict(getattr(model, '_model_args', {}))
        model_args.update(edl_layers=cfg.convert, edl_cfg=dict(cfg.convert_kwargs))
        model._model_args = model_args
    log(f"converted {len(edl_layers(model))} convolutions to EDL layers (policy {cfg.convert!r})")


def load_initial_weights(model: nn.Module, checkpoint: str, *, allow_pickle: bool = False, log=print) -> None:
    """Load a state-dict file or an export folder into ``model``; a classifier trained for
    another number of classes is left as the model built it (timm's fine-tuning rule).

    The weights go through :func:`timm_edl.weights.load_checkpoint` (a pickle file is refused
    with :class:`~timm_edl.weights.UnsafeCheckpointError` unless ``allow_pickle``; keys and
    shapes checked before anything is copied).  Any other difference is a :class:`ConfigError`.
    """
    from ..hub.load import weights_path
    try:
        path = weights_path(checkpoint, allow_pickle=allow_pickle)
        kept = weights.load_checkpoint(model, path, allow_pickle=allow_pickle, new_head=True)
    except weights.UnsafeCheckpointError:  # a ValueError too: it keeps its type, as everywhere in the package
        raise
    except weights.StateDictMismatchError as error:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit {type(model).__name__}: {error} (an EDL checkpoint needs the same "
            f"edl_layers as the model; load a conv checkpoint into the conv twin, model_kwargs edl_layers: none, "
            f"and use convert: to turn it into EDL layers)") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read checkpoint {checkpoint}: {error}") from error
    log(f"loaded weights from {path}" + (f" (classifier {', '.join(kept)} re-initialised: "
                                         f"different number of classes)" if kept else ''))


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two groups: weights with decay; biases, norms and EDL scalars (beta, lam, step
    scale) without.  Frozen parameters are included on purpose: beta is frozen during the
    vanilla stage and must already be in the optimizer when it is released."""
    no_decay_ids = set()
    for _, layer in edl_layers(model):
        for p in (layer.beta, layer.lam, layer.step_scale):
            if isinstance(p, nn.Parameter):
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or id(p) in no_decay_ids else decay).append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return [g for g in groups if g['params']]


def beta_metrics(model: nn.Module) -> Dict[str, float]:
    """beta of every EDL layer (``beta/<layer name>``), their mean and the mean per top-level
    stage (stem = modules before 'layer1')."""
    layers = edl_layers(model)
    if not layers:
        return {}
    groups: Dict[str, List[float]] = {}
    values = []
    for name, layer in layers:
        head = name.split('.')[0]
        head = head if head.startswith('layer') else 'stem'
        value = float(layer.beta.detach().clamp(0, 1))
        groups.setdefault(head, []).append(value)
        values.append(value)
    out = {'beta_mean': sum(values) / len(values)}
    out.update({f'beta_{k}': sum(v) / len(v) for k, v in groups.items()})
    out.update({f'beta/{name}': float(layer.beta.detach().clamp(0, 1)) for name, layer in layers})
    return out


def stage_for(cfg: TrainConfig, epoch: int) -> Optional[str]:
    """The EDL beta mode of ``epoch`` (``'vanilla'`` / ``'elastic'``), None without a schedule."""
    if cfg.elastic_from_epoch is None:
        return None
    return 'elastic' if epoch >= cfg.elastic_from_epoch else 'vanilla'


def enter_stage(model: nn.Module, stage: str, beta_init: Optional[float]) -> None:
    """Set every EDL layer's beta mode; entering the elastic stage starts beta from
    ``beta_init`` when given."""
    set_beta_mode(model, stage)
    if stage == 'elastic' and beta_init is not None:
        with torch.no_grad():
            for _, layer in edl_layers(model):
                layer.beta.fill_(beta_init)
