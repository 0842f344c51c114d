"""The training recipe schema: one dataclass, YAML files, ``--key value`` overrides.

A recipe is a YAML mapping whose keys are the fields of :class:`TrainConfig`; any key
may also be given on the command line (``--epochs 2``, ``--model-kwargs.edl_layers
none``, ``--eps 8/255``).  Unknown keys are rejected with the closest valid names.
Precedence: dataclass defaults < recipe file < command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = [
    'TrainConfig', 'ConfigError', 'OBJECTIVES', 'RUNTIME_KEYS', 'config_keys', 'load_config',
    'apply_overrides', 'parse_overrides', 'config_to_dict', 'config_diff', 'save_config',
]

OBJECTIVES = ('natural', 'pgd', 'trades', 'mart', 'fast')
AWP_OBJECTIVES = ('pgd', 'trades')             # objectives with an awp_gamma option
NORMS = ('Linf', 'L2')
CRAFT_BN_MODES = ('eval', 'train')
MIXED_PRECISION = ('no', 'bf16', 'fp16')
VAL_SPLITS = ('holdout', 'test')
VAL_SELECT = ('robust', 'noisy')      # what selects best/: PGD accuracy | accuracy under noise sigma
PROGRESS = ('auto', 'always', 'never')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
os_PathLike = typing.Union[str, Path]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is meant for the user."""


@dataclass
class TrainConfig:
    """Every key a ``timm-edl train`` recipe may set (see docs/training.md for a table).

    Sizes (``batch_size``, ``val_batch_size``) are per process; the global batch is
    ``batch_size * num_processes * grad_accum_steps``.
    """
    # ---------------------------------------------------------------- model / init
    model: str = 'edlnet_resnet18'           # timm name, 'name.tag', 'local-dir:<export dir>' or 'hf-hub:<repo>'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    pretrained: bool = False                  # timm pretrained weights of `model` (its tag)
    checkpoint: Optional[str] = None          # initial weights: .safetensors / .pth state dict, or an export folder
    allow_pickle: bool = False                # accept a pickle-based checkpoint (.pth/.bin) you trust
    convert: Optional[str] = None             # convert_to_edl policy applied after loading ('default', 'all', ...)
    convert_kwargs: Dict[str, Any] = field(default_factory=dict)  # EDLConv2d options for the conversion
    elastic_from_epoch: Optional[int] = None  # two-stage: beta frozen at 1 before this epoch, trained from it on
    elastic_beta_init: Optional[float] = None  # beta of every EDL layer when it is released (default: as it is)
    # ---------------------------------------------------------------- data
    dataset: str = 'cifar10'
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None          # resize + centre-crop (needed for image folders of mixed sizes)
    train_n_ex: Optional[int] = None          # train on the first n (non-held-out) examples only
    augment: bool = True                      # random crop (+ flip where the dataset allows)
    batch_size: int = 128
    num_workers: int = 2
    data_on_device: bool = False              # training set as one uint8 tensor on the device; crops/flips drawn there
    # ---------------------------------------------------------------- objective
    objective: str = 'pgd'                    # natural | pgd (Madry) | trades | mart | fast (FGSM-RS)
    eps: Optional[float] = None               # threat-model radius in [0, 1] pixels; None: the dataset's default
    norm: str = 'Linf'
    attack_steps: int = 10
    attack_step_size: Optional[float] = None  # None: 2.5 * eps / attack_steps
    fast_alpha: Optional[float] = None        # FGSM-RS step; None: 1.25 * eps
    trades_beta: float = 6.0
    mart_beta: float = 6.0
    craft_bn: str = 'eval'                    # BN while crafting: eval (running stats) | train (batch stats)
    awp_gamma: float = 0.0                    # AWP (Wu et al. 2020) weight perturbation size, relative per layer; 0: off
    awp_warmup: int = 0                       # epochs before AWP starts
    sigma: float = 0.0                        # std of Gaussian noise on the training inputs (smoothing); 0: off
    # ---------------------------------------------------------------- optimisation (timm)
    epochs: int = 200
    opt: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    sched: str = 'multistep'
    sched_on_updates: Optional[bool] = None   # None: per update for objective fast, per epoch otherwise
    decay_milestones: List[int] = field(default_factory=lambda: [100, 150])
    decay_epochs: Optional[float] = None
    decay_rate: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False               # warmup before the main schedule, which spans the other epochs
    grad_accum_steps: int = 1
    mixed_precision: str = 'no'               # no | bf16 | fp16
    model_ema: bool = False
    model_ema_decay: float = 0.999
    channels_last: bool = False               # NHWC memory format for the model and its inputs
    compile: bool = False                     # torch.compile the model (accelerate's TorchDynamoPlugin)
    compile_backend: str = 'inductor'         # a torch.compile backend ('eager' traces without compiling)
    compile_mode: Optional[str] = None        # inductor mode: default | reduce-overhead | max-autotune | ...
    # ---------------------------------------------------------------- robust validation
    val_every: int = 1                        # epochs between validations (0: never; the last epoch always)
    val_split: str = 'holdout'                # holdout (fixed random train subset, not trained on) | test (first n)
    val_n_ex: int = 1000
    val_eps: Optional[float] = None           # None: eps
    val_attack_steps: int = 10
    val_attack_step_size: Optional[float] = None  # None: 2.5 * val_eps / val_attack_steps
    val_batch_size: int = 256
    val_select: str = 'robust'                # best/ by: robust (PGD) | noisy (accuracy under noise sigma)
    # ---------------------------------------------------------------- run
    output: Optional[str] = None              # run folder; None: runs/<recipe name>
    seed: int = 0
    save_every_steps: int = 0                 # also save the state every N optimizer steps (0: epoch ends only)
    keep_checkpoints: int = 2
    stop_after_steps: Optional[int] = None    # simulate a crash: exit after N optimizer steps without saving (tests)
    progress: str = 'auto'                    # tqdm bars: auto (TTY only) | always | never
    time_budget_min: Optional[float] = None   # stop at an optimizer step once this many minutes have passed


