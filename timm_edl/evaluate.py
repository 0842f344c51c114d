"""``timm-edl eval``: the evaluation entry point (``timm_edl.cli`` imports this module).

The implementation lives in the :mod:`timm_edl.evaluation` package; this module keeps the
name the command dispatcher uses and re-exports the public API::

    from timm_edl.evaluate import evaluate, EvalConfig, naive_surrogate
    report = evaluate(model, x, y, EvalConfig(threat_model='Linf', eps='8/255'), dataset='cifar10')
"""
from .evaluation import *  # noqa: F401,F403
from .evaluation import __all__  # noqa: F401
from .evaluation.cli import eval_main, main  # noqa: F401
