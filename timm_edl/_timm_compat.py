"""The private names of timm that timm-edl uses, imported once, here.

timm exports most of what a plugin needs from ``timm.models`` / ``timm.layers``; the names
below are the exceptions.  Each is imported from its private module by :func:`_private`, so
that a timm release that moves or drops one fails at ``import timm_edl`` with a message
naming the symbol, instead of somewhere deep in a load.  ``tests/test_timm_compat.py``
imports every one of them.

Checked against timm 1.0.31.

===============================  =========================  ==================================================
name                             private module             what timm-edl uses it for
===============================  =========================  ==================================================
``feature_take_indices``         ``timm.models._features``  ``EDLResNet.forward_intermediates`` /
                                                            ``prune_intermediate_layers``: which feature
                                                            levels to take
``download_from_hf``             ``timm.models._hub``       one file of a Hub repo (``repo@revision`` split as
                                                            timm splits it), to check a weights file before
                                                            timm reads it
``load_model_config_from_path``  ``timm.models._hub``       config.json of a ``local-dir:`` folder, read as
                                                            ``timm.create_model`` reads it (its Hub twin is
                                                            public)
``save_config_for_hf``           ``timm.models._hub``       timm's own config.json for an export
                                                            (``save_for_hf`` would write the weights too)
``PREFERRED_FILES``              ``timm.models._hub``       ``_PREFERRED_FILES``: the weights file names timm
                                                            looks for in a folder / repo, in its order
``EXT_PRIORITY``                 ``timm.models._hub``       ``_EXT_PRIORITY``: the extensions it falls back to
                                                            in a folder, in its order
``resolve_pretrained_source``    ``timm.models._builder``   ``_resolve_pretrained_source``: where
                                                            ``load_pretrained`` will read the weights, so that
                                                            the pickle gate checks that file first
===============================  =========================  ==================================================
"""
import importlib
from typing import Any, Dict, Tuple

import timm

__all__ = [
    'TIMM_CHECKED', 'PRIVATE_NAMES', 'feature_take_indices', 'download_from_hf', 'load_model_config_from_path',
    'save_config_for_hf', 'PREFERRED_FILES', 'EXT_PRIORITY', 'resolve_pretrained_source',
]

# timm versions the names below were checked against
TIMM_CHECKED = ('1.0.31',)

# our name -> (private module, name there)
PRIVATE_NAMES: Dict[str, Tuple[str, str]] = {
    'feature_take_indices': ('timm.models._features', 'feature_take_indices'),
    'download_from_hf': ('timm.models._hub', 'download_from_hf'),
    'load_model_config_from_path': ('timm.models._hub', 'load_model_config_from_path'),
    'save_config_for_hf': ('timm.models._hub', 'save_config_for_hf'),
    'PREFERRED_FILES': ('timm.models._hub', '_PREFERRED_FILES'),
    'EXT_PRIORITY': ('timm.models._hub', '_EXT_PRIORITY'),
    'resolve_pretrained_source': ('timm.models._builder', '_resolve_pretrained_source'),
}


def _private(name: str) -> Any:
    """The timm object behind our ``name``; an ImportError naming it when timm lacks it."""
    module, attr = PRIVATE_NAMES[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"timm-edl needs {module}.{attr} from timm, which timm {timm.__version__} does not have "
            f"({type(e).__name__}: {e}). timm-edl was checked with timm {', '.join(TIMM_CHECKED)}: install one "
            f"of those (pip install 'timm=={TIMM_CHECKED[-1]}') or a timm-edl release made for your timm.") from e


feature_take_indices = _private('feature_take_indices')
download_from_hf = _private('download_from_hf')
load_model_config_from_path = _private('load_model_config_from_path')
save_config_for_hf = _private('save_config_for_hf')
PREFERRED_FILES = _private('PREFERRED_FILES')
EXT_PRIORITY = _private('EXT_PRIORITY')
resolve_pretrained_source = _private('resolve_pretrained_source')