#: Keys that may differ between a run and its resumption (they do not change the result).
RUNTIME_KEYS = frozenset({
    'output', 'num_workers', 'progress', 'save_every_steps', 'keep_checkpoints', 'stop_after_steps', 'download',
    'data_dir', 'val_batch_size', 'allow_pickle', 'time_budget_min',
})


def config_keys() -> List[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


_FIELD_TYPES: Dict[str, Any] = typing.get_type_hints(TrainConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return 'mapping'
    return getattr(tp, '__name__', str(tp))


def _parse_number(value: Any, key: str, integer: bool) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:  # '8/255', '0.1', '1e-3'
            number = Fraction(text) if '/' in text else float(text)
        except (ValueError, ZeroDivisionError):
            what = 'an integer' if integer else 'a number (e.g. 0.03 or 8/255)'
            raise ConfigError(f"{key}: expected {what}, got {value!r}") from None
        value = float(number)
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting '8/255', ints for floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ('null', 'none', '~')):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ('true', 'yes', '1', 'on', 'false', 'no', '0', 'off'):
            return value.strip().lower() in ('true', 'yes', '1', 'on')
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        return _parse_number(value, key, integer=True)
    if tp is float:
        return _parse_number(value, key, integer=False)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, List):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _unknown_key_message(key: str, where: str) -> str:
    keys = config_keys()
    close = difflib.get_close_matches(key.replace('-', '_'), keys, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    return (f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(keys)} "
            f"(see docs/training.md).")


