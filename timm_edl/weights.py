"""Weight files: the safetensors checks, the pickle gate, reading and loading, digests.

Loading never unpickles unless asked: a ``.bin``/``.pth``/``.pt`` checkpoint is refused
(:class:`UnsafeCheckpointError`) unless ``allow_pickle=True``, and then it is read with
``torch.load(weights_only=True)`` by timm's own :func:`timm.models.load_state_dict`.
:func:`check_pretrained_source` gives timm's pretrained path
(``timm.create_model('edlnet_*', pretrained=True, ...)``) the same rule: it asks timm where
the weights will come from (``_resolve_pretrained_source``, the function timm's
``load_pretrained`` calls) and checks that file before timm reads it.
``timm.create_model(..., checkpoint_path=...)`` is plain timm and not covered: use
:func:`load_checkpoint`, the one function that puts a weights file into a model (the Hub
loader, the training's initial weights and the evaluation's ``--checkpoint`` all call it).
"""
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._timm_compat import download_from_hf, resolve_pretrained_source

__all__ = [
    'WEIGHTS_NAME', 'CONFIG_NAME', 'HUB_NAMESPACE', 'PICKLE_SUFFIXES', 'EDL_ARCH_ARGS',
    'UnsafeCheckpointError', 'CorruptCheckpointError', 'StateDictMismatchError',
    'check_safetensors_file', 'read_state_dict', 'check_state_dict', 'load_checkpoint', 'state_dict_digest',
    'file_sha256', 'check_pretrained_source', 'hf_download', 'is_pickle_name', 'refuse_pickle',
    'ZOO_DIR', 'ZOO_MANIFEST', 'shipped_weights', 'check_shipped_file',
]

WEIGHTS_NAME = 'model.safetensors'
# The one place that names the Hub namespace of published timm-edl weights (repos are <namespace>/<model name>).
HUB_NAMESPACE = 'timm-edl'
CONFIG_NAME = 'config.json'

# Weight files that need unpickling (timm's local-dir loader looks for these too).
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.tar', '.ckpt', '.pkl', '.pickle')

# The zoo's weights ship inside the package: one safetensors file per model, and a manifest
# {model_name: {file, sha256, bytes}} written by experiments/zoo.py when it ships them.
ZOO_DIR = Path(__file__).resolve().parent / '_zoo'
ZOO_MANIFEST = ZOO_DIR / 'manifest.json'

# EDLResNet arguments that no entrypoint sets and that are not in the state dict.
EDL_ARCH_ARGS = ('edl_layers', 'edl_cfg', 'input_mean', 'input_std')


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



_ST_DTYPE_BYTES = {
    'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U8': 1,
    'U16': 2, 'U32': 4, 'U64': 8, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'C64': 8,
}
_MAX_HEADER = 100 * 1024 * 1024


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


def is_pickle_name(path: Union[str, Path]) -> bool:
    return not str(path).endswith('.safetensors')


def refuse_pickle(path: Union[str, Path]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it is not a .safetensors file, and pickle-based checkpoints "
        f"(.bin/.pth/.pt, torch.save) can run arbitrary code when loaded. Use safetensors weights, or, "
        f"if you trust the file, opt in with allow_pickle=True (it is then read with "
        f"torch.load(weights_only=True)); re-export it with timm_edl.hub.export to get safetensors.")


