"""``timm-edl train``: adversarial training and fine-tuning of EDLNets on accelerate.

Usage::

    timm-edl train --config recipes/edlnet_resnet18_cifar10_pgd.yaml [--key value ...]
    accelerate launch -m timm_edl.train --config recipes/... [--key value ...]
    timm-edl train --output runs/my_run --resume            # continue the last saved state

Any key of :class:`TrainConfig` can be overridden on the command line
(``--epochs 2``, ``--eps 8/255``, ``--model-kwargs.edl_layers none``).  The model options
shared by every command (:func:`timm_edl.cli.args.add_model_options`: ``--model``,
``--model-kwargs KEY=VALUE ...``, ``--checkpoint``, ``--allow-pickle``) set the recipe keys
``model``, ``model_kwargs`` (the whole mapping), ``checkpoint`` and ``allow_pickle``; they
apply before the ``--key value`` overrides, so ``--model-kwargs.KEY value`` adds to them.
``--arch`` is refused: a run builds ``model`` and loads ``--checkpoint`` into it.  Exit
status as for every command (:mod:`timm_edl.cli.errors`): 0 done (or stopped on
``time_budget_min`` with its state saved), 1 the run stopped before its end
(``stop_after_steps``), 2 a usage error (bad recipe key or value, unknown model, missing
dataset, output folder in use), 130 stopped by Ctrl-C at an optimizer step, its state saved
(a second Ctrl-C stops at once, losing the steps since the last save).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..train import ConfigError, TrainConfig, train
from ..train.config import (
    apply_overrides, build_config, config_keys, config_to_dict, load_config, parse_overrides, read_recipe,
)
from .args import add_model_options, model_options
from .errors import EXIT_INTERRUPTED, CommandFailed, UsageError, run

__all__ = ['main', 'resolve_config', 'model_values']


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-edl train', allow_abbrev=False,
        description='Adversarial training / fine-tuning of EDLNets (and their conv twins) on accelerate. '
                    'Multi-GPU: accelerate launch -m timm_edl.train --config ...',
        epilog='The model options set the recipe keys model, model_kwargs (the whole mapping), checkpoint and '
               'allow_pickle; --model is a timm name, local-dir:FOLDER or hf-hub:ORG/REPO and --arch is refused '
               '(initial weights come from --checkpoint). Every config key can be overridden: --key value (e.g. '
               '--epochs 2 --eps 8/255 --model-kwargs.edl_layers none, which adds one key to model_kwargs). '
               'Keys: ' + ', '.join(config_keys()),
    )
    parser.add_argument('-c', '--config', help='recipe YAML (see recipes/); optional with --resume')
    parser.add_argument('--resume', nargs='?', const=True, default=None, metavar='CHECKPOINT',
                        help='continue from the last saved state in the output folder (or from CHECKPOINT)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output folder (only one written by timm-edl)')
    parser.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    add_model_options(parser, required=False, arch=False)
    return parser


def model_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The model options given on the command line as recipe values (``--model`` -> ``model``, ...)."""
    if args.arch is not None:
        raise UsageError(f"--arch {args.arch}: train has no --arch; name the architecture with --model "
                         f"(e.g. --model edlnet_resnet18) and its initial weights with --checkpoint FILE")
    return {('model' if key == 'spec' else key): value for key, value in model_options(args).items()}


def resolve_config(config: Optional[str], overrides: List[str], resume=None,
                   model: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The config of a run: recipe + ``model`` (recipe values of the model options) +
    overrides, or (``--resume`` without ``--config``) the config saved in the output folder
    + ``model`` + overrides."""
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
        values = apply_overrides({**values, **(model or {})}, pairs)
        values['output'] = str(output)
        return build_config(values, str(saved))
    return load_config(config, overrides, model)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv)
    return run('train', lambda: _main(args, rest))


def _main(args: argparse.Namespace, rest: List[str]) -> int:
    cfg = resolve_config(args.config, rest, args.resume, model_values(args))
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end='')
        return 0
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.stop_reason == 'stop_after_steps':  # a time-budget stop is a clean stop
        raise CommandFailed(f"the run stopped after {cfg.stop_after_steps} optimizer steps (stop_after_steps) "
                            f"before its end; continue it with --resume --output {cfg.output}")
    if result.stop_reason == 'interrupted':
        print(f"timm-edl train: interrupted after {result.global_update} optimizer steps, state saved; continue "
              f"with: timm-edl train --resume --output {cfg.output}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
