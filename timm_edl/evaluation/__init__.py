"""Robustness evaluation of timm / EDLNet models (``timm-edl eval``).

* :func:`evaluate` (``core``): clean accuracy, adaptive PGD, AutoAttack (resumable), the
  naive and transfer attacks, and the checks against false robustness, on tensors;
* :class:`EvalConfig` (``config``): its options, checked by ``EvalConfig.resolve``
  (:class:`OptionError` names a bad one);
* :mod:`.report`: JSON (RobustBench ``model_info`` fields + ours), Markdown, Hub
  ``model-index``, robustness curve;
* :func:`naive_surrogate`, :func:`conv_twin`: model transforms for the naive evaluation
  and the transfer attack; :func:`gradient_check`: autograd vs finite differences.
"""
from .checks import Check, gradient_check
from .config import EvalConfig, OptionError
from .core import SCHEMA, evaluate, model_index
from .models import NAIVE_MODES, conv_twin, describe_model, load_model, naive_surrogate
from .report import markdown, plot_sweep, write_outputs
from .runners import run_autoattack
from ..threat import (
    ROBUSTBENCH_DEFAULT_EPS, THREAT_MODELS, EpsError, ThreatModelError, canonical_threat_model, default_eps,
    format_eps, parse_eps, parse_eps_list,
)
from .errors import EvaluationError

__all__ = [
    'evaluate', 'EvalConfig', 'SCHEMA', 'model_index', 'Check', 'gradient_check',
    'naive_surrogate', 'conv_twin', 'NAIVE_MODES', 'load_model', 'describe_model',
    'markdown', 'plot_sweep', 'write_outputs', 'run_autoattack', 'EvaluationError', 'OptionError', 'EpsError',
    'ThreatModelError',
    'THREAT_MODELS', 'ROBUSTBENCH_DEFAULT_EPS', 'canonical_threat_model', 'default_eps', 'format_eps',
    'parse_eps', 'parse_eps_list',
]