def read_state_dict(path: Union[str, Path], *, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file (or, with ``allow_pickle``, a torch file).

    The file goes through the pickle gate and, for safetensors, :func:`check_safetensors_file`;
    then timm's :func:`timm.models.load_state_dict` reads it (torch files with
    ``torch.load(weights_only=True)``, a training checkpoint's EMA / ``state_dict`` / ``model``
    entry unwrapped, ``module.`` / ``_orig_mod.`` prefixes removed).
    """
    from timm.models import load_state_dict
    path = Path(path)
    if is_pickle_name(path):
        if not allow_pickle:
            raise refuse_pickle(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
    else:
        check_safetensors_file(path)
    try:
        state_dict = load_state_dict(str(path), use_ema=True, device='cpu', weights_only=True)
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError (zip), EOFError ...
        how = 'as safetensors' if not is_pickle_name(path) else 'with torch.load(weights_only=True)'
        raise CorruptCheckpointError(f"{path} could not be read {how}: {type(e).__name__}: {e}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    return state_dict


def check_state_dict(
        model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool, allow_unexpected: bool = False,
        kept: Sequence[str] = (),
) -> None:
    """Raise :class:`StateDictMismatchError` when ``state_dict`` does not fit ``model``.

    Before anything is copied, unlike ``nn.Module.load_state_dict(strict=True)``, which copies
    every tensor that fits and only then raises (leaving the model half-loaded); it also works
    on meta-device tensors (an export is verified without reading its weights) and says when
    the mismatch is a question of EDL layers.  ``strict=False`` tolerates missing and
    unexpected keys (``allow_unexpected`` the unexpected ones alone), never mis-shaped ones;
    ``kept``: model entries that stay as built (a new classifier), never missing.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and k not in kept]
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
        if hasattr(model, 'edl_cfg'):  # an EDLNet
            hint = (" The EDL layers differ: the model was built with other edl_layers / edl_cfg than the "
                    "weights (config.json's model_args record the right ones).")
        elif any(k.endswith(edl_keys) for k in bad_unexpected):
            hint = (" The weights hold EDL layers the model lacks: a converted timm model is built by "
                    "timm.create_model('edl_converted', base_model=..., conversion=...) with the model_args of its "
                    "export's config.json (timm.create_model('local-dir:...') and timm_edl.hub.load() do this).")
    raise StateDictMismatchError(
        f"the weights do not match the {type(model).__name__} architecture: " + '; '.join(parts) + '.' + hint,
        missing, unexpected, mismatched)


def load_checkpoint(
        model: nn.Module, path: Union[str, Path], *, allow_pickle: bool = False, strict: bool = True,
        allow_unexpected: bool = False, new_head: bool = False,
) -> List[str]:
    """Load a weights file into ``model`` safely: the one way weights reach a model.

    ``.safetensors`` files are checked (:func:`check_safetensors_file`) and read without
    pickle.  Anything else is refused with :class:`UnsafeCheckpointError` unless
    ``allow_pickle=True``, then read with ``torch.load(weights_only=True)``; timm's
    ``load_state_dict`` unwraps training checkpoints and strips ``module.`` prefixes
    (:func:`read_state_dict`).  The keys and shapes are compared with the model before
    anything is copied: a mismatch raises :class:`StateDictMismatchError` listing the
    missing, unexpected and mis-shaped entries (``strict=False`` tolerates missing and
    unexpected keys, ``allow_unexpected`` the unexpected ones alone, e.g. the head a
    ``features_only`` model lacks; mis-shaped ones never).

    ``new_head=True`` applies timm's fine-tuning rule (``load_pretrained`` with another
    ``num_classes``): when the weights' classifier (``pretrained_cfg['classifier']``) has
    ``C' != model.num_classes`` rows, its weight and bias are discarded and the model's
    classifier stays as built.  Returns the classifier entries so kept (empty without a new
    head).
    """
    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    kept = _other_head(model, state_dict) if new_head else []
    state_dict = {k: v for k, v in state_dict.items() if k not in kept}
    check_state_dict(model, state_dict, strict, allow_unexpected=allow_unexpected, kept=kept)
    model.load_state_dict(state_dict, strict=False)
    return kept


def _other_head(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The classifier entries of ``state_dict`` trained for another number of classes than ``model``'s."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    num_classes = getattr(model, 'num_classes', None)
    out = []
    for head in heads:
        weight = state_dict.get(f'{head}.weight')
        if weight is not None and num_classes is not None and weight.shape[0] != num_classes:
            out += [k for k in (f'{head}.weight', f'{head}.bias') if k in state_dict]
    return out


def state_dict_digest(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]]) -> str:
    """sha256 of a model's weights, or of any named tensors, independent of the file format.

    Returns ``'sha256:<hex>'`` over every entry (name, dtype, shape, bytes) in name order,
    except the step-size cache of EDL layers (``*.lipschitz``, ``*.lipschitz_size``), which
    a forward pass at another input size may refresh.  The evaluation records it as
    ``weights_digest`` so that :func:`timm_edl.hub.export` can check that the results belong
    to the exported weights, and names its resumable AutoAttack state by it (of the model and
    of ``{'x': images, 'y': labels}``).
    """
    state_dict = model_or_state_dict
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    skip = {k for k in state_dict if k.endswith(('.lipschitz', '.lipschitz_size'))}
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key in skip:
            continue
        t = state_dict[key].detach().to('cpu').contiguous()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return 'sha256:' + h.hexdigest()


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file's bytes."""
    path = Path(path)
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def shipped_weights() -> Dict[str, Dict[str, Any]]:
    """``{model_name: {'file', 'sha256', 'bytes', 'path'}}`` of the weights shipped in the package."""
    if not ZOO_MANIFEST.is_file():
        return {}
    entries = json.loads(ZOO_MANIFEST.read_text(encoding='utf-8'))
    return {name: {**e, 'path': str(ZOO_DIR / e['file'])} for name, e in entries.items()}


