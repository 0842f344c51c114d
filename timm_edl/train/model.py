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

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

import timm
from timm.models import load_pretrained, parse_model_name, split_model_name_tag

from .. import data as D
from .. import weights
from ..convert import EDL_DEFAULTS, convert_to_edl
from ..layers.edl import edl_layers, set_beta_mode
from .config import ConfigError, TrainConfig

__all__ = ['build_model', 'load_initial_weights', 'param_groups', 'beta_metrics', 'stage_for', 'enter_stage']


def _is_edlnet(model_name: str) -> bool:
    source, name = parse_model_name(model_name)
    return source is None and split_model_name_tag(name)[0].startswith('edlnet_')


def build_model(cfg: TrainConfig, info: D.DatasetInfo, log=print) -> nn.Module:
    """Create the model the config asks for: timm model (+ pretrained weights), optional
    checkpoint, optional conv -> EDL conversion.  Runs on CPU, before accelerate."""
    import timm_edl  # noqa: F401  (registers the edlnet_* models)

    from ..hub import ModelSpecError, resolve_model
    source, name = parse_model_name(cfg.model)
    if source is None and not timm.is_model(split_model_name_tag(name)[0]):
        edl = ', '.join(timm.list_models('edlnet_*'))
        raise ConfigError(f"unknown model {cfg.model!r}; timm-edl models: {edl} (any timm model name also works)")
    kwargs = dict(cfg.model_kwargs)
    kwargs['num_classes'] = info.num_classes
    kwargs['in_chans'] = info.in_chans
    if _is_edlnet(cfg.model):  # normalise with the dataset's statistics unless told otherwise
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


def _weights_file(checkpoint: str) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        found = next((c for c in (path / 'model.safetensors', path / 'pytorch_model.bin') if c.is_file()), None)
        if found is None:
            raise ConfigError(f"checkpoint folder {path} holds neither model.safetensors nor pytorch_model.bin")
        path = found
    if not path.is_file():
        raise ConfigError(f"checkpoint {checkpoint!r} not found")
    return path


def load_initial_weights(model: nn.Module, checkpoint: str, *, allow_pickle: bool = False, log=print) -> None:
    """Load a state-dict file or an export folder into ``model``; a classifier trained for
    another number of classes is left as the model built it.

    The file is read by :func:`timm_edl.weights.read_state_dict` (a pickle file is refused with
    :class:`~timm_edl.weights.UnsafeCheckpointError` unless ``allow_pickle``; prefixes cleaned by
    timm's ``load_state_dict``) and loaded by timm's ``load_pretrained``, which drops the classifier
    when the class counts differ.  Any other difference is a :class:`ConfigError`.
    """
    path = _weights_file(checkpoint)
    try:
        state = weights.read_state_dict(path, allow_pickle=allow_pickle)
    except weights.UnsafeCheckpointError:  # a ValueError too: it keeps its type, as everywhere in the package
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read checkpoint {path}: {error}") from error
    pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    classifier = pretrained_cfg.get('classifier') or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    head_classes = next((state[f'{h}.weight'].shape[0] for h in heads if f'{h}.weight' in state), None)
    num_classes = getattr(model, 'num_classes', head_classes)
    new_head = head_classes is not None and head_classes != num_classes
    head_keys = {f'{h}.{p}' for h in heads for p in ('weight', 'bias')} if new_head else set()
    dropped = [k for k in state if k in head_keys]
    bad = [k for k in state if k in own and k not in dropped and state[k].shape != own[k].shape]
    if bad:
        raise ConfigError(f"checkpoint {path} does not fit {type(model).__name__}: shape mismatch for "
                          f"{', '.join(bad[:5])} (e.g. {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = (" (an EDL checkpoint needs the same edl_layers as the model; load a conv checkpoint into the "
                "conv twin, model_kwargs edl_layers: none, and use convert: to turn it into EDL layers)")
        raise ConfigError(f"checkpoint {path} does not match {type(model).__name__}: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}{hint}")
    # timm's own pretrained path with the weights passed in: `source` and `label_offset` reset so
    # that nothing else is read or sliced, in_chans as the cfg says so that nothing is adapted
    in_chans = (pretrained_cfg.get('input_size') or (3,))[0]
    load_pretrained(model, dict(pretrained_cfg, source='', state_dict=state, label_offset=0,
                                num_classes=head_classes if head_classes is not None else num_classes),
                    num_classes=num_classes, in_chans=in_chans)
    log(f"loaded weights from {path}" + (f" (classifier {', '.join(dropped)} re-initialised: "
                                         f"different number of classes)" if dropped else ''))


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
