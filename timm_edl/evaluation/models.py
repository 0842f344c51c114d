"""Models for the evaluation: loading a ``--model`` spec, surrogates, descriptions.

Model specs (``--model`` / ``--surrogate``) are resolved by :func:`timm_edl.hub.resolve_model`,
the resolver every command uses: a registry name (randomly initialised models are reported
loudly as ``weights: random-init``, with ``num_classes`` / ``in_chans`` from the dataset
unless ``--model-kwargs`` sets them), ``hf-hub:`` / ``local-dir:`` / a folder (an export), or
a weights file (architecture from ``--arch`` or a ``config.json`` beside it).

Surrogates: ``twin`` (:func:`conv_twin`) or any model spec.  The naive evaluation's
surrogate is :func:`naive_surrogate`.
"""
import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..hub.load import ModelSpecError, resolve_model
from ..layers import EDLConv2d, edl_layer_stats, edl_layers, rista
from ..weights import state_dict_digest
from .errors import EvaluationError

__all__ = ['load_model', 'conv_twin', 'naive_surrogate', 'NAIVE_MODES', 'describe_model']


def load_model(
        spec: str,
        *,
        model_kwargs: Optional[Dict[str, Any]] = None,
        arch: Optional[str] = None,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        allow_pickle: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """:func:`timm_edl.hub.resolve_model` for ``--model`` / ``--surrogate``, in eval mode; its
    :class:`~timm_edl.hub.ModelSpecError` becomes an :class:`EvaluationError` (the evaluation's
    command line prints it and exits 2)."""
    try:
        model, source = resolve_model(spec, model_kwargs=model_kwargs, arch=arch, checkpoint=checkpoint,
                                      num_classes=num_classes, in_chans=in_chans, allow_pickle=allow_pickle)
    except ModelSpecError as e:
        raise EvaluationError(str(e)) from e
    return model.eval(), source


# ----------------------------------------------------------------------------- surrogates

def conv_twin(model: nn.Module, example: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of ``model`` whose EDL layers are plain convolutions (the "conv twin").

    Each EDL layer becomes ``conv2d(x, s A) + bias`` with ``A`` its dictionary (atoms
    normalised as in the forward) and ``s = 1/L`` its step size: the linear part of one
    RISTA step from ``z_0 = 0``, before the shrinkage.  It is a cheap, fully differentiable
    surrogate built from the model's own weights, for transfer attacks.  Layers that were
    never run have no cached ``L`` and use ``s = 1``: pass an ``example`` batch to run the
    model once first.
    """
    if example is not None:
        with torch.no_grad():
            model.eval()(example)
    twin = copy.deepcopy(model)
    for name, layer in edl_layers(twin):
        weight = layer.dictionary().detach()
        L = float(layer.lipschitz) if float(layer.lipschitz) > 0 else 1.0
        if layer.fixed_lipschitz > 0:
            L = layer.fixed_lipschitz
        conv = nn.Conv2d(layer.in_chans, layer.out_chans, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, bias=layer.bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight / L)
            if layer.bias is not None:
                conv.bias.copy_(layer.bias.detach())
        twin.set_submodule(name, conv)
    return twin.eval()


NAIVE_MODES = {
    'truncate': 'exact forward; gradient through the last RISTA step only (z_{K-1} detached)',
    'one-step': 'one RISTA step from z_0 = 0 in the forward and the backward (a truncated solver)',
    'bpda': 'exact forward; backward of the linear analysis s A(x) (straight-through the solver)',
    'detach': 'exact forward; no gradient through the solver (zero input gradient through EDL layers)',
}


class _NaiveEDL(nn.Module):
    """An EDL layer whose backward skips or truncates the unrolled solver (see NAIVE_MODES)."""

    def __init__(self, layer: EDLConv2d, mode: str):
        super().__init__()
        self.layer = layer
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = layer.dictionary()
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        size = [int(v) for v in layer.lipschitz_size.tolist()]
        if size == [x.shape[-2], x.shape[-1]] and float(layer.lipschitz) > 0 and layer.fixed_lipschitz <= 0:
            # the step size of the original model (a copy's weights live elsewhere in memory, which
            # would make EDLConv2d refresh L by Lanczos: a slightly different function)
            L = layer.lipschitz
        else:
            L = layer._lipschitz(weight, [x.shape[-2], x.shape[-1]])
        beta, lam = layer.beta_value(), layer.lam_value()

        def solve(inp, steps, z_init=None, scale=None):
            return rista(inp, weight, beta, lam, L, layer.stride, layer.padding, steps, layer.eps,
                         layer.nonneg, layer.step_rule, layer.step_scale, z_init, layer.init, layer.reweight, scale)

        if self.mode == 'one-step':
            z = solve(x, 1)
        elif self.mode == 'truncate':
            z_prev = scale = None
            if layer.num_steps > 1:
                with torch.no_grad():
                    z_prev = solve(x, layer.num_steps - 1)
                    if layer.reweight == 'scale_free':  # the c of the full solve, held fixed
                        scale = layer.residual_scale(x, weight, lam, L)
            z = solve(x, 1, z_prev, scale)
        else:
            with torch.no_grad():
                z_exact = solve(x, layer.num_steps)
            linear = torch.nn.functional.conv2d(x, weight, None, layer.stride, layer.padding) / L.to(x.dtype)
            if self.mode == 'detach':
                linear = linear * 0.0  # keeps the graph connected: the gradient is exactly zero
            z = z_exact + (linear - linear.detach())
        if layer.bias is not None:
            z = z + layer.bias.view(1, -1, 1, 1).to(z.dtype)
        return z


def naive_surrogate(model: nn.Module, mode: str = 'truncate') -> nn.Module:
    """A copy of ``model`` whose EDL layers give naive gradients (the pre-EDL evaluations).

    Modes (``NAIVE_MODES``): ``'truncate'`` (default), ``'one-step'``, ``'bpda'``,
    ``'detach'``.  Except for ``'one-step'`` the forward pass equals the model's, so an
    attack that follows these gradients (``pgd_attack(model, ..., grad_model=surrogate)``)
    still selects its iterates on the real model: only the gradient is naive.  Reporting
    its accuracy next to the adaptive attack's shows how much robustness a naive
    evaluation of an unrolled sparse-coding network would have claimed.
    """
    if mode not in NAIVE_MODES:
        raise EvaluationError(f"unknown naive mode {mode!r}; choose one of {', '.join(NAIVE_MODES)}")
    surrogate = copy.deepcopy(model)
    layers = edl_layers(surrogate)
    for name, layer in layers:
        surrogate.set_submodule(name, _NaiveEDL(layer, mode))
    return surrogate.eval()


# ----------------------------------------------------------------------------- description

def describe_model(model: nn.Module, source: Optional[Dict[str, Any]] = None,
                   x: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Architecture, parameter count, weights digest and EDL hyperparameters of ``model``.

    ``edl.layers`` lists every EDL layer with its beta (clamped to [0, 1] as in the
    forward), lam, K, step rule, eps floor, ... and, when a clean batch ``x`` is given,
    the mean final objective F(z_K) and the code sparsity on it (``edl_layer_stats``).
    """
    source = dict(source or {})
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = source.get('architecture') or cfg.get('architecture') or type(model).__name__
    layers = edl_layers(model)
    stats = {}
    if layers:
        try:
            stats = edl_layer_stats(model, x) if x is not None else edl_layer_stats(model)
        except Exception:  # diagnostics only; never fail the evaluation over them
            stats = {}
    per_layer: Dict[str, Dict[str, Any]] = {}
    for name, layer in layers:
        entry: Dict[str, Any] = {
            'beta': float(layer.beta.detach().clamp(0, 1)),
            'beta_raw': float(layer.beta.detach()),
            'beta_learnable': isinstance(layer.beta, nn.Parameter),
            'lam': float(layer.lam.detach().clamp_min(0)),
            'num_steps': int(layer.num_steps),
            'step_rule': layer.step_rule,
            'eps': float(layer.eps),
            'nonneg': bool(layer.nonneg),
            'normalize_atoms': bool(layer.normalize),
            'in_chans': int(layer.in_chans), 'out_chans': int(layer.out_chans),
            'kernel_size': list(layer.kernel_size), 'stride': list(layer.stride),
            'lipschitz': float(layer.lipschitz) if float(layer.lipschitz) > 0 else None,
        }
        for key in ('objective', 'sparsity'):
            if key in stats.get(name, {}):
                entry[key] = float(stats[name][key])
        per_layer[name] = entry
    betas = [v['beta'] for v in per_layer.values()]
    edl: Dict[str, Any] = {
        'num_layers': len(layers),
        'policy': getattr(model, 'edl_layers', None),
        'config': _jsonable(getattr(model, 'edl_cfg', None)),
        'beta_min': min(betas) if betas else None,
        'beta_max': max(betas) if betas else None,
        'layers': per_layer,
    }
    num_params = sum(p.numel() for p in model.parameters())
    return {
        'spec': source.get('spec'),
        'kind': source.get('kind'),
        'architecture': arch,
        'tag': source.get('tag', cfg.get('tag')),
        'weights': source.get('weights'),
        'model_kwargs': _jsonable(source.get('model_kwargs') or {}),
        'num_params': int(num_params),
        'num_classes': getattr(model, 'num_classes', None),
        'weights_digest': state_dict_digest(model),
        'edl': edl,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
