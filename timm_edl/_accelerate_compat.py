"""The private API of accelerate that timm-edl uses, in one place.

Checked against accelerate 1.16.0.

=====================================  ==================================================
name                                   what timm-edl uses it for
=====================================  ==================================================
``AcceleratorState._reset_state``      forget the process-wide accelerator settings
                                       (mixed precision, device, ...) after a run
``GradientState._reset_state``         forget the gradient-accumulation settings
=====================================  ==================================================

accelerate keeps its settings in process-wide singletons: without the reset a second
``timm_edl.train.train`` in the same process (tests, notebooks) would keep the first run's
mixed precision and accumulation.  ``tests/test_timm_compat.py`` checks that both exist.
"""
from typing import Tuple

from accelerate.state import AcceleratorState, GradientState

__all__ = ['ACCELERATE_CHECKED', 'PRIVATE_NAMES', 'reset_accelerate_state']

ACCELERATE_CHECKED = ('1.16.0',)

# (class, private method)
PRIVATE_NAMES: Tuple[Tuple[type, str], ...] = (
    (AcceleratorState, '_reset_state'),
    (GradientState, '_reset_state'),
)


def reset_accelerate_state() -> None:
    """Reset accelerate's singletons so that the next in-process run picks its own settings
    (single-process runs only: a distributed run keeps its state until the processes end)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
