"""Checks against false robustness (gradient masking, weak attacks).

Each check returns a :class:`Check` with a status:

``passed``   the check ran and found nothing;
``failed``   evidence that the robust accuracy is overstated -> the report's FAILED CHECK
             section (and exit status 1 with ``--strict``);
``warning``  worth a look, not evidence of overstated robustness by itself;
``skipped``  could not run (e.g. no surrogate given), with the reason.

The checks (see docs/evaluation.md for the reasoning):

``ordering``                 AutoAttack <= PGD <= clean (attacked accuracy per point never
                             above clean; AutoAttack not weaker than our PGD).
``eps-sweep``                accuracy non-increasing in eps, and (near) 0 at a large eps.
``pgd-steps-restarts``       fewer steps do not beat more steps, more steps/restarts do not
                             raise accuracy (and a warning when they lower it a lot: PGD has
                             not converged).
``transfer``                 a transfer attack from a surrogate is not stronger than the
                             white-box attack.
``naive-vs-adaptive``        the naive (truncated-gradient) attack is not stronger than the
                             adaptive one; informational gap otherwise.
``gradient``                 autograd input gradients agree with central finite differences
                             (float64) along random directions; no point has a zero
                             gradient while the loss changes at the scale of eps.
``autoattack-checks``        every warning pyautoattack logs (randomised or dynamic defence,
                             zero gradients, Square beating the gradient attacks, ...).

:func:`evaluation_checks` assembles them for one evaluation from its rows and measurements.
"""
import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import input_gradient
from ..threat import l2_radius
from ..results import pct_text as _pct

__all__ = [
    'Check', 'STATUSES', 'gradient_check', 'check_gradient', 'check_ordering', 'check_sweep',
    'check_ladder', 'check_transfer', 'check_naive', 'check_noise', 'check_autoattack_log', 'evaluation_checks',
    'tolerance_for',
    'FD_COSINE_MIN', 'NEAR_ZERO_ACCURACY', 'ZO_COSINE_WARN', 'PGD_AA_GAP',
]

STATUSES = ('passed', 'failed', 'warning', 'skipped')
#: median cosine between autograd and finite-difference directional derivatives below
#: which the backward pass is taken not to match the forward pass
FD_COSINE_MIN = 0.9
#: accuracy at the sweep's largest radius above which "accuracy goes to 0" fails
NEAR_ZERO_ACCURACY = 0.05
#: median cosine between autograd and the zero-order estimate at the scale of eps below
#: which the gradient check warns (locally right but uninformative gradients)
ZO_COSINE_WARN = 0.5
#: PGD accuracy this much above AutoAttack's makes the ordering check warn
PGD_AA_GAP = 0.05


@dataclass
class Check:
    name: str
    status: str
    summary: str
    values: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def tolerance_for(n: int, tolerance: float) -> float:
    """Slack for comparing two accuracies on n points: ``tolerance``, and at least one point."""
    return max(float(tolerance), 1.0 / max(int(n), 1)) + 1e-9


# ----------------------------------------------------------------------------- gradients

def _cosine(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return None
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))


