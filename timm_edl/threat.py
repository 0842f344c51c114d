"""Threat models and perturbation radii: one home for the names, aliases and eps text used by
attacks, training, evaluation and the model cards (``--threat-model``, ``--eps``, ``--eps-sweep``).

Radii are in ``[0, 1]`` pixel units, written as a decimal (``0.031``, ``0.5``, ``12``) or
a fraction (``8/255``).  The text form is kept for reports, so ``8/255`` is printed as
``8/255`` and not as ``0.0313725``.
"""
import math
import re
from typing import List, Optional, Tuple

__all__ = [
    'ThreatModelError', 'EpsError', 'THREAT_MODELS', 'ROBUSTBENCH_DEFAULT_EPS',
    'canonical_threat_model', 'parse_eps', 'parse_eps_list', 'format_eps', 'default_eps',
    'l2_radius',
]


class ThreatModelError(ValueError):
    """An unknown threat model or an invalid radius (the command lines print it and exit 2)."""


class EpsError(ThreatModelError):
    """An ``--eps`` / ``--eps-sweep`` value that is not a valid radius."""


THREAT_MODELS = ('Linf', 'L2', 'L1')
#: RobustBench's default radius per threat model (CIFAR-10/100); Linf defaults to the
#: dataset's own ``default_eps_linf`` when it has one (0.1 for Fashion-MNIST, 4/255 for
#: ImageNet-like image folders).
ROBUSTBENCH_DEFAULT_EPS = {'Linf': '8/255', 'L2': '0.5', 'L1': '12'}

_ALIASES = {'linf': 'Linf', 'l-inf': 'Linf', 'l_inf': 'Linf', 'inf': 'Linf', 'linfinity': 'Linf',
            'l2': 'L2', 'l-2': 'L2', 'l_2': 'L2', 'l1': 'L1', 'l-1': 'L1', 'l_1': 'L1'}
_NUMBER = r'(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?'
_EPS_RE = re.compile(rf'^\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?$')


def canonical_threat_model(name: str) -> str:
    """'linf' / 'Linf' / 'L-inf' -> 'Linf'; 'l2' -> 'L2'; 'l1' -> 'L1'."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ThreatModelError(f"unknown threat model {name!r}; choose one of {', '.join(THREAT_MODELS)}")
    return _ALIASES[key]


def parse_eps(text: str, threat_model: Optional[str] = None) -> float:
    """``'8/255'`` -> 0.0313..., ``'0.031'`` -> 0.031, ``'12'`` -> 12.0.

    Raises :class:`EpsError` for anything else (empty, negative, ``nan``, ``1/0``, ``8//255``)
    and, for Linf, for radii above 1 (pixels are in [0, 1]: ``--eps 8`` is almost certainly
    meant as ``8/255``).
    """
    raw = str(text)
    match = _EPS_RE.match(raw)
    if match is None:
        hint = " (radii are >= 0)" if raw.strip().startswith('-') else ""
        raise EpsError(f"invalid eps {raw!r}{hint}: write a number like 0.031 or a fraction like 8/255")
    num = float(match.group(1))
    den = float(match.group(2)) if match.group(2) is not None else 1.0
    if den == 0:
        raise EpsError(f"invalid eps {raw!r}: division by zero")
    value = num / den
    if not math.isfinite(value):
        raise EpsError(f"invalid eps {raw!r}: not a finite number")
    if threat_model is not None and canonical_threat_model(threat_model) == 'Linf' and value > 1:
        raise EpsError(
            f"Linf eps {raw!r} = {value:g} is larger than 1, but pixels are in [0, 1]; "
            f"did you mean {raw.strip()}/255?")
    return value


def format_eps(value: float, threat_model: str = 'Linf') -> str:
    """A short text for a radius: ``k/255`` for Linf multiples of 1/255, else ``%g``."""
    k = value * 255
    if threat_model == 'Linf' and 0 < value < 1 and abs(k - round(k)) < 1e-6 * max(1.0, k):
        return f"{int(round(k))}/255"
    return f"{value:g}"


def _normalise_text(text: str) -> str:
    """The user's text without blanks: ``' 8 / 255 '`` -> ``'8/255'``."""
    return re.sub(r'\s+', '', str(text))


def parse_eps_list(text: str, threat_model: Optional[str] = None) -> List[Tuple[str, float]]:
    """``'0,2/255,4/255'`` -> ``[('0', 0.0), ('2/255', 0.0078...), ('4/255', 0.0156...)]``,
    sorted by radius, duplicates removed."""
    items = [t for t in str(text).split(',') if t.strip()]
    if not items:
        raise EpsError(f"invalid eps list {text!r}: expected comma-separated radii like 0,2/255,8/255")
    out = {}
    for item in items:
        value = parse_eps(item, threat_model)
        out.setdefault(round(value, 12), (_normalise_text(item), value))
    return [out[k] for k in sorted(out)]


def default_eps(threat_model: str, default_eps_linf: Optional[float] = None) -> Tuple[str, float]:
    """(text, value) of the default radius: RobustBench's, or the dataset's Linf default."""
    threat_model = canonical_threat_model(threat_model)
    if threat_model == 'Linf' and default_eps_linf is not None:
        return format_eps(default_eps_linf, 'Linf'), float(default_eps_linf)
    text = ROBUSTBENCH_DEFAULT_EPS[threat_model]
    return text, parse_eps(text)


def l2_radius(eps: float, threat_model: str, dim: int) -> float:
    """Largest l2 length of a perturbation in the threat ball (Linf: eps sqrt(d); L2, L1: eps)."""
    if threat_model == 'Linf':
        return eps * math.sqrt(dim)
    return eps
