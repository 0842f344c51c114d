"""``edl_converted``: a timm CNN whose convolutions are EDL layers, as a timm architecture.

``timm.create_model('edl_converted', base_model='resnet18', conversion=block, **base_args)``
builds ``timm.create_model('resnet18', **base_args)`` and applies ``block`` to it
(:func:`timm_edl.convert.apply_conversion`: which convolutions are EDL layers, with which
EDLConv2d options, as :func:`~timm_edl.convert.conversion_config` describes a converted
model).  The export of a converted model names this architecture and these arguments in
its config.json, so timm's own loaders (``timm.create_model('local-dir:...')`` /
``'hf-hub:...'``, ``pretrained=True``, after ``import timm_edl``) rebuild the converted
network and load its weights.

The model is an instance of the base architecture's class (a converted ``resnet18`` is a
``ResNet``) with the timm API of that class.  Its ``pretrained_cfg`` is the one given (an
export's) or else the base's (input size, mean / std, classifier) without a weights source.
``features_only=True`` wraps it in timm's default feature extractor (``FeatureListNet`` over
the base's ``feature_info``).  Weights are checked by the pickle gate of
:mod:`timm_edl.weights`, as for EDLNets.
"""
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from ..convert import apply_conversion, conversion_config
from ..weights import check_pretrained_source

__all__ = ['CONVERTED_ARCH', 'converted_model_args']

CONVERTED_ARCH = 'edl_converted'

# The cfg keys that name a weights source: a converted model has none of its base's weights.
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'custom_load')

# No weights of its own: an export's config.json supplies the cfg with the weights' source.
default_cfgs = generate_default_cfgs({CONVERTED_ARCH: {'url': ''}})


def _base_cfg(base_model: str) -> Dict[str, Any]:
    """The base architecture's pretrained cfg without a weights source, named after ``edl_converted``."""
    cfg = resolve_pretrained_cfg(base_model).to_dict()
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    return dict(cfg, architecture=CONVERTED_ARCH)


def _build(base_model: str, conversion: Dict[str, Any], **base_args: Any) -> nn.Module:
    """``base_model`` with random weights and the EDL layers of ``conversion``."""
    model = timm.create_model(base_model, pretrained=False, **base_args)
    return apply_conversion(model, conversion)


@register_model
def edl_converted(
        pretrained: bool = False,
        base_model: Optional[str] = None,
        conversion: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """A timm model converted to EDL layers: ``base_model`` (a timm architecture name) with
    ``conversion`` (a :func:`timm_edl.convert.conversion_config` block) applied; every other
    argument goes to ``timm.create_model(base_model, ...)``."""
    if not isinstance(base_model, str) or not isinstance(conversion, dict):
        raise ValueError(
            "edl_converted needs base_model=<timm architecture name> and conversion=<the dict "
            "timm_edl.convert.conversion_config(model) returns>; an export's config.json records both in "
            "model_args: create it with timm.create_model('local-dir:<export>') or timm_edl.hub.load()")
    if not timm.is_model(base_model):
        raise ValueError(f"edl_converted: base_model {base_model!r} is not a timm architecture")
    allow_pickle = kwargs.pop('allow_pickle', False)
    if kwargs.get('pretrained_cfg') is None:
        kwargs['pretrained_cfg'] = _base_cfg(base_model)
    if pretrained:
        kwargs = check_pretrained_source(CONVERTED_ARCH, kwargs, allow_pickle=allow_pickle)
    return build_model_with_cfg(_build, CONVERTED_ARCH, pretrained, base_model=base_model, conversion=conversion,
                                **kwargs)


def converted_model_args(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """``(base architecture, model_args)`` that make ``edl_converted`` rebuild ``model``.

    ``model`` is a timm model with EDL layers: converted in place (``convert_to_edl`` on
    ``timm.create_model('resnet18', ...)``) or built by ``edl_converted`` (and perhaps
    converted further).  ``model_args`` holds ``base_model`` and the current
    ``conversion``; the base's own arguments are the model's ``_model_args``, which timm's
    config writer adds.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    base = cfg.get('architecture')
    if base == CONVERTED_ARCH:
        base = getattr(model, '_model_args', {}).get('base_model')
    if not base or not timm.is_model(base):
        raise ValueError(
            "cannot tell which timm architecture this converted model is: create it with timm.create_model(...) "
            "before converting it (its pretrained_cfg['architecture'] names the base)")
    conversion = conversion_config(model)
    conversion['timm_version'] = timm.__version__
    return base, {'base_model': base, 'conversion': conversion}
