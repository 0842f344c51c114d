"""The one grammar of ``KEY=VALUE`` options (``--model-kwargs``, ``--edl-cfg``, ``--info``) of every command.

Values are YAML flow values, as in the recipes and ``timm-edl train``'s ``--key value``
overrides: numbers, ``true``/``false``, ``null``, ``[8, 16]``, ``{beta: 0.5, num_steps: 3}``,
JSON; anything else is a string (``edl_layers=none``).
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ['KwargsError', 'parse_kwargs', 'parse_label_names']


class KwargsError(ValueError):
    """A ``KEY=VALUE`` entry that does not parse (the message names the option)."""


def parse_kwargs(items: Optional[Sequence[str]], option: str = '--model-kwargs') -> Dict[str, Any]:
    """``['layers=[1, 1]', 'edl_cfg={beta: 0.5}', 'edl_layers=none']`` ->
    ``{'layers': [1, 1], 'edl_cfg': {'beta': 0.5}, 'edl_layers': 'none'}``."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition('=')
        if not sep or not key.strip():
            raise KwargsError(f"{option}: expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ''
        except yaml.YAMLError as e:
            raise KwargsError(f"{option}: the value of {key.strip()!r} is not valid YAML ({text!r}): "
                              f"{str(e).splitlines()[0]}") from None
        if isinstance(value, str) and value.strip().startswith('(') and value.strip().endswith(')'):
            raise KwargsError(f"{option}: {key.strip()}={text}: write lists in brackets, "
                              f"{key.strip()}=[{value.strip()[1:-1]}] (values are YAML)")
        out[key.strip()] = value
    return out


def parse_label_names(text: Optional[str]) -> Optional[List[str]]:
    """Class names from a ``.json`` list, a text file (one per line) or ``a,b,c``."""
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        content = path.read_text(encoding='utf-8')
        if path.suffix == '.json':
            return [str(x) for x in json.loads(content)]
        return [line.strip() for line in content.splitlines() if line.strip()]
    return [x.strip() for x in text.split(',')]
