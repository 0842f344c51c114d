"""Models for the evaluation: loading a ``--model`` spec, surrogates, descriptions.

Model specs (``--model`` / ``--surrogate``):

* ``edlnet_resnet18`` or ``edlnet_resnet18.cifar10``: timm's registry.  Published weights
  are loaded when the tag has them; otherwise the model is randomly initialised (reported
  loudly as ``weights: random-init``), with ``num_classes`` / ``in_chans`` taken from the
  dataset unless ``--model-kwargs`` sets them.
* ``hf-hub:<org>/<repo>`` and ``local-dir:<folder>`` (or a plain folder path): an exported
  model (``timm_edl.hub.load``: config.json + model.safetensors).
* ``path/to/weights.safetensors``: a weights file; the architecture comes from ``--arch``
  or from a ``config.json`` beside the file.  Pickle files (``.pth``, ``.pt``, ``.bin``)
  need ``--allow-pickle`` and are read with ``torch.load(weights_only=True)``.

Surrogates: ``twin`` (:func:`conv_twin`) or any model spec.  The naive evaluation's
surrogate is :func:`naive_surrogate`.
"""
import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

from ..layers.edl import EDLConv2d, edl_layer_stats, edl_layers, rista
from .threat import EvaluationError

__all__ = [
    'ModelSpecError', 'parse_kwargs', 'load_model', 'conv_twin', 'naive_surrogate', 'NAIVE_MODES',
    'describe_model', 'weights_digest', 'CHECKPOINT_SUFFIXES',
]

CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar', '.ckpt', '.tar')


class ModelSpecError(EvaluationError):
    """The model spec cannot be resolved (unknown name, missing file, weights that do not fit)."""


