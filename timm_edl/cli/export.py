"""``timm-edl export``: write a Hub-ready folder from a model and its weights."""
import argparse
import sys
from typing import Optional, Sequence

from timm.models import parse_model_name

from ..hub import HUB_NAMESPACE, export, resolve_model
from ..hub.export import folder_files
from ..models.edlnet import tags_with_weights
from .args import parse_kwargs, parse_label_names


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl export``: write a Hub-ready folder from a model and its weights."""
    p = argparse.ArgumentParser(
        prog='timm-edl export',
        description='Write a Hub-ready folder (model.safetensors, config.json, README.md model card).')
    p.add_argument('--model', required=True,
                   help="timm name (e.g. edlnet_resnet18) with --checkpoint, a name.tag with pretrained weights "
                        "(e.g. a zoo model), or an export to re-export: "
                        "local-dir:PATH / hf-hub:ID (e.g. to add evaluation results)")
    p.add_argument('--checkpoint', help='weights to export (.safetensors; .pth/.bin need --allow-pickle)')
    p.add_argument('--allow-pickle', action='store_true', help='accept a pickle checkpoint (torch.load weights_only)')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE',
                   help='timm.create_model arguments the checkpoint was trained with (YAML values, see timm_edl.cli.args)')
    p.add_argument('--eval-results', nargs='*', metavar='JSON', help="evaluation entry point's JSON output(s)")
    p.add_argument('--compare-results', nargs='*', metavar='LABEL=JSON', default=[],
                   help="another model's evaluation JSON on the same points, for the card's comparison table, "
                        "e.g. 'conv twin=runs/twin/eval.json' (repeat the label for several JSONs)")
    p.add_argument('--card-notes', metavar='FILE', help='Markdown file appended to the card (e.g. how it was trained)')
    p.add_argument('--label-names', help='class names: a .json list, a text file (one per line) or a,b,c')
    p.add_argument('--license', default='apache-2.0')
    p.add_argument('--dataset', nargs='*', dest='datasets', help='Hub dataset ids for the card')
    p.add_argument('--model-name', help=f'published name; the Hub repo is {HUB_NAMESPACE}/<name>')
    p.add_argument('--out', required=True, help='output folder (empty or absent)')
    p.add_argument('--overwrite', action='store_true', help='replace an earlier export in --out')
    p.add_argument('--input-size', nargs=3, type=int, metavar=('C', 'H', 'W'),
                   help='image size to record in pretrained_cfg (default: from the evaluated dataset)')
    p.add_argument('--card-dir', help="also write the card to CARD_DIR/<name>.md (use hub_cards/ when publishing)")
    args = p.parse_args(argv)
    try:
        kwargs = parse_kwargs(args.model_kwargs, '--model-kwargs')
        source, name = parse_model_name(args.model)
        shipped = source is None and name in tags_with_weights()  # a zoo tag: its pretrained weights
        if source is None and not args.checkpoint and not shipped:
            print("timm-edl export: error: --checkpoint is required with a registry model name without "
                  "pretrained weights (there is nothing to export from random weights); tags with weights: "
                  f"{', '.join(tags_with_weights()) or 'none'}", file=sys.stderr)
            return 2
        compare = {}
        for item in args.compare_results:
            label, sep, path = item.rpartition('=')
            if not sep or not label.strip() or not path:
                print(f"timm-edl export: error: --compare-results takes LABEL=JSON, got {item!r}", file=sys.stderr)
                return 2
            compare.setdefault(label.strip(), []).append(path)
        notes = None
        if args.card_notes:
            with open(args.card_notes, encoding='utf-8') as f:
                notes = f.read()
        model, _ = resolve_model(args.model, model_kwargs=kwargs, checkpoint=args.checkpoint,
                                 pretrained=(shipped and not args.checkpoint) if source is None else None,
                                 allow_pickle=args.allow_pickle)
        out = export(model, args.out, eval_results=args.eval_results or None,
                     label_names=parse_label_names(args.label_names), license=args.license,
                     datasets=args.datasets, overwrite=args.overwrite, model_name=args.model_name,
                     data_config=dict(input_size=tuple(args.input_size)) if args.input_size else None,
                     card_dir=args.card_dir, compare_results=compare or None, card_notes=notes)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"timm-edl export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    for rel, size in folder_files(out):
        print(f"  {rel}  {size:,} bytes")
    return 0
