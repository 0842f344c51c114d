"""Writing a Hub-ready folder (``model.safetensors``, ``config.json``, ``README.md``) and checking one.

``config.json`` is timm's own (``save_config_for_hf``): ``architecture``, ``num_classes``,
``label_names``, ``model_args`` (every argument needed to rebuild the exact network: for
EDLNets ``edl_layers``, the complete ``edl_cfg``, ``input_mean``/``input_std``; for a
converted timm model, architecture ``edl_converted`` with ``base_model``, ``conversion``
(which convolutions are EDL layers and their options) and the base's own arguments) and
``pretrained_cfg``; plus a block timm ignores: ``timm_edl`` (published name, versions,
sha256 of the weights, evaluation results).
"""
import json
import shutil
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm

from .._timm_compat import save_config_for_hf
from ..convert import edl_layer_config
from ..layers import edl_layers
from ..models.converted import CONVERTED_ARCH, converted_model_args
from ..models.edlnet import PAPER_ID, EDLResNet
from ..results import read_certified_results, read_eval_results
from ..weights import (
    CONFIG_NAME, HUB_NAMESPACE, PICKLE_SUFFIXES, WEIGHTS_NAME, CorruptCheckpointError, UnsafeCheckpointError,
    check_safetensors_file, check_state_dict, file_sha256, state_dict_digest,
)
from . import card as C
from .load import model_recipe, require_registered, version

CARD_NAME = 'README.md'
MANAGED = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
PLOT_PATTERN = '*.certified_accuracy*.png'  # certified-accuracy plots shipped with a card
EXPORT_FORMAT = 2  # 2: converted models as edl_converted (1: base architecture + timm_edl_conversion)

# Model arguments that describe how a model was created or loaded, not its architecture.
_RUNTIME_ARGS = (
    'allow_pickle', 'cache_dir', 'features_only', 'out_indices', 'feature_cls', 'feature_cfg',
    'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'checkpoint_path',
    'pretrained_strict', 'device', 'dtype',
)

HUB_DATASET_IDS = {  # timm_edl.data names -> Hub dataset ids for the card's `datasets:`
    'cifar10': 'cifar10', 'cifar10-jpeg': 'cifar10', 'cifar100': 'cifar100',
    'fashion-mnist': 'fashion_mnist', 'fashion-mnist-small': 'fashion_mnist',
}


class ExportError(ValueError):
    """The model cannot be exported faithfully (the message says why)."""


def _is_edlnet(model: nn.Module) -> bool:
    return isinstance(model, EDLResNet)


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
        input_mean=C.float32_list(model.input_norm.mean), input_std=C.float32_list(model.input_norm.std),
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