def _validate(cfg: TrainConfig) -> TrainConfig:
    def choice(key: str, options: Sequence[str]) -> None:
        if getattr(cfg, key) not in options:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(options)}")

    choice('objective', OBJECTIVES)
    choice('norm', NORMS)
    choice('craft_bn', CRAFT_BN_MODES)
    choice('mixed_precision', MIXED_PRECISION)
    choice('val_split', VAL_SPLITS)
    choice('val_select', VAL_SELECT)
    choice('progress', PROGRESS)
    positive = ('epochs', 'batch_size', 'grad_accum_steps', 'val_batch_size', 'keep_checkpoints')
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    non_negative = ('num_workers', 'attack_steps', 'val_attack_steps', 'val_every', 'save_every_steps',
                    'warmup_epochs', 'lr', 'weight_decay', 'min_lr', 'trades_beta', 'mart_beta', 'sigma')
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ('eps', 'val_eps', 'attack_step_size', 'val_attack_step_size', 'fast_alpha', 'clip_grad'):
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key in ('train_n_ex', 'image_size', 'stop_after_steps'):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 (or null), got {value}")
    if cfg.val_n_ex < 0:
        raise ConfigError(f"val_n_ex must be >= 0, got {cfg.val_n_ex}")
    if cfg.elastic_from_epoch is not None and cfg.elastic_from_epoch < 0:
        raise ConfigError(f"elastic_from_epoch must be >= 0 (or null), got {cfg.elastic_from_epoch}")
    if cfg.elastic_beta_init is not None and not 0.0 <= cfg.elastic_beta_init <= 1.0:
        raise ConfigError(f"elastic_beta_init must lie in [0, 1] (or null), got {cfg.elastic_beta_init}")
    if cfg.awp_gamma < 0 or cfg.awp_warmup < 0:
        raise ConfigError(f"awp_gamma and awp_warmup must be >= 0, got {cfg.awp_gamma}, {cfg.awp_warmup}")
    if cfg.awp_gamma > 0 and cfg.objective not in AWP_OBJECTIVES:
        raise ConfigError(f"awp_gamma > 0 (adversarial weight perturbation) is supported for objectives "
                          f"{', '.join(AWP_OBJECTIVES)}, not {cfg.objective!r}")
    if cfg.sigma > 0 and cfg.objective != 'natural':
        raise ConfigError(f"sigma > 0 (Gaussian-noise training for randomized smoothing) is defined for objective "
                          f"natural only, not {cfg.objective!r}: set objective: natural or sigma: 0")
    if cfg.val_select == 'noisy' and cfg.sigma == 0:
        raise ConfigError("val_select: noisy selects best/ on the accuracy under Gaussian noise of std sigma, but "
                          "sigma is 0: set sigma > 0 or val_select: robust")
    if cfg.objective == 'fast' and cfg.norm != 'Linf':
        raise ConfigError("objective 'fast' (FGSM-RS) is defined for norm Linf only")
    if cfg.objective in ('pgd', 'trades', 'mart') and cfg.attack_steps < 1:
        raise ConfigError(f"objective {cfg.objective!r} needs attack_steps >= 1")
    if not 0.0 <= cfg.model_ema_decay < 1.0:
        raise ConfigError(f"model_ema_decay must lie in [0, 1), got {cfg.model_ema_decay}")
    if cfg.pretrained and cfg.checkpoint:
        raise ConfigError("give either pretrained: true or checkpoint: <path>, not both")
    for key in ('num_classes', 'in_chans'):
        if key in cfg.model_kwargs:
            raise ConfigError(f"model_kwargs.{key} is set from the dataset; remove it from model_kwargs")
    if cfg.sched_on_updates is None:  # fast AT's few epochs need the rate to move within each epoch
        cfg.sched_on_updates = cfg.objective == 'fast'
    if cfg.warmup_epochs > 0 and cfg.warmup_lr == 0 and not cfg.sched_on_updates:
        raise ConfigError(f"warmup_lr: 0 with a per-epoch schedule trains the whole first epoch at learning rate 0 "
                          f"(warmup_epochs: {cfg.warmup_epochs}); set sched_on_updates: true (the rate then rises "
                          f"every update) or a warmup_lr above 0")
    _validate_speed_keys(cfg)
    return cfg


def _validate_speed_keys(cfg: TrainConfig) -> None:
    """The keys that change how fast a run goes: device data, compile, warmup prefix, budget."""
    if cfg.data_on_device and cfg.image_size is not None:
        raise ConfigError("data_on_device serves the stored images at their own size; remove image_size or set "
                          "data_on_device: false")
    if cfg.compile:
        from accelerate.utils import DynamoBackend
        backends = [b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO]
        if cfg.compile_backend not in backends:
            raise ConfigError(f"compile_backend: {cfg.compile_backend!r} is not one of {', '.join(backends)}")
        if cfg.compile_mode is not None and cfg.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode: {cfg.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    elif cfg.compile_mode is not None:
        raise ConfigError("compile_mode is set but compile is false; add compile: true or remove compile_mode")
    if cfg.warmup_prefix and cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"warmup_prefix: warmup_epochs ({cfg.warmup_epochs}) must be fewer than epochs "
                          f"({cfg.epochs}), which the warmup and the main schedule share")
    if cfg.time_budget_min is not None and not cfg.time_budget_min > 0:
        raise ConfigError(f"time_budget_min must be > 0 minutes (or null), got {cfg.time_budget_min}")


def _split_key(raw: str) -> Tuple[str, Optional[str]]:
    """'--model-kwargs.edl_layers' -> ('model_kwargs', 'edl_layers')."""
    name = raw.lstrip('-')
    head, _, sub = name.partition('.')
    return head.replace('-', '_'), (sub or None)


