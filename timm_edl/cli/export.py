"""``timm-edl export``: write a Hub-ready folder from a model and its weights."""
import argparse
from pathlib import Path
from typing import Optional, Sequence

from timm.models import parse_model_name

from ..hub import HUB_NAMESPACE, export, resolve_model
from ..hub.export import folder_files
from ..hub.load import CHECKPOINT_SUFFIXES
from ..models.edlnet import tags_with_weights
from .args import add_model_options, model_options, parse_label_names
from .errors import UsageError, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='timm-edl export',
        description='Write a Hub-ready folder (model.safetensors, config.json, README.md model card) from a '
                    'model and its weights: a timm name with --checkpoint, a name.tag with published weights '
                    '(a zoo model), or an export to re-export (e.g. to add evaluation results).')
    add_model_options(p)
    p.add_argument('--eval-results', nargs='*', metavar='JSON', help="evaluation entry point's JSON output(s)")
    p.add_argument('--certify-results', nargs='*', metavar='JSON',
                   help="`timm-edl certify`'s JSON output(s): a certified-robustness section and metrics in the card")
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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl export``: write a Hub-ready folder from a model and its weights."""
    args = _parser().parse_args(argv)
    return run('export', lambda: _export(args), failures=(OSError, RuntimeError))


def _export(args: argparse.Namespace) -> int:
    options = model_options(args)
    source, name = parse_model_name(args.model)
    # a registry name, not a folder or weights file (resolve_model tells them apart the same way)
    registry = source is None and not Path(args.model).exists() and not name.lower().endswith(CHECKPOINT_SUFFIXES)
    shipped = registry and name in tags_with_weights()  # a zoo tag: its pretrained weights
    if registry and not args.checkpoint and not shipped:
        raise UsageError("--checkpoint is required with a registry model name without pretrained weights (there "
                         f"is nothing to export from random weights); tags with weights: "
                         f"{', '.join(tags_with_weights()) or 'none'}")
    compare = {}
    for item in args.compare_results:
        label, sep, path = item.rpartition('=')
        if not sep or not label.strip() or not path:
            raise UsageError(f"--compare-results takes LABEL=JSON, got {item!r}")
        compare.setdefault(label.strip(), []).append(path)
    notes = Path(args.card_notes).read_text(encoding='utf-8') if args.card_notes else None
    model, _ = resolve_model(**options, pretrained=(shipped and not args.checkpoint) if registry else None)
    out = export(model, args.out, eval_results=args.eval_results or None,
                 label_names=parse_label_names(args.label_names), license=args.license,
                 datasets=args.datasets, overwrite=args.overwrite, model_name=args.model_name,
                 data_config=dict(input_size=tuple(args.input_size)) if args.input_size else None,
                 card_dir=args.card_dir, compare_results=compare or None, card_notes=notes,
                 certify_results=args.certify_results or None)
    print(f"wrote {out}")
    for rel, size in folder_files(out):
        print(f"  {rel}  {size:,} bytes")
    return 0
