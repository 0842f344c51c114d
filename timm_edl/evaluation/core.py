"""The evaluation itself: attacks, checks, and the report dictionary.

:func:`evaluate` works on a model and tensors (no files, no CLI); :mod:`.report` writes its
result and :mod:`.cli` is the ``timm-edl eval`` command around both.
"""
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .checks import Check, evaluation_checks, gradient_check
from .config import ATTACKS, EvalConfig, EvalSetting
from .models import NAIVE_MODES, describe_model, naive_surrogate
from .runners import correct_under_attack, make_noise, make_pgd, predict_correct, run_autoattack
from .. import results as result_schema
from ..stats import pack_correct, unpack_correct  # noqa: F401  (unpack_correct: still importable from here)
from ..threat import default_eps, format_eps
from ..weights import state_dict_digest
from .errors import EvaluationError

__all__ = ['EvalConfig', 'evaluate', 'ATTACKS', 'SCHEMA', 'state_key', 'package_versions', 'dataset_fields', 'check_points']

SCHEMA = 'timm-edl-eval/1'


def state_key(**parts: Any) -> str:
    """Short hash naming an AutoAttack state file: one per (weights, data, attack setting)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> Dict[str, Optional[str]]:
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


def dataset_fields(dataset: Any, data_label: Optional[str]) -> Tuple[str, str, Optional[float], Any]:
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


# ----------------------------------------------------------------------------- one run

@dataclass
class _Run:
    """One evaluation in progress: the model, the points, the options, and what was measured.

    ``per_point[key]`` is the (N,) bool robust correctness of each attack (correct clean and
    attacked), ``results[key]`` its report row; ``timings`` / ``cpu_timings`` hold the wall
    and process CPU seconds of every timed phase, in the order they ran.
    """
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    config: EvalConfig
    setting: EvalSetting
    surrogate: Optional[nn.Module]
    surrogate_name: Optional[str]
    log: Callable[[str], None]
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    per_point: Dict[str, torch.Tensor] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    cpu_timings: Dict[str, float] = field(default_factory=dict)

    @property
    def m(self) -> int:
        """Points of the eps sweep and the PGD ladder: the first ``check_n``."""
        return min(len(self.x), int(self.config.check_n))

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, its wall and CPU seconds recorded under ``key``."""
        t0, c0 = time.time(), time.process_time()
        out = fn()
        self.timings[key] = time.time() - t0
        self.cpu_timings[key] = time.process_time() - c0
        return out

    def correct_under(self, attack: Callable, desc: str, m: Optional[int] = None) -> torch.Tensor:
        """Correctness after ``attack`` on the first ``m`` points (all by default), (m,) bool."""
        m = len(self.x) if m is None else m
        return correct_under_attack(self.model, self.x[:m], self.y[:m], attack, batch_size=int(self.config.batch_size),
                                    device=self.setting.device, desc=desc, progress=self.config.progress)

    def pgd(self, steps: Optional[int] = None, restarts: Optional[int] = None, grad_model: Optional[nn.Module] = None,
            eps_value: Optional[float] = None, seed_offset: int = 0) -> Callable:
        """The white-box attack (:func:`.runners.make_pgd`); by default with the options' steps,
        restarts, eps and seed.  At another radius a given step size scales with it."""
        s, c = self.setting, self.config
        eps = s.eps if eps_value is None else eps_value
        step = s.step_size if (eps_value is None or s.step_size is None or s.eps == 0) else s.step_size * eps / s.eps
        return make_pgd(threat_model=s.threat_model, eps=eps, steps=steps or c.pgd_steps,
                        restarts=restarts or c.pgd_restarts, step_size=step, seed=c.seed + seed_offset,
                        grad_model=grad_model)


# ----------------------------------------------------------------------------- the attacks

_Outcome = Tuple[torch.Tensor, str, Dict[str, Any]]  # (correct per point, row label, row fields)