def _build_on_meta(arch: str, model_args: Dict[str, Any]) -> nn.Module:
    """The network config.json describes, without allocating weights (CPU if meta fails)."""
    try:
        with torch.device('meta'):
            model = timm.create_model(arch, pretrained=False, **model_args)
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values
        model = timm.create_model(arch, pretrained=False, **model_args)
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
    """timm's own config.json for ``model`` (``save_config_for_hf``), as a dict.

    timm only writes it to a file; the export needs it before anything is written (to rebuild
    the network from it and compare), so timm writes it into a temporary folder first."""
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
    plots = {p.name for p in out_dir.glob(PLOT_PATTERN)}
    unknown = sorted(set(entries) - set(MANAGED) - plots)
    if unknown:
        raise FileExistsError(
            f"{out_dir} holds files an export does not write ({', '.join(unknown[:6])}); they would be pushed "
            f"along with the export. Remove them or pick another folder.")
    for name in plots:  # the new export writes its own, if any
        (out_dir / name).unlink()


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
        compare_results: Optional[Dict[str, Any]] = None,
        card_notes: Optional[str] = None,
        certify_results: Union[None, str, Path, Dict[str, Any], Sequence[Any]] = None,
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
        card_template: template path (default :data:`C.CARD_TEMPLATE`).
        compare_results: ``{label: evaluation JSON(s)}`` of other models on the same points
            (e.g. the conv twin): a comparison table in the card; each must match the points,
            threat model and eps of one of ``eval_results``.
        card_notes: Markdown appended to the card's evaluation (e.g. a ``## Training`` section).
        certify_results: ``timm-edl certify`` JSON(s) (path, dict or list): a "Certified
            robustness (randomized smoothing)" section and certified-accuracy metrics in the
            ``model-index``; their ``weights_digest`` must match the model.

    The export is checked before anything is written: ``timm.create_model(architecture,
    **model_args)`` must rebuild a network with the same
    state-dict keys, shapes and EDL options, else :class:`ExportError`.  Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    model = getattr(model, '_orig_mod', model)  # torch.compile
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    kind = _kind(model)
    arch = _architecture(model)
    extra_args = dict(model_args or {})
    if kind == 'edlnet':
        config_arch = arch
        extra_args = {**_edl_model_args(model), **extra_args}
    else:  # the card and the default name speak of the base architecture
        config_arch = CONVERTED_ARCH
        arch, converted_args = converted_model_args(model)
        extra_args = {**converted_args, **extra_args}
    results = read_eval_results(eval_results)
    compare = {label: read_eval_results(r) for label, r in (compare_results or {}).items()}
    certified = read_certified_results(certify_results)
    plots = _certified_plots(certify_results, model_name)
    digest = state_dict_digest(model)
    for r in results + certified:
        if r.get('architecture') and timm.is_model(r['architecture']) and r['architecture'] not in (arch, config_arch):
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

    new_tag = model_name[len(arch) + 1:] if model_name.startswith(arch + '.') else tag
    summary = C.summary(model, arch, kind, num_classes, results)
    data_config = _default_data_config(model, kind, results, data_config)
    cfg_update = {'architecture': config_arch, 'tag': new_tag, 'license': license, 'description': summary}
    config = _config_for(model, extra_args, cfg_update, label_names, data_config)
    rebuilt = _build_on_meta(config_arch, dict(config.get('model_args') or {}))
    names = [n for n, _ in edl_layers(model)]
    if kind == 'edlnet' and 'edl_layers' not in (model_args or {}) and names != [n for n, _ in edl_layers(rebuilt)]:
        # the policy no longer describes the EDL layers (e.g. a converted conv twin): list them
        extra_args['edl_layers'] = _names_regex(names) if names else 'none'
        config = _config_for(model, extra_args, cfg_update, label_names, data_config)
        rebuilt = _build_on_meta(config_arch, dict(config.get('model_args') or {}))
    _compare_rebuild(model, rebuilt, config_arch)
    if not config.get('pretrained_cfg', {}).get('tag'):
        config['pretrained_cfg'].pop('tag', None)

    if datasets is None:
        datasets = []
        for r in results + certified:
            ds = HUB_DATASET_IDS.get(r['dataset'], r['dataset'])
            if ds not in datasets:
                datasets.append(ds)
    edl_text, preserving = C.edl_markdown(model)
    num_params = sum(p.numel() for p in model.parameters())
    input_size = tuple(config['pretrained_cfg'].get('input_size', (3, 224, 224)))
    fields = dict(
        metadata=C.metadata_yaml(model_name, license, list(datasets), results, tags, certified),
        model_name=model_name, repo_id=repo_id, summary=summary, paper_id=PAPER_ID,
        evaluation=C.evaluation_markdown(results), checks=C.checks_markdown(results),
        comparison=C.comparison_markdown(results, compare) + C.certified_markdown(certified, plots),
        notes=f"\n\n{card_notes.strip()}" if card_notes and card_notes.strip() else '',
        details=C.details_markdown(model, arch, kind, num_params, input_size, label_names, datasets),
        edl_details=edl_text, usage=C.usage_markdown(repo_id, kind), license=license,
        timm_edl_version=version(), timm_version=timm.__version__, torch_version=torch.__version__.split('+')[0],
    )
    card = C.render_card(Path(card_template) if card_template else C.CARD_TEMPLATE, fields)

    _prepare_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    import safetensors.torch
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    tmp_weights = out_dir / f'.{WEIGHTS_NAME}.partial'
    safetensors.torch.save_file(tensors, str(tmp_weights), metadata={'format': 'pt'})
    config['timm_edl'] = dict(
        format=EXPORT_FORMAT, model_name=model_name, repo_id=repo_id, kind=kind,
        timm_edl_version=version(), timm_version=timm.__version__, torch_version=torch.__version__,
        weights_sha256=file_sha256(tmp_weights), weights_digest=digest, evaluation=results,
    )
    if certified:
        config['timm_edl']['certified_robustness'] = certified
    _write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2) + '\n')
    _write_text(out_dir / CARD_NAME, card)
    os.replace(tmp_weights, out_dir / WEIGHTS_NAME)
    for target in [out_dir] + ([Path(card_dir)] if card_dir is not None else []):
        target.mkdir(parents=True, exist_ok=True)
        for name, source in plots.items():
            shutil.copyfile(source, target / name)
    if card_dir is not None:
        _write_text(Path(card_dir) / f'{model_name}.md', card)
    return out_dir


def _certified_plots(certify_results: Any, model_name: str) -> Dict[str, Path]:
    """``{file name in the export: PNG}`` of the certification JSONs given as paths that have the
    certified-accuracy plot ``timm-edl certify`` writes beside them (same stem, ``.png``)."""
    items = list(certify_results) if isinstance(certify_results, (list, tuple)) else [certify_results]
    paths = [Path(p).with_suffix('.png') for p in items if isinstance(p, (str, Path))]
    found = [p for p in paths if p.is_file()]
    return {f"{model_name}.certified_accuracy{'' if i == 0 else f'_{i + 1}'}.png": p for i, p in enumerate(found)}


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
        from ..data import DATASETS
        info = DATASETS.get(names.pop())
        if info is not None and info.input_size is not None and info.input_size[0] == chans:
            data_config['input_size'] = tuple(info.input_size)
    return data_config


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.partial')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


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
    for name in MANAGED:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an export: {name} is missing (write it with timm_edl.hub.export)")
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    header = check_safetensors_file(folder / WEIGHTS_NAME)
    sha = (config.get('timm_edl') or {}).get('weights_sha256')
    if sha and file_sha256(folder / WEIGHTS_NAME) != sha:
        raise CorruptCheckpointError(f"{folder / WEIGHTS_NAME} does not match the sha256 recorded in config.json")
    arch, model_args = model_recipe(config)
    require_registered(arch, str(folder))
    rebuilt = _build_on_meta(arch, model_args)
    check_state_dict(rebuilt, {k: torch.empty(s, device='meta') for k, (_, s) in header.items()}, strict=True)
    return config


def folder_files(folder: Path) -> List[Tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob('*')
                  if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts))
