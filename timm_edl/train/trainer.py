"""Adversarial training / fine-tuning loop on accelerate (``timm-edl train``).

accelerate does device placement, mixed precision, gradient accumulation, data
parallelism and the checkpoint state (``save_state`` / ``load_state``); timm provides the
optimizer, the LR schedule, the EMA and the summary CSV.

Reproducibility and exact resumption
------------------------------------
All randomness of a run is a pure function of ``seed`` and the position in the run, so
nothing random has to be saved and a run killed at any point and resumed from its last
state ends with the same weights as an uninterrupted run (bitwise on CPU; up to
non-deterministic kernels on GPU):

* the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``;
* the augmentation of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)`` (the same
  with any number of data-loader workers);
* the attack's random start for batch ``b`` of epoch ``e`` on rank ``r`` is seeded by
  ``(seed, e, b, r)``; validation attacks use a fixed seed.

States are saved only right after an optimizer step; they hold model, optimizer,
scheduler, EMA and the loop position (:class:`TrainState`), including the EDL layers'
power-iteration vectors, so the step sizes ``1/L`` continue exactly as they would have.

Two-stage EDL schedule
----------------------
``elastic_from_epoch = k``: before epoch ``k`` every EDL layer is vanilla DL (beta = 1,
frozen: :func:`~timm_edl.layers.set_beta_mode` ``'vanilla'``); from epoch ``k`` on beta is
trained (``'elastic'``), starting from ``elastic_beta_init`` when given (else from 1).
Every epoch's metrics (``summary.csv``) hold each layer's beta (``beta/<layer>``).  beta is in the optimizer from the start (no weight decay), so
releasing it needs no new optimizer.  Under DDP, parameters that were frozen when the
model was wrapped are not reduced by DDP; the trainer averages their gradients itself.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

import timm
from timm.models import load_state_dict as timm_load_state_dict
from timm.models._factory import parse_model_name
from timm.models._registry import split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn, update_summary

from .. import data as D
from ..attacks import accuracy_under_attack, pgd_attack
from ..convert import EDL_DEFAULTS, convert_to_edl
from ..layers.edl import edl_layers, set_beta_mode
from .config import RUNTIME_KEYS, ConfigError, TrainConfig, config_diff, save_config
from .awp import perturb_weights
from .objectives import craft, needs_clean_forward, training_loss

__all__ = ['train', 'TrainResult', 'TrainState', 'RunDirError', 'build_model', 'param_groups',
           'latest_checkpoint', 'CHECKPOINT_DIR']

CHECKPOINT_DIR = 'checkpoints'
_PROGRESS_FILE = 'progress.json'  # written last into a checkpoint folder: marks it complete
_RUN_MARKER = 'config.yaml'
_HOLDOUT_SEED = 20250202  # fixed: the hold-out set does not change with the run's seed
_SUMS = ('n', 'loss', 'clean_n', 'clean_loss', 'clean_correct', 'robust_n', 'robust_loss', 'robust_correct')


class RunDirError(ConfigError):
    """The output folder cannot be used as asked (exists, nothing to resume, ...)."""


# --------------------------------------------------------------------------- seeding


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix-style; stable across Python runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler):
    """Yields ``(epoch, i)`` keys; the order of epoch ``e`` depends only on ``(seed, e)``."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, 1, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return iter([(epoch, i) for i in order])


class SeededView(Dataset):
    """``indices`` of ``base`` with per-(epoch, sample) seeded augmentation.

    Indexed by the ``(epoch, i)`` keys of :class:`EpochShuffleSampler`; returns
    ``(image, label, index into base)``.
    """

    def __init__(self, base: Dataset, indices: List[int], transform, seed: int):
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key
        index = self.indices[i]
        image, label = self.base[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, 2, epoch, index))
                image = self.transform(image)
        return image, label, index


# --------------------------------------------------------------------------- model


def _is_edlnet(cfg: TrainConfig) -> bool:
    source, name = parse_model_name(cfg.model)
    return source is None and split_model_name_tag(name)[0].startswith('edlnet_')