def _clean(run: _Run) -> _Outcome:
    correct = predict_correct(run.model, run.x, run.y, batch_size=int(run.config.batch_size),
                              device=run.setting.device, progress=run.config.progress)
    return correct, 'Clean', {}


def _noise(run: _Run) -> _Outcome:
    c, s = run.config, run.setting
    attack = make_noise(threat_model=s.threat_model, eps=s.eps, draws=c.noise_draws, distribution=c.noise_dist,
                        seed=c.seed)
    label = f"Random noise ({c.noise_dist}, {c.noise_draws} draws per point; robust = correct under every draw)"
    return run.correct_under(attack, 'noise'), label, dict(draws=c.noise_draws, distribution=c.noise_dist,
                                                           attack='noise')


def _pgd(run: _Run) -> _Outcome:
    c, s = run.config, run.setting
    raw = run.correct_under(run.pgd(), s.pgd_label)
    restarts = f"{c.pgd_restarts} restart{'s' if c.pgd_restarts > 1 else ''}"
    default_step = None if s.threat_model == 'L1' else 2.5 * s.eps / c.pgd_steps
    return raw, f"{s.pgd_label} adaptive (gradients through every unrolled step), {restarts}", dict(
        raw_accuracy=_acc(raw), steps=c.pgd_steps, restarts=c.pgd_restarts,
        step_size=s.step_size if s.step_size is not None else default_step,
        attack='apgd-ce' if s.threat_model == 'L1' else 'pgd')


def _autoattack_state(run: _Run) -> Optional[Path]:
    """The resume state file of this (weights, data, setting), None without ``state_dir``."""
    c, s = run.config, run.setting
    if c.state_dir is None:
        return None
    key = state_key(weights=state_dict_digest(run.model), data=state_dict_digest({'x': run.x, 'y': run.y}),
                    threat_model=s.threat_model, eps=s.eps, version=s.aa_version, attacks=s.aa_attacks,
                    seed=c.seed, batch_size=int(c.batch_size))
    return Path(c.state_dir) / f'autoattack-{key}.json'


def _autoattack(run: _Run) -> _Outcome:
    c, s = run.config, run.setting
    state_path = _autoattack_state(run)
    aa = run_autoattack(run.model, run.x, run.y, threat_model=s.threat_model, eps=s.eps, version=s.aa_version,
                        attacks=s.aa_attacks, seed=c.seed, batch_size=int(c.batch_size), device=s.device,
                        state_path=state_path, log_file=Path(c.log_file) if c.log_file else None,
                        progress=c.progress)
    return aa['correct'], f"AutoAttack {s.aa_version} ({', '.join(aa['attacks'])})", dict(
        version=s.aa_version, attacks=aa['attacks'], per_attack=aa['per_attack'], resumed=aa['resumed'],
        already_run=aa['already_run'], state_file=None if state_path is None else str(state_path),
        warnings=aa['warnings'])


def _naive(run: _Run) -> _Outcome:
    c, label = run.config, run.setting.pgd_label
    raw = run.correct_under(run.pgd(grad_model=naive_surrogate(run.model, c.naive_mode)), f'naive {label}')
    return raw, f"Naive {label} ({c.naive_mode}: {NAIVE_MODES[c.naive_mode]})", dict(
        mode=c.naive_mode, steps=c.pgd_steps, restarts=c.pgd_restarts)


def _transfer(run: _Run) -> _Outcome:
    label = run.setting.pgd_label
    raw = run.correct_under(run.pgd(grad_model=run.surrogate), f'transfer {label}')
    return raw, f"Transfer {label} from surrogate {run.surrogate_name}", dict(surrogate=run.surrogate_name)


class _Attack(NamedTuple):
    """One row of the report: ``wanted(run)`` says whether the options ask for it,
    ``run(run)`` measures it (see :func:`_run_attack`)."""
    key: str
    wanted: Callable[[_Run], bool]
    run: Callable[[_Run], _Outcome]