def check_shipped_file(path: Union[str, Path]) -> None:
    """A file of the package's zoo must have the sha256 its manifest records (else
    :class:`CorruptCheckpointError`); files outside the zoo are not concerned."""
    path = Path(path).resolve()
    for name, entry in shipped_weights().items():
        if Path(entry['path']).resolve() != path:
            continue
        digest = file_sha256(path) if path.is_file() else 'missing'
        if digest != entry['sha256']:
            raise CorruptCheckpointError(
                f"the shipped weights of {name} ({path}) do not match the package's manifest (sha256 "
                f"{digest}, expected {entry['sha256']}): the installation is damaged or the file was "
                f"edited. Reinstall timm-edl (pip install --force-reinstall timm-edl).")


def hf_download(repo: str, filename: str, cache_dir: Union[None, str, Path] = None) -> str:
    """The local path of ``filename`` of Hub repo ``repo`` (``'<id>[@revision]'``), through timm."""
    return download_from_hf(repo, filename, cache_dir=cache_dir)


def check_pretrained_source(variant: str, kwargs: Dict[str, Any], allow_pickle: bool = False) -> Dict[str, Any]:
    """Hook for EDLNet and ``edl_converted`` creation with ``pretrained=True``: refuse pickles, check safetensors.

    Asks timm where its ``load_pretrained`` will read the weights and, unless ``allow_pickle``:

    * ``file=...`` (``pretrained_cfg_overlay``): must be a valid ``.safetensors`` file;
    * ``local-dir:``: the folder must hold a valid ``model.safetensors`` (timm prefers it);
    * Hub (``hf-hub:`` or a registry ``hf_hub_id``): pins ``hf_hub_filename='model.safetensors'``
      so timm never falls back to ``pytorch_model.bin``; the file is fetched (cache) and checked;
    * a URL: refused (torch.hub URLs are pickles).

    When a registry tag's weights come from the Hub (``hf_hub_id`` in the tag's cfg, not an
    ``hf-hub:`` name, for which timm applies config.json itself), the repo's config.json
    supplies the EDL arguments the entrypoint does not set (:data:`EDL_ARCH_ARGS`; explicit
    kwargs win): they decide the computation but are not in the state dict, so a mismatch
    would load silently.

    Returns the kwargs to pass on (``pretrained_cfg_overlay`` possibly extended).  With
    ``allow_pickle=True`` timm's own loader reads the weights unchanged.
    """
    from timm.models import resolve_pretrained_cfg
    kwargs = dict(kwargs)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay).to_dict()
    load_from, location = resolve_pretrained_source(cfg)
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    if load_from == 'hf-hub' and cfg.get('source') != 'hf-hub':
        from huggingface_hub.errors import EntryNotFoundError
        try:
            config_path = hf_download(cfg['hf_hub_id'], CONFIG_NAME, kwargs.get('cache_dir'))
        except EntryNotFoundError:
            config_path = None
        if config_path is not None:
            saved_args = json.loads(Path(config_path).read_text(encoding='utf-8')).get('model_args') or {}
            for key in EDL_ARCH_ARGS:
                if key in saved_args:
                    kwargs.setdefault(key, saved_args[key])
    if allow_pickle:
        return kwargs
    if load_from == 'hf-hub':
        filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
        if is_pickle_name(filename):
            raise refuse_pickle(f"{cfg['hf_hub_id']}/{filename}")
        check_safetensors_file(hf_download(cfg['hf_hub_id'], filename, kwargs.get('cache_dir')))
        overlay['hf_hub_filename'] = filename
        kwargs['pretrained_cfg_overlay'] = overlay
    elif load_from == 'local-dir':
        folder = Path(location or '')
        if (folder / WEIGHTS_NAME).is_file():
            check_safetensors_file(folder / WEIGHTS_NAME)
        else:
            pickles = [p.name for p in sorted(folder.glob('*')) if p.name.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise refuse_pickle(folder / pickles[0])
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}: nothing to load for {name}")
    elif load_from == 'file':
        if is_pickle_name(location):
            raise refuse_pickle(location)
        check_shipped_file(location)
        check_safetensors_file(location)
    elif load_from == 'url':
        raise UnsafeCheckpointError(
            f"refusing to download {location} for {name}: URL checkpoints are read by torch.hub as pickles. "
            f"Pass allow_pickle=True if you trust it.")
    return kwargs