def build_model(cfg: TrainConfig, info: D.DatasetInfo, log=print) -> nn.Module:
    """Create the model the config asks for: timm model (+ pretrained weights), optional
    checkpoint, optional conv -> EDL conversion.  Runs on CPU, before accelerate."""
    import timm_edl  # noqa: F401  (registers the edlnet_* models)

    source, name = parse_model_name(cfg.model)
    if source is None and not timm.is_model(split_model_name_tag(name)[0]):
        edl = ', '.join(timm.list_models('edlnet_*'))
        raise ConfigError(f"unknown model {cfg.model!r}; timm-edl models: {edl} (any timm model name also works)")
    kwargs = dict(cfg.model_kwargs)
    kwargs['num_classes'] = info.num_classes
    kwargs['in_chans'] = info.in_chans
    if _is_edlnet(cfg):  # normalise with the dataset's statistics unless told otherwise
        kwargs.setdefault('input_mean', tuple(info.mean))
        kwargs.setdefault('input_std', tuple(info.std))
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except TypeError as error:
        raise ConfigError(f"model {cfg.model!r} rejected model_kwargs {sorted(cfg.model_kwargs)}: {error}") from error
    cfg_mean = tuple(getattr(model, 'pretrained_cfg', {}).get('mean', (0.0,)))
    cfg_std = tuple(getattr(model, 'pretrained_cfg', {}).get('std', (1.0,)))
    if any(m != 0 for m in cfg_mean) or any(s != 1 for s in cfg_std):
        raise ConfigError(
            f"model {cfg.model!r} expects normalised inputs (mean={cfg_mean}, std={cfg_std}), but adversarial "
            f"training feeds [0, 1] pixels so that eps is defined in pixel space. Use an edlnet_* model (they "
            f"normalise internally; edl_layers: none gives the conv twin, and a timm ResNet checkpoint loads into "
            f"edlnet_resnet18_in with model_kwargs edl_layers: none).")
    if cfg.checkpoint:
        _load_checkpoint(model, cfg.checkpoint, log)
    if cfg.convert:
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
    return model