def gradient_check(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat_model: str, eps: float,
        n_dirs: int = 16, h: float = 1e-4, seed: int = 0, device: torch.device = torch.device('cpu'),
        progress: bool = False,
) -> Dict[str, Any]:
    """Autograd vs finite differences vs a zero-order estimate, per point of (x, y).

    For each point, ``n_dirs`` random unit directions ``u_j`` (l2) and the per-sample
    cross-entropy ``f``:

    * ``autograd_j = <grad f(x), u_j>`` (the gradient every attack follows);
    * ``fd_j = (f(x + h u_j) - f(x - h u_j)) / 2h`` with a tiny ``h``, in float64: the
      derivative of the forward pass itself.  A backward pass that does not match the
      forward (detached or approximated solver steps, straight-through tricks) shows as a
      low cosine between the two vectors;
    * ``zo_j``, the same difference at ``sigma`` = 1/4 of the l2 radius of the threat
      ball: a zero-order estimate at the scale of the attack.  Shattered or vanishing
      gradients (the loss is flat at x but changes within the ball) show as a zero
      autograd gradient with a nonzero ``zo``.

    Runs on a float64 copy of the model (float32 with ``h = 1e-2`` if the model cannot run in
    float64).  Returns per-point numbers and their medians.
    """
    dtype = torch.float64
    try:
        probe = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        with torch.no_grad():
            probe(x[:1].to(device=device, dtype=dtype))
    except Exception:
        dtype, h = torch.float32, max(h, 1e-2)
        probe = copy.deepcopy(model).to(device).eval()
    dim = x[0].numel()
    sigma = 0.25 * l2_radius(eps, threat_model, dim)
    generator = torch.Generator().manual_seed(seed)
    points = []
    from .runners import progress_bar
    bar = progress_bar(len(x), 'gradient check', progress)
    for i in range(len(x)):
        bar.update(1)
        xi = x[i:i + 1].to(device=device, dtype=dtype)
        yi = y[i:i + 1].to(device)
        u = torch.randn((n_dirs, dim), generator=generator, dtype=torch.float64)
        u = (u / u.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        grad = input_gradient(probe, xi, yi).flatten()
        autograd = u @ grad

        def directional(step: float) -> torch.Tensor:
            delta = (step * u).view(n_dirs, *xi.shape[1:])
            with torch.no_grad():
                yy = yi.expand(n_dirs)
                plus = F.cross_entropy(probe(xi + delta), yy, reduction='none')
                minus = F.cross_entropy(probe(xi - delta), yy, reduction='none')
            return (plus - minus) / (2 * step)

        fd = directional(h)
        zo = directional(sigma) if sigma > 0 else torch.zeros_like(fd)
        with torch.no_grad():
            loss = float(F.cross_entropy(probe(xi), yi))
        grad_norm = float(grad.norm())
        points.append({
            'index': i,
            'loss': loss,
            'grad_norm': grad_norm,
            'fd_cosine': _cosine(autograd, fd),
            'zo_cosine': _cosine(autograd, zo),
            'autograd_norm': float(autograd.norm()),
            'fd_norm': float(fd.norm()),
            'zo_norm': float(zo.norm()),
            'zero_gradient': bool(grad_norm == 0.0),
        })

    bar.close()

    def median(key):
        vals = sorted(p[key] for p in points if p[key] is not None)
        return vals[len(vals) // 2] if vals else None

    return {
        'n_points': len(points), 'n_dirs': n_dirs, 'h': h, 'sigma': sigma,
        'dtype': str(dtype).replace('torch.', ''),
        'fd_cosine_median': median('fd_cosine'), 'zo_cosine_median': median('zo_cosine'),
        'points': points,
    }


def check_gradient(result: Optional[Dict[str, Any]], *, fd_cosine_min: float = FD_COSINE_MIN,
                   zo_cosine_warn: float = ZO_COSINE_WARN) -> Check:
    """Fails when autograd disagrees with finite differences or vanishes inside the ball."""
    if result is None or not result.get('points'):
        return Check('gradient', 'skipped', 'no points to check (no correctly classified clean point?)')
    points = result['points']
    vanishing = [p['index'] for p in points if p['autograd_norm'] == 0 and (p['fd_norm'] > 0 or p['zo_norm'] > 1e-8)]
    fd_med = result['fd_cosine_median']
    disagree = fd_med is not None and fd_med < fd_cosine_min
    values = {k: v for k, v in result.items()}
    fd_txt = 'n/a' if fd_med is None else f"{fd_med:.3f}"
    zo_med = result['zo_cosine_median']
    zo_txt = 'n/a' if zo_med is None else f"{zo_med:.3f}"
    summary = (f"cosine(autograd, finite differences) median {fd_txt} over {len(points)} points x "
               f"{result['n_dirs']} directions (h={result['h']:g}, {result['dtype']}); "
               f"cosine(autograd, zero-order at sigma={result['sigma']:.3g}) median {zo_txt}")
    if vanishing:
        return Check('gradient', 'failed',
                     f"autograd input gradient is exactly zero at {len(vanishing)}/{len(points)} points "
                     f"although the loss changes around them: gradient attacks cannot move there "
                     f"(vanishing/shattered or detached gradients). " + summary, values)
    if disagree:
        return Check('gradient', 'failed',
                     f"autograd gradients disagree with finite differences of the forward pass "
                     f"(median cosine {fd_txt} < {fd_cosine_min}): the backward pass is not the "
                     f"derivative of the forward (detached/approximated solver steps?). " + summary, values)
    if zo_med is not None and zo_med < zo_cosine_warn:
        return Check('gradient', 'warning',
                     f"autograd gradients match the forward pass locally but point elsewhere than the loss "
                     f"changes at the scale of eps (zero-order cosine {zo_txt} < {zo_cosine_warn}): shattered "
                     f"or rugged loss surface, gradient attacks may underperform. " + summary, values)
    return Check('gradient', 'passed', summary, values)


# ----------------------------------------------------------------------------- accuracy checks

def check_ordering(clean: float, pgd: Optional[float], autoattack: Optional[float], *, n: int,
                   tolerance: float, pgd_raw: Optional[float] = None,
                   aa_only_broken_by_pgd: Optional[int] = None) -> Check:
    """AutoAttack <= PGD <= clean, within ``tolerance_for(n)``."""
    tol = tolerance_for(n, tolerance)
    problems = []
    values = {'clean': clean, 'pgd': pgd, 'autoattack': autoattack, 'tolerance': tol,
              'pgd_raw': pgd_raw, 'points_pgd_breaks_but_autoattack_does_not': aa_only_broken_by_pgd}
    if pgd is None and autoattack is None:
        return Check('ordering', 'skipped', 'no attack was run', values)
    if pgd_raw is not None and pgd_raw > clean + tol:
        problems.append(f"accuracy on PGD points {_pct(pgd_raw)} > clean {_pct(clean)}: the attack helps the model")
    if pgd is not None and pgd > clean + tol:
        problems.append(f"PGD {_pct(pgd)} > clean {_pct(clean)}")
    if autoattack is not None and autoattack > clean + tol:
        problems.append(f"AutoAttack {_pct(autoattack)} > clean {_pct(clean)}")
    if pgd is not None and autoattack is not None and autoattack > pgd + tol:
        problems.append(f"AutoAttack {_pct(autoattack)} > PGD {_pct(pgd)}: AutoAttack is weaker than "
                        f"our adaptive PGD here (its gradients may be masked for it)")
    chain = ' <= '.join(f"{k} {_pct(v)}" for k, v in (('AutoAttack', autoattack), ('PGD', pgd), ('clean', clean))
                        if v is not None)
    if problems:
        return Check('ordering', 'failed', '; '.join(problems), values)
    if pgd is not None and autoattack is not None and pgd > autoattack + max(PGD_AA_GAP, 2 * tol):
        return Check('ordering', 'warning',
                     f"{chain}, but PGD is much weaker than AutoAttack ({100 * (pgd - autoattack):.2f} points): "
                     f"the PGD number alone would overstate robustness; AutoAttack's other attacks find "
                     f"adversarial examples PGD misses (see its per-attack accuracies); report AutoAttack or the "
                     f"worst case",
                     values)
    note = ''
    if aa_only_broken_by_pgd:
        note = f" ({aa_only_broken_by_pgd} points broken by PGD but not by AutoAttack; the worst case counts them)"
    return Check('ordering', 'passed', f"{chain} (tolerance {_pct(tol)}){note}", values)


def check_sweep(points: Sequence[Dict[str, Any]], *, n: int, tolerance: float,
                near_zero: float = NEAR_ZERO_ACCURACY, require_zero: bool = True) -> Check:
    """Accuracy non-increasing in eps and (with ``require_zero``) (near) 0 at the largest radius."""
    if not points:
        return Check('eps-sweep', 'skipped', 'no sweep was run')
    tol = tolerance_for(n, tolerance)
    pts = sorted(points, key=lambda p: p['eps_value'])
    problems = []
    for a, b in zip(pts, pts[1:]):
        if b['accuracy'] > a['accuracy'] + tol:
            problems.append(f"accuracy rises from {_pct(a['accuracy'])} at eps={a['eps']} to "
                            f"{_pct(b['accuracy'])} at eps={b['eps']}")
    last = pts[-1]
    if require_zero and last['accuracy'] > near_zero:
        problems.append(f"accuracy is still {_pct(last['accuracy'])} at eps={last['eps']} (expected <= "
                        f"{_pct(near_zero)}: a large enough perturbation must break any classifier)")
    values = {'points': list(pts), 'tolerance': tol, 'near_zero': near_zero}
    curve = ', '.join(f"{p['eps']}: {_pct(p['accuracy'])}" for p in pts)
    if problems:
        return Check('eps-sweep', 'failed', '; '.join(problems) + f" [PGD accuracy by eps: {curve}]", values)
    return Check('eps-sweep', 'passed', f"non-increasing and {_pct(last['accuracy'])} at eps={last['eps']} "
                 f"[{curve}]" + ('' if require_zero else ' (large-eps point not run: --no-checks)'), values)


def check_ladder(rungs: Sequence[Dict[str, Any]], *, n: int, tolerance: float) -> Check:
    """``rungs`` ordered from weakest to strongest PGD: accuracy must not rise along them."""
    if len(rungs) < 2:
        return Check('pgd-steps-restarts', 'skipped', 'needs at least two PGD configurations')
    tol = tolerance_for(n, tolerance)
    problems, warnings = [], []
    for a, b in zip(rungs, rungs[1:]):
        if b['accuracy'] > a['accuracy'] + tol:
            problems.append(f"{b['label']} gives {_pct(b['accuracy'])} > {a['label']} {_pct(a['accuracy'])}")
        elif b['accuracy'] < a['accuracy'] - 2 * tol and b is rungs[-1]:
            warnings.append(f"{b['label']} lowers accuracy to {_pct(b['accuracy'])} from {_pct(a['accuracy'])}: "
                            f"PGD has not converged, the PGD number overstates robustness; use more steps/restarts")
    values = {'rungs': list(rungs), 'tolerance': tol}
    ladder = ' -> '.join(f"{r['label']}: {_pct(r['accuracy'])}" for r in rungs)
    if problems:
        return Check('pgd-steps-restarts', 'failed',
                     'more PGD steps/restarts raise accuracy: ' + '; '.join(problems) + f" [{ladder}]", values)
    if warnings:
        return Check('pgd-steps-restarts', 'warning', '; '.join(warnings) + f" [{ladder}]", values)
    return Check('pgd-steps-restarts', 'passed', f"accuracy does not rise with steps/restarts [{ladder}]", values)


def check_transfer(transfer: Optional[float], white_box: Optional[float], *, n: int, tolerance: float,
                   surrogate: Optional[str], reason: str = '') -> Check:
    """A transfer attack must not beat the white-box attack."""
    if transfer is None or white_box is None:
        return Check('transfer', 'skipped', reason or 'no --surrogate given: transfer check skipped '
                     '(try --surrogate twin for the conv twin built from the model\'s dictionaries)')
    tol = tolerance_for(n, tolerance)
    values = {'transfer': transfer, 'white_box': white_box, 'surrogate': surrogate, 'tolerance': tol}
    if transfer < white_box - tol:
        return Check('transfer', 'failed',
                     f"transfer attack from {surrogate} ({_pct(transfer)}) is stronger than the white-box "
                     f"attack ({_pct(white_box)}): the model's own gradients are less useful than a "
                     f"surrogate's (gradient masking)", values)
    return Check('transfer', 'passed',
                 f"transfer from {surrogate}: {_pct(transfer)} >= white-box {_pct(white_box)}", values)


def check_naive(naive: Optional[float], adaptive: Optional[float], *, n: int, tolerance: float, mode: str,
                reason: str = '') -> Check:
    """The adaptive attack must be at least as strong as the naive one."""
    if naive is None or adaptive is None:
        return Check('naive-vs-adaptive', 'skipped', reason or 'run with --naive to compare with a naive evaluation')
    tol = tolerance_for(n, tolerance)
    values = {'naive': naive, 'adaptive': adaptive, 'mode': mode, 'gap': naive - adaptive, 'tolerance': tol}
    if naive < adaptive - tol:
        return Check('naive-vs-adaptive', 'failed',
                     f"the naive attack ({mode}: {_pct(naive)}) beats the adaptive attack ({_pct(adaptive)}): "
                     f"the adaptive PGD is not converging", values)
    return Check('naive-vs-adaptive', 'passed',
                 f"naive ({mode}) {_pct(naive)} vs adaptive {_pct(adaptive)}: a naive evaluation would have "
                 f"overstated robustness by {100 * (naive - adaptive):.2f} points", values)


def check_noise(noise: Optional[float], attacked: Optional[float], *, n: int, tolerance: float,
                attack: str = 'PGD') -> Check:
    """A gradient attack must be at least as strong as random noise of the same radius.

    Random noise uses no gradient; when it breaks more points than PGD, the gradients mislead
    the attack (masked, shattered or vanishing gradients): the PGD number is not a robustness
    measurement."""
    if noise is None or attacked is None:
        return Check('noise-vs-attack', 'skipped', 'run with --attacks ...,noise,pgd to compare random noise with PGD')
    tol = tolerance_for(n, tolerance)
    values = {'noise': noise, 'attack': attacked, 'gap': noise - attacked, 'tolerance': tol}
    if noise < attacked - tol:
        return Check('noise-vs-attack', 'failed',
                     f"random noise ({_pct(noise)}) breaks more points than {attack} ({_pct(attacked)}): the "
                     f"gradients mislead the attack (gradient masking)", values)
    return Check('noise-vs-attack', 'passed',
                 f"random noise {_pct(noise)} >= {attack} {_pct(attacked)}", values)


def check_autoattack_log(warnings: Optional[List[str]], ran: bool) -> Check:
    """Every warning pyautoattack logged during the run is a failed check."""
    if not ran:
        return Check('autoattack-checks', 'skipped', 'AutoAttack was not run')
    if warnings:
        return Check('autoattack-checks', 'failed', 'AutoAttack flagged: ' + ' | '.join(warnings),
                     {'warnings': list(warnings)})
    return Check('autoattack-checks', 'passed',
                 "no AutoAttack warning (randomised/dynamic defence, zero gradients, Square vs gradient attacks)",
                 {'warnings': []})


# ----------------------------------------------------------------------------- one evaluation's checks

def evaluation_checks(results: Dict[str, Dict[str, Any]], per_point: Dict[str, torch.Tensor],
                      measured: Dict[str, Any], *, n: int, tolerance: float, attack_label: str) -> List[Check]:
    """Every check of one evaluation, in report order.

    Args:
        results: the report's rows by attack (``clean``, ``pgd``, ``autoattack``, ``noise``,
            ``naive``, ``transfer``; only those that ran), each with its ``accuracy`` over the
            ``n`` points.
        per_point: (n,) bool robust correctness by attack (for points PGD breaks and
            AutoAttack does not).
        measured: what was measured for the checks: ``sweep`` (:func:`check_sweep`'s
            ``points``, ``n``, ``require_zero``), ``ladder`` (:func:`check_ladder`'s
            ``rungs``, ``n``), ``gradient`` (:func:`gradient_check`'s result, or None when no
            point qualified); a missing key: not measured, no check.
        attack_label: name of the white-box attack (``PGD-50``).
    """
    def acc(key: str) -> Optional[float]:
        return results.get(key, {}).get('accuracy')

    white_box = acc('pgd')
    both = 'pgd' in per_point and 'autoattack' in per_point
    checks = [check_ordering(
        acc('clean'), white_box, acc('autoattack'), n=n, tolerance=tolerance,
        pgd_raw=results.get('pgd', {}).get('raw_accuracy'),
        aa_only_broken_by_pgd=int((per_point['autoattack'] & ~per_point['pgd']).sum()) if both else None)]
    if 'sweep' in measured:
        checks.append(check_sweep(tolerance=tolerance, **measured['sweep']))
    if 'ladder' in measured:
        checks.append(check_ladder(tolerance=tolerance, **measured['ladder']))
    if 'gradient' in measured:
        checks.append(check_gradient(measured['gradient']))
    surrogate = results.get('transfer', {}).get('surrogate')
    checks.append(check_transfer(acc('transfer'), white_box, n=n, tolerance=tolerance, surrogate=surrogate,
                                 reason='' if 'transfer' not in results or white_box is not None
                                 else 'the transfer check compares with PGD: add pgd to --attacks'))
    if 'noise' in results:
        checks.append(check_noise(acc('noise'), white_box, n=n, tolerance=tolerance, attack=attack_label))
    if 'naive' in results:
        checks.append(check_naive(acc('naive'), white_box, n=n, tolerance=tolerance, mode=results['naive']['mode'],
                                  reason='' if white_box is not None else 'compares with PGD: add pgd to --attacks'))
    aa = results.get('autoattack')
    checks.append(check_autoattack_log(aa['warnings'] if aa else None, ran=aa is not None))
    return checks
