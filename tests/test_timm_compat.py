"""The private names of timm and accelerate that timm-edl uses: each exists in the installed
version, is imported in one module only, and a missing one is reported by name."""
import importlib
import re
from pathlib import Path

import pytest

import accelerate
import timm
from timm_edl import _accelerate_compat, _timm_compat

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_edl'


@pytest.mark.parametrize('name', sorted(_timm_compat.PRIVATE_NAMES))
def test_every_private_timm_name_exists(name):
    module, attr = _timm_compat.PRIVATE_NAMES[name]
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        pytest.fail(f"timm {timm.__version__} has no {module}.{attr} (timm_edl._timm_compat.{name}); timm-edl was "
                    f"checked with timm {', '.join(_timm_compat.TIMM_CHECKED)}")
    assert getattr(_timm_compat, name) is found


def test_a_missing_private_name_is_reported_by_name(monkeypatch):
    monkeypatch.setitem(_timm_compat.PRIVATE_NAMES, 'gone', ('timm.models._hub', '_no_such_name'))
    with pytest.raises(ImportError, match=r'timm\.models\._hub\._no_such_name') as info:
        _timm_compat._private('gone')
    assert f'timm {timm.__version__}' in str(info.value) and _timm_compat.TIMM_CHECKED[0] in str(info.value)


def test_the_checked_timm_version_is_the_installed_one():
    assert timm.__version__ in _timm_compat.TIMM_CHECKED, (
        f"timm {timm.__version__} is installed: check the names of timm_edl/_timm_compat.py against it and add it "
        f"to TIMM_CHECKED")
    assert accelerate.__version__ in _accelerate_compat.ACCELERATE_CHECKED, (
        f"accelerate {accelerate.__version__} is installed: check timm_edl/_accelerate_compat.py against it")


@pytest.mark.parametrize('cls, method', _accelerate_compat.PRIVATE_NAMES, ids=lambda v: getattr(v, '__name__', v))
def test_every_private_accelerate_name_exists(cls, method):
    assert callable(getattr(cls, method, None)), (
        f"accelerate {accelerate.__version__} has no {cls.__name__}.{method}; timm-edl was checked with accelerate "
        f"{', '.join(_accelerate_compat.ACCELERATE_CHECKED)}")


def test_the_reset_lets_the_next_accelerator_take_other_settings():
    from accelerate import Accelerator
    Accelerator(cpu=True, mixed_precision='no')
    with pytest.raises(ValueError, match='already been initialized'):  # what the reset is for
        Accelerator(cpu=True, mixed_precision='bf16')
    _accelerate_compat.reset_accelerate_state()
    assert Accelerator(cpu=True, mixed_precision='bf16').mixed_precision == 'bf16'
    _accelerate_compat.reset_accelerate_state()


def test_private_names_are_imported_in_the_compat_modules_only():
    private = re.compile(r'\b(?:timm\.(?:models|layers)\._\w+|_reset_state)\b')
    compat = {PACKAGE / '_timm_compat.py', PACKAGE / '_accelerate_compat.py'}
    found = {str(p.relative_to(PACKAGE)): sorted(set(private.findall(p.read_text(encoding='utf-8'))))
             for p in sorted(PACKAGE.rglob('*.py')) if p not in compat}
    assert not {k: v for k, v in found.items() if v}