def _load_checkpoint(model: nn.Module, path_str: str, log) -> None:
    path = Path(path_str).expanduser()
    if path.is_dir():
        candidates = [path / 'model.safetensors', path / 'pytorch_model.bin']
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"checkpoint folder {path} holds neither model.safetensors nor pytorch_model.bin")
        path = found
    if not path.is_file():
        raise ConfigError(f"checkpoint {path_str!r} not found")
    try:
        state = timm_load_state_dict(str(path), use_ema=True)
    except Exception as error:  # many formats, many errors
        raise ConfigError(f"cannot read checkpoint {path}: {error}") from error
    state = {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier') or ''
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    is_head = lambda k: any(h and (k == h or k.startswith(h + '.')) for h in heads)  # noqa: E731
    dropped = [k for k in state if k in own and state[k].shape != own[k].shape and is_head(k)]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape and not is_head(k)]
    if bad:
        raise ConfigError(f"checkpoint {path} does not fit {type(model).__name__}: shape mismatch for "
                          f"{', '.join(bad[:5])} (e.g. {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    for k in dropped:
        del state[k]
    missing = [k for k in own if k not in state and not (k in dropped or is_head(k) and dropped)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = (" (an EDL checkpoint needs the same edl_layers as the model; load a conv checkpoint into the "
                "conv twin, model_kwargs edl_layers: none, and use convert: to turn it into EDL layers)")
        raise ConfigError(f"checkpoint {path} does not match {type(model).__name__}: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}{hint}")
    model.load_state_dict(state, strict=not dropped)
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


def _beta_groups(model: nn.Module) -> Dict[str, float]:
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


def _plain_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` without accelerate's mixed-precision forward wrapper."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop('forward', None)
    clone.__dict__.pop('_original_forward', None)
    return clone.cpu().eval()


# --------------------------------------------------------------------------- state


class TrainState:
    """Loop position, epoch metric sums, best-checkpoint tracking and EDL step caches;
    saved with the accelerate state (``register_for_checkpointing``)."""

    def __init__(self, models: Dict[str, nn.Module]):
        self.models = models  # name -> module whose EDL power vectors are saved
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_update = 0
        self.eval_pending = False
        self.sums: Dict[str, float] = {k: 0.0 for k in _SUMS}
        self.epoch_time = 0.0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self._edl_vectors: Dict[str, torch.Tensor] = {}

    def progress(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_update=self.global_update,
                    eval_pending=self.eval_pending, best_metric=self.best_metric, best_epoch=self.best_epoch)

    def state_dict(self) -> Dict[str, Any]:
        vectors = {}
        for prefix, model in self.models.items():
            for name, layer in edl_layers(model):
                vectors[f'{prefix}:{name}'] = layer.power_vector.detach().cpu().clone()
        return dict(self.progress(), sums=dict(self.sums), epoch_time=self.epoch_time, edl_power_vectors=vectors)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ('epoch', 'step_in_epoch', 'global_update', 'eval_pending', 'best_metric', 'best_epoch',
                    'epoch_time'):
            setattr(self, key, state[key])
        self.sums = dict(state['sums'])
        self._edl_vectors = dict(state['edl_power_vectors'])

    def restore_edl_caches(self) -> None:
        """After ``load_state``: give every EDL layer its saved power-iteration vector and
        mark its cached L stale (states are saved right after an optimizer step, whose
        weight update the uninterrupted run would have refreshed L for, warm-started)."""
        for prefix, model in self.models.items():
            for name, layer in edl_layers(model):
                vector = self._edl_vectors.get(f'{prefix}:{name}')
                if vector is not None:  # empty: L was never computed; a cold start follows, as it would have
                    layer.power_vector = vector.to(layer.weight.device)
                with torch.no_grad():
                    layer.weight.add_(0)  # bump the version counter: the cached L gets refreshed
        self._edl_vectors = {}


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""
    output: Path
    model: nn.Module                       # the trained model (unwrapped, on the training device)
    ema: Optional[nn.Module] = None
    completed: bool = True                 # False when stopped by stop_after_steps
    global_update: int = 0
    last_eval: Dict[str, float] = field(default_factory=dict)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    seen_indices: Optional[torch.Tensor] = None  # dataset indices this rank trained on (this process only)


# --------------------------------------------------------------------------- run folder


def latest_checkpoint(output: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(output) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and (p / _PROGRESS_FILE).is_file()]
    return max(done, key=lambda p: json.loads((p / _PROGRESS_FILE).read_text())['global_update'], default=None)


def _check_run_dir(output: Path, resume: Union[None, bool, str], overwrite: bool) -> Optional[Path]:
    """Returns the checkpoint to resume from (None for a fresh run); raises RunDirError."""
    if resume:
        if isinstance(resume, str):
            ckpt = Path(resume)
            if not (ckpt / _PROGRESS_FILE).is_file():
                raise RunDirError(f"--resume {resume}: not a complete timm-edl checkpoint folder "
                                  f"(no {_PROGRESS_FILE})")
            return ckpt
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise RunDirError(f"--resume: no complete checkpoint under {output / CHECKPOINT_DIR}; start the run "
                              f"without --resume")
        return ckpt
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise RunDirError(f"output folder {output} already exists and is not empty. Pass --overwrite to "
                              f"replace it, --resume to continue its run, or --output <dir> for a new one.")
        if not (output / _RUN_MARKER).is_file():
            raise RunDirError(f"--overwrite refused: {output} does not look like a timm-edl run folder (no "
                              f"{_RUN_MARKER}); delete it yourself or choose another --output")
    return None


# --------------------------------------------------------------------------- data


def _prepare_data(cfg: TrainConfig, accelerator):
    with accelerator.main_process_first():
        info = D.dataset_info(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
        base = D.get_dataset(cfg.dataset, cfg.data_dir, 'train', download=cfg.download, image_size=cfg.image_size)
        info = base.info
        if cfg.val_n_ex and cfg.val_every and cfg.val_split == 'test':
            x_val, y_val = D.load_tensors(cfg.dataset, cfg.data_dir, 'test', n_ex=cfg.val_n_ex,
                                          download=cfg.download, image_size=cfg.image_size)
        else:
            x_val = y_val = None
    n = len(base)
    train_idx = list(range(n))
    if cfg.val_n_ex and cfg.val_every and cfg.val_split == 'holdout':
        if cfg.val_n_ex >= n:
            raise ConfigError(f"val_n_ex={cfg.val_n_ex} holds out the whole {info.display_name} train split "
                              f"({n} images)")
        # a fixed random subset (independent of `seed`, so runs with different seeds validate on
        # the same images): class-sorted datasets (image folders, Tiny-ImageNet) stay balanced
        held = torch.randperm(n, generator=torch.Generator().manual_seed(_HOLDOUT_SEED))[:cfg.val_n_ex]
        val_idx = sorted(held.tolist())
        held_set = set(val_idx)
        train_idx = [i for i in train_idx if i not in held_set]
        samples = [base[i] for i in val_idx]
        shapes = {tuple(s[0].shape) for s in samples}
        if len(shapes) > 1:
            raise ConfigError(f"{info.display_name}: images of different sizes; set image_size")
        x_val = torch.stack([s[0] for s in samples])
        y_val = torch.tensor([s[1] for s in samples], dtype=torch.long)
    if cfg.train_n_ex is not None:
        if cfg.train_n_ex > len(train_idx):
            raise ConfigError(f"train_n_ex={cfg.train_n_ex} but only {len(train_idx)} training images are available")
        train_idx = train_idx[:cfg.train_n_ex]
    transform = D.train_transforms(info, augment=cfg.augment) if cfg.augment else None
    view = SeededView(base, train_idx, transform, cfg.seed)
    sampler = EpochShuffleSampler(len(view), cfg.seed)
    if len(view) < cfg.batch_size * accelerator.num_processes:
        raise ConfigError(f"{len(view)} training images are fewer than one global batch "
                          f"({cfg.batch_size} x {accelerator.num_processes} processes)")
    loader = DataLoader(view, batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                        pin_memory=accelerator.device.type == 'cuda')
    return info, loader, sampler, x_val, y_val


# --------------------------------------------------------------------------- evaluation


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, eps: float,
              accelerator) -> Dict[str, float]:
    """Clean and PGD-k accuracy of ``model`` on the validation subset, sharded over ranks."""
    rank, world = accelerator.process_index, accelerator.num_processes
    xs, ys = x[rank::world].to(accelerator.device), y[rank::world].to(accelerator.device)
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    if len(xs):
        generator = torch.Generator(device=accelerator.device).manual_seed(_mix(cfg.seed, 3, rank))
        step = cfg.val_attack_step_size
        attack = partial(pgd_attack, eps=eps, norm=cfg.norm, steps=cfg.val_attack_steps, step_size=step,
                         random_start=True, generator=generator)
        with accelerator.autocast():
            clean = accuracy_under_attack(model, xs, ys, None, batch_size=cfg.val_batch_size)
            robust = accuracy_under_attack(model, xs, ys, attack, batch_size=cfg.val_batch_size)
        counts += torch.tensor([len(xs), clean * len(xs), robust * len(xs)], dtype=torch.float64,
                               device=accelerator.device)
    model.train(was_training)
    counts = accelerator.reduce(counts, 'sum')
    n = float(counts[0])
    return {'clean_top1': 100.0 * float(counts[1]) / n, 'robust_top1': 100.0 * float(counts[2]) / n}


# --------------------------------------------------------------------------- export


def export_model(model: nn.Module, folder: Path, eval_results: Optional[Dict[str, Any]], *,
                 label_names: Optional[List[str]] = None, tag: Optional[str] = None) -> str:
    """Write a Hub-ready folder with :func:`timm_edl.hub.export` (model.safetensors, config.json,
    README.md card), or, where that module is missing, with timm's ``save_for_hf``
    (model.safetensors + config.json) plus eval_results.json.  Returns the exporter used."""
    plain = _plain_copy(model)
    try:
        from ..hub import export as hub_export
    except ImportError:
        hub_export = None
    if label_names is not None and len(label_names) == getattr(plain, 'num_classes', -1):
        plain.pretrained_cfg = dict(plain.pretrained_cfg, label_names=tuple(label_names))
    if hub_export is not None:
        arch = getattr(plain, 'pretrained_cfg', {}).get('architecture')
        kwargs: Dict[str, Any] = dict(eval_results=eval_results, overwrite=True)
        if label_names is not None and len(label_names) == getattr(plain, 'num_classes', -1):
            kwargs['label_names'] = list(label_names)
        if arch and tag and _is_edl_arch(arch):
            kwargs['model_name'] = f'{arch}.{tag}'
        hub_export(plain, folder, **kwargs)
        return 'timm_edl.hub.export'
    from timm.models import save_for_hf
    if folder.exists():
        shutil.rmtree(folder)
    save_for_hf(plain, str(folder), safe_serialization=True)
    if eval_results:
        (folder / 'eval_results.json').write_text(json.dumps(eval_results, indent=2))
    return 'timm.models.save_for_hf'


def _is_edl_arch(arch: str) -> bool:
    return arch.startswith('edlnet_')


# --------------------------------------------------------------------------- training


def _craft_eps(cfg: TrainConfig, info: D.DatasetInfo) -> float:
    if cfg.eps is not None:
        return cfg.eps
    if info.default_eps_linf is None:
        raise ConfigError(f"{info.display_name} has no default eps; set eps")
    if cfg.norm != 'Linf' and cfg.objective != 'natural':
        raise ConfigError("set eps explicitly for the L2 threat model")
    return float(info.default_eps_linf)


def _stage_for(cfg: TrainConfig, epoch: int) -> Optional[str]:
    if cfg.elastic_from_epoch is None:
        return None
    return 'elastic' if epoch >= cfg.elastic_from_epoch else 'vanilla'


def _tqdm_enabled(cfg: TrainConfig, is_main: bool) -> bool:
    if not is_main or cfg.progress == 'never':
        return False
    return cfg.progress == 'always' or sys.stderr.isatty()


def _fmt(value: Optional[float], pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return f"{value:.2f}%" if pct else f"{value:.4f}"


def _truncate_summary(path: Path, keep_before_epoch: int) -> None:
    """Drop summary rows of epochs that the resumed run will redo."""
    if not path.is_file():
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < keep_before_epoch]
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(kept)


def train(cfg: TrainConfig, *, resume: Union[None, bool, str] = None, overwrite: bool = False) -> TrainResult:
    """Run the training described by ``cfg`` (on every process of an ``accelerate launch``).

    ``resume``: ``True`` continues from the newest complete state in ``cfg.output``, a path
    from that checkpoint folder.  Returns a :class:`TrainResult` on every process.
    """
    try:
        return _train(cfg, resume=resume, overwrite=overwrite)
    finally:
        if int(os.environ.get('WORLD_SIZE', '1')) == 1:
            _reset_accelerate_singletons()


def _check_same_recipe(saved: Path, cfg: TrainConfig) -> None:
    """A resumed run must use the config it was started with (runtime keys aside)."""
    if not saved.is_file():
        return
    import yaml
    from .config import build_config
    diff = config_diff(build_config(yaml.safe_load(saved.read_text()), str(saved)), cfg)
    if diff:
        lines = ', '.join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise RunDirError(f"--resume with a different config than {saved}: {lines}. Resume with the same "
                          f"recipe (only {', '.join(sorted(RUNTIME_KEYS))} may change) or start a new run.")


def _reset_accelerate_singletons() -> None:
    """Let a later in-process run (tests, notebooks) pick other accelerate settings
    (mixed precision, accumulation); single-process runs only."""
    try:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except (ImportError, AttributeError):  # private API of accelerate; best effort
        pass


def _train(cfg: TrainConfig, *, resume: Union[None, bool, str], overwrite: bool) -> TrainResult:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output = Path(cfg.output)
    # Launched with several processes (accelerate launch --multi_gpu / torchrun) on a machine
    # without GPUs: data-parallel on CPU (gloo), which accelerate only does when told cpu=True.
    multi_cpu = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.cuda.is_available()
    # No DDP buffer broadcast at every forward: TRADES and MART run two forwards per step, and the
    # in-place broadcast into the BatchNorm statistics between them breaks the backward of the first
    # (torch 2.11); BN statistics are synced from rank 0 at every epoch end instead (distribute_bn).
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                              rng_types=[], step_scheduler_with_optimizer=False, cpu=multi_cpu,
                              kwargs_handlers=[ddp_kwargs])
    is_main = accelerator.is_main_process
    ckpt = _check_run_dir(output, resume, overwrite)
    if ckpt is not None:
        _check_same_recipe(output / _RUN_MARKER, cfg)
    log_path = output / 'log.txt'
    pending_log: List[str] = []  # messages from before the run folder is ready

    def log(message: str) -> None:
        if is_main:
            tqdm.write(message) if _tqdm_enabled(cfg, True) else print(message, flush=True)
            pending_log.append(message)
            if folder_ready:
                with open(log_path, 'a') as f:
                    f.write(''.join(m + '\n' for m in pending_log))
                pending_log.clear()

    folder_ready = False

    # data and model first: their errors must not leave a half-made run folder behind
    set_seed(cfg.seed)  # the same initial weights on every rank
    info, train_loader, sampler, x_val, y_val = _prepare_data(cfg, accelerator)
    eps = _craft_eps(cfg, info)
    val_eps = cfg.val_eps if cfg.val_eps is not None else eps
    model = build_model(cfg, info, log=log)

    accelerator.wait_for_everyone()
    if is_main:
        if ckpt is None and output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            save_config(cfg, output / _RUN_MARKER)
    folder_ready = True
    accelerator.wait_for_everyone()
    has_edl = bool(edl_layers(model))
    if cfg.elastic_from_epoch is not None and not has_edl:
        log(f"note: {cfg.model} has no EDL layers; elastic_from_epoch is ignored")
    progress = json.loads((ckpt / _PROGRESS_FILE).read_text()) if ckpt is not None else None
    start_epoch = progress['epoch'] if progress else 0
    stage = _stage_for(cfg, start_epoch) if has_edl else None
    if stage is not None:
        set_beta_mode(model, stage)
        if stage == 'elastic' and ckpt is None and cfg.elastic_beta_init is not None:  # elastic from epoch 0
            for _, layer in edl_layers(model):
                with torch.no_grad():
                    layer.beta.fill_(cfg.elastic_beta_init)
    # Created (and wrapped) with beta possibly frozen: see the module docstring on DDP.
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, param_group_fn=lambda m: param_groups(m, cfg.weight_decay),
                                    **cfg.opt_kwargs)
    model = model.to(accelerator.device)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    ddp_param_ids = {id(p) for p in model.parameters() if p.requires_grad}
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    raw = accelerator.unwrap_model(model)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    state = TrainState({'model': raw, **({'ema': ema.module} if ema is not None else {})})
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(state)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state.restore_edl_caches()
        if not is_main:  # the saved sums are the all-rank totals; keep them once
            state.sums = {k: 0.0 for k in _SUMS}
        if is_main:
            _truncate_summary(output / 'summary.csv', state.epoch)
        log(f"resumed from {ckpt} (epoch {state.epoch}, batch {state.step_in_epoch}, "
            f"update {state.global_update})")

    world = accelerator.num_processes
    n_params = sum(p.numel() for p in raw.parameters())
    log(f"timm-edl train: {cfg.model} ({n_params / 1e6:.2f}M params, {len(edl_layers(raw))} EDL layers) on "
        f"{info.display_name}, objective {cfg.objective}, eps {eps:.4g} {cfg.norm}; {world} process(es) on "
        f"{accelerator.device}, mixed precision {cfg.mixed_precision}, global batch "
        f"{cfg.batch_size * world * cfg.grad_accum_steps}; output {output}")

    def save_state() -> None:
        totals = torch.tensor([state.sums[k] for k in _SUMS], dtype=torch.float64, device=accelerator.device)
        totals = accelerator.reduce(totals, 'sum')
        state.sums = {k: (float(v) if is_main else 0.0) for k, v in zip(_SUMS, totals.tolist())}
        folder = output / CHECKPOINT_DIR / f'step_{state.global_update:09d}'
        accelerator.wait_for_everyone()
        if is_main and folder.exists():
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if is_main:
            (folder / _PROGRESS_FILE).write_text(json.dumps(state.progress()))
            done = sorted((p for p in (output / CHECKPOINT_DIR).iterdir() if (p / _PROGRESS_FILE).is_file()),
                          key=lambda p: p.name)
            for old in done[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    extra_params: List[nn.Parameter] = []  # trainable now, but not registered with DDP

    def apply_stage(epoch: int) -> None:
        nonlocal stage, extra_params
        wanted = _stage_for(cfg, epoch) if has_edl else None
        if wanted is not None and wanted != stage:
            set_beta_mode(raw, wanted)
            start = ''
            if wanted == 'elastic' and cfg.elastic_beta_init is not None:
                for _, layer in edl_layers(raw):
                    with torch.no_grad():
                        layer.beta.fill_(cfg.elastic_beta_init)
                start = f", beta from {cfg.elastic_beta_init:g}"
            log(f"epoch {epoch + 1}: EDL beta mode -> {wanted} (set_beta_mode{start})")
            stage = wanted
        extra_params = [p for p in raw.parameters() if p.requires_grad and id(p) not in ddp_param_ids] \
            if world > 1 else []

    seen: List[torch.Tensor] = []
    last_eval: Dict[str, float] = {}
    completed = True
    attack_gen = torch.Generator(device=accelerator.device)
    summary_path = output / 'summary.csv'
    val_enabled = bool(cfg.val_every and cfg.val_n_ex and x_val is not None)
    label_names = list(info.class_names) if info.class_names else None
    export_tag = f"{info.name.replace('-', '_')}_{cfg.objective}_{cfg.norm.lower()}"

    for epoch in range(state.epoch, cfg.epochs):
        apply_stage(epoch)
        if scheduler is not None:
            scheduler.step(epoch)
            scheduler.step_update(state.global_update)
        sampler.set_epoch(epoch)
        t0 = time.time()
        if not state.eval_pending:
            model.train()
            skip = state.step_in_epoch
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            loader.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from its own counter on iter()
            sampler.set_epoch(epoch)
            bar = tqdm(loader, total=len(train_loader), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not _tqdm_enabled(cfg, is_main), leave=False, dynamic_ncols=True)
            for x, y, index in bar:
                seen.append(index.detach().cpu())
                attack_gen.manual_seed(_mix(cfg.seed, 4, epoch, state.step_in_epoch, accelerator.process_index))
                clean_eval = None
                if not needs_clean_forward(cfg.objective):
                    # clean metrics for objectives whose loss sees only x_adv: an eval-mode
                    # forward before the update (so the state saved after it stays consistent)
                    raw.eval()
                    with torch.no_grad(), accelerator.autocast():
                        clean_eval = raw(x).detach()
                    raw.train()
                with accelerator.accumulate(model):
                    x_in = craft(cfg.objective, raw, x, y, eps=eps, norm=cfg.norm, steps=cfg.attack_steps,
                                 step_size=cfg.attack_step_size, fast_alpha=cfg.fast_alpha,
                                 craft_bn=cfg.craft_bn, generator=attack_gen)
                    awp = None
                    if cfg.awp_gamma > 0 and epoch >= cfg.awp_warmup:  # AWP: the loss at w + v (awp.py)
                        with accelerator.autocast():
                            awp = perturb_weights(raw, lambda m: training_loss(
                                cfg.objective, m, x, x_in, y, trades_beta=cfg.trades_beta,
                                mart_beta=cfg.mart_beta)[0], cfg.awp_gamma)
                    loss, logits = training_loss(cfg.objective, model, x, x_in, y, trades_beta=cfg.trades_beta,
                                                 mart_beta=cfg.mart_beta)
                    accelerator.backward(loss)
                    if awp is not None:
                        awp.restore()  # w exactly, before the optimizer step
                    if accelerator.sync_gradients:
                        if extra_params:  # e.g. beta released after DDP wrapped the model
                            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in extra_params]
                            flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), 'mean')
                            for p, chunk in zip(extra_params, flat.split([g.numel() for g in grads])):
                                p.grad = chunk.view_as(p).clone()
                        if cfg.clip_grad:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # metrics of this batch (clean logits in eval mode where the loss had none)
                with torch.no_grad():
                    b = float(len(y))
                    state.sums['n'] += b
                    state.sums['loss'] += float(loss.detach()) * b
                    clean = logits['clean'] if logits['clean'] is not None else clean_eval
                    if clean is not None:
                        state.sums['clean_n'] += b
                        state.sums['clean_loss'] += float(F.cross_entropy(clean.float(), y)) * b
                        state.sums['clean_correct'] += float((clean.argmax(1) == y).sum())
                    if logits['adv'] is not None:
                        state.sums['robust_n'] += b
                        state.sums['robust_loss'] += float(F.cross_entropy(logits['adv'].float(), y)) * b
                        state.sums['robust_correct'] += float((logits['adv'].argmax(1) == y).sum())
                state.step_in_epoch += 1
                if accelerator.sync_gradients:
                    state.global_update += 1
                    if ema is not None:
                        ema.update(raw, step=state.global_update)
                    if scheduler is not None:
                        scheduler.step_update(state.global_update)
                    if not bar.disable and state.step_in_epoch % 10 == 0:
                        bar.set_postfix(loss=f"{state.sums['loss'] / max(state.sums['n'], 1):.3f}")
                    if cfg.save_every_steps and state.global_update % cfg.save_every_steps == 0:
                        state.epoch_time += time.time() - t0
                        t0 = time.time()
                        save_state()
                    if cfg.stop_after_steps is not None and state.global_update >= cfg.stop_after_steps:
                        completed = False
                        break
            bar.close()
            if not completed:
                log(f"stopped after {state.global_update} optimizer steps (stop_after_steps); continue with "
                    f"--resume")
                break
            state.eval_pending = True
            state.epoch_time += time.time() - t0
            save_state()
            t0 = time.time()

        # ---- end of epoch: summary, validation, best/last tracking
        if world > 1:  # every rank validates and exports with rank 0's BN statistics (as timm's train.py)
            distribute_bn(raw, world, reduce=False)
        totals = torch.tensor([state.sums[k] for k in _SUMS], dtype=torch.float64, device=accelerator.device)
        s = dict(zip(_SUMS, accelerator.reduce(totals, 'sum').tolist()))
        ratio = lambda a, b, pct=1.0: (pct * s[a] / s[b]) if s[b] else None  # noqa: E731
        train_metrics = {
            'loss': ratio('loss', 'n'),
            'clean_loss': ratio('clean_loss', 'clean_n'), 'clean_top1': ratio('clean_correct', 'clean_n', 100.0),
            'robust_loss': ratio('robust_loss', 'robust_n'),
            'robust_top1': ratio('robust_correct', 'robust_n', 100.0),
            'stage': stage or ('none' if not has_edl else 'as-built'),
            **_beta_groups(raw),
        }
        do_eval = val_enabled and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        eval_metrics: Dict[str, Any] = {'clean_top1': None, 'robust_top1': None}
        if ema is not None:
            eval_metrics.update(ema_clean_top1=None, ema_robust_top1=None)
        if do_eval:
            eval_metrics.update(_evaluate(raw, x_val, y_val, cfg, val_eps, accelerator))
            if ema is not None:
                ema_metrics = _evaluate(ema.module, x_val, y_val, cfg, val_eps, accelerator)
                eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
            last_eval = {k: v for k, v in eval_metrics.items() if v is not None}
        train_metrics['epoch_time'] = state.epoch_time + (time.time() - t0)
        lr = optimizer.param_groups[0]['lr']
        if is_main:
            update_summary(epoch, train_metrics, eval_metrics, str(summary_path), lr=lr)
        log(f"epoch {epoch + 1}/{cfg.epochs} [{train_metrics['stage']}] lr {lr:.4g} | train loss "
            f"{_fmt(train_metrics['loss'], False)} clean {_fmt(train_metrics['clean_top1'])} adv "
            f"{_fmt(train_metrics['robust_top1'])} | val clean {_fmt(eval_metrics['clean_top1'])} "
            f"PGD-{cfg.val_attack_steps} {_fmt(eval_metrics['robust_top1'])}"
            + (f" (EMA {_fmt(eval_metrics['ema_clean_top1'])} / {_fmt(eval_metrics['ema_robust_top1'])})"
               if ema is not None and do_eval else '')
            + (f" | beta {train_metrics['beta_mean']:.4f}" if 'beta_mean' in train_metrics else '')
            + f" | {train_metrics['epoch_time']:.1f}s")
        if do_eval:
            key = 'ema_robust_top1' if ema is not None else 'robust_top1'
            metric = eval_metrics[key]
            if state.best_metric is None or metric > state.best_metric:
                state.best_metric, state.best_epoch = metric, epoch
                if is_main:
                    results = _eval_results(cfg, info, eval_metrics, ema is not None, val_eps)
                    how = export_model(ema.module if ema is not None else raw, output / 'best', results,
                                       label_names=label_names, tag=export_tag)
                    log(f"new best robust accuracy {metric:.2f}% at epoch {epoch + 1}: exported {output / 'best'} "
                        f"({how})")
                accelerator.wait_for_everyone()
        state.epoch += 1
        state.step_in_epoch = 0
        state.eval_pending = False
        state.sums = {k: 0.0 for k in _SUMS}
        state.epoch_time = 0.0

    if completed:
        if is_main:
            results = _eval_results(cfg, info, last_eval, ema is not None, val_eps)
            how = export_model(ema.module if ema is not None else raw, output / 'final', results,
                               label_names=label_names, tag=export_tag)
            log(f"done: final model exported to {output / 'final'} ({how})"
                + (f"; best robust accuracy {state.best_metric:.2f}% (epoch {state.best_epoch + 1}) in "
                   f"{output / 'best'}" if state.best_metric is not None else ''))
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        output=output, model=raw, ema=ema.module if ema is not None else None, completed=completed,
        global_update=state.global_update, last_eval=last_eval, best_metric=state.best_metric,
        best_epoch=state.best_epoch, seen_indices=torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long))


def _eval_results(cfg: TrainConfig, info: D.DatasetInfo, metrics: Dict[str, Any], use_ema: bool,
                  eps: float) -> Optional[Dict[str, Any]]:
    """The validation numbers in :mod:`timm_edl.hub`'s evaluation-result format (fractions).

    They are training-time numbers (PGD-k, one restart, on the validation subset), labelled
    with their split; a full evaluation (``timm-edl eval``) should replace them before publishing.
    """
    prefix = 'ema_' if use_ema else ''
    clean, robust = metrics.get(f'{prefix}clean_top1'), metrics.get(f'{prefix}robust_top1')
    if clean is None:
        return None
    return {
        'dataset': info.name,
        'split': 'train-holdout' if cfg.val_split == 'holdout' else 'test',
        'n_ex': cfg.val_n_ex,
        'clean_acc': clean / 100.0,
        'pgd_acc': robust / 100.0,
        'threat_model': cfg.norm,
        'eps': eps,
        'pgd_steps': cfg.val_attack_steps,
        'pgd_restarts': 1,
    }
