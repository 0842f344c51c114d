"""The options of an evaluation (:class:`EvalConfig`) and their checking.

:meth:`EvalConfig.resolve` checks every option and returns the :class:`EvalSetting` the
evaluation runs with: the canonical threat model, eps as a number, the attacks to run, the
sweep radii and the device.  A bad value raises :class:`OptionError`, worded with the
option names (``pgd_steps must be >= 1, got 0``); a command line rewords it with its own
flags through :meth:`OptionError.worded`.
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..attacks import NOISE_DISTRIBUTIONS
from ..threat import canonical_threat_model, default_eps, parse_eps, parse_eps_list
from .errors import EvaluationError
from .models import NAIVE_MODES
from .runners import AUTOATTACK_ATTACKS, AUTOATTACK_VERSIONS

__all__ = ['EvalConfig', 'EvalSetting', 'OptionError', 'ATTACKS', 'resolve_device']

ATTACKS = ('clean', 'noise', 'pgd', 'autoattack')
_ATTACK_ALIASES = {'aa': 'autoattack', 'auto-attack': 'autoattack', 'autoattack': 'autoattack',
                   'pgd': 'pgd', 'apgd': 'pgd', 'clean': 'clean', 'noise': 'noise', 'random-noise': 'noise'}
#: the smallest accepted value of each count option
_MINIMUM = (('pgd_steps', 1), ('pgd_restarts', 1), ('noise_draws', 1), ('batch_size', 1), ('check_n', 1),
            ('grad_dirs', 2))


class _Spelled(dict):
    """Template values; a field that is not a value is an option name, spelled by ``spell``."""

    def __init__(self, values: Dict[str, Any], spell: Callable[[str], str]):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


class OptionError(EvaluationError):
    """A bad value of the option ``option``.

    ``template`` names options as ``{name}`` fields and the offending values as fields of
    ``values``; ``str(error)`` spells the options by their names (``pgd_steps``),
    :meth:`worded` by any spelling, e.g. a command line's flags (``--pgd-steps``).
    """

    def __init__(self, option: str, template: str, **values: Any):
        self.option, self.template, self.values = option, template, values
        super().__init__(self.worded())

    def worded(self, spell: Callable[[str], str] = str) -> str:
        return self.template.format_map(_Spelled(self.values, spell))


@dataclass(frozen=True)
class EvalSetting:
    """The checked options an evaluation runs with (:meth:`EvalConfig.resolve`)."""
    threat_model: str                   # 'Linf' | 'L2' | 'L1'
    eps: float                          # radius in [0, 1] pixel units
    eps_text: str                       # as written ('8/255'), or the default radius's text
    attacks: List[str]                  # canonical, in the order given, without 'clean'
    step_size: Optional[float]          # PGD step size; None: 2.5 eps / steps
    sweep: List[Tuple[str, float]]      # the requested eps sweep, (text, value)
    min_steps: int                      # fewest PGD steps the threat model's attack accepts
    aa_version: str                     # 'custom' when aa_attacks are given
    aa_attacks: Optional[List[str]]
    device: torch.device
    pgd_label: str                      # 'PGD-50', or 'APGD-CE-50 (L1, pyautoattack)'


@dataclass
class EvalConfig:
    """Options of :func:`timm_edl.evaluation.evaluate` (the CLI flags of the same names)."""
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

    def resolve(self, default_eps_linf: Optional[float] = None) -> EvalSetting:
        """Check every option; the setting the evaluation runs with.

        ``default_eps_linf``: the dataset's Linf radius, used when ``eps`` is None (else
        RobustBench's radius of the threat model).  Raises :class:`OptionError` (and
        ``ThreatModelError`` / ``EpsError`` for a bad threat model or radius).
        """
        threat_model = canonical_threat_model(self.threat_model)
        if self.eps is None:
            eps_text, eps = default_eps(threat_model, default_eps_linf)
        else:
            eps, eps_text = parse_eps(self.eps, threat_model), str(self.eps).replace(' ', '')
        attacks = _canonical_attacks(self.attacks)
        self._check_choices(threat_model, attacks)
        min_steps = self._check_counts(threat_model)
        step_size = None if self.pgd_step_size is None else parse_eps(self.pgd_step_size)
        sweep = parse_eps_list(self.eps_sweep, threat_model) if isinstance(self.eps_sweep, str) else (
            [(str(t), parse_eps(t, threat_model)) for t in self.eps_sweep] if self.eps_sweep else [])
        aa_attacks = list(self.aa_attacks) if self.aa_attacks else None
        if 'autoattack' in attacks:
            _check_autoattack(self.version, aa_attacks)
        pgd_label = (f"APGD-CE-{self.pgd_steps} (L1, pyautoattack)" if threat_model == 'L1'
                     else f"PGD-{self.pgd_steps}")
        return EvalSetting(threat_model=threat_model, eps=eps, eps_text=eps_text, attacks=attacks,
                           step_size=step_size, sweep=sweep, min_steps=min_steps,
                           aa_version='custom' if aa_attacks else self.version, aa_attacks=aa_attacks,
                           device=resolve_device(self.device), pgd_label=pgd_label)

    def _check_choices(self, threat_model: str, attacks: List[str]) -> None:
        if self.version not in AUTOATTACK_VERSIONS:
            raise OptionError('version', "unknown {version} {value!r}; choose one of {choices}",
                              value=self.version, choices=', '.join(AUTOATTACK_VERSIONS[:3]))
        if self.naive_mode not in NAIVE_MODES:
            raise OptionError('naive_mode', "unknown {naive_mode} {value!r}; choose one of {choices}",
                              value=self.naive_mode, choices=', '.join(NAIVE_MODES))
        if 'noise' in attacks and threat_model == 'L1':
            raise OptionError('attacks', "attack 'noise' supports Linf and L2 only")
        if 'noise' in attacks and self.noise_dist not in NOISE_DISTRIBUTIONS:
            raise OptionError('noise_dist', "unknown {noise_dist} {value!r}; choose one of {choices}",
                              value=self.noise_dist, choices=', '.join(NOISE_DISTRIBUTIONS))

    def _check_counts(self, threat_model: str) -> int:
        """Check the count options; the fewest PGD steps the threat model accepts."""
        for name, low in _MINIMUM:
            value = getattr(self, name)
            if int(value) < low:
                raise OptionError(name, "{%s} must be >= {low}, got {value}" % name, low=low, value=value)
        min_steps = 5 if threat_model == 'L1' else 1  # APGD-L1 splits its iterations 30/30/40 % over 3 radii
        if self.pgd_steps < min_steps:
            raise OptionError('pgd_steps', "{pgd_steps} must be >= {low} for L1 (APGD-L1 runs its iterations in "
                              "three stages), got {value}", low=min_steps, value=self.pgd_steps)
        return min_steps


def _canonical_attacks(attacks: Union[str, Sequence[str]]) -> List[str]:
    items = attacks.split(',') if isinstance(attacks, str) else list(attacks)
    out = []
    for item in items:
        key = str(item).strip().lower()
        if not key:
            continue
        if key not in _ATTACK_ALIASES:
            raise OptionError('attacks', "unknown attack {value!r}; choose from autoattack, pgd, noise (clean "
                              "accuracy is always reported; {naive} and {surrogate} add the naive and transfer "
                              "attacks)", value=item)
        if _ATTACK_ALIASES[key] not in out:
            out.append(_ATTACK_ALIASES[key])
    return [a for a in out if a != 'clean']


def _check_autoattack(version: str, aa_attacks: Optional[List[str]]) -> None:
    if version == 'custom' and not aa_attacks:
        raise OptionError('aa_attacks', "AutoAttack version 'custom' needs a list of attacks ({aa_attacks})")
    unknown = [a for a in aa_attacks or () if a not in AUTOATTACK_ATTACKS]
    if unknown:
        raise OptionError('aa_attacks', "unknown AutoAttack attacks {value}; choose from {choices}",
                          value=unknown, choices=AUTOATTACK_ATTACKS)


def resolve_device(name: str) -> torch.device:
    name = str(name or 'cpu')
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OptionError('device', "invalid {device} {value!r}: {reason}", value=name, reason=e) from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise OptionError('device', "{device} {value}: CUDA is not available on this machine (use {device} cpu)",
                          value=name)
    return device
