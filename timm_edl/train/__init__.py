"""``timm-edl train``: adversarial training and fine-tuning of EDLNets on accelerate.

Usage::

    timm-edl train --config recipes/edlnet_resnet18_cifar10_pgd.yaml [--key value ...]
    accelerate launch -m timm_edl.train --config recipes/... [--key value ...]
    timm-edl train --output runs/my_run --resume            # continue the last saved state

Any key of :class:`TrainConfig` can be overridden on the command line
(``--epochs 2``, ``--eps 8/255``, ``--model-kwargs.edl_layers none``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .config import (
    ConfigError, TrainConfig, apply_overrides, build_config, config_keys, load_config, parse_overrides,
    read_recipe,
)
from .trainer import RunDirError, TrainResult, latest_checkpoint, open_run, train

__all__ = ['main', 'train', 'open_run', 'TrainConfig', 'TrainResult', 'ConfigError', 'RunDirError', 'load_config',
           'resolve_config', 'latest_checkpoint']


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-edl train', allow_abbrev=False,
        description='Adversarial training / fine-tuning of EDLNets (and their conv twins) on accelerate. '
                    'Multi-GPU: accelerate launch -m timm_edl.train --config ...',
        epilog='Every config key can be overridden: --key value (e.g. --epochs 2 --eps 8/255 '
               '--model-kwargs.edl_layers none). Keys: ' + ', '.join(config_keys()),
    )
    parser.add_argument('-c', '--config', help='recipe YAML (see recipes/); optional with --resume')
    parser.add_argument('--resume', nargs='?', const=True, default=None, metavar='CHECKPOINT',
                        help='continue from the last saved state in the output folder (or from CHECKPOINT)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output folder (only one written by timm-edl)')
    parser.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    return parser


def resolve_config(config: Optional[str], overrides: List[str], resume=None) -> TrainConfig:
    """The config of a run: recipe + overrides, or (``--resume`` without ``--config``) the
    config saved in the output folder + overrides."""
    if config is None and resume:
        pairs = parse_overrides(overrides)
        output = next((v for k, s, v in pairs if k == 'output' and s is None), None)
        if output is None and isinstance(resume, str):
            output = Path(resume).resolve().parents[1]  # <output>/checkpoints/step_*
        if output is None:
            raise ConfigError('--resume without --config needs --output <run folder> (or a checkpoint path)')
        saved = Path(str(output)) / 'config.yaml'
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} not found; is {output} a timm-edl run folder?")
        values = read_recipe(saved)
        values.pop('stop_after_steps', None)  # a one-shot kill switch, not part of the recipe
        values = apply_overrides(values, pairs)
        values['output'] = str(output)
        return build_config(values, str(saved))
    return load_config(config, overrides)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = resolve_config(args.config, rest, args.resume)
        if args.print_config:
            import yaml
            from .config import config_to_dict
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end='')
            return 0
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as error:
        print(f"timm-edl train: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # data / weights problems get a one-line message too
        from ..data import DatasetError
        from ..weights import UnsafeCheckpointError
        from ..models.edlnet import PretrainedWeightsUnavailable
        if isinstance(error, (DatasetError, PretrainedWeightsUnavailable, UnsafeCheckpointError)):
            print(f"timm-edl train: error: {error}", file=sys.stderr)
            return 2
        raise
    return 3 if result.stop_reason == 'stop_after_steps' else 0  # a time-budget stop is a clean stop