#: every row of the report but the worst case, in the order they run
_ATTACKS = (
    _Attack('clean', lambda r: True, _clean),
    _Attack('noise', lambda r: 'noise' in r.setting.attacks, _noise),
    _Attack('pgd', lambda r: 'pgd' in r.setting.attacks, _pgd),
    _Attack('autoattack', lambda r: 'autoattack' in r.setting.attacks, _autoattack),
    _Attack('naive', lambda r: r.config.naive, _naive),
    _Attack('transfer', lambda r: r.surrogate is not None, _transfer),
)


def _run_attack(run: _Run, attack: _Attack) -> None:
    """Run one attack, timed; keep its per-point result (robust: correct clean and attacked;
    clean itself: correct) and its row, and log it."""
    correct, label, fields = run.timed(attack.key, lambda: attack.run(run))
    correct = correct & run.per_point.get('clean', correct)
    run.per_point[attack.key] = correct
    row = _row(label, correct, run.timings[attack.key], **fields)
    row['cpu_seconds'] = round(run.cpu_timings[attack.key], 3)
    run.results[attack.key] = row
    resumed = ', resumed' if fields.get('resumed') else ''
    run.log(f"[{attack.key}] {100 * row['accuracy']:.2f}% ({run.timings[attack.key]:.1f} s{resumed})")


def _worst_case(run: _Run) -> None:
    """The row of the points that survive every attack that ran."""
    attacked = [a.key for a in _ATTACKS[1:] if a.key in run.per_point]
    if not attacked:
        return
    worst = run.per_point['clean'].clone()
    for k in attacked:
        worst &= run.per_point[k]
    run.per_point['worst_case'] = worst
    run.results['worst_case'] = _row('Worst case over all attacks (per point)', worst,
                                     sum(run.timings[k] for k in attacked), attacks=attacked)


# ----------------------------------------------------------------------------- measurements for the checks

def _sweep_radii(run: _Run) -> List[Tuple[str, float]]:
    """The requested sweep, plus (with checks) a radius large enough to break any classifier
    and (with a sweep) the evaluation's own eps; sorted by radius."""
    c, s = run.config, run.setting
    radii = list(s.sweep)
    if c.checks:
        large = (s.eps if s.eps > 0 else default_eps(s.threat_model)[1]) * c.large_eps_factor
        if s.threat_model == 'Linf':
            large = min(large, 0.5)  # at 0.5 every image can be moved to the same gray image
        if not radii or max(v for _, v in radii) < large:
            radii.append((format_eps(large, s.threat_model), large))
    if s.sweep and not any(abs(v - s.eps) < 1e-12 for _, v in radii):
        radii.append((s.eps_text, s.eps))
    return sorted(radii, key=lambda r: r[1])


def _at_radius(run: _Run, text: str, value: float) -> Tuple[torch.Tensor, float]:
    """Robust correctness of the first ``m`` points under PGD at radius ``value``, and the
    seconds it took (clean at 0 and the PGD row at eps are reused: 0 s)."""
    m, clean = run.m, run.per_point['clean'][:run.m]
    if value == 0:
        return clean, 0.0
    if abs(value - run.setting.eps) < 1e-12 and 'pgd' in run.per_point:
        return run.per_point['pgd'][:m], 0.0
    t = time.time()
    correct = run.correct_under(run.pgd(eps_value=value), f'sweep eps={text}', m) & clean
    return correct, time.time() - t


def _sweep(run: _Run) -> List[Dict[str, Any]]:
    """Accuracy under PGD at each radius of :func:`_sweep_radii`, on the first ``m`` points."""
    c, s = run.config, run.setting
    points = []
    for text, value in _sweep_radii(run):
        correct, secs = _at_radius(run, text, value)
        points.append({'eps': text, 'eps_value': value, 'accuracy': _acc(correct), 'n': run.m,
                       'attack': s.pgd_label, 'seconds': round(secs, 3),
                       'added_by_check': c.checks and (text, value) not in s.sweep and abs(value - s.eps) > 1e-12})
    return points


