"""``timm-edl convert``: convert a timm CNN and write an exported (Hub-ready) folder."""
import argparse
import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..convert import EDL_DEFAULTS, POLICIES, convert_to_edl
from ..hub import export, resolve_model
from ..layers import edl_layers
from .args import add_model_options, model_options, parse_kwargs
from .errors import UsageError, run


def _relative_logit_error(original: nn.Module, converted: nn.Module, input_size: Sequence[int]) -> float:
    x = torch.rand(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = original.eval()(x)
        b = converted.eval()(x)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='timm-edl convert',
        description='Turn the Conv2d layers of a timm CNN into EDL layers (dictionaries initialised from '
                    'the conv weights) and write a Hub-ready folder (model.safetensors, config.json, README.md) '
                    'that timm_edl.hub.load() reads.')
    add_model_options(p)  # e.g. --model resnet18, resnet50.a1_in1k; --checkpoint: weights of the original model
    p.add_argument('--pretrained', action='store_true', help="load timm's pretrained weights first (needs the Hub)")
    p.add_argument('--policy', default='default',
                   help=f"which convs: {', '.join(sorted(POLICIES))} (default: default)")
    p.add_argument('--mode', choices=('preserve', 'edl'), default='preserve',
                   help="'preserve' (default): function-preserving EDL layers (same outputs as the original); "
                        "'edl': the EDLNet defaults (num_steps=2, lam=0.1, unit-norm atoms, L by Lanczos)")
    p.add_argument('--edl-cfg', nargs='*', metavar='KEY=VALUE', help='EDLConv2d options, e.g. beta_learnable=false')
    p.add_argument('--out', required=True, help='output folder (must be empty or absent)')
    p.add_argument('--model-name', help='published model name (default: <model>_edl[.<tag>])')
    p.add_argument('--overwrite', action='store_true', help='replace the files of an existing export in --out')
    p.add_argument('--no-check', action='store_true', help='skip the logits comparison (preserve mode)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl convert``: convert a timm CNN and write an exported (Hub-ready) folder."""
    args = _parser().parse_args(argv)
    return run('convert', lambda: _convert(args), failures=(OSError, RuntimeError))


def _convert(args: argparse.Namespace) -> int:
    options = model_options(args)
    edl_cfg = parse_kwargs(args.edl_cfg, '--edl-cfg')
    model, _ = resolve_model(**options, pretrained=args.pretrained)
    original = copy.deepcopy(model) if args.mode == 'preserve' and not args.no_check else None
    if args.mode == 'preserve':
        convert_to_edl(model, args.policy, preserve_function=True, **edl_cfg)
    else:
        convert_to_edl(model, args.policy, **{**EDL_DEFAULTS, **edl_cfg})
    n = len(edl_layers(model))
    if n == 0:
        raise UsageError(f"policy {args.policy!r} selects no convertible Conv2d in {args.model}; policies: "
                         f"{', '.join(sorted(POLICIES))}")
    print(f"converted {n} convolution(s) of {args.model} to EDL layers ({args.mode} mode)")
    if original is not None:
        input_size = model.pretrained_cfg.get('input_size', (3, 224, 224))
        err = _relative_logit_error(original, model, input_size)
        print(f"max |logit difference| / max |logit| on random inputs {tuple(input_size)}: {err:.2e}")
    out = export(model, args.out, model_name=args.model_name, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