def parse_overrides(argv: Sequence[str]) -> List[Tuple[str, Optional[str], Any]]:
    """``['--epochs', '2', '--eps=8/255', '--model-kwargs.edl_layers', 'none']`` ->
    ``[(key, subkey, value)]`` with values parsed as YAML scalars/flow collections."""
    out: List[Tuple[str, Optional[str], Any]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if not token.startswith('--') or token == '--':
            raise ConfigError(f"expected an option '--key value', got {token!r}")
        if '=' in token:
            raw, text = token.split('=', 1)
            i += 1
        else:
            raw = token
            if i + 1 >= len(argv) or (argv[i + 1].startswith('--') and len(argv[i + 1]) > 2):
                text = 'true'  # a bare flag: --augment
                i += 1
            else:
                text = argv[i + 1]
                i += 2
        key, sub = _split_key(raw)
        try:
            value = yaml.safe_load(text) if text != '' else ''
        except yaml.YAMLError:
            value = text
        out.append((key, sub, value))
    return out


def apply_overrides(
        base: Dict[str, Any], overrides: Sequence[Tuple[str, Optional[str], Any]], where: str = 'the command line',
) -> Dict[str, Any]:
    merged = dict(base)
    for key, sub, value in overrides:
        if key not in _FIELD_TYPES:
            raise ConfigError(_unknown_key_message(key, where))
        if sub is not None:
            if typing.get_origin(_FIELD_TYPES[key]) not in (dict, Dict):
                raise ConfigError(f"--{key}.{sub}: {key} is not a mapping")
            mapping = dict(merged.get(key) or {})
            mapping[sub] = value
            merged[key] = mapping
        else:
            merged[key] = value
    return merged


def build_config(values: Dict[str, Any], where: str = 'the recipe') -> TrainConfig:
    """A validated :class:`TrainConfig` from a mapping (unknown keys rejected)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping of config keys, got {type(values).__name__}")
    kwargs = {}
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            raise ConfigError(_unknown_key_message(str(key), where))
        kwargs[key] = _coerce(value, _FIELD_TYPES[key], key)
    return _validate(TrainConfig(**kwargs))


RECIPES_DIR = Path(__file__).resolve().parents[1] / 'recipes'  # shipped with the package; recipes/ links here


def shipped_recipes() -> List[str]:
    """Names of the ``timm-edl train`` recipes that ship with timm-edl (``timm_edl/recipes``,
    ``recipes/`` in a checkout; ``recipes/timm/`` holds configs for timm's own train.py)."""
    return sorted(p.stem for p in RECIPES_DIR.glob('*.yaml'))


def resolve_recipe(path: os_PathLike) -> Path:
    """A recipe file: ``path`` itself when it exists, else the shipped recipe of that name
    (``cpu_fashion_mnist_pgd`` or ``recipes/cpu_fashion_mnist_pgd.yaml``, from any folder)."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name[len('recipes/'):] if name.startswith('recipes/') else name
    shipped = RECIPES_DIR / (name if name.endswith('.yaml') else name + '.yaml')
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe {str(path)!r} not found, neither as a file nor as a shipped recipe; shipped: "
                      f"{', '.join(shipped_recipes())}")


def read_recipe(path: os_PathLike) -> Dict[str, Any]:
    path = resolve_recipe(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of config keys")
    for key in values:
        if key not in _FIELD_TYPES:
            raise ConfigError(_unknown_key_message(str(key), str(path)))
    return values



def load_config(path: Optional[os_PathLike] = None, overrides: Sequence[str] = (),
                values: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then the recipe at ``path`` (if any), then ``values`` (recipe keys set by the
    command line's model options), then ``--key value`` overrides."""
    recipe = read_recipe(path) if path is not None else {}
    values = apply_overrides({**recipe, **(values or {})}, parse_overrides(overrides))
    cfg = build_config(values, str(path) if path is not None else 'the command line')
    if cfg.output is None:
        name = cfg.model.split(':')[-1].replace('/', '_')
        stem = Path(path).stem if path is not None else f"{name}_{cfg.objective}_{cfg.dataset}"
        cfg.output = str(Path('runs') / stem)
    return cfg


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: os_PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_diff(a: TrainConfig, b: TrainConfig, ignore=RUNTIME_KEYS) -> Dict[str, Tuple[Any, Any]]:
    da, db = config_to_dict(a), config_to_dict(b)
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db[k]}