def parse_kwargs(items: Optional[Sequence[str]], option: str = '--model-kwargs') -> Dict[str, Any]:
    """``['widths=(8,16)', 'edl_layers=none']`` -> ``{'widths': (8, 16), 'edl_layers': 'none'}``.

    Values are Python literals where they parse as one, strings otherwise (as timm's
    ``--model-kwargs``).
    """
    import ast
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition('=')
        if not sep or not key.strip():
            raise EvaluationError(f"{option}: expected key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _hub():
    from .. import hub
    return hub


def weights_digest(model: nn.Module) -> str:
    """``timm_edl.hub.state_dict_digest`` of the model ('sha256:<hex>'), the id that
    ``timm-edl export`` checks evaluation results against."""
    try:
        return _hub().state_dict_digest(model)
    except ImportError:  # pragma: no cover - hub unavailable
        h = hashlib.sha256()
        state = model.state_dict()
        for key in sorted(state):
            if key.endswith(('.lipschitz', '.lipschitz_size')):
                continue
            t = state[key].detach().cpu().contiguous()
            h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return 'sha256:' + h.hexdigest()


def _unknown_model_error(name: str) -> ModelSpecError:
    all_models = timm.list_models()
    close = difflib.get_close_matches(name, all_models, n=5, cutoff=0.6)
    edl = [m for m in all_models if m.startswith('edlnet_')]
    hint = f" Did you mean: {', '.join(close)}?" if close else ''
    return ModelSpecError(
        f"unknown model {name!r}: not in timm's registry, not an existing file or folder, and not an "
        f"hf-hub:/local-dir: spec.{hint} EDLNets: {', '.join(edl)}.")


def _load_error(spec: str, error: Exception) -> ModelSpecError:
    return ModelSpecError(f"cannot load model {spec!r}: {type(error).__name__}: {error}")


def load_model(
        spec: str,
        *,
        model_kwargs: Optional[Dict[str, Any]] = None,
        arch: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        allow_pickle: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model a spec names (see the module docstring); returns ``(model, source)``.

    ``num_classes`` / ``in_chans`` (the dataset's) are defaults for registry names only;
    ``model_kwargs`` always win.  The model is returned in eval mode on the CPU.  ``source``
    describes where the weights came from: ``{'spec', 'kind', 'architecture', 'weights',
    'model_kwargs'}`` with kind in {'registry', 'hub', 'local-dir', 'checkpoint'} and
    weights 'pretrained' | 'random-init' | the file or repo.
    """
    import timm_edl  # noqa: F401  (registers edlnet_*)
    kwargs = dict(model_kwargs or {})
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError("empty --model")
    path = Path(spec)
    source: Dict[str, Any] = {'spec': spec, 'model_kwargs': kwargs}
    try:
        if spec.startswith(('hf-hub:', 'local-dir:')) or path.is_dir():
            ident = spec if spec.startswith(('hf-hub:', 'local-dir:')) else f'local-dir:{spec}'
            if ident.startswith('local-dir:') and not Path(ident[len('local-dir:'):]).is_dir():
                raise ModelSpecError(f"model folder not found: {Path(ident[len('local-dir:'):]).absolute()}")
            model = _hub().load(ident, allow_pickle=allow_pickle, **kwargs)
            source.update(kind='hub' if ident.startswith('hf-hub:') else 'local-dir', weights=ident)
        elif path.is_file() or spec.lower().endswith(CHECKPOINT_SUFFIXES):
            if not path.is_file():
                raise ModelSpecError(f"checkpoint not found: {path.absolute()}")
            config_file = path.parent / 'config.json'
            config: Dict[str, Any] = {}
            if config_file.is_file():
                try:
                    config = json.loads(config_file.read_text(encoding='utf-8'))
                except ValueError as e:
                    raise ModelSpecError(f"{config_file} is not valid JSON: {e}") from None
            if arch is None and path.name == 'model.safetensors' and config.get('architecture'):
                model = _hub().load(f'local-dir:{path.parent}', allow_pickle=allow_pickle, **kwargs)
            else:
                arch = arch or config.get('architecture')
                if not arch:
                    raise ModelSpecError(
                        f"{spec}: a weights file needs its architecture: pass --arch NAME (e.g. --arch "
                        f"edlnet_resnet18 plus --model-kwargs), or keep the config.json that "
                        f"`timm-edl export` writes next to it")
                base, _ = timm.models.split_model_name_tag(arch)
                if not timm.is_model(base):
                    raise _unknown_model_error(arch)
                args = dict(config.get('model_args') or {})
                if config.get('num_classes') is not None:
                    args.setdefault('num_classes', config['num_classes'])
                if not config:
                    if num_classes is not None:
                        args.setdefault('num_classes', num_classes)
                    if in_chans is not None:
                        args.setdefault('in_chans', in_chans)
                args.update(kwargs)
                model = timm.create_model(arch, pretrained=False, **args)
                _hub().load_checkpoint(model, path, allow_pickle=allow_pickle)
            source.update(kind='checkpoint', weights=str(path))
        else:
            base, tag = timm.models.split_model_name_tag(spec)
            if not timm.is_model(base):
                raise _unknown_model_error(spec)
            cfg = timm.models.get_pretrained_cfg(f'{base}.{tag}' if tag else base, allow_unregistered=True)
            has_weights = bool(cfg is not None and getattr(cfg, 'has_weights', False))
            if not has_weights:
                if num_classes is not None:
                    kwargs.setdefault('num_classes', num_classes)
                if in_chans is not None:
                    kwargs.setdefault('in_chans', in_chans)
            model = timm.create_model(spec, pretrained=has_weights, **kwargs)
            source.update(kind='registry', weights='pretrained' if has_weights else 'random-init')
            source['model_kwargs'] = kwargs
    except EvaluationError:
        raise
    except ImportError as e:
        raise _load_error(spec, e) from e
    except (RuntimeError, ValueError, TypeError, OSError, KeyError) as e:
        raise _load_error(spec, e) from e
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    source['architecture'] = cfg.get('architecture') or type(model).__name__
    source['tag'] = cfg.get('tag')
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
        _set_submodule(twin, name, conv)
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
        _set_submodule(surrogate, name, _NaiveEDL(layer, mode))
    return surrogate.eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
        'weights_digest': weights_digest(model),
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
