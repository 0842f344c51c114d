"""Replace the convolutions of a network by EDL layers.

One mechanism serves two uses: the EDLNet constructors build a plain ResNet and swap the
selected convolutions for freshly initialised EDL layers, and ``convert_to_edl`` turns
the convolutions of an existing (trained) timm / torchvision CNN into EDL layers whose
dictionaries start from the convolution weights.

Function-preserving conversion
------------------------------
With ``num_steps=1, beta=1, lam=0, normalize_atoms=False, fixed_lipschitz=1.0`` (the
:data:`PRESERVE_FUNCTION` setting, ``convert_to_edl(model, preserve_function=True)``) one
RISTA step from ``z_0 = 0`` is ``z_1 = T_0(A(x) / L) = conv2d(x, weight)``: the converted
network computes exactly what the original computed (up to float rounding of the bias
add), BatchNorm and everything else untouched.

Switching a converted network to the EDL regime (for adversarial fine-tuning) is
:func:`set_edl_options` on the EDL layers, then :func:`timm_edl.set_beta_mode`::

    set_edl_options(model, num_steps=2, lam=0.1, fixed_lipschitz=None)  # L by Lanczos
    set_beta_mode(model, 'vanilla')   # stage 1: beta = 1 (Lasso); later 'elastic'

Per layer this sets the attributes ``num_steps``, ``lam`` (buffer, or parameter if
``lam_learnable``), ``fixed_lipschitz`` (0.0 = estimate ``L = ||A||^2`` by Lanczos),
optionally ``normalize`` (``normalize_atoms``), ``eps``, ``nonneg``, ``step_rule``,
``power_iters``/``power_iters_warm``, and forgets the cached step size.  The function then
changes: with the step ``1/L`` every code is scaled by about ``1/L`` relative to the
convolution and ``lam > 0`` sparsifies it, so BatchNorm statistics must be re-estimated
(train mode) and the network fine-tuned.  ``normalize_atoms=True`` additionally rescales
every atom to unit norm.

Serialising a conversion
------------------------
:func:`conversion_config` describes the EDL layers of a converted model as a JSON-able
dict (``model_args['conversion']`` of an exported ``config.json``, whose architecture
``edl_converted`` is :mod:`timm_edl.models.converted`) and :func:`apply_conversion`
re-applies it to a freshly built original architecture.
"""
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .layers import INITS, REWEIGHTS, EDLConv2d, edl_layers, with_legacy_options

__all__ = [
    'EDL_DEFAULTS', 'PRESERVE_FUNCTION', 'POLICIES', 'select_convs', 'convert_to_edl',
    'edl_layer_config', 'conversion_config', 'apply_conversion', 'set_edl_options',
]

# EDLConv2d keyword arguments used by EDLNets unless overridden (model arg ``edl_cfg``)
EDL_DEFAULTS: Dict[str, Any] = dict(
    num_steps=2, beta=1.0, beta_learnable=True, lam=0.1, lam_learnable=False,
    step_rule='fixed', init='ista', reweight='scale_free', eps=None, nonneg=False, normalize_atoms=True,
)
_EDL_KEYS = set(EDL_DEFAULTS) | {'bias', 'power_iters', 'power_iters_warm', 'fixed_lipschitz', 'fused', 'memory_efficient',
                                  'compile_solver'}

# The setting at which an EDL layer computes exactly conv2d(x, weight) (see module docstring).
PRESERVE_FUNCTION: Dict[str, Any] = dict(
    num_steps=1, beta=1.0, lam=0.0, nonneg=False, normalize_atoms=False, fixed_lipschitz=1.0,
)

# Keys of edl_layer_config() whose values live in the state dict (not the architecture).
_VALUE_KEYS = ('beta', 'lam')
CONVERSION_FORMAT = 1

Policy = Union[str, Callable[[str, nn.Conv2d], bool]]
POLICIES = {
    'default': 'every conv with a kernel larger than 1x1 (3x3 convs and the stem); 1x1 convs stay plain',
    'all': 'every convolution, 1x1 shortcuts included',
    'stem': 'only the first convolution (the stem)',
    'blocks': 'every conv larger than 1x1 except the stem',
    'none': 'no convolution (the conv twin)',
    're:<regex>': 'convolutions whose qualified module name matches the regex (re.search)',
}


