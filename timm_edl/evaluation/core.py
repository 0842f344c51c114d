"""The evaluation itself: attacks, checks, and the report dictionary.

:func:`evaluate` works on a model and tensors (no files, no CLI); :mod:`.report` writes its
result and :mod:`.cli` is the ``timm-edl eval`` command around both.
"""
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .checks import (
    Check, check_autoattack_log, check_gradient, check_ladder, check_naive, check_noise, check_ordering,
    check_sweep, check_transfer, gradient_check,
)
from .models import NAIVE_MODES, describe_model, naive_surrogate
from .runners import (
    AUTOATTACK_VERSIONS, correct_under_attack, make_noise, make_pgd, predict_correct, run_autoattack,
)
from .. import results as result_schema
from ..threat import canonical_threat_model, default_eps, format_eps, parse_eps, parse_eps_list
from ..weights import state_dict_digest
from .errors import EvaluationError

__all__ = ['EvalConfig', 'evaluate', 'ATTACKS', 'SCHEMA', 'state_key']

SCHEMA = 'timm-edl-eval/1'
ATTACKS = ('clean', 'noise', 'pgd', 'autoattack')
_ATTACK_ALIASES = {'aa': 'autoattack', 'auto-attack': 'autoattack', 'autoattack': 'autoattack',
                   'pgd': 'pgd', 'apgd': 'pgd', 'clean': 'clean', 'noise': 'noise', 'random-noise': 'noise'}


@dataclass
class EvalConfig:
    """Options of :func:`evaluate` (the CLI flags of the same names)."""
    threat_model: str = 'Linf'
    eps: Optional[str] = None                 # text ('8/255'); None: the default radius
    attacks: Sequence[str] = ('autoattack', 'pgd')
    version: str = 'standard'                 # AutoAttack version: standard | plus | rand | custom
    aa_attacks: Optional[Sequence[str]] = None  # attacks of version 'custom'
    pgd_steps: int = 50
    pgd_restarts: int = 1
    pgd_step_size: Optional[str] = None       # text; None: 2.5 eps / steps
    noise_draws: int = 10                     # attack 'noise': random draws per point
    noise_dist: str = 'corners'               # attack 'noise': 'corners' (sign * eps) or 'uniform'
    batch_size: int = 100
    seed: int = 0
    device: str = 'cpu'
    eps_sweep: Optional[Union[str, Sequence[str]]] = None
    naive: bool = False
    naive_mode: str = 'truncate'
    checks: bool = True
    check_n: int = 100                        # points used by the PGD ladder and the sweep
    grad_points: int = 4
    grad_dirs: int = 16
    tolerance: float = 0.01
    large_eps_factor: float = 16.0            # the "accuracy -> 0" radius: factor x eps
    progress: bool = True
    state_dir: Optional[Union[str, Path]] = None  # AutoAttack resume states; None: no resume
    log_file: Optional[Union[str, Path]] = None   # AutoAttack log

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ('state_dir', 'log_file'):
            d[k] = None if d[k] is None else str(d[k])
        d['attacks'] = list(self.attacks)
        if isinstance(self.eps_sweep, (list, tuple)):
            d['eps_sweep'] = list(self.eps_sweep)
        return d


def _canonical_attacks(attacks: Union[str, Sequence[str]]) -> List[str]:
    items = attacks.split(',') if isinstance(attacks, str) else list(attacks)
    out = []
    for item in items:
        key = str(item).strip().lower()
        if not key:
            continue
        if key not in _ATTACK_ALIASES:
            raise EvaluationError(f"unknown attack {item!r}; choose from autoattack, pgd, noise (clean accuracy is "
                                  f"always reported; --naive and --surrogate add the naive and transfer attacks)")
        if _ATTACK_ALIASES[key] not in out:
            out.append(_ATTACK_ALIASES[key])
    return [a for a in out if a != 'clean']