def _ladder(run: _Run) -> List[Dict[str, Any]]:
    """PGD of steps/5 x 1, steps x restarts and 2 steps x (restarts + 1) on the first ``m``
    points, weakest first."""
    c, s, m = run.config, run.setting, run.m
    clean = run.per_point['clean'][:m]
    weak_steps = max(s.min_steps, c.pgd_steps // 5)
    strong_steps, strong_restarts = 2 * c.pgd_steps, c.pgd_restarts + 1
    main = (run.per_point['pgd'][:m] if 'pgd' in run.per_point
            else run.correct_under(run.pgd(), f'{s.pgd_label} (ladder)', m) & clean)
    weak = run.correct_under(run.pgd(steps=weak_steps, restarts=1, seed_offset=1),
                             f'PGD-{weak_steps} (ladder)', m) & clean
    strong = run.correct_under(run.pgd(steps=strong_steps, restarts=strong_restarts, seed_offset=2),
                               f'PGD-{strong_steps}x{strong_restarts} (ladder)', m) & clean
    return [
        {'label': f"{weak_steps} steps x 1", 'steps': weak_steps, 'restarts': 1, 'accuracy': _acc(weak), 'n': m},
        {'label': f"{c.pgd_steps} steps x {c.pgd_restarts}", 'steps': c.pgd_steps, 'restarts': c.pgd_restarts,
         'accuracy': _acc(main), 'n': m},
        {'label': f"{strong_steps} steps x {strong_restarts}", 'steps': strong_steps, 'restarts': strong_restarts,
         'accuracy': _acc(strong), 'n': m},
    ]


def _gradient(run: _Run) -> Optional[Dict[str, Any]]:
    """:func:`.checks.gradient_check` on the first ``grad_points`` correctly classified points
    (None when there is none); point indices are those of the evaluation."""
    c, s = run.config, run.setting
    candidates = torch.nonzero(run.per_point['clean'][:max(run.m, c.grad_points)]).flatten()[:c.grad_points]
    if not len(candidates):
        return None
    grad = gradient_check(run.model, run.x[candidates], run.y[candidates], threat_model=s.threat_model, eps=s.eps,
                          n_dirs=c.grad_dirs, seed=c.seed, device=s.device, progress=c.progress)
    for p in grad['points']:
        p['index'] = int(candidates[p['index']])
    return grad


def _measure(run: _Run) -> Dict[str, Any]:
    """The measurements the checks need beyond the rows: the eps sweep (with a sweep or the
    checks), the PGD ladder and the gradient check (with the checks)."""
    c, measured = run.config, {}
    if run.setting.sweep or c.checks:
        points = run.timed('eps_sweep', lambda: _sweep(run))
        run.log("[sweep] " + ', '.join(f"{p['eps']}: {100 * p['accuracy']:.1f}%" for p in points))
        measured['sweep'] = dict(points=points, n=run.m, require_zero=c.checks)
    if c.checks:
        measured['ladder'] = dict(rungs=run.timed('check_ladder', lambda: _ladder(run)), n=run.m)
        measured['gradient'] = run.timed('check_gradient', lambda: _gradient(run))
    return measured


# ----------------------------------------------------------------------------- evaluate

def evaluate(model: nn.Module, *args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Evaluate ``model``; see :func:`_evaluate` for the arguments.

    The parameters of the model (and of a surrogate) are frozen during the evaluation
    (:func:`timm_edl.attacks.frozen_parameters`; restored afterwards), so no attack's
    backward computes parameter gradients it does not need.
    """
    from ..attacks import frozen_parameters
    with frozen_parameters(model, kwargs.get('surrogate')):
        return _evaluate(model, *args, **kwargs)


def check_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, label: str,
                  data_info: Any) -> None:
    """The points are [0, 1] images with one label each, and the model has a logit per class."""
    if len(x) == 0 or len(x) != len(y):
        raise EvaluationError(f"need as many labels as images and at least one point, got {len(x)} and {len(y)}")
    if x.min() < 0 or x.max() > 1:
        raise EvaluationError("images must be [0, 1] pixels (the models normalise internally)")
    with torch.no_grad():
        out = model(x[:1].to(device))
    classes = None if data_info is None else data_info.num_classes
    if classes is not None and out.shape[-1] != classes:
        raise EvaluationError(f"the model has {out.shape[-1]} outputs but {label} has {classes} classes (create "
                              f"an untrained model with num_classes={classes}, or evaluate on the dataset it was "
                              f"trained on)")


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
        config: :class:`EvalConfig` (checked by :meth:`EvalConfig.resolve`: a bad option
            raises :class:`.config.OptionError`).
        dataset: a ``timm_edl.data`` name or ``DatasetInfo`` (for defaults and labels);
            ``data_label`` overrides its display name (e.g. "CIFAR-10-JPEG").
        model_source: what ``load_model`` returned about the model (spec, weights, ...).
        surrogate: a model for the transfer attack (``surrogate_name`` labels it).
        info: RobustBench fields to fill in (link, name, authors, venue, reported, ...).
        n_total: size of the whole split (the report notes when only its first points were used).
        log: ``print``-like callable for one-line phase summaries (default: stderr).

    Every attack of :data:`_ATTACKS` that the options ask for runs on all points, then the
    measurements of the checks (:func:`_measure`), then :func:`.checks.evaluation_checks`.
    Returns the report dictionary (see docs/evaluation.md for its fields).  The failed
    checks are in ``report['failed_checks']``.
    """
    config = config or EvalConfig()
    started, started_cpu = time.time(), time.process_time()
    dataset_name, label, default_linf, data_info = dataset_fields(dataset, data_label)
    setting = config.resolve(default_linf)
    model = model.to(setting.device).eval()
    if surrogate is not None:
        surrogate = surrogate.to(setting.device).eval()
    torch.manual_seed(config.seed)
    check_points(model, x, y, setting.device, label, data_info)
    run = _Run(model, x, y, config, setting, surrogate, surrogate_name,
               log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    for attack in _ATTACKS:
        if attack.wanted(run):
            _run_attack(run, attack)
    _worst_case(run)
    measured = _measure(run)
    checks = evaluation_checks(run.results, run.per_point, measured, n=len(x), tolerance=config.tolerance,
                               attack_label=setting.pgd_label)
    for c in checks:
        run.log(f"[check] {c.name}: {c.status.upper()}")
    run.timings['total'] = time.time() - started
    run.cpu_timings['total'] = time.process_time() - started_cpu
    description = describe_model(model, model_source, x[:min(len(x), int(config.batch_size))].to(setting.device))
    return _report(run, checks, measured.get('sweep', {}).get('points', []), description, info=info or {},
                   dataset_name=dataset_name, label=label, data_info=data_info, split=split, n_total=n_total)


def _fmt_pct(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{100 * v:.2f}"


def _footnote(*, label: str, lossy: bool, n: int, n_total: Optional[int], split: str, weights: Any,
              failed: List[str], external: Optional[float], extra: Optional[str]) -> Optional[str]:
    """The report's footnote: lossy data, a subset of the split, untrained weights, failed
    checks, a worst case below AutoAttack (after ``extra``, the caller's own note)."""
    notes = []
    if lossy:
        notes.append(f"Evaluated on {label}, a lossy copy of the dataset: not comparable with leaderboards "
                     f"of the original data.")
    if n_total and n < n_total:
        notes.append(f"First {n} of {n_total} {split} points.")
    if weights == 'random-init':
        notes.append("UNTRAINED (randomly initialised) weights.")
    if failed:
        notes.append(f"FAILED CHECK: {', '.join(failed)}; the robust accuracy may be overstated.")
    if external is not None:
        notes.append(f"Worst case over all attacks ({100 * external:.2f}%) is below AutoAttack.")
    footnote = ' '.join(notes) or None
    return f"{extra} {footnote or ''}".strip() if extra else footnote


def _report(run: _Run, checks: List[Check], sweep_points: List[Dict[str, Any]], description: Dict[str, Any], *,
            info: Dict[str, Any], dataset_name: str, label: str, data_info: Any, split: str,
            n_total: Optional[int]) -> Dict[str, Any]:
    config, setting, results, n = run.config, run.setting, run.results, len(run.x)
    failed = [c.name for c in checks if c.status == 'failed']
    clean_acc = results['clean']['accuracy']
    aa_acc = results.get('autoattack', {}).get('accuracy')
    pgd_acc = results.get('pgd', {}).get('accuracy')
    worst = results.get('worst_case', {}).get('accuracy')
    external = worst if (worst is not None and aa_acc is not None and worst < aa_acc) else None
    lossy = bool(getattr(data_info, 'lossy', False))
    footnote = _footnote(label=label, lossy=lossy, n=n, n_total=n_total, split=split,
                         weights=description.get('weights'), failed=failed, external=external,
                         extra=info.get('footnote'))
    rb = {  # RobustBench model_info entry, in RobustBench's own formatting (strings, percent)
        'link': info.get('link'), 'name': info.get('name'), 'authors': info.get('authors'),
        'additional_data': info.get('additional_data'),
        'number_forward_passes': info.get('number_forward_passes', 1),
        'dataset': dataset_name, 'venue': info.get('venue'),
        'architecture': info.get('architecture', description['architecture']),
        'eps': setting.eps_text, 'clean_acc': _fmt_pct(clean_acc),
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
        'eps': setting.eps, 'clean_acc': clean_acc, 'reported': info.get('reported'),
        'autoattack_acc': aa_acc, 'external': external, 'footnote': footnote, 'unreliable': bool(failed),
        # also read by `timm-edl export`
        'split': split, 'n_ex': n, 'threat_model': setting.threat_model, 'pgd_acc': pgd_acc,
        'attack': 'autoattack' if aa_acc is not None else None,
        'version': results.get('autoattack', {}).get('version'),
        'pgd_steps': config.pgd_steps if pgd_acc is not None else None,
        'pgd_restarts': config.pgd_restarts if pgd_acc is not None else None,
        'weights_digest': description['weights_digest'],
        # ours
        'eps_text': setting.eps_text,
        'data_label': label,
        'data': {'name': dataset_name, 'display_name': label, 'split': split, 'n_ex': n, 'n_total': n_total,
                 'lossy': lossy},
        'worst_case_acc': worst,
        'naive_acc': results.get('naive', {}).get('accuracy'),
        'noise_acc': results.get('noise', {}).get('accuracy'),
        'transfer_acc': results.get('transfer', {}).get('accuracy'),
        'seed': config.seed,
        'device': str(setting.device),
        'results': results,
        'eps_sweep': sweep_points or None,
        'checks': [c.to_dict() for c in checks],
        'failed_checks': failed,
        'timings': {k: round(v, 3) for k, v in run.timings.items()},
        'cpu_timings': {k: round(v, 3) for k, v in run.cpu_timings.items()},
        'per_point': {k: pack_correct(v) for k, v in run.per_point.items()},
        'model': description,
        'edl_beta': {k: v['beta'] for k, v in description['edl']['layers'].items()},
        'config': config.to_dict(),
        'versions': package_versions(),
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'robustbench': rb,
    }
    report['model_index'] = model_index(report)
    return report


def model_index(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The Hub card's ``model-index`` block of a report (:func:`timm_edl.results.model_index`,
    the layout ``timm-edl export`` writes into the card)."""
    spec = report['model'].get('spec') or report['architecture']
    if spec.startswith('hf-hub:'):
        name = spec[len('hf-hub:'):]
    else:
        name = Path(spec.split(':', 1)[-1] if spec.startswith('local-dir:') else spec).name
        name = name[:-len('.safetensors')] if name.endswith('.safetensors') else name
    entry = {k: report.get(k) for k in result_schema.INDEX_FIELDS}
    entry = result_schema.normalize_result(entry, 'evaluation report')
    return result_schema.model_index(report.get('name') or name, [entry])