def _convertible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple))


def select_convs(model: nn.Module, policy: Policy = 'default') -> List[str]:
    """Qualified names of the ``nn.Conv2d`` modules of ``model`` that ``policy`` selects.

    Grouped, dilated, non-zero-padded or string-padded convolutions cannot be EDL layers
    and are never selected.  The stem is the first convolution in module order (an EDL
    layer already, in a partly converted model: then 'stem' selects nothing).
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return []
    stem_name = next(n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, EDLConv2d)))
    if callable(policy):
        chosen = [n for n, m in convs if policy(n, m)]
    elif not isinstance(policy, str):
        raise TypeError(f"edl policy must be a string or a callable, got {type(policy).__name__}")
    elif policy.startswith('re:'):
        pattern = re.compile(policy[3:])
        chosen = [n for n, _ in convs if pattern.search(n)]
    elif policy == 'default':
        chosen = [n for n, m in convs if max(m.kernel_size) > 1]
    elif policy == 'all':
        chosen = [n for n, _ in convs]
    elif policy == 'stem':
        chosen = [stem_name] if stem_name == convs[0][0] else []
    elif policy == 'blocks':
        chosen = [n for n, m in convs if max(m.kernel_size) > 1 and n != stem_name]
    elif policy == 'none':
        chosen = []
    else:
        raise ValueError(f"unknown edl policy {policy!r}; choose one of {sorted(POLICIES)} or a callable")
    by_name = dict(convs)
    return [n for n in chosen if _convertible(by_name[n])]


def _check_edl_kwargs(edl_kwargs: Dict[str, Any]) -> None:
    unknown = set(edl_kwargs) - _EDL_KEYS
    if unknown:
        raise ValueError(f"unknown EDL option(s) {sorted(unknown)}; valid: {sorted(_EDL_KEYS)}")


def _replace_conv(model: nn.Module, name: str, kwargs: Dict[str, Any], copy_weights: bool) -> EDLConv2d:
    conv = model.get_submodule(name)
    kwargs = dict(kwargs)
    kwargs.setdefault('bias', conv.bias is not None)
    edl = EDLConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, **kwargs,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    if copy_weights:
        with torch.no_grad():
            edl.weight.copy_(conv.weight)
            if conv.bias is not None and edl.bias is not None:
                edl.bias.copy_(conv.bias)
        edl.reset_step_cache()
    model.set_submodule(name, edl)
    return edl


def convert_to_edl(
        model: nn.Module,
        policy: Policy = 'default',
        copy_weights: bool = True,
        *,
        preserve_function: bool = False,
        **edl_kwargs: Any,
) -> nn.Module:
    """Replace the convolutions selected by ``policy`` with :class:`EDLConv2d` layers, in place.

    Each EDL layer gets the geometry (channels, kernel, stride, padding) of the conv it
    replaces; with ``copy_weights`` its dictionary starts from the conv weight (and the
    conv bias, if any, becomes the code bias).  ``edl_kwargs`` go to every EDLConv2d.

    ``preserve_function=True`` uses :data:`PRESERVE_FUNCTION` (one step, beta=1, lam=0,
    no atom normalisation, L fixed to 1): every EDL layer then computes exactly
    ``conv2d(x, weight)``, so the converted model's outputs equal the original's.  Options
    that would break this (``num_steps != 1``, ``lam != 0``, ...) are refused; options that
    do not (``beta_learnable``, ``lam_learnable``, ``step_rule``, ``eps``, ...) are allowed.
    Switch to the EDL regime afterwards with :func:`set_edl_options` (module docstring).

    Works on any ``nn.Module`` (timm, torchvision, features_only wrappers): only the
    selected ``nn.Conv2d`` modules change, the rest (BatchNorm, heads, the timm API
    methods) is untouched.  Returns ``model``.
    """
    _check_edl_kwargs(edl_kwargs)
    if preserve_function:
        if not copy_weights:
            raise ValueError("preserve_function=True needs copy_weights=True (it keeps the conv weights)")
        clashes = {k: v for k, v in edl_kwargs.items() if k in PRESERVE_FUNCTION and v != PRESERVE_FUNCTION[k]}
        if clashes:
            raise ValueError(
                f"preserve_function=True needs {PRESERVE_FUNCTION}; {clashes} would change the function. "
                f"Convert with preserve_function=True, then switch with set_edl_options(model, ...)")
        edl_kwargs = {**edl_kwargs, **PRESERVE_FUNCTION}
    for name in select_convs(model, policy):
        _replace_conv(model, name, edl_kwargs, copy_weights)
    return model


def edl_layer_config(layer: EDLConv2d, values: bool = True) -> Dict[str, Any]:
    """The EDLConv2d keyword arguments that rebuild ``layer`` (JSON-able).

    ``values=False`` leaves out ``beta`` and ``lam``, whose current values are stored in
    the state dict (what remains decides the layer's structure and computation).
    """
    cfg: Dict[str, Any] = dict(
        num_steps=int(layer.num_steps),
        beta_learnable=isinstance(layer.beta, nn.Parameter),
        lam_learnable=isinstance(layer.lam, nn.Parameter),
        step_rule=layer.step_rule, init=layer.init, reweight=layer.reweight, eps=float(layer.eps),
        nonneg=bool(layer.nonneg),
        normalize_atoms=bool(layer.normalize), bias=layer.bias is not None,
        power_iters=int(layer.power_iters), power_iters_warm=int(layer.power_iters_warm),
        fixed_lipschitz=float(layer.fixed_lipschitz) if layer.fixed_lipschitz > 0 else None,
    )
    for key in ('fused', 'memory_efficient'):  # execution options (same math), when the layer has them
        if key in _EDL_KEYS and hasattr(layer, key):
            cfg[key] = bool(getattr(layer, key))
    if values:
        cfg['beta'] = min(max(float(layer.beta.detach().float().cpu()), 0.0), 1.0)
        cfg['lam'] = max(float(layer.lam.detach().float().cpu()), 0.0)
    return cfg


def conversion_config(model: nn.Module) -> Dict[str, Any]:
    """JSON-able description of the EDL layers of a converted model.

    ``{'format': 1, 'layers': [names], 'edl_cfg': {...}, 'layer_overrides': {name: {...}}}``:
    ``edl_cfg`` holds the EDLConv2d arguments of the first EDL layer, ``layer_overrides``
    the keys in which another layer differs.  :func:`apply_conversion` rebuilds them.
    """
    layers = edl_layers(model)
    if not layers:
        raise ValueError("model has no EDLConv2d layers: nothing to describe")
    common = edl_layer_config(layers[0][1])
    overrides: Dict[str, Dict[str, Any]] = {}
    for name, layer in layers[1:]:
        cfg = edl_layer_config(layer, values=False)
        diff = {k: v for k, v in cfg.items() if common.get(k) != v}
        if diff:
            overrides[name] = diff
    return dict(format=CONVERSION_FORMAT, layers=[n for n, _ in layers], edl_cfg=common,
                layer_overrides=overrides)


def apply_conversion(model: nn.Module, block: Dict[str, Any]) -> nn.Module:
    """Re-apply a :func:`conversion_config` block to a freshly built original model, in place.

    The EDL layers are created with the recorded options and random dictionaries
    (``copy_weights=False``); load the converted weights afterwards.  Layers named in
    the block that are absent from ``model`` (e.g. pruned by ``features_only``) are
    skipped only when ``model`` is a timm feature wrapper; otherwise they are an error.
    """
    if not isinstance(block, dict) or 'layers' not in block or 'edl_cfg' not in block:
        raise ValueError("not a conversion block (conversion_config): expected a dict with 'layers' and 'edl_cfg'")
    if int(block.get('format', 1)) > CONVERSION_FORMAT:
        raise ValueError(
            f"conversion block format {block['format']} is newer than this timm-edl understands "
            f"({CONVERSION_FORMAT}): upgrade timm-edl")
    common = with_legacy_options(block['edl_cfg'])
    _check_edl_kwargs(common)
    overrides = block.get('layer_overrides') or {}
    is_feature_wrapper = type(model).__name__.startswith('Feature')
    for name in block['layers']:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None and is_feature_wrapper:
            continue
        if module is None or not _convertible(module):
            what = 'missing' if module is None else f'a {type(module).__name__}, not a convertible nn.Conv2d'
            raise ValueError(
                f"the conversion names layer {name!r}, which is {what} in this "
                f"{type(model).__name__}: the architecture differs from the converted one "
                f"(other model_args or timm version?)")
        kwargs = {**common, **overrides.get(name, {})}
        _check_edl_kwargs(kwargs)
        _replace_conv(model, name, kwargs, copy_weights=False)
    return model


_SETTABLE = ('num_steps', 'lam', 'fixed_lipschitz', 'normalize_atoms', 'eps', 'nonneg', 'step_rule', 'init', 'reweight',
             'power_iters', 'power_iters_warm', 'fused', 'memory_efficient', 'compile_solver')


def set_edl_options(model: nn.Module, **options: Any) -> nn.Module:
    """Change hyperparameters of every EDL layer of ``model`` in place (see module docstring).

    Keys: ``num_steps``, ``lam``, ``fixed_lipschitz`` (``None``: Lanczos),
    ``normalize_atoms``, ``eps``, ``nonneg``, ``init``, ``reweight`` (give ``eps`` too: each
    reweighting has its own scale of eps), ``step_rule`` (switching to 'learnable' adds a
    ``step_scale`` parameter initialised to 1: rebuild the optimizer), ``power_iters``,
    ``power_iters_warm``, and the execution options ``fused`` / ``memory_efficient`` /
    ``compile_solver`` (``torch.compile`` the solver; not recorded by exports, so a
    loaded model never needs a compiler).
    ``beta`` is switched with :func:`timm_edl.set_beta_mode`.
    The cached step size is forgotten.  Returns ``model``.
    """
    unknown = set(options) - set(_SETTABLE)
    if unknown:
        raise ValueError(f"cannot set {sorted(unknown)} on EDL layers; settable: {list(_SETTABLE)} "
                         f"(beta: use set_beta_mode)")
    layers = edl_layers(model)
    if not layers:
        raise ValueError("model has no EDLConv2d layers")
    if 'num_steps' in options and int(options['num_steps']) < 1:
        raise ValueError(f"num_steps must be >= 1, got {options['num_steps']}")
    if 'lam' in options and float(options['lam']) < 0:
        raise ValueError(f"lam must be >= 0, got {options['lam']}")
    if 'eps' in options and not float(options['eps']) > 0:
        raise ValueError(f"eps must be > 0, got {options['eps']}")
    fixed = options.get('fixed_lipschitz', 0.0)
    if fixed is not None and fixed != 0.0 and not float(fixed) > 0:
        raise ValueError(f"fixed_lipschitz must be > 0 or None, got {fixed}")
    if 'step_rule' in options:
        from .layers import STEP_RULES
        if options['step_rule'] not in STEP_RULES:
            raise ValueError(f"unknown step_rule {options['step_rule']!r}; choose one of {STEP_RULES}")
    for key, allowed in (('init', INITS), ('reweight', REWEIGHTS)):
        if key in options and options[key] not in allowed:
            raise ValueError(f"unknown {key} {options[key]!r}; choose one of {allowed}")
    for _, layer in layers:
        for key, value in options.items():
            if key in ('init', 'reweight'):
                setattr(layer, key, value)
            elif key == 'lam':
                with torch.no_grad():
                    layer.lam.fill_(float(value))
            elif key == 'fixed_lipschitz':
                layer.fixed_lipschitz = float(value) if value else 0.0
            elif key == 'normalize_atoms':
                layer.normalize = bool(value)
            elif key == 'step_rule':
                layer.step_rule = value
                if value == 'learnable' and layer.step_scale is None:
                    layer.step_scale = nn.Parameter(torch.ones((), device=layer.weight.device))
                elif value != 'learnable':
                    layer.step_scale = None
            elif key in ('num_steps', 'power_iters', 'power_iters_warm'):
                setattr(layer, key, int(value))
            elif key == 'eps':
                layer.eps = float(value)
            else:
                setattr(layer, key, bool(value))
        layer.reset_step_cache()
    return model
