"""Loading a model from the Hub, a local export or timm's registry, with clear errors.

The folder is read the way timm reads it (``load_model_config_from_path`` /
``load_model_config_from_hf`` for config.json, timm's preferred weights file names); the
weights go through :func:`timm_edl.weights.load_checkpoint` (the pickle gate, the
safetensors checks and a key/shape check before anything is copied) after the sha256
recorded at export.  A converted timm model is built by the ``edl_converted`` architecture;
an export that names its base architecture plus a ``timm_edl_conversion`` block (the format
of earlier timm-edl releases) is read as one too.
"""
import difflib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn

import timm
from timm.models import load_model_config_from_hf, parse_model_name

from .._timm_compat import EXT_PRIORITY, PREFERRED_FILES, load_model_config_from_path
from ..models.converted import CONVERTED_ARCH
from ..weights import (
    CONFIG_NAME, WEIGHTS_NAME, CorruptCheckpointError, check_safetensors_file, file_sha256, hf_download,
    is_pickle_name, load_checkpoint, refuse_pickle,
)


class ArchitectureNotRegisteredError(RuntimeError):
    """config.json names an architecture that timm does not know."""


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved (unknown name, missing file, weights that do not fit)."""


# Weight files a bare model spec may name.
CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar', '.ckpt', '.tar')


def version() -> str:
    from .. import __version__
    return __version__


def model_recipe(config: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(architecture, model_args)`` of a config.json: what ``timm.create_model`` builds.

    An export of a converted model made by earlier timm-edl releases names the base
    architecture and carries the conversion in a ``timm_edl_conversion`` block: it is read
    as ``edl_converted`` with ``base_model`` and ``conversion``, as exports record it now.
    """
    arch, model_args = config.get('architecture'), dict(config.get('model_args') or {})
    legacy = config.get('timm_edl_conversion')
    if legacy is not None and arch != CONVERTED_ARCH:
        arch, model_args = CONVERTED_ARCH, {**model_args, 'base_model': arch, 'conversion': legacy}
    return arch, model_args


def require_registered(arch: Optional[str], where: str) -> None:
    if not arch:
        raise ValueError(f"{where}: config.json has no 'architecture'")
    if not timm.is_model(arch):
        raise ArchitectureNotRegisteredError(
            f"{where}: config.json names architecture {arch!r}, which timm does not know. timm-edl "
            f"architectures (edlnet_*, edl_converted) exist only after `import timm_edl` (timm has no plugin discovery): "
            f"import it before timm.create_model. timm-edl {version()} (with timm {timm.__version__}) is "
            f"loaded and does not define it either: a newer timm-edl or timm may be needed.")


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
            return Path(hf_download(self.ident, filename, self.cache_dir))
        except EntryNotFoundError:  # also LocalEntryNotFoundError (offline, not cached)
            return None

    def config(self) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str], Dict[str, Any]]:
        """(config.json as written, timm's pretrained_cfg, architecture, model_args)."""
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
            pretrained_cfg, _, _ = load_model_config_from_path(self.ident)
        else:
            pretrained_cfg, _, _ = load_model_config_from_hf(self.ident, cache_dir=self.cache_dir)
        arch, model_args = model_recipe(raw)
        return raw, pretrained_cfg, arch, model_args

    def weights(self, allow_pickle: bool) -> Path:
        """The weights file timm's loaders would read (their preferred names, then for a folder the
        first file per extension in their priority order), after the pickle gate."""
        candidates = list(PREFERRED_FILES)
        if self.source == 'local-dir':
            folder = Path(self.ident)
            candidates += [files[0].name for ext in EXT_PRIORITY if (files := sorted(folder.glob(f'*{ext}')))]
        for name in candidates:
            path = self.get(name)
            if path is not None:
                if is_pickle_name(name) and not allow_pickle:
                    raise refuse_pickle(f"{self.where}/{name}")
                return path
        raise FileNotFoundError(f"{self.where}: no {WEIGHTS_NAME} found (nor any other weights file)")


