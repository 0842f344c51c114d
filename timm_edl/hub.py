"""Weights on the Hugging Face Hub: export, push, and safe loading.

Publishing (maintainers)::

    folder = export(model, 'out/edlnet_resnet18.cifar10_linf', eval_results='eval.json')
    push(folder, dry_run=True)           # lists the files; then push(folder) uploads them

Loading (users)::

    import timm, timm_edl                # the import registers the edlnet_* architectures
    model = timm.create_model('hf-hub:timm-edl/<name>', pretrained=True)
    model = timm_edl.hub.load('hf-hub:timm-edl/<name>')   # same, with clearer errors; also
                                                          # rebuilds converted timm models

An exported folder is what timm reads (``local-dir:`` / ``hf-hub:``):

* ``model.safetensors``: the state dict (safetensors, never a pickle);
* ``config.json``: timm's config (``architecture``, ``num_classes``, ``num_features``,
  ``label_names``, ``model_args``, ``pretrained_cfg``, written by timm's own
  ``save_config_for_hf``).  ``model_args`` holds every argument needed to rebuild the exact
  network: for EDLNets ``edl_layers``, the complete ``edl_cfg``, ``input_mean``/``input_std``
  and ``in_chans``/``num_classes``/``global_pool``.  Two extra top-level blocks, which timm
  ignores: ``timm_edl`` (published name, versions, sha256 of the weights, evaluation
  results) and, for a converted timm model, ``timm_edl_conversion`` (which convolutions are
  EDL layers and their options; :func:`load` re-applies it, see below);
* ``README.md``: the model card, rendered from ``hub_cards/model_card.md.tmpl``.

Evaluation results (``export(eval_results=...)``)
-------------------------------------------------
A path to a JSON file, a dict, or a list of them (one per threat model), as written by the
evaluation entry point.  A file may also hold ``{"results": [...]}``.  Fields read:

==================  ========  =======================================================
field               required  meaning
==================  ========  =======================================================
``dataset``         yes       dataset name as in :mod:`timm_edl.data` (``cifar10``,
                              ``fashion-mnist-small``, ...)
``split``           no        default ``test``
``n_ex``            yes       number of test points evaluated (int > 0)
``clean_acc``       yes       clean accuracy, a fraction in [0, 1]
``threat_model``    if robust ``Linf`` | ``L2`` | ``L1`` (case-insensitive)
``eps``             if robust radius in [0, 1]-pixel units (e.g. 0.0313725 = 8/255)
``autoattack_acc``  no        robust accuracy under AutoAttack, fraction in [0, 1]
``pgd_acc``         no        robust accuracy under PGD, fraction in [0, 1]
``attack``          no        attack name behind ``autoattack_acc`` (default
                              ``autoattack``); may be a dict ``{"name", "version"}``
``version``         no        AutoAttack version (``standard``, ``plus``, ``rand``, ``custom``)
``pgd_steps``       no        PGD iterations (int)
``pgd_restarts``    no        PGD restarts (int)
``architecture``    no        timm architecture evaluated; must equal the exported one
``weights_digest``  no        :func:`state_dict_digest` of the evaluated model; must equal
                              the exported model's (catches attaching the wrong results)
``eps_text``        no        how to print eps (``8/255``); default: derived from ``eps``
``data_label``      no        dataset display name (``CIFAR-10-JPEG``); default: from
                              :mod:`timm_edl.data`
``footnote``        no        caveats printed under the results table
``unreliable``      no        true when a gradient-masking check failed (also implied by
                              a non-empty ``failed_checks`` list): the card says the robust
                              accuracy may be overstated
==================  ========  =======================================================

"Robust" means ``autoattack_acc`` or ``pgd_acc`` is present.  Accuracies are fractions;
the card shows them as percentages.  Unknown fields are ignored.

Security
--------
Loading never unpickles unless asked: a ``.bin``/``.pth``/``.pt`` checkpoint is refused
(:class:`UnsafeCheckpointError`) unless ``allow_pickle=True``, and then it is read with
``torch.load(weights_only=True)``.  :func:`check_pretrained_source` is the hook that gives
timm's own pretrained path (``timm.create_model('edlnet_*', pretrained=True, ...)``) the
same rule.  ``timm.create_model(..., checkpoint_path=...)`` is plain timm and not covered:
use :func:`load_checkpoint`.

A converted timm model (``convert_to_edl`` on e.g. ``resnet18``) is exported with
``architecture: resnet18`` plus the ``timm_edl_conversion`` block.  Plain
``timm.create_model('local-dir:...')`` would build a plain resnet18 and refuse the EDL state
dict (unexpected ``*.beta``/``*.lam`` keys): load it with :func:`load`.
"""
import argparse
import hashlib
import json
import math
import os
import re
import string
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.models import clean_state_dict, parse_model_name

from .convert import PRESERVE_FUNCTION, apply_conversion, conversion_config, edl_layer_config
from .layers import edl_layers

# This module imports nothing from timm_edl.models at import time, so that the model
# definitions may import HUB_NAMESPACE / check_pretrained_source from here.

__all__ = [
    'HUB_NAMESPACE', 'WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'CARD_TEMPLATE',
    'export', 'push', 'load', 'load_checkpoint', 'read_state_dict', 'check_safetensors_file',
    'check_pretrained_source', 'state_dict_digest', 'read_eval_results', 'verify_export',
    'export_main', 'push_main',
    'UnsafeCheckpointError', 'CorruptCheckpointError', 'StateDictMismatchError',
    'ArchitectureNotRegisteredError', 'ExportError', 'PretrainedWeightsUnavailable',
]

# The one place that names the Hub namespace of published timm-edl weights.
HUB_NAMESPACE = 'timm-edl'

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
_MANAGED = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
CARD_TEMPLATE = Path(__file__).resolve().parent / '_cards' / 'model_card.md.tmpl'  # hub_cards/ links to it
EXPORT_FORMAT = 1

# Weight files that need unpickling (timm's local-dir loader looks for these too).
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.tar', '.ckpt', '.pkl', '.pickle')
_PICKLE_HUB_FILES = ('pytorch_model.bin', 'pytorch_model.pth', 'model.pth')

# Model arguments that describe how a model was created or loaded, not its architecture.
_RUNTIME_ARGS = (
    'allow_pickle', 'cache_dir', 'features_only', 'out_indices', 'feature_cls', 'feature_cfg',
    'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'checkpoint_path',
    'pretrained_strict', 'device', 'dtype',
)

# EDLResNet arguments that no entrypoint sets and that are not in the state dict.
_EDL_ARCH_ARGS = ('edl_layers', 'edl_cfg', 'input_mean', 'input_std')

HUB_DATASET_IDS = {  # timm_edl.data names -> Hub dataset ids for the card's `datasets:`
    'cifar10': 'cifar10', 'cifar10-jpeg': 'cifar10', 'cifar100': 'cifar100',
    'fashion-mnist': 'fashion_mnist', 'fashion-mnist-small': 'fashion_mnist',
}
_THREAT_MODELS = {'linf': 'Linf', 'l_inf': 'Linf', 'l-inf': 'Linf', 'inf': 'Linf',
                  'l2': 'L2', 'l_2': 'L2', 'l1': 'L1', 'l_1': 'L1'}


class UnsafeCheckpointError(ValueError):
    """A pickle-based checkpoint was refused (pass ``allow_pickle=True`` to opt in)."""


class CorruptCheckpointError(ValueError):
    """A weights file is not a readable safetensors file (corrupt, truncated, wrong format)."""