def state_key(**parts: Any) -> str:
    """Short hash naming an AutoAttack state file: one per (weights, data, attack setting)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolve_device(name: str) -> torch.device:
    name = str(name or 'cpu')
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise EvaluationError(f"invalid --device {name!r}: {e}") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise EvaluationError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata
    out: Dict[str, Optional[str]] = {'python': platform.python_version()}
    for dist in ('timm-edl', 'torch', 'timm', 'pyautoattack', 'numpy', 'torchvision'):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _acc(correct: Optional[torch.Tensor]) -> Optional[float]:
    return None if correct is None else int(correct.sum()) / len(correct)  # exact, not float32


def _row(label: str, correct: torch.Tensor, seconds: float, **extra: Any) -> Dict[str, Any]:
    n = len(correct)
    return {'label': label, 'accuracy': _acc(correct), 'n_correct': int(correct.sum()), 'n': n,
            'seconds': round(seconds, 3), 'seconds_per_100': round(100 * seconds / max(n, 1), 3), **extra}


def _dataset_fields(dataset: Any, data_label: Optional[str]) -> Tuple[str, str, Optional[float], Any]:
    """(name, display label, default Linf eps, info) for a dataset name or DatasetInfo."""
    from ..data import DATASETS, DatasetInfo
    info = None
    if isinstance(dataset, DatasetInfo):
        info = dataset
    elif isinstance(dataset, str) and dataset in DATASETS:
        info = DATASETS[dataset]
    name = info.name if info is not None else str(dataset)
    label = data_label or (info.display_name if info is not None else name)
    return name, label, (info.default_eps_linf if info is not None else None), info


def evaluate(model: nn.Module, *args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Evaluate ``model``; see :func:`_evaluate` for the arguments.

    The parameters of the model (and of a surrogate) are frozen during the evaluation
    (:func:`timm_edl.attacks.frozen_parameters`; restored afterwards), so no attack's
    backward computes parameter gradients it does not need.
    """
    from ..attacks import frozen_parameters
    with frozen_parameters(model, kwargs.get('surrogate')):
        return _evaluate(model, *args, **kwargs)