def weights_path(path: Union[str, Path], *, allow_pickle: bool = False) -> Path:
    """A weights file, or the one an export folder holds (timm's preferred names first), after
    the pickle gate; ``FileNotFoundError`` when there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _Files('local-dir', str(path), None).weights(allow_pickle)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


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
        **kwargs: ``timm.create_model`` arguments, e.g. ``num_classes`` (another number of
            classes: the classifier stays as built, as in timm), ``features_only=True``,
            ``drop_path_rate``.

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
    require_registered(arch, files.where)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg,
                              pretrained_model_args=model_args, **{**model_args, **kwargs})
    if pretrained:
        path = files.weights(allow_pickle)
        sha = (raw.get('timm_edl') or {}).get('weights_sha256')
        if verify_sha256 and sha and path.name == WEIGHTS_NAME:
            check_safetensors_file(path)
            if file_sha256(path) != sha:
                raise CorruptCheckpointError(
                    f"{files.where}/{WEIGHTS_NAME} does not match the sha256 recorded in config.json at export: "
                    f"the file is corrupt or was replaced. Download / export it again.")
        load_checkpoint(model, path, allow_pickle=allow_pickle, strict=strict,
                        allow_unexpected=bool(kwargs.get('features_only')), new_head='num_classes' in kwargs)
    return model


# ----------------------------------------------------------------------------- model specs

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


def _model_for_file(path: Path, arch: Optional[str], kwargs: Dict[str, Any], num_classes: Optional[int],
                    in_chans: Optional[int], allow_pickle: bool) -> nn.Module:
    """The model a weights file holds: architecture from ``arch`` or a config.json beside it."""
    if not path.is_file():
        raise ModelSpecError(f"checkpoint not found: {path.absolute()}")
    config_file = path.parent / CONFIG_NAME
    config: Dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding='utf-8'))
        except ValueError as e:
            raise ModelSpecError(f"{config_file} is not valid JSON: {e}") from None
    if arch is None and path.name == WEIGHTS_NAME and config.get('architecture'):
        return load(f'local-dir:{path.parent}', allow_pickle=allow_pickle, **kwargs)
    config_arch, args = model_recipe(config)
    arch = arch or config_arch
    if not arch:
        raise ModelSpecError(
            f"{path}: a weights file needs its architecture: pass --arch NAME (e.g. --arch "
            f"edlnet_resnet18 plus --model-kwargs), or keep the config.json that "
            f"`timm-edl export` writes next to it")
    if not timm.is_model(timm.models.split_model_name_tag(arch)[0]):
        raise _unknown_model_error(arch)
    if config.get('num_classes') is not None:
        args.setdefault('num_classes', config['num_classes'])
    if not config:
        if num_classes is not None:
            args.setdefault('num_classes', num_classes)
        if in_chans is not None:
            args.setdefault('in_chans', in_chans)
    model = timm.create_model(arch, pretrained=False, **{**args, **kwargs})
    load_checkpoint(model, path, allow_pickle=allow_pickle)
    return model


def resolve_model(
        spec: str,
        *,
        model_kwargs: Optional[Dict[str, Any]] = None,
        arch: Optional[str] = None,
        checkpoint: Union[None, str, Path] = None,
        pretrained: Optional[bool] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        allow_pickle: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The one model resolver of every command: the model a spec names and where it came from.

    Specs: ``edlnet_resnet18`` / ``edlnet_resnet18.cifar10`` (timm's registry; published
    weights are loaded when the tag has them, ``pretrained`` forces either way);
    ``hf-hub:<org>/<repo>``, ``local-dir:<folder>`` or a folder path (an export, :func:`load`);
    ``path/to/weights.safetensors`` (architecture from ``arch`` or a ``config.json`` beside
    it; pickle files need ``allow_pickle``).  ``num_classes`` / ``in_chans`` are defaults for
    randomly initialised registry models only; ``model_kwargs`` always win.  ``checkpoint``:
    weights loaded afterwards (:func:`timm_edl.weights.load_checkpoint`).

    Returns ``(model, source)`` (the model in training mode, on the CPU); ``source`` is
    ``{'spec', 'kind', 'architecture', 'tag', 'weights', 'model_kwargs'}`` with kind in
    {'registry', 'hub', 'local-dir', 'checkpoint'} and weights 'pretrained' | 'random-init' |
    the file or repo.  Raises :class:`ModelSpecError` with what to fix.
    """
    kwargs = dict(model_kwargs or {})
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError("empty model spec")
    path = Path(spec)
    source: Dict[str, Any] = {'spec': spec, 'model_kwargs': kwargs}
    try:
        if spec.startswith(('hf-hub:', 'local-dir:')) or path.is_dir():
            ident = spec if spec.startswith(('hf-hub:', 'local-dir:')) else f'local-dir:{spec}'
            if ident.startswith('local-dir:') and not Path(ident[len('local-dir:'):]).is_dir():
                raise ModelSpecError(f"model folder not found: {Path(ident[len('local-dir:'):]).absolute()}")
            model = load(ident, allow_pickle=allow_pickle, **kwargs)
            source.update(kind='hub' if ident.startswith('hf-hub:') else 'local-dir', weights=ident)
        elif path.is_file() or spec.lower().endswith(CHECKPOINT_SUFFIXES):
            model = _model_for_file(path, arch, kwargs, num_classes, in_chans, allow_pickle)
            source.update(kind='checkpoint', weights=str(path))
        else:
            base, tag = timm.models.split_model_name_tag(spec)
            if not timm.is_model(base):
                raise _unknown_model_error(spec)
            cfg = timm.models.get_pretrained_cfg(f'{base}.{tag}' if tag else base, allow_unregistered=True)
            has_weights = bool(cfg is not None and getattr(cfg, 'has_weights', False)) if pretrained is None \
                else pretrained
            if not has_weights:
                if num_classes is not None:
                    kwargs.setdefault('num_classes', num_classes)
                if in_chans is not None:
                    kwargs.setdefault('in_chans', in_chans)
            model = timm.create_model(spec, pretrained=has_weights, **kwargs)
            source.update(kind='registry', weights='pretrained' if has_weights else 'random-init')
            source['model_kwargs'] = kwargs
        if checkpoint:
            load_checkpoint(model, checkpoint, allow_pickle=allow_pickle)
            source['weights'] = str(checkpoint)
    except ModelSpecError:
        raise
    except ImportError as e:
        raise _load_error(spec, e) from e
    except (RuntimeError, ValueError, TypeError, OSError, KeyError) as e:
        raise _load_error(spec, e) from e
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    source['architecture'] = cfg.get('architecture') or type(model).__name__
    source['tag'] = cfg.get('tag')
    return model, source
