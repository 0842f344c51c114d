"""The command-line grammar shared by every command: the ``KEY=VALUE`` options
(``--model-kwargs``, ``--edl-cfg``, ``--info``) and the model option group.

Values are YAML flow values, as in the recipes and ``timm-edl train``'s ``--key value``
overrides: numbers, ``true``/``false``, ``null``, ``[8, 16]``, ``{beta: 0.5, num_steps: 3}``,
JSON; anything else is a string (``edl_layers=none``).  An entry that is a whole YAML
mapping, ``'{edl_layers: none, widths: [8, 16]}'``, gives several keys at once.

The model group (:func:`add_model_options`): ``--model``, ``--arch``, ``--model-kwargs``,
``--checkpoint``, ``--allow-pickle``, turned by :func:`model_options` into the keyword
arguments of :func:`timm_edl.hub.resolve_model`.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ['KwargsError', 'parse_kwargs', 'parse_label_names', 'add_model_options', 'model_options', 'add_data_options']


class KwargsError(ValueError):
    """A ``KEY=VALUE`` entry that does not parse (the message names the option)."""


def _mapping(item: str, option: str) -> Dict[str, Any]:
    try:
        value = yaml.safe_load(item)
    except yaml.YAMLError as e:
        raise KwargsError(f"{option}: {item!r} is not a valid YAML mapping: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise KwargsError(f"{option}: expected key=value or a mapping {{key: value}}, got {item!r}")
    return value


def parse_kwargs(items: Optional[Sequence[str]], option: str = '--model-kwargs') -> Dict[str, Any]:
    """``['layers=[1, 1]', 'edl_cfg={beta: 0.5}', 'edl_layers=none']`` ->
    ``{'layers': [1, 1], 'edl_cfg': {'beta': 0.5}, 'edl_layers': 'none'}``."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if str(item).strip().startswith('{'):
            out.update(_mapping(str(item), option))
            continue
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


def add_model_options(parser: argparse.ArgumentParser, *, required: bool = True,
                      arch: bool = True) -> argparse._ArgumentGroup:
    """The ``model`` option group of every command that takes a model.  Nothing is set unless
    given (defaults are None / False), so a command can tell given options from defaults;
    ``arch=False`` hides ``--arch`` from the help (the command rejects it itself)."""
    g = parser.add_argument_group('model')
    g.add_argument('--model', required=required,
                   help='timm name or name.tag (a tag with published weights loads them), hf-hub:ORG/REPO, '
                        'local-dir:FOLDER or a folder (an export), or a weights file (.safetensors; needs --arch '
                        'or the config.json beside it)')
    g.add_argument('--arch', default=None,
                   help='timm architecture of a bare weights file given as --model' if arch else argparse.SUPPRESS)
    g.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                   help="timm.create_model arguments, YAML values: channels=[8,16] edl_layers=none "
                        "(or one mapping '{edl_layers: none}')")
    g.add_argument('--checkpoint', default=None,
                   help='weights loaded into the model once built (.safetensors; .pth/.pt/.bin need --allow-pickle)')
    g.add_argument('--allow-pickle', action='store_true',
                   help='accept .pth/.pt/.bin weights you trust (read with torch.load(weights_only=True))')



def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of :func:`add_model_options` that were given, as keyword arguments of
    :func:`timm_edl.hub.resolve_model` (``spec``, ``model_kwargs``, ``arch``, ``checkpoint``,
    ``allow_pickle``).  Raises :class:`KwargsError` for a bad ``--model-kwargs`` entry."""
    given = {'spec': args.model, 'arch': args.arch, 'checkpoint': args.checkpoint,
             'allow_pickle': args.allow_pickle or None,
             'model_kwargs': None if args.model_kwargs is None else parse_kwargs(args.model_kwargs)}
    return {key: value for key, value in given.items() if value is not None}


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data option group of the evaluation commands (``eval``, ``certify``): ``--dataset``,
    ``--data-dir``, ``--download``, ``--split``, ``--n-ex``, ``--image-size``."""
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default='cifar10',
                   help='cifar10, cifar100, cifar10-jpeg, tiny-imagenet, imagefolder, fashion-mnist, '
                        'fashion-mnist-small')
    g.add_argument('--data-dir', default=None, help='where the dataset is (default: $TIMM_EDL_DATA_DIR or .data)')
    g.add_argument('--download', action='store_true',
                   help='download cifar10 / cifar100 / fashion-mnist through torchvision if absent (needs network)')
    g.add_argument('--split', default='test', help="held-out split ('val' for tiny-imagenet / image folders)")
    g.add_argument('--n-ex', type=int, default=None, help='first n test points, in order (default: all)')
    g.add_argument('--image-size', type=int, default=None, help='resize + centre-crop images (image folders)')