def _evaluate(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        config: Optional[EvalConfig] = None,
        *,
        dataset: Any = 'cifar10',
        data_label: Optional[str] = None,
        split: str = 'test',
        model_source: Optional[Dict[str, Any]] = None,
        surrogate: Optional[nn.Module] = None,
        surrogate_name: Optional[str] = None,
        info: Optional[Dict[str, Any]] = None,
        n_total: Optional[int] = None,
        log=None,
) -> Dict[str, Any]:
    """Evaluate ``model`` on the points (x, y) (images in [0, 1], labels) and check the result.

    Args:
        model: maps [0, 1] images to logits.
        x, y: the first n_ex test points, in dataset order (``timm_edl.data.load_tensors``).
        config: :class:`EvalConfig`.
        dataset: a ``timm_edl.data`` name or ``DatasetInfo`` (for defaults and labels);
            ``data_label`` overrides its display name (e.g. "CIFAR-10-JPEG").
        model_source: what ``load_model`` returned about the model (spec, weights, ...).
        surrogate: a model for the transfer attack (``surrogate_name`` labels it).
        info: RobustBench fields to fill in (link, name, authors, venue, reported, ...).
        n_total: size of the whole split (the report notes when only its first points were used).
        log: ``print``-like callable for one-line phase summaries (default: stderr).

    Returns the report dictionary (see docs/evaluation.md for its fields).  The failed
    checks are in ``report['failed_checks']``.
    """
    config = config or EvalConfig()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started, started_cpu = time.time(), time.process_time()
    threat_model = canonical_threat_model(config.threat_model)
    dataset_name, label, default_linf, data_info = _dataset_fields(dataset, data_label)
    if config.eps is None:
        eps_text, eps = default_eps(threat_model, default_linf)
    else:
        eps = parse_eps(config.eps, threat_model)
        eps_text = str(config.eps).replace(' ', '')
    attacks = _canonical_attacks(config.attacks)
    if config.version not in AUTOATTACK_VERSIONS:
        raise EvaluationError(f"unknown --version {config.version!r}; choose one of {', '.join(AUTOATTACK_VERSIONS[:3])}")
    if config.naive_mode not in NAIVE_MODES:
        raise EvaluationError(f"unknown --naive-mode {config.naive_mode!r}; choose one of {', '.join(NAIVE_MODES)}")
    if 'noise' in attacks and threat_model == 'L1':
        raise EvaluationError("attack 'noise' supports Linf and L2 only")
    for name, value, low in (('--pgd-steps', config.pgd_steps, 1), ('--pgd-restarts', config.pgd_restarts, 1),
                             ('--noise-draws', config.noise_draws, 1),
                             ('--batch-size', config.batch_size, 1), ('--check-n', config.check_n, 1),
                             ('--grad-dirs', config.grad_dirs, 2)):
        if int(value) < low:
            raise EvaluationError(f"{name} must be >= {low}, got {value}")
    min_steps = 5 if threat_model == 'L1' else 1  # APGD-L1 splits its iterations 30/30/40 % over 3 radii
    if threat_model == 'L1' and config.pgd_steps < min_steps:
        raise EvaluationError(f"--pgd-steps must be >= {min_steps} for L1 (APGD-L1 runs its iterations in three "
                              f"stages), got {config.pgd_steps}")
    step_size = None if config.pgd_step_size is None else parse_eps(config.pgd_step_size)
    sweep = parse_eps_list(config.eps_sweep, threat_model) if isinstance(config.eps_sweep, str) else (
        [(str(t), parse_eps(t, threat_model)) for t in config.eps_sweep] if config.eps_sweep else [])
    if len(x) == 0 or len(x) != len(y):
        raise EvaluationError(f"need as many labels as images and at least one point, got {len(x)} and {len(y)}")
    if x.min() < 0 or x.max() > 1:
        raise EvaluationError("images must be [0, 1] pixels (the models normalise internally)")
    device = _resolve_device(config.device)
    model = model.to(device).eval()
    if surrogate is not None:
        surrogate = surrogate.to(device).eval()
    n = len(x)
    bs = int(config.batch_size)
    progress = config.progress
    torch.manual_seed(config.seed)
    with torch.no_grad():
        out = model(x[:1].to(device))
    if data_info is not None and data_info.num_classes is not None and out.shape[-1] != data_info.num_classes:
        raise EvaluationError(f"the model has {out.shape[-1]} outputs but {label} has {data_info.num_classes} "
                              f"classes (pass --model-kwargs num_classes={data_info.num_classes} for an "
                              f"untrained model, or evaluate on the dataset it was trained on)")

    results: Dict[str, Any] = {}
    timings: Dict[str, float] = {}       # wall clock
    cpu_timings: Dict[str, float] = {}   # CPU time of this process (all threads)
    per_point: Dict[str, torch.Tensor] = {}

    # clean -------------------------------------------------------------------------------
    t0, c0 = time.time(), time.process_time()
    clean = predict_correct(model, x, y, batch_size=bs, device=device, progress=progress)
    timings['clean'] = time.time() - t0
    cpu_timings['clean'] = time.process_time() - c0
    per_point['clean'] = clean
    results['clean'] = _row('Clean', clean, timings['clean'])
    log(f"[clean] {100 * _acc(clean):.2f}% ({timings['clean']:.1f} s)")

    # random noise ----------------------------------------------------------------------
    if 'noise' in attacks:
        t0, c0 = time.time(), time.process_time()
        noise_fn = make_noise(threat_model=threat_model, eps=eps, draws=config.noise_draws,
                              distribution=config.noise_dist, seed=config.seed)
        raw = correct_under_attack(model, x, y, noise_fn, batch_size=bs, device=device, desc='noise',
                                   progress=progress)
        timings['noise'] = time.time() - t0
        cpu_timings['noise'] = time.process_time() - c0
        per_point['noise'] = raw & clean
        results['noise'] = _row(f"Random noise ({config.noise_dist}, {config.noise_draws} draws per point; robust "
                                f"= correct under every draw)", per_point['noise'], timings['noise'],
                                draws=config.noise_draws, distribution=config.noise_dist, attack='noise')
        log(f"[noise] {100 * _acc(per_point['noise']):.2f}% ({timings['noise']:.1f} s)")

    pgd_label = (f"APGD-CE-{config.pgd_steps} (L1, pyautoattack)" if threat_model == 'L1'
                 else f"PGD-{config.pgd_steps}")
    restarts_txt = f"{config.pgd_restarts} restart{'s' if config.pgd_restarts > 1 else ''}"

    def pgd_attack_fn(steps=None, restarts=None, grad_model=None, eps_value=None, seed_offset=0):
        e = eps if eps_value is None else eps_value
        ss = step_size if (eps_value is None or step_size is None or eps == 0) else step_size * e / eps
        return make_pgd(threat_model=threat_model, eps=e, steps=steps or config.pgd_steps,
                        restarts=restarts or config.pgd_restarts, step_size=ss,
                        seed=config.seed + seed_offset, grad_model=grad_model)

    # adaptive PGD ------------------------------------------------------------------------
    if 'pgd' in attacks:
        t0, c0 = time.time(), time.process_time()
        raw = correct_under_attack(model, x, y, pgd_attack_fn(), batch_size=bs, device=device,
                                   desc=pgd_label, progress=progress)
        timings['pgd'] = time.time() - t0
        cpu_timings['pgd'] = time.process_time() - c0
        per_point['pgd'] = raw & clean
        results['pgd'] = _row(f"{pgd_label} adaptive (gradients through every unrolled step), {restarts_txt}",
                              per_point['pgd'], timings['pgd'], raw_accuracy=_acc(raw),
                              steps=config.pgd_steps, restarts=config.pgd_restarts,
                              step_size=step_size if step_size is not None else (
                                  None if threat_model == 'L1' else 2.5 * eps / config.pgd_steps),
                              attack='apgd-ce' if threat_model == 'L1' else 'pgd')
        log(f"[pgd] {100 * _acc(per_point['pgd']):.2f}% ({timings['pgd']:.1f} s)")

    # AutoAttack --------------------------------------------------------------------------
    aa = None
    if 'autoattack' in attacks:
        aa_attacks = list(config.aa_attacks) if config.aa_attacks else None
        version = 'custom' if aa_attacks else config.version
        state_path = None
        if config.state_dir is not None:
            key = state_key(weights=state_dict_digest(model), data=state_dict_digest({'x': x, 'y': y}),
                            threat_model=threat_model,
                            eps=eps, version=version, attacks=aa_attacks, seed=config.seed, batch_size=bs)
            state_path = Path(config.state_dir) / f'autoattack-{key}.json'
        t0, c0 = time.time(), time.process_time()
        aa = run_autoattack(model, x, y, threat_model=threat_model, eps=eps, version=version, attacks=aa_attacks,
                            seed=config.seed, batch_size=bs, device=device, state_path=state_path,
                            log_file=Path(config.log_file) if config.log_file else None, progress=progress)
        timings['autoattack'] = time.time() - t0
        cpu_timings['autoattack'] = time.process_time() - c0
        per_point['autoattack'] = aa['correct'] & clean
        results['autoattack'] = _row(
            f"AutoAttack {version} ({', '.join(aa['attacks'])})", per_point['autoattack'], timings['autoattack'],
            version=version, attacks=aa['attacks'], per_attack=aa['per_attack'], resumed=aa['resumed'],
            already_run=aa['already_run'], state_file=None if state_path is None else str(state_path),
            warnings=aa['warnings'])
        log(f"[autoattack] {100 * aa['accuracy']:.2f}% ({timings['autoattack']:.1f} s"
            f"{', resumed' if aa['resumed'] else ''})")

    # naive -------------------------------------------------------------------------------
    if config.naive:
        t0, c0 = time.time(), time.process_time()
        naive_model = naive_surrogate(model, config.naive_mode)
        raw = correct_under_attack(model, x, y, pgd_attack_fn(grad_model=naive_model), batch_size=bs,
                                   device=device, desc=f'naive {pgd_label}', progress=progress)
        timings['naive'] = time.time() - t0
        cpu_timings['naive'] = time.process_time() - c0
        per_point['naive'] = raw & clean
        results['naive'] = _row(f"Naive {pgd_label} ({config.naive_mode}: {NAIVE_MODES[config.naive_mode]})",
                                per_point['naive'], timings['naive'], mode=config.naive_mode,
                                steps=config.pgd_steps, restarts=config.pgd_restarts)
        log(f"[naive] {100 * _acc(per_point['naive']):.2f}% ({timings['naive']:.1f} s)")
        del naive_model

    # transfer ----------------------------------------------------------------------------
    if surrogate is not None:
        t0, c0 = time.time(), time.process_time()
        raw = correct_under_attack(model, x, y, pgd_attack_fn(grad_model=surrogate), batch_size=bs,
                                   device=device, desc=f'transfer {pgd_label}', progress=progress)
        timings['transfer'] = time.time() - t0
        cpu_timings['transfer'] = time.process_time() - c0
        per_point['transfer'] = raw & clean
        results['transfer'] = _row(f"Transfer {pgd_label} from surrogate {surrogate_name}", per_point['transfer'],
                                   timings['transfer'], surrogate=surrogate_name)
        log(f"[transfer] {100 * _acc(per_point['transfer']):.2f}% ({timings['transfer']:.1f} s)")

    # worst case over every attack ----------------------------------------------------------
    attacked = [k for k in ('noise', 'pgd', 'autoattack', 'naive', 'transfer') if k in per_point]
    if attacked:
        worst = clean.clone()
        for k in attacked:
            worst &= per_point[k]
        per_point['worst_case'] = worst
        results['worst_case'] = _row('Worst case over all attacks (per point)', worst,
                                     sum(timings[k] for k in attacked), attacks=attacked)

    # checks --------------------------------------------------------------------------------
    checks: List[Check] = []
    sweep_points: List[Dict[str, Any]] = []
    m = min(n, int(config.check_n))
    tol = config.tolerance
    primary = 'pgd' if 'pgd' in per_point else None

    def pgd_subset(label, **kwargs):
        t = time.time()
        raw_ = correct_under_attack(model, x[:m], y[:m], pgd_attack_fn(**kwargs), batch_size=bs, device=device,
                                    desc=label, progress=progress)
        return raw_ & clean[:m], time.time() - t

    if sweep or config.checks:
        t0, c0 = time.time(), time.process_time()
        radii = list(sweep)
        if config.checks:
            large = (eps if eps > 0 else default_eps(threat_model)[1]) * config.large_eps_factor
            if threat_model == 'Linf':
                large = min(large, 0.5)  # at 0.5 every image can be moved to the same gray image
            if not radii or max(v for _, v in radii) < large:
                radii.append((format_eps(large, threat_model), large))
        if sweep and not any(abs(v - eps) < 1e-12 for _, v in radii):
            radii.append((eps_text, eps))
        for text, value in sorted(radii, key=lambda r: r[1]):
            if value == 0:
                correct, secs = clean[:m], 0.0
            elif abs(value - eps) < 1e-12 and primary:
                correct, secs = per_point[primary][:m], 0.0
            else:
                correct, secs = pgd_subset(f'sweep eps={text}', eps_value=value)
            sweep_points.append({'eps': text, 'eps_value': value, 'accuracy': _acc(correct), 'n': m,
                                 'attack': pgd_label, 'seconds': round(secs, 3),
                                 'added_by_check': config.checks and (text, value) not in sweep
                                 and abs(value - eps) > 1e-12})
        timings['eps_sweep'] = time.time() - t0
        cpu_timings['eps_sweep'] = time.process_time() - c0
        log(f"[sweep] " + ', '.join(f"{p['eps']}: {100 * p['accuracy']:.1f}%" for p in sweep_points))
        checks.append(check_sweep(sweep_points, n=m, tolerance=tol, require_zero=config.checks))

    ordering = check_ordering(
        _acc(clean), _acc(per_point.get('pgd')), _acc(per_point.get('autoattack')), n=n, tolerance=tol,
        pgd_raw=results.get('pgd', {}).get('raw_accuracy'),
        aa_only_broken_by_pgd=(int((per_point['autoattack'] & ~per_point['pgd']).sum())
                               if 'pgd' in per_point and 'autoattack' in per_point else None))
    checks.insert(0, ordering)

    if config.checks:
        t0, c0 = time.time(), time.process_time()
        weak_steps = max(min_steps, config.pgd_steps // 5)
        main_sub = per_point['pgd'][:m] if 'pgd' in per_point else pgd_subset(f'{pgd_label} (ladder)')[0]
        weak, _ = pgd_subset(f'PGD-{weak_steps} (ladder)', steps=weak_steps, restarts=1, seed_offset=1)
        strong_steps, strong_restarts = 2 * config.pgd_steps, config.pgd_restarts + 1
        strong, _ = pgd_subset(f'PGD-{strong_steps}x{strong_restarts} (ladder)', steps=strong_steps,
                               restarts=strong_restarts, seed_offset=2)
        rungs = [
            {'label': f"{weak_steps} steps x 1", 'steps': weak_steps, 'restarts': 1, 'accuracy': _acc(weak)},
            {'label': f"{config.pgd_steps} steps x {config.pgd_restarts}", 'steps': config.pgd_steps,
             'restarts': config.pgd_restarts, 'accuracy': _acc(main_sub)},
            {'label': f"{strong_steps} steps x {strong_restarts}", 'steps': strong_steps,
             'restarts': strong_restarts, 'accuracy': _acc(strong)},
        ]
        for r in rungs:
            r['n'] = m
        checks.append(check_ladder(rungs, n=m, tolerance=tol))
        timings['check_ladder'] = time.time() - t0
        cpu_timings['check_ladder'] = time.process_time() - c0

        t0, c0 = time.time(), time.process_time()
        candidates = torch.nonzero(clean[:max(m, config.grad_points)]).flatten()[:config.grad_points]
        grad = None
        if len(candidates):
            grad = gradient_check(model, x[candidates], y[candidates], threat_model=threat_model, eps=eps,
                                  n_dirs=config.grad_dirs, seed=config.seed, device=device, progress=progress)
            for p in grad['points']:
                p['index'] = int(candidates[p['index']])
        checks.append(check_gradient(grad))
        timings['check_gradient'] = time.time() - t0
        cpu_timings['check_gradient'] = time.process_time() - c0

    white_box = _acc(per_point.get('pgd'))
    checks.append(check_transfer(_acc(per_point.get('transfer')), white_box, n=n, tolerance=tol,
                                 surrogate=surrogate_name,
                                 reason='' if surrogate is None or white_box is not None
                                 else 'the transfer check compares with PGD: add pgd to --attacks'))
    if 'noise' in per_point:
        checks.append(check_noise(_acc(per_point['noise']), white_box, n=n, tolerance=tol, attack=pgd_label))
    if config.naive:
        checks.append(check_naive(_acc(per_point.get('naive')), white_box, n=n, tolerance=tol,
                                  mode=config.naive_mode,
                                  reason='' if white_box is not None else 'compares with PGD: add pgd to --attacks'))
    checks.append(check_autoattack_log(aa['warnings'] if aa else None, ran=aa is not None))
    for c in checks:
        log(f"[check] {c.name}: {c.status.upper()}")

    for key, row in results.items():
        if key in cpu_timings:
            row['cpu_seconds'] = round(cpu_timings[key], 3)
    timings['total'] = time.time() - started
    cpu_timings['total'] = time.process_time() - started_cpu
    edl_batch = x[:min(n, bs)].to(device)
    description = describe_model(model, model_source, edl_batch)
    return _report(
        config=config, threat_model=threat_model, eps=eps, eps_text=eps_text, dataset_name=dataset_name,
        label=label, data_info=data_info, split=split, n=n, results=results, checks=checks,
        sweep_points=sweep_points, timings=timings, cpu_timings=cpu_timings, description=description, info=info or {},
        device=device, per_point=per_point, surrogate_name=surrogate_name, n_total=n_total)


def _fmt_pct(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{100 * v:.2f}"


def _report(*, config, threat_model, eps, eps_text, dataset_name, label, data_info, split, n, results, checks,
            sweep_points, timings, cpu_timings, description, info, device, per_point, surrogate_name,
            n_total=None) -> Dict[str, Any]:
    failed = [c.name for c in checks if c.status == 'failed']
    clean_acc = results['clean']['accuracy']
    aa_acc = results.get('autoattack', {}).get('accuracy')
    pgd_acc = results.get('pgd', {}).get('accuracy')
    worst = results.get('worst_case', {}).get('accuracy')
    external = worst if (worst is not None and aa_acc is not None and worst < aa_acc) else None
    footnotes = []
    lossy = bool(getattr(data_info, 'lossy', False))
    if lossy:
        footnotes.append(f"Evaluated on {label}, a lossy copy of the dataset: not comparable with leaderboards "
                         f"of the original data.")
    if n_total and n < n_total:
        footnotes.append(f"First {n} of {n_total} {split} points.")
    if description.get('weights') == 'random-init':
        footnotes.append("UNTRAINED (randomly initialised) weights.")
    if failed:
        footnotes.append(f"FAILED CHECK: {', '.join(failed)}; the robust accuracy may be overstated.")
    if external is not None:
        footnotes.append(f"Worst case over all attacks ({100 * external:.2f}%) is below AutoAttack.")
    footnote = ' '.join(footnotes) or None
    if info.get('footnote'):
        footnote = f"{info['footnote']} {footnote or ''}".strip()

    rb = {  # RobustBench model_info entry, in RobustBench's own formatting (strings, percent)
        'link': info.get('link'), 'name': info.get('name'), 'authors': info.get('authors'),
        'additional_data': info.get('additional_data'),
        'number_forward_passes': info.get('number_forward_passes', 1),
        'dataset': dataset_name, 'venue': info.get('venue'),
        'architecture': info.get('architecture', description['architecture']),
        'eps': eps_text, 'clean_acc': _fmt_pct(clean_acc),
        'reported': info.get('reported'), 'autoattack_acc': _fmt_pct(aa_acc),
        'external': _fmt_pct(external), 'footnote': footnote, 'unreliable': bool(failed),
    }
    report: Dict[str, Any] = {
        'schema': SCHEMA,
        # RobustBench model_info fields (accuracies as fractions, eps as a number: what
        # `timm-edl export` reads; `robustbench` below has RobustBench's string format)
        'link': rb['link'], 'name': rb['name'], 'authors': rb['authors'],
        'additional_data': rb['additional_data'], 'number_forward_passes': rb['number_forward_passes'],
        'dataset': dataset_name, 'venue': rb['venue'], 'architecture': description['architecture'],
        'eps': eps, 'clean_acc': clean_acc, 'reported': info.get('reported'),
        'autoattack_acc': aa_acc, 'external': external, 'footnote': footnote, 'unreliable': bool(failed),
        # also read by `timm-edl export`
        'split': split, 'n_ex': n, 'threat_model': threat_model, 'pgd_acc': pgd_acc,
        'attack': 'autoattack' if aa_acc is not None else None,
        'version': results.get('autoattack', {}).get('version'),
        'pgd_steps': config.pgd_steps if pgd_acc is not None else None,
        'pgd_restarts': config.pgd_restarts if pgd_acc is not None else None,
        'weights_digest': description['weights_digest'],
        # ours
        'eps_text': eps_text,
        'data_label': label,
        'data': {'name': dataset_name, 'display_name': label, 'split': split, 'n_ex': n, 'n_total': n_total,
                 'lossy': lossy},
        'worst_case_acc': worst,
        'naive_acc': results.get('naive', {}).get('accuracy'),
        'noise_acc': results.get('noise', {}).get('accuracy'),
        'transfer_acc': results.get('transfer', {}).get('accuracy'),
        'seed': config.seed,
        'device': str(device),
        'results': results,
        'eps_sweep': sweep_points or None,
        'checks': [c.to_dict() for c in checks],
        'failed_checks': failed,
        'timings': {k: round(v, 3) for k, v in timings.items()},
        'cpu_timings': {k: round(v, 3) for k, v in cpu_timings.items()},
        'per_point': {k: pack_correct(v) for k, v in per_point.items()},
        'model': description,
        'edl_beta': {k: v['beta'] for k, v in description['edl']['layers'].items()},
        'config': config.to_dict(),
        'versions': _versions(),
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'robustbench': rb,
    }
    report['model_index'] = model_index(report)
    return report


def pack_correct(correct: torch.Tensor) -> str:
    """Per-point correctness (bool, one per evaluated point, in order) as a hex string of its
    bits, most significant first (8 points per 2 hex digits): 10,000 points in 2,500 characters."""
    bits = correct.detach().to('cpu', torch.bool).flatten().tolist()
    bits += [False] * (-len(bits) % 8)
    return bytes(int(''.join('1' if b else '0' for b in bits[i:i + 8]), 2)
                 for i in range(0, len(bits), 8)).hex()


def unpack_correct(text: str, n: int) -> List[bool]:
    """The first ``n`` per-point results written by :func:`pack_correct`."""
    bits = [c == '1' for byte in bytes.fromhex(text) for c in f'{byte:08b}']
    if len(bits) < n:
        raise ValueError(f"packed per-point results hold {len(bits)} points, asked for {n}")
    return bits[:n]


def model_index(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The Hub card's ``model-index`` block of a report (:func:`timm_edl.results.model_index`,
    the layout ``timm-edl export`` writes into the card)."""
    spec = report['model'].get('spec') or report['architecture']
    if spec.startswith('hf-hub:'):
        name = spec[len('hf-hub:'):]
    else:
        name = Path(spec.split(':', 1)[-1] if spec.startswith('local-dir:') else spec).name
        name = name[:-len('.safetensors')] if name.endswith('.safetensors') else name
    entry = {k: report.get(k) for k in ('dataset', 'split', 'n_ex', 'clean_acc', 'autoattack_acc', 'pgd_acc',
                                        'threat_model', 'eps', 'eps_text', 'version', 'pgd_steps', 'data_label')}
    entry = result_schema.normalize_result(entry, 'evaluation report')
    return result_schema.model_index(report.get('name') or name, [entry])