class StateDictMismatchError(RuntimeError):
    """A state dict does not fit the model; ``missing``, ``unexpected``, ``mismatched`` list why."""

    def __init__(self, message: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class ArchitectureNotRegisteredError(RuntimeError):
    """config.json names an architecture that timm does not know."""


class ExportError(ValueError):
    """The model cannot be exported faithfully (the message says why)."""


def __getattr__(name: str) -> Any:
    if name == 'PretrainedWeightsUnavailable':  # re-exported lazily (see the import note above)
        from .models.edlnet import PretrainedWeightsUnavailable
        return PretrainedWeightsUnavailable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    from . import __version__
    return __version__


def _is_edlnet(model: nn.Module) -> bool:
    from .models.edlnet import EDLResNet
    return isinstance(model, EDLResNet)


# ----------------------------------------------------------------------------- weights files

_ST_DTYPE_BYTES = {
    'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U8': 1,
    'U16': 2, 'U32': 4, 'U64': 8, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'C64': 8,
}
_MAX_HEADER = 100 * 1024 * 1024
_PAPER_ID = 'arXiv:2502.00834'


def check_safetensors_file(path: Union[str, Path]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Check the structure of a safetensors file without loading it; return ``{name: (dtype, shape)}``.

    Reads the 8-byte header length and the JSON header, and checks that every tensor's
    byte range lies in the file and that the data section has exactly the size the header
    announces (a truncated download fails here).  Raises :class:`CorruptCheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    size = path.stat().st_size

    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{path} is not a valid safetensors file: {why}. The file is corrupt or truncated (an "
            f"interrupted download or copy?): delete it and download / export it again.")

    with path.open('rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"it has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, 'little')
        # A safetensors header length can start with byte 0x80 too (any length = 128 mod 256):
        # only call the file a pickle when it does not read as a safetensors header ('{' first).
        first = f.read(1) if 0 < n <= min(size - 8, _MAX_HEADER) else b''
        if first != b'{' and (head[:2] == b'PK' or head[:1] == b'\x80'):
            raise CorruptCheckpointError(
                f"{path} is a pickle-based PyTorch checkpoint (torch.save), not safetensors; "
                f"read it with load_checkpoint(..., allow_pickle=True) only if you trust its origin")
        if n > size - 8 or n > _MAX_HEADER:
            raise corrupt(f"its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads((first + f.read(n - len(first))).decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as e:
            raise corrupt(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_len = size - 8 - n
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    end_max = 0
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype, shape = str(info['dtype']), tuple(int(s) for s in info['shape'])
            start, end = (int(v) for v in info['data_offsets'])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"the header entry of {name!r} is malformed") from None
        if not 0 <= start <= end:
            raise corrupt(f"tensor {name!r} has byte range [{start}, {end})")
        itemsize = _ST_DTYPE_BYTES.get(dtype)
        if itemsize is not None and itemsize * math.prod(shape) != end - start:
            raise corrupt(f"tensor {name!r} ({dtype}, shape {list(shape)}) does not fit its {end - start} bytes")
        end_max = max(end_max, end)
        tensors[name] = (dtype, shape)
    if end_max != data_len:
        what = 'truncated: ' if end_max > data_len else ''
        raise corrupt(f"{what}the header describes {end_max} bytes of tensor data, the file holds {data_len}")
    return tensors


def _is_pickle_name(path: Union[str, Path]) -> bool:
    return not str(path).endswith('.safetensors')


def _refuse_pickle(path: Union[str, Path]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it is not a .safetensors file, and pickle-based checkpoints "
        f"(.bin/.pth/.pt, torch.save) can run arbitrary code when loaded. Use safetensors weights, or, "
        f"if you trust the file, opt in with allow_pickle=True (it is then read with "
        f"torch.load(weights_only=True)); re-export it with timm_edl.hub.export to get safetensors.")


def read_state_dict(path: Union[str, Path], *, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file (or, with ``allow_pickle``, a torch file).

    Torch files are read with ``torch.load(weights_only=True)``; a training checkpoint's
    ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` entry is unwrapped and
    ``module.`` / ``_orig_mod.`` prefixes are removed (as timm does).
    """
    path = Path(path)
    if not _is_pickle_name(path):
        check_safetensors_file(path)
        import safetensors
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path} could not be read as safetensors: {e}") from e
    if not allow_pickle:
        raise _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError ...
        raise CorruptCheckpointError(
            f"{path} could not be read with torch.load(weights_only=True): {type(e).__name__}: {e}") from e
    if isinstance(checkpoint, dict):
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    return clean_state_dict(checkpoint)


def _check_state_dict(
        model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool, allow_unexpected: bool = False,
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    bad_missing = missing if strict else []
    bad_unexpected = unexpected if strict and not allow_unexpected else []
    if not (mismatched or bad_missing or bad_unexpected):
        return

    def listing(items: List[str]) -> str:
        shown = ', '.join(items[:12])
        return shown + (f', ... ({len(items) - 12} more)' if len(items) > 12 else '')

    parts = []
    if bad_missing:
        parts.append(f"missing from the weights ({len(bad_missing)}): {listing(bad_missing)}")
    if bad_unexpected:
        parts.append(f"unexpected in the weights ({len(bad_unexpected)}): {listing(bad_unexpected)}")
    if mismatched:
        parts.append(f"mis-shaped ({len(mismatched)}): " + listing(
            [f"{k} weights {list(a)} vs model {list(b)}" for k, a, b in mismatched]))
    hint = ''
    edl_keys = ('.beta', '.lam', '.lipschitz', '.step_scale')
    if any(k.endswith(edl_keys) for k in bad_unexpected + bad_missing):
        if _is_edlnet(model):
            hint = (" The EDL layers differ: the model was built with other edl_layers / edl_cfg than the "
                    "weights (config.json's model_args record the right ones).")
        elif any(k.endswith(edl_keys) for k in bad_unexpected):
            hint = (" The weights hold EDL layers the model lacks: for a converted timm model use "
                    "timm_edl.hub.load(), which re-applies the conversion recorded in config.json.")
    raise StateDictMismatchError(
        f"the weights do not match the {type(model).__name__} architecture: " + '; '.join(parts) + '.' + hint,
        missing, unexpected, mismatched)


def load_checkpoint(
        model: nn.Module, path: Union[str, Path], *, allow_pickle: bool = False, strict: bool = True,
) -> nn.Module:
    """Load a weights file into ``model`` safely; returns ``model``.

    ``.safetensors`` files are checked (:func:`check_safetensors_file`) and read without
    pickle.  Anything else is refused with :class:`UnsafeCheckpointError` unless
    ``allow_pickle=True``, then read with ``torch.load(weights_only=True)``.  The keys and
    shapes are compared with the model before anything is copied: a mismatch raises
    :class:`StateDictMismatchError` listing the missing, unexpected and mis-shaped entries
    (``strict=False`` tolerates missing / unexpected keys, never mis-shaped ones).
    """
    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    _check_state_dict(model, state_dict, strict)
    model.load_state_dict(state_dict, strict=False)
    return model


def state_dict_digest(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]]) -> str:
    """sha256 of a model's weights, independent of the file format (``'sha256:<hex>'``).

    Covers every state-dict entry (name, dtype, shape, bytes) except the step-size cache of
    EDL layers (``*.lipschitz``, ``*.lipschitz_size``), which a forward pass at another
    input size may refresh.  The evaluation entry point records it as ``weights_digest`` so
    that :func:`export` can check that the results belong to the exported weights.
    """
    if isinstance(model_or_state_dict, nn.Module):
        skip = {f'{n}.{b}' for n, _ in edl_layers(model_or_state_dict) for b in ('lipschitz', 'lipschitz_size')}
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
        skip = {k for k in state_dict if k.endswith(('.lipschitz', '.lipschitz_size'))}
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key in skip:
            continue
        t = state_dict[key].detach().to('cpu').contiguous()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return 'sha256:' + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- evaluation results

def _fraction(entry: Dict[str, Any], key: str, where: str) -> Optional[float]:
    value = entry.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {key}={value} is not a fraction in [0, 1] (accuracies are fractions, "
                         f"not percentages)")
    return value


def _normalize_eval(entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an evaluation result must be a JSON object, got {type(entry).__name__}")
    out: Dict[str, Any] = {}
    for key in ('dataset', 'n_ex', 'clean_acc'):
        if entry.get(key) is None:
            raise ValueError(f"{where}: required field {key!r} is missing (fields: dataset, n_ex, clean_acc, "
                             f"threat_model, eps, autoattack_acc, pgd_acc, attack, version)")
    out['dataset'] = str(entry['dataset'])
    out['split'] = str(entry.get('split') or 'test')
    n_ex = entry['n_ex']
    if isinstance(n_ex, bool) or not isinstance(n_ex, (int, float)) or int(n_ex) != n_ex or n_ex <= 0:
        raise ValueError(f"{where}: n_ex must be a positive integer, got {n_ex!r}")
    out['n_ex'] = int(n_ex)
    out['clean_acc'] = _fraction(entry, 'clean_acc', where)
    for key in ('autoattack_acc', 'pgd_acc'):
        value = _fraction(entry, key, where)
        if value is not None:
            out[key] = value
    attack = entry.get('attack')
    version = entry.get('version')
    if isinstance(attack, dict):
        version = version or attack.get('version')
        attack = attack.get('name')
    robust = 'autoattack_acc' in out or 'pgd_acc' in out
    if robust:
        tm = entry.get('threat_model')
        if tm is None or entry.get('eps') is None:
            raise ValueError(f"{where}: robust accuracies need 'threat_model' and 'eps'")
        out['threat_model'] = _THREAT_MODELS.get(str(tm).lower(), str(tm))
        try:
            eps = float(entry['eps'])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: eps must be a number, got {entry['eps']!r}") from None
        if not eps >= 0:
            raise ValueError(f"{where}: eps must be >= 0, got {eps}")
        out['eps'] = eps
    if 'autoattack_acc' in out:
        out['attack'] = str(attack or 'autoattack')
        if version is not None:
            out['version'] = str(version)
    for key in ('pgd_steps', 'pgd_restarts'):
        if entry.get(key) is not None and 'pgd_acc' in out:
            out[key] = int(entry[key])
    for key in ('architecture', 'weights_digest', 'eps_text', 'data_label', 'footnote'):
        if entry.get(key):
            out[key] = str(entry[key])
    failed = entry.get('failed_checks') or []
    if entry.get('unreliable') or failed:
        out['unreliable'] = True
        if failed:
            out['failed_checks'] = [str(c) for c in failed]
    return out


def read_eval_results(
        eval_results: Union[None, str, Path, Dict[str, Any], Sequence[Any]],
) -> List[Dict[str, Any]]:
    """Normalised evaluation entries (see the module docstring for the fields)."""
    if eval_results is None:
        return []
    items = list(eval_results) if isinstance(eval_results, (list, tuple)) else [eval_results]
    out: List[Dict[str, Any]] = []
    for item in items:
        where = 'evaluation results'
        if isinstance(item, (str, Path)):
            where = str(item)
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"evaluation results file not found: {path}")
            try:
                item = json.loads(path.read_text(encoding='utf-8'))
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(item, dict) and isinstance(item.get('results'), list):
            out += [_normalize_eval(e, where) for e in item['results']]
        elif isinstance(item, list):
            out += [_normalize_eval(e, where) for e in item]
        else:
            out.append(_normalize_eval(item, where))
    return out


def _eps_of(r: Dict[str, Any]) -> str:
    return r.get('eps_text') or _eps_text(r['eps'], r['threat_model'])


def _attack_label(r: Dict[str, Any], key: str) -> str:
    if key == 'pgd_acc':
        return f"PGD-{r['pgd_steps']}" if r.get('pgd_steps') else 'PGD'
    name = 'AutoAttack' if r['attack'].lower() == 'autoattack' else r['attack']
    return f"{name} {r['version']}" if r.get('version') else name


def _data_label(r: Dict[str, Any]) -> str:
    return r.get('data_label') or _dataset_display(r['dataset'])


def _eps_text(eps: float, threat_model: str) -> str:
    k = eps * 255
    if threat_model == 'Linf' and eps > 0 and abs(k - round(k)) < 1e-4:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def _dataset_display(name: str) -> str:
    try:
        from .data import DATASETS
        info = DATASETS.get(name)
        return info.display_name if info is not None else name
    except Exception:  # pragma: no cover - data module unavailable
        return name


def _pct(value: float) -> float:
    return round(100.0 * value, 2)


# ----------------------------------------------------------------------------- describing a model

def _float32_list(t: torch.Tensor) -> List[float]:
    import numpy as np
    return [float(str(np.float32(v))) for v in t.detach().float().cpu().flatten().tolist()]


def _names_regex(names: Sequence[str]) -> str:
    return 're:^(?:' + '|'.join(re.escape(n) for n in names) + ')$'


def _edl_model_args(model: nn.Module) -> Dict[str, Any]:
    """model_args that rebuild an EDLResNet's EDL layers and input normalisation."""
    layers = edl_layers(model)
    # compile_solver is how this machine runs the solver, not part of the model: a loaded
    # export must not need a compiler
    edl_cfg = {k: v for k, v in model.edl_cfg.items() if k != 'compile_solver'}
    if layers:
        first_name, first = layers[0]
        common = edl_layer_config(first, values=False)
        for name, layer in layers[1:]:
            cfg = edl_layer_config(layer, values=False)
            diff = sorted(k for k in cfg if cfg[k] != common[k])
            if diff:
                raise ExportError(
                    f"the EDL layers of this EDLNet differ in {diff} ({first_name!r} vs {name!r}); an EDLNet's "
                    f"edl_cfg applies to every EDL layer, so set them alike (timm_edl.convert.set_edl_options)")
        edl_cfg.update(common)
        for key in ('beta', 'lam'):  # the values are in the state dict; record them when uniform
            values = {edl_layer_config(m)[key] for _, m in layers}
            if len(values) == 1:
                edl_cfg[key] = values.pop()
    edl_cfg.setdefault('beta', 1.0)
    edl_cfg.setdefault('lam', 0.1)
    policy = model.edl_layers
    if not isinstance(policy, str) or policy == 'custom':
        policy = _names_regex([n for n, _ in layers]) if layers else 'none'
    return dict(
        edl_layers=policy, edl_cfg=edl_cfg,
        input_mean=_float32_list(model.input_norm.mean), input_std=_float32_list(model.input_norm.std),
    )


def _kind(model: nn.Module) -> str:
    if _is_edlnet(model):
        return 'edlnet'
    if not getattr(model, 'pretrained_cfg', None):
        _architecture(model)  # raises: not a timm model
    if type(model).__name__.startswith('Feature') or not hasattr(model, 'num_classes'):
        raise ExportError(
            f"cannot export a {type(model).__name__}: export the full classification model "
            f"(features_only models are rebuilt from it with timm_edl.hub.load(..., features_only=True))")
    if not edl_layers(model):
        raise ExportError(
            f"this {type(model).__name__} has no EDL layers: convert it first with "
            f"timm_edl.convert_to_edl(model, ...) (plain timm models are exported by timm itself: "
            f"timm.models.push_to_hf_hub)")
    return 'converted'


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch or not timm.is_model(arch):
        raise ExportError(
            "cannot tell which timm architecture this model is: create it with timm.create_model(...) "
            "(the export records model.pretrained_cfg['architecture'] and the creation arguments)")
    return arch


def _build_on_meta(arch: str, model_args: Dict[str, Any], conversion: Optional[Dict[str, Any]]) -> nn.Module:
    """The network config.json describes, without allocating weights (CPU if meta fails)."""
    try:
        with torch.device('meta'):
            model = timm.create_model(arch, pretrained=False, **model_args)
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values
        model = timm.create_model(arch, pretrained=False, **model_args)
    if conversion is not None:
        apply_conversion(model, conversion)
    return model


def _compare_rebuild(model: nn.Module, rebuilt: nn.Module, arch: str) -> None:
    a = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    problems = []
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        problems.append(f"state dict keys differ (only in the model: {only_a[:8]}, only in the rebuild: {only_b[:8]})")
    shapes = [k for k in a.keys() & b.keys() if a[k] != b[k]]
    if shapes:
        problems.append(f"shapes differ for {sorted(shapes)[:8]}")
    la = {n: edl_layer_config(m, values=False) for n, m in edl_layers(model)}
    lb = {n: edl_layer_config(m, values=False) for n, m in edl_layers(rebuilt)}
    if la.keys() != lb.keys():
        problems.append(f"EDL layers differ: {sorted(la.keys() ^ lb.keys())[:8]}")
    else:
        diff = [n for n in la if la[n] != lb[n]]
        if diff:
            problems.append(f"EDL options differ for {diff[:8]}")
    if problems:
        raise ExportError(
            f"config.json would not rebuild this model: timm.create_model({arch!r}, **model_args) gives a "
            f"different network: {'; '.join(problems)}. Pass the missing constructor arguments with "
            f"export(..., model_args={{...}}).")


def _clean_model_args(model: nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in _RUNTIME_ARGS}


def _config_for(model: nn.Module, model_args: Dict[str, Any], pretrained_cfg_update: Dict[str, Any],
                label_names: Optional[Sequence[str]], data_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """timm's own config.json for ``model`` (timm.models._hub.save_config_for_hf), as a dict."""
    from timm.models._hub import save_config_for_hf
    saved = getattr(model, '_model_args', None)
    model._model_args = _clean_model_args(model)
    model_config: Dict[str, Any] = {'pretrained_cfg': pretrained_cfg_update}
    if label_names:
        model_config['label_names'] = list(label_names)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_NAME
            save_config_for_hf(model, str(path), model_config=model_config, model_args=model_args,
                               data_config=data_config)
            return json.loads(path.read_text(encoding='utf-8'))
    finally:
        if saved is None:
            del model._model_args
        else:
            model._model_args = saved


# ----------------------------------------------------------------------------- model card

def _yaml_block(data: Dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000).rstrip('\n')


def _metadata(model_name: str, license: str, datasets: List[str], results: List[Dict[str, Any]],
              extra_tags: Sequence[str]) -> Dict[str, Any]:
    tags = ['image-classification', 'timm', 'edlnet', 'adversarial-robustness', 'timm-edl',
            'elastic-dictionary-learning', 'sparse-coding']
    tags += [t for t in extra_tags if t not in tags]
    meta: Dict[str, Any] = {'library_name': 'timm', 'pipeline_tag': 'image-classification', 'license': license,
                            'tags': tags}
    if datasets:
        meta['datasets'] = list(datasets)
    if results:
        entries = []
        for r in results:
            metrics = [{'type': 'accuracy', 'name': 'Clean accuracy', 'value': _pct(r['clean_acc']),
                        'args': {'n_ex': r['n_ex']}, 'verified': False}]
            for key in ('autoattack_acc', 'pgd_acc'):
                if key not in r:
                    continue
                attack = _attack_label(r, key)
                args = {'threat_model': r['threat_model'], 'eps': r['eps'], 'attack': attack, 'n_ex': r['n_ex']}
                metrics.append({
                    'type': 'robust-accuracy',
                    'name': f"Robust accuracy ({attack}, {r['threat_model']} eps={_eps_of(r)})",
                    'value': _pct(r[key]), 'args': args, 'verified': False})
            entries.append({
                'task': {'type': 'image-classification', 'name': 'Image Classification'},
                'dataset': {'name': _data_label(r), 'type': r['dataset'], 'split': r['split']},
                'metrics': metrics,  # no 'source': huggingface_hub requires a url with its name
            })
        meta['model-index'] = [{'name': model_name, 'results': entries}]
    return meta


def _evaluation_markdown(results: List[Dict[str, Any]]) -> str:
    if not results:
        return ("**No evaluation results are recorded for these weights.** Their clean and robust accuracy "
                "are unknown: do not assume that this model is robust.")
    rows = ['| Dataset (split) | Test points | Threat model | eps | Clean accuracy | AutoAttack accuracy '
            '| PGD accuracy |', '|---|---|---|---|---|---|---|']
    notes = []
    for i, r in enumerate(results, start=1):
        tm = r.get('threat_model', '-')
        eps = _eps_of(r) if 'eps' in r else '-'
        aa = f"{_pct(r['autoattack_acc']):.2f} % ({_attack_label(r, 'autoattack_acc')})" \
            if 'autoattack_acc' in r else '-'
        pgd = '-'
        if 'pgd_acc' in r:
            detail = ', '.join(x for x in (f"{r['pgd_steps']} steps" if r.get('pgd_steps') else '',
                                           f"{r['pgd_restarts']} restart{'s' if r['pgd_restarts'] != 1 else ''}"
                                           if r.get('pgd_restarts') else '') if x)
            pgd = f"{_pct(r['pgd_acc']):.2f} %" + (f" ({detail})" if detail else '')
        mark = ''
        if r.get('footnote') or r.get('unreliable'):
            mark = f" [{i}]"
            text = r.get('footnote') or ''
            if r.get('unreliable') and 'FAILED CHECK' not in text:
                failed = ', '.join(r.get('failed_checks', [])) or 'a gradient-masking check'
                text = f"FAILED CHECK: {failed}; the robust accuracy may be overstated. {text}".strip()
            notes.append(f"[{i}] {'**' if r.get('unreliable') else ''}{text}{'**' if r.get('unreliable') else ''}")
        rows.append(f"| {_data_label(r)} ({r['split']}){mark} | {r['n_ex']} | {tm} | {eps} "
                    f"| {_pct(r['clean_acc']):.2f} % | {aa} | {pgd} |")
    note = ("\n\nAccuracies are percentages of the test points, copied by `timm_edl.hub.export` from the "
            "evaluation entry point's JSON output (also stored in `config.json` under `timm_edl.evaluation`). "
            "They are not verified by the Hub.")
    if not any('autoattack_acc' in r or 'pgd_acc' in r for r in results):
        note += " **No robust accuracy is recorded.**"
    if notes:
        note += '\n\n' + '\n\n'.join(notes)
    return '\n'.join(rows) + note


def _range_text(values: List[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if abs(hi - lo) < 5e-4 else f"{lo:.3g} to {hi:.3g}"


def _edl_markdown(model: nn.Module) -> Tuple[str, bool]:
    layers = edl_layers(model)
    if not layers:
        return "None: this is the convolutional twin (`edl_layers='none'`), a plain CNN.", False
    cfgs = [edl_layer_config(m) for _, m in layers]
    preserving = all(all(c[k] == v for k, v in PRESERVE_FUNCTION.items()) for c in cfgs)
    betas = [c['beta'] for c in cfgs]
    lams = [c['lam'] for c in cfgs]

    def values(key: str) -> str:
        vs = []
        for c in cfgs:
            v = c[key]
            if v not in vs:
                vs.append(v)
        return ', '.join('L by Lanczos (1.01 x lambda_max)' if (key == 'fixed_lipschitz' and v is None) else f"`{v}`"
                         for v in vs)

    n_conv = len(layers) + sum(1 for m in model.modules() if type(m) is nn.Conv2d)
    rows = [
        '| | |', '|---|---|',
        f"| EDL layers | {len(layers)} of {n_conv} convolutions |",
        f"| Unrolled RISTA steps (`num_steps`) | {values('num_steps')} |",
        f"| beta (per layer{'; learnable' if any(c['beta_learnable'] for c in cfgs) else ''}) | {_range_text(betas)} |",
        f"| lam (sparsity{'; learnable' if any(c['lam_learnable'] for c in cfgs) else ''}) | {_range_text(lams)} |",
        f"| Step rule | {values('step_rule')} |",
        f"| First step (`init`: 'ista' = plain ISTA warm start) | {values('init')} |",
        f"| l1 reweighting (`reweight`) | {values('reweight')} |",
        f"| Lipschitz constant L | {values('fixed_lipschitz')} |",
        f"| Unit-norm atoms (`normalize_atoms`) | {values('normalize_atoms')} |",
        f"| Non-negative codes (`nonneg`) | {values('nonneg')} |",
        f"| Smoothing of the reweighting (`eps`) | {values('eps')} |",
    ]
    text = '\n'.join(rows) + "\n\nThe exact per-layer options are in `config.json`."
    if preserving:
        text += ("\n\nEvery EDL layer is at the function-preserving setting (one step, beta = 1, lam = 0, L = 1, "
                 "no atom normalisation): the network computes exactly what the original convolutional network "
                 "computes. It has not been fine-tuned as an EDL network.")
    return text, preserving


def _usage_markdown(repo_id: str, kind: str) -> str:
    if kind == 'edlnet':
        return (
            "```python\nimport timm\nimport timm_edl  # registers the edlnet_* architectures with timm: required\n\n"
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
            "config = timm.data.resolve_model_data_config(model)  # mean 0 / std 1: the model normalises itself\n"
            "# input: images with pixels in [0, 1], shape (B, *config['input_size'])\n```\n\n"
            f'`timm_edl.hub.load("hf-hub:{repo_id}")` does the same with clearer error messages. Without '
            "`import timm_edl`, timm fails with `Unknown model`: timm has no plugin discovery.")
    return (
        "```python\nimport timm_edl.hub\n\n"
        f'model = timm_edl.hub.load("hf-hub:{repo_id}").eval()\n'
        "config = timm.data.resolve_model_data_config(model)\n```\n\n"
        "This is a timm model with EDL layers: `timm_edl.hub.load` builds the original timm architecture and "
        "re-applies the conversion recorded in `config.json` (`timm_edl_conversion`) before loading the weights. "
        "A plain `timm.create_model(\"hf-hub:...\")` builds the unconverted network and refuses these weights.")


def _render_card(template: Path, fields: Dict[str, str]) -> str:
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template not found: {template} (export needs a source checkout of timm-edl, "
            f"or pass card_template=...)")
    return string.Template(template.read_text(encoding='utf-8')).substitute(fields)


# ----------------------------------------------------------------------------- export

def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not out_dir.exists():
        return
    entries = [p.name for p in out_dir.iterdir() if not p.name.startswith('.')]
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty ({', '.join(sorted(entries)[:6])}): refusing to overwrite it. Pick a new "
            f"folder, or pass overwrite=True (--overwrite) to replace an earlier export there.")
    unknown = sorted(set(entries) - set(_MANAGED))
    if unknown:
        raise FileExistsError(
            f"{out_dir} holds files an export does not write ({', '.join(unknown[:6])}); they would be pushed "
            f"along with the export. Remove them or pick another folder.")


def _default_model_name(arch: str, tag: Optional[str], kind: str) -> str:
    base = arch if kind == 'edlnet' else f'{arch}_edl'
    return f'{base}.{tag}' if tag else base


def _check_model_name(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(f'{HUB_NAMESPACE}/{name}')
    except HFValidationError as e:
        raise ValueError(f"model_name {name!r} is not a valid Hub repository name: {e}") from None


def export(
        model: nn.Module,
        out_dir: Union[str, Path],
        *,
        eval_results: Union[None, str, Path, Dict[str, Any], Sequence[Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        datasets: Optional[Sequence[str]] = None,
        overwrite: bool = False,
        model_name: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        tags: Sequence[str] = (),
        data_config: Optional[Dict[str, Any]] = None,
        card_dir: Union[None, str, Path] = None,
        card_template: Union[None, str, Path] = None,
) -> Path:
    """Write a Hub-ready folder for ``model``: ``model.safetensors``, ``config.json``, ``README.md``.

    Args:
        model: an EDLNet (``timm.create_model('edlnet_*', ...)``) or a timm model converted
            with :func:`timm_edl.convert_to_edl`.
        out_dir: folder to write; created if absent, must be empty unless ``overwrite``.
        eval_results: evaluation JSON (path, dict or list; fields in the module docstring).
            Without it the card says plainly that nothing was evaluated.
        label_names: class names (default: the model's ``pretrained_cfg['label_names']``
            when their number matches ``num_classes``).
        license: Hub license id for the card and the config.
        datasets: Hub dataset ids for the card (default: from the evaluation results).
        overwrite: replace an earlier export in ``out_dir`` (files other than the three an
            export writes, hidden files aside, are never touched: their presence is an error).
        model_name: published name (the Hub repo is ``f'{HUB_NAMESPACE}/{model_name}'``);
            default ``<architecture>.<pretrained tag>`` (converted: ``<architecture>_edl.<tag>``).
        model_args: extra constructor arguments to record (when the model was not built
            by ``timm.create_model`` with them).
        tags: extra card tags.
        data_config: preprocessing to record in ``pretrained_cfg`` (timm keys: ``input_size``,
            ``mean``, ``std``, ``crop_pct``, ``interpolation``, ...).  Default: for EDLNets
            mean 0 / std 1 per input channel (the model normalises itself) and, when every
            evaluation result names one dataset of :mod:`timm_edl.data` with this channel
            count, that dataset's image size.
        card_dir: also write the card to ``card_dir/<model_name>.md`` (the repo's
            ``hub_cards/`` keeps the card of every published model).
        card_template: template path (default :data:`CARD_TEMPLATE`).

    The export is checked before anything is written: ``timm.create_model(architecture,
    **model_args)`` (plus the recorded conversion) must rebuild a network with the same
    state-dict keys, shapes and EDL options, else :class:`ExportError`.  Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    model = getattr(model, '_orig_mod', model)  # torch.compile
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    kind = _kind(model)
    arch = _architecture(model)
    results = read_eval_results(eval_results)
    digest = state_dict_digest(model)
    for r in results:
        if r.get('architecture') and timm.is_model(r['architecture']) and r['architecture'] != arch:
            raise ExportError(f"the evaluation results are for {r['architecture']!r}, the model is {arch!r}")
        if r.get('weights_digest') and r['weights_digest'] != digest:
            raise ExportError(
                "the evaluation results were computed on other weights (their weights_digest differs from "
                "state_dict_digest(model)): re-run the evaluation on the model you export")
    tag = model.pretrained_cfg.get('tag')
    model_name = model_name or _default_model_name(arch, tag, kind)
    _check_model_name(model_name)
    repo_id = f'{HUB_NAMESPACE}/{model_name}'

    num_classes = int(model.num_classes)
    if label_names is None:
        cfg_labels = model.pretrained_cfg.get('label_names')
        if cfg_labels and len(cfg_labels) == num_classes:
            label_names = list(cfg_labels)
    elif len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for a model with {num_classes} classes")

    extra_args = dict(model_args or {})
    conversion = None
    if kind == 'edlnet':
        extra_args = {**_edl_model_args(model), **extra_args}
    else:
        conversion = conversion_config(model)
        conversion['timm_version'] = timm.__version__
    new_tag = model_name[len(arch) + 1:] if model_name.startswith(arch + '.') else tag
    summary = _summary(model, arch, kind, num_classes, results)
    data_config = _default_data_config(model, kind, results, data_config)
    cfg_update = {'tag': new_tag, 'license': license, 'description': summary}
    config = _config_for(model, extra_args, cfg_update, label_names, data_config)
    rebuilt = _build_on_meta(arch, dict(config.get('model_args') or {}), conversion)
    names = [n for n, _ in edl_layers(model)]
    if kind == 'edlnet' and 'edl_layers' not in (model_args or {}) and names != [n for n, _ in edl_layers(rebuilt)]:
        # the policy no longer describes the EDL layers (e.g. a converted conv twin): list them
        extra_args['edl_layers'] = _names_regex(names) if names else 'none'
        config = _config_for(model, extra_args, cfg_update, label_names, data_config)
        rebuilt = _build_on_meta(arch, dict(config.get('model_args') or {}), conversion)
    _compare_rebuild(model, rebuilt, arch)
    if not config.get('pretrained_cfg', {}).get('tag'):
        config['pretrained_cfg'].pop('tag', None)

    if datasets is None:
        datasets = []
        for r in results:
            ds = HUB_DATASET_IDS.get(r['dataset'], r['dataset'])
            if ds not in datasets:
                datasets.append(ds)
    edl_text, preserving = _edl_markdown(model)
    num_params = sum(p.numel() for p in model.parameters())
    input_size = tuple(config['pretrained_cfg'].get('input_size', (3, 224, 224)))
    fields = dict(
        metadata=_yaml_block(_metadata(model_name, license, list(datasets), results, tags)),
        model_name=model_name, repo_id=repo_id, summary=summary, paper_id=_PAPER_ID,
        evaluation=_evaluation_markdown(results),
        details=_details_markdown(model, arch, kind, num_params, input_size, label_names, datasets),
        edl_details=edl_text, usage=_usage_markdown(repo_id, kind), license=license,
        timm_edl_version=_version(), timm_version=timm.__version__, torch_version=torch.__version__.split('+')[0],
    )
    card = _render_card(Path(card_template) if card_template else CARD_TEMPLATE, fields)

    _prepare_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    import safetensors.torch
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    tmp_weights = out_dir / f'.{WEIGHTS_NAME}.partial'
    safetensors.torch.save_file(tensors, str(tmp_weights), metadata={'format': 'pt'})
    config['timm_edl'] = dict(
        format=EXPORT_FORMAT, model_name=model_name, repo_id=repo_id, kind=kind,
        timm_edl_version=_version(), timm_version=timm.__version__, torch_version=torch.__version__,
        weights_sha256=_file_sha256(tmp_weights), weights_digest=digest, evaluation=results,
    )
    if conversion is not None:
        config['timm_edl_conversion'] = conversion
    _write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2) + '\n')
    _write_text(out_dir / CARD_NAME, card)
    os.replace(tmp_weights, out_dir / WEIGHTS_NAME)
    if card_dir is not None:
        Path(card_dir).mkdir(parents=True, exist_ok=True)
        _write_text(Path(card_dir) / f'{model_name}.md', card)
    return out_dir


def _default_data_config(model: nn.Module, kind: str, results: List[Dict[str, Any]],
                         data_config: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    data_config = dict(data_config or {})
    if kind != 'edlnet':
        return data_config or None
    chans = int(model.in_chans)
    data_config.setdefault('mean', (0.0,) * chans)
    data_config.setdefault('std', (1.0,) * chans)
    names = {r['dataset'] for r in results}
    if 'input_size' not in data_config and 'img_size' not in data_config and len(names) == 1:
        from .data import DATASETS
        info = DATASETS.get(names.pop())
        if info is not None and info.input_size is not None and info.input_size[0] == chans:
            data_config['input_size'] = tuple(info.input_size)
    return data_config


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.partial')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def _summary(model: nn.Module, arch: str, kind: str, num_classes: int, results: List[Dict[str, Any]]) -> str:
    n = len(edl_layers(model))
    data = ''
    if results:
        names = []
        for r in results:
            d = _data_label(r)
            if d not in names:
                names.append(d)
        data = f", evaluated on {', '.join(names)}"
    if kind == 'edlnet':
        return (f"Elastic Dictionary Learning network `{arch}` ({n} EDL layers, {num_classes} classes{data}) "
                f"from timm-edl.")
    return (f"timm `{arch}` with {n} convolutions converted to EDL layers by timm_edl.convert_to_edl "
            f"({num_classes} classes{data}).")


def _details_markdown(model: nn.Module, arch: str, kind: str, num_params: int, input_size: Tuple[int, ...],
                      label_names: Optional[Sequence[str]], datasets: Sequence[str]) -> str:
    if kind == 'edlnet':
        arch_text = f"`{arch}` (timm-edl; `import timm_edl` registers it with timm)"
        mean = _float32_list(model.input_norm.mean)
        std = _float32_list(model.input_norm.std)
        input_text = (f"{' x '.join(str(s) for s in input_size)}, pixels in [0, 1]; the model normalises them "
                      f"itself (mean {tuple(mean)}, std {tuple(std)}), so timm's data config has mean 0 / std 1")
    else:
        arch_text = f"timm `{arch}`, convolutions converted to EDL layers (`timm_edl_conversion` in config.json)"
        cfg = model.pretrained_cfg
        input_text = (f"{' x '.join(str(s) for s in input_size)}, normalised by the data pipeline with mean "
                      f"{tuple(cfg.get('mean', ()))}, std {tuple(cfg.get('std', ()))} "
                      f"(`timm.data.resolve_model_data_config(model)`)")
    classes = f"{model.num_classes}"
    if label_names:
        shown = ', '.join(str(n) for n in list(label_names)[:10])
        classes += f" ({shown}{', ...' if len(label_names) > 10 else ''})"
    rows = ['| | |', '|---|---|', f"| Architecture | {arch_text} |",
            f"| Parameters | {num_params / 1e6:.2f} M |", f"| Input | {input_text} |", f"| Classes | {classes} |"]
    if datasets:
        rows.append(f"| Datasets | {', '.join(datasets)} |")
    return '\n'.join(rows)


# ----------------------------------------------------------------------------- verify / push

def verify_export(folder: Union[str, Path]) -> Dict[str, Any]:
    """Check an exported folder without loading the weights; return its config.json.

    The weights must be a valid safetensors file (and match the recorded sha256), no pickle
    file may be present, the card must exist, and the architecture rebuilt from config.json
    (on the meta device) must have exactly the keys and shapes stored in the weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder not found: {folder}")
    pickles = [p.name for p in folder.rglob('*') if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnsafeCheckpointError(f"{folder} contains pickle files ({', '.join(pickles)}): timm-edl publishes "
                                    f"safetensors only; remove them")
    for name in _MANAGED:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an export: {name} is missing (write it with timm_edl.hub.export)")
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    header = check_safetensors_file(folder / WEIGHTS_NAME)
    sha = (config.get('timm_edl') or {}).get('weights_sha256')
    if sha and _file_sha256(folder / WEIGHTS_NAME) != sha:
        raise CorruptCheckpointError(f"{folder / WEIGHTS_NAME} does not match the sha256 recorded in config.json")
    arch = config.get('architecture')
    _require_registered(arch, str(folder))
    rebuilt = _build_on_meta(arch, dict(config.get('model_args') or {}), config.get('timm_edl_conversion'))
    _check_state_dict(rebuilt, {k: torch.empty(s, device='meta') for k, (_, s) in header.items()}, strict=True)
    return config


def _folder_files(folder: Path) -> List[Tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob('*')
                  if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts))


def push(
        folder: Union[str, Path],
        repo_id: Optional[str] = None,
        *,
        token: Optional[str] = None,
        private: bool = False,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
) -> Any:
    """Upload an exported folder to the Hub (``HfApi.create_repo`` + ``HfApi.upload_folder``).

    ``repo_id`` defaults to ``f'{HUB_NAMESPACE}/{model_name}'`` with the name recorded by
    :func:`export`.  The folder is checked first (:func:`verify_export`).  ``token``
    defaults to huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
    ``dry_run=True`` touches no network and returns the ``[(path, bytes)]`` that would be
    uploaded (hidden files are never uploaded); otherwise returns the commit info.
    """
    folder = Path(folder)
    config = verify_export(folder)
    if repo_id is None:
        name = (config.get('timm_edl') or {}).get('model_name')
        if not name:
            raise ValueError(f"{folder}/config.json records no model name: pass repo_id")
        repo_id = f'{HUB_NAMESPACE}/{name}'
    from huggingface_hub.utils import validate_repo_id
    validate_repo_id(repo_id)
    files = _folder_files(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled
    api = HfApi(token=token, library_name='timm-edl', library_version=_version())
    message = commit_message or f"Upload {repo_id.split('/')[-1]} (timm-edl {_version()})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message,
                                 revision=revision, ignore_patterns=['.*', '**/.*'])
    except OfflineModeIsEnabled as e:
        raise ConnectionError(f"cannot push to {repo_id}: huggingface_hub is in offline mode "
                              f"(unset HF_HUB_OFFLINE). {e}") from e


# ----------------------------------------------------------------------------- loading

def _require_registered(arch: Optional[str], where: str) -> None:
    if not arch:
        raise ValueError(f"{where}: config.json has no 'architecture'")
    if not timm.is_model(arch):
        raise ArchitectureNotRegisteredError(
            f"{where}: config.json names architecture {arch!r}, which timm does not know. timm-edl "
            f"architectures (edlnet_*) exist only after `import timm_edl` (timm has no plugin discovery): "
            f"import it before timm.create_model. timm-edl {_version()} (with timm {timm.__version__}) is "
            f"loaded and does not define it either: a newer timm-edl or timm may be needed.")


def check_pretrained_source(variant: str, kwargs: Dict[str, Any], allow_pickle: bool = False) -> Dict[str, Any]:
    """Hook for EDLNet creation with ``pretrained=True``: refuse pickles, check safetensors.

    Resolves where timm's ``load_pretrained`` will read the weights (the same order as
    timm 1.0's ``_resolve_pretrained_source``) and, unless ``allow_pickle``:

    * ``file=...`` (``pretrained_cfg_overlay``): must be a valid ``.safetensors`` file;
    * ``local-dir:``: the folder must hold a valid ``model.safetensors`` (timm prefers it);
    * Hub (``hf-hub:`` or a registry ``hf_hub_id``): pins ``hf_hub_filename='model.safetensors'``
      so timm never falls back to ``pytorch_model.bin``; the file is fetched (cache) and checked;
    * a URL: refused (torch.hub URLs are pickles).

    When a registry tag's weights come from the Hub (``hf_hub_id`` in the tag's cfg, not an
    ``hf-hub:`` name, for which timm applies config.json itself), the repo's config.json
    supplies the EDL arguments the entrypoint does not set (``edl_layers``, ``edl_cfg``,
    ``input_mean``, ``input_std``; explicit kwargs win): they decide the computation but are
    not in the state dict, so a mismatch would load silently.

    Returns the kwargs to pass on (``pretrained_cfg_overlay`` possibly extended).  With
    ``allow_pickle=True`` timm's own loader reads the weights unchanged (torch files with
    ``torch.load(weights_only=True)``).
    """
    from timm.models import resolve_pretrained_cfg
    kwargs = dict(kwargs)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay).to_dict()
    source = cfg.get('source') or ''
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    from_hub = source == 'hf-hub' or (source != 'local-dir' and cfg.get('state_dict') is None
                                      and not cfg.get('file') and bool(cfg.get('hf_hub_id')))
    if from_hub and source != 'hf-hub':
        from huggingface_hub.errors import EntryNotFoundError
        try:
            config_path = _hf_download(cfg['hf_hub_id'], CONFIG_NAME, kwargs.get('cache_dir'))
        except EntryNotFoundError:
            config_path = None
        if config_path is not None:
            saved_args = json.loads(Path(config_path).read_text(encoding='utf-8')).get('model_args') or {}
            for key in _EDL_ARCH_ARGS:
                if key in saved_args:
                    kwargs.setdefault(key, saved_args[key])
    if allow_pickle:
        return kwargs
    if from_hub:
        filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
        if _is_pickle_name(filename):
            raise _refuse_pickle(f"{cfg['hf_hub_id']}/{filename}")
        path = _hf_download(cfg['hf_hub_id'], filename, kwargs.get('cache_dir'))
        check_safetensors_file(path)
        overlay['hf_hub_filename'] = filename
        kwargs['pretrained_cfg_overlay'] = overlay
    elif source == 'local-dir':
        folder = Path(cfg.get('file') or '')
        weights = folder / WEIGHTS_NAME
        if weights.is_file():
            check_safetensors_file(weights)
        else:
            pickles = [p.name for p in sorted(folder.glob('*')) if p.name.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise _refuse_pickle(folder / pickles[0])
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}: nothing to load for {name}")
    elif cfg.get('state_dict') is not None:
        pass
    elif cfg.get('file'):
        if _is_pickle_name(cfg['file']):
            raise _refuse_pickle(cfg['file'])
        check_safetensors_file(cfg['file'])
    elif cfg.get('url'):
        raise UnsafeCheckpointError(
            f"refusing to download {cfg['url']} for {name}: URL checkpoints are read by torch.hub as pickles. "
            f"Pass allow_pickle=True if you trust it.")
    return kwargs


def _hf_download(repo: str, filename: str, cache_dir: Optional[Union[str, Path]] = None) -> str:
    from huggingface_hub import hf_hub_download
    from timm.models._hub import hf_split
    repo_id, revision = hf_split(repo)
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           library_name='timm-edl', library_version=_version())


class _Files:
    """config.json and weights of a local folder or a Hub repo (through huggingface_hub's cache)."""

    def __init__(self, source: str, ident: str, cache_dir: Optional[Union[str, Path]]):
        self.source, self.ident, self.cache_dir = source, ident, cache_dir
        self.where = f'{source}:{ident}'
        if source == 'local-dir' and not Path(ident).is_dir():
            raise FileNotFoundError(f"{self.where}: no such folder")

    def get(self, filename: str) -> Optional[Path]:
        if self.source == 'local-dir':
            path = Path(self.ident) / filename
            return path if path.is_file() else None
        from huggingface_hub.errors import EntryNotFoundError
        try:
            return Path(_hf_download(self.ident, filename, self.cache_dir))
        except EntryNotFoundError:  # also LocalEntryNotFoundError (offline, not cached)
            return None

    def config(self) -> Tuple[Dict[str, Any], Dict[str, Any], str, Dict[str, Any]]:
        from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
        path = self.get(CONFIG_NAME)
        if path is None:
            offline = ''
            if self.source == 'hf-hub':
                from huggingface_hub import constants
                if constants.HF_HUB_OFFLINE:
                    offline = ' (offline mode: it is not in the local Hub cache)'
            raise FileNotFoundError(f"{self.where}: no {CONFIG_NAME} found{offline}")
        raw = json.loads(path.read_text(encoding='utf-8'))
        if self.source == 'local-dir':
            pretrained_cfg, arch, model_args = load_model_config_from_path(self.ident)
        else:
            pretrained_cfg, arch, model_args = load_model_config_from_hf(self.ident, cache_dir=self.cache_dir)
        return raw, pretrained_cfg, arch, dict(model_args or {})

    def weights(self, allow_pickle: bool) -> Path:
        path = self.get(WEIGHTS_NAME)
        if path is not None:
            return path
        candidates = list(_PICKLE_HUB_FILES)
        if self.source == 'local-dir':
            candidates += [p.name for p in sorted(Path(self.ident).iterdir()) if p.name.endswith(PICKLE_SUFFIXES)]
        for name in candidates:
            path = self.get(name)
            if path is not None:
                if not allow_pickle:
                    raise _refuse_pickle(f"{self.where}/{name}")
                return path
        raise FileNotFoundError(f"{self.where}: no {WEIGHTS_NAME} found (nor any other weights file)")


def _parse_source(name: str) -> Tuple[Optional[str], str]:
    """(source, id): an existing folder is ``local-dir`` unless it is a bare registry name."""
    if os.path.isdir(name) and not (timm.is_model(name.split('.')[0]) and os.sep not in name):
        return 'local-dir', name
    return parse_model_name(name)


def load(
        name: str,
        *,
        pretrained: bool = True,
        allow_pickle: bool = False,
        strict: bool = True,
        cache_dir: Optional[Union[str, Path]] = None,
        verify_sha256: bool = True,
        **kwargs: Any,
) -> nn.Module:
    """Create a model from the Hub, a local export, or timm's registry, with clear errors.

    Args:
        name: ``'hf-hub:<namespace>/<repo>[@revision]'``, ``'local-dir:<folder>'`` (or a path to
            an existing folder), or a registry name (``'edlnet_resnet18.cifar10'``: passed to
            ``timm.create_model``).
        pretrained: load the weights (else only the architecture of config.json).
        allow_pickle: accept a ``.bin``/``.pth`` file when no ``model.safetensors`` exists
            (read with ``torch.load(weights_only=True)``).  Off by default.
        strict: the weights must match the model exactly.
        cache_dir: Hub cache folder (default: huggingface_hub's).
        verify_sha256: check the weights against the sha256 recorded by :func:`export`.
        **kwargs: ``timm.create_model`` arguments, e.g. ``num_classes`` (a new head, reset
            after loading), ``features_only=True``, ``drop_path_rate``.

    Errors: :class:`ArchitectureNotRegisteredError`, :class:`CorruptCheckpointError`,
    :class:`UnsafeCheckpointError`, :class:`StateDictMismatchError`,
    :class:`PretrainedWeightsUnavailable` (registry tag without weights),
    ``FileNotFoundError``.  The model is returned in training mode, as timm does.
    """
    source, ident = _parse_source(name)
    if source is None:
        if allow_pickle:
            kwargs['allow_pickle'] = True
        return timm.create_model(ident, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    files = _Files(source, ident, cache_dir)
    raw, pretrained_cfg, arch, model_args = files.config()
    _require_registered(arch, files.where)
    conversion = raw.get('timm_edl_conversion')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    features = bool(kwargs.get('features_only', False))
    num_classes = kwargs.pop('num_classes', None)
    args = {**model_args, **kwargs}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg,
                              pretrained_model_args=model_args, **args)
    if conversion is not None:
        apply_conversion(model, conversion)
    if pretrained:
        path = files.weights(allow_pickle)
        sha = (raw.get('timm_edl') or {}).get('weights_sha256')
        if verify_sha256 and sha and path.name == WEIGHTS_NAME:
            check_safetensors_file(path)
            if _file_sha256(path) != sha:
                raise CorruptCheckpointError(
                    f"{files.where}/{WEIGHTS_NAME} does not match the sha256 recorded in config.json at export: "
                    f"the file is corrupt or was replaced. Download / export it again.")
        state_dict = read_state_dict(path, allow_pickle=allow_pickle)
        _check_state_dict(model, state_dict, strict, allow_unexpected=features)
        model.load_state_dict(state_dict, strict=False)
    if num_classes is not None and not features and num_classes != getattr(model, 'num_classes', num_classes):
        model.reset_classifier(num_classes)
    return model


# ----------------------------------------------------------------------------- CLI

def _label_names_arg(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        content = path.read_text(encoding='utf-8')
        if path.suffix == '.json':
            return [str(x) for x in json.loads(content)]
        return [line.strip() for line in content.splitlines() if line.strip()]
    return [x.strip() for x in text.split(',')]


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl export``: write a Hub-ready folder from a model and its weights."""
    from .convert import _parse_kv
    p = argparse.ArgumentParser(
        prog='timm-edl export',
        description='Write a Hub-ready folder (model.safetensors, config.json, README.md model card).')
    p.add_argument('--model', required=True,
                   help="timm name (e.g. edlnet_resnet18) with --checkpoint, or an export to re-export: "
                        "local-dir:PATH / hf-hub:ID (e.g. to add evaluation results)")
    p.add_argument('--checkpoint', help='weights to export (.safetensors; .pth/.bin need --allow-pickle)')
    p.add_argument('--allow-pickle', action='store_true', help='accept a pickle checkpoint (torch.load weights_only)')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE',
                   help='timm.create_model arguments the checkpoint was trained with (JSON values)')
    p.add_argument('--eval-results', nargs='*', metavar='JSON', help="evaluation entry point's JSON output(s)")
    p.add_argument('--label-names', help='class names: a .json list, a text file (one per line) or a,b,c')
    p.add_argument('--license', default='apache-2.0')
    p.add_argument('--dataset', nargs='*', dest='datasets', help='Hub dataset ids for the card')
    p.add_argument('--model-name', help=f'published name; the Hub repo is {HUB_NAMESPACE}/<name>')
    p.add_argument('--out', required=True, help='output folder (empty or absent)')
    p.add_argument('--overwrite', action='store_true', help='replace an earlier export in --out')
    p.add_argument('--input-size', nargs=3, type=int, metavar=('C', 'H', 'W'),
                   help='image size to record in pretrained_cfg (default: from the evaluated dataset)')
    p.add_argument('--card-dir', help="also write the card to CARD_DIR/<name>.md (use hub_cards/ when publishing)")
    args = p.parse_args(argv)
    try:
        kwargs = _parse_kv(args.model_kwargs, '--model-kwargs')
        source, _ = parse_model_name(args.model)
        if source is not None:
            model = load(args.model, allow_pickle=args.allow_pickle, **kwargs)
            if args.checkpoint:
                load_checkpoint(model, args.checkpoint, allow_pickle=args.allow_pickle)
        else:
            if not args.checkpoint:
                print("timm-edl export: error: --checkpoint is required with a registry model name "
                      "(there is nothing to export from random weights)", file=sys.stderr)
                return 2
            model = timm.create_model(args.model, pretrained=False, **kwargs)
            load_checkpoint(model, args.checkpoint, allow_pickle=args.allow_pickle)
        out = export(model, args.out, eval_results=args.eval_results or None,
                     label_names=_label_names_arg(args.label_names), license=args.license,
                     datasets=args.datasets, overwrite=args.overwrite, model_name=args.model_name,
                     data_config=dict(input_size=tuple(args.input_size)) if args.input_size else None,
                     card_dir=args.card_dir)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"timm-edl export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    for rel, size in _folder_files(out):
        print(f"  {rel}  {size:,} bytes")
    return 0


def push_main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl push``: upload an exported folder to the Hugging Face Hub."""
    p = argparse.ArgumentParser(
        prog='timm-edl push',
        description='Upload an exported folder to the Hub (token: HF_TOKEN or `hf auth login`).')
    p.add_argument('folder', help='folder written by timm-edl export / convert')
    p.add_argument('--repo-id', help=f'default: {HUB_NAMESPACE}/<model name recorded at export>')
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded; no network')
    p.add_argument('--commit-message')
    p.add_argument('--revision', help='branch to push to (default: main)')
    args = p.parse_args(argv)
    try:
        result = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                      commit_message=args.commit_message, revision=args.revision)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"timm-edl push: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        config = json.loads((Path(args.folder) / CONFIG_NAME).read_text(encoding='utf-8'))
        repo = args.repo_id or f"{HUB_NAMESPACE}/{config['timm_edl']['model_name']}"
        print(f"dry run: would upload to {repo}{' (private)' if args.private else ''}:")
        for rel, size in result:
            print(f"  {rel}  {size:,} bytes")
        print(f"  total {sum(s for _, s in result):,} bytes")
    else:
        print(f"pushed: {getattr(result, 'commit_url', result)}")
    return 0
