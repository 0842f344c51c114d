"""``timm-edl demo``: the whole product on real data, in minutes on a CPU.

1. adversarially trains a small EDLNet and its conv twin with the same recipe and seed
   (``timm-edl train``);
2. evaluates both with ``timm-edl eval`` (clean, adaptive PGD, AutoAttack, and the
   gradient-masking checks);
3. exports the EDLNet as a Hub-ready folder whose card carries the measured numbers, and
   reloads it through ``timm.create_model('local-dir:...')``, checking identical logits;
4. prints a side-by-side table and where the files are.

Default data: ``fashion-mnist-small``, the real Fashion-MNIST subset shipped inside the
package (no download). ``--dataset cifar10 --data-dir DIR --recipe
recipes/edlnet_resnet18_cifar10_pgd.yaml`` runs the same pipeline on real CIFAR-10.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .cli.errors import CommandFailed, UsageError, run
from .train.config import RECIPES_DIR

DEFAULT_RECIPE = RECIPES_DIR / 'cpu_fashion_mnist_pgd.yaml'


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='timm-edl demo', description=__doc__.split('\n')[0])
    p.add_argument('--recipe', default=str(DEFAULT_RECIPE), help='training recipe for both models')
    p.add_argument('--dataset', default='fashion-mnist-small')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--train-n-ex', default='null', help="training images ('null': all of the dataset)")
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--n-ex', type=int, default=200, help='test points for every attack (first n, in order)')
    p.add_argument('--eps', default=None, help="attack radius (default: the recipe's eps)")
    p.add_argument('--attacks', default='autoattack,pgd')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None,
                   help='everything is written below this folder (default: a new runs/demo-<date>-<time>)')
    p.add_argument('--overwrite', action='store_true', help='replace an earlier demo in --out')
    return p


def _train(args, name: str, extra: List[str]) -> Path:
    from .train import load_config, train
    overrides = ['--dataset', args.dataset, '--train-n-ex', args.train_n_ex, '--epochs', str(args.epochs),
                 '--seed', str(args.seed), '--output', str(Path(args.out) / name)] + extra
    if args.data_dir:
        overrides += ['--data-dir', args.data_dir]
    cfg = load_config(args.recipe, overrides)
    start = time.time()
    result = train(cfg, overwrite=args.overwrite)
    print(f'[demo] trained {name} in {time.time() - start:.0f} s -> {result.output}', flush=True)
    return Path(result.output) / 'final', cfg


def _evaluate(args, folder: Path, name: str, eps: str) -> Dict:
    from .cli.eval import main as eval_main
    out = Path(args.out) / 'eval' / name
    argv = ['--model', f'local-dir:{folder}', '--dataset', args.dataset, '--n-ex', str(args.n_ex),
            '--eps', eps, '--attacks', args.attacks, '--seed', str(args.seed), '--out', str(out)]
    if args.data_dir:
        argv += ['--data-dir', args.data_dir]
    if args.overwrite:
        argv += ['--overwrite']
    code = eval_main(argv)
    if code not in (0, None):
        raise CommandFailed(f'the evaluation of {name} failed (exit status {code})')
    reports = sorted(out.glob('*.json'), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise CommandFailed(f'the evaluation wrote no JSON report in {out}')
    report = json.loads(reports[-1].read_text())
    report['_path'] = str(reports[-1])
    return report


def _export_and_reload(args, folder: Path, report: Dict) -> Path:
    import timm
    from . import hub
    from .data import load_tensors
    model = hub.load(f'local-dir:{folder}').eval()
    export_dir = Path(args.out) / 'export' / folder.parent.name
    hub.export(model, export_dir, eval_results=report['_path'], overwrite=args.overwrite)
    reloaded = timm.create_model(f'local-dir:{export_dir}', pretrained=True).eval()
    x, _ = load_tensors(args.dataset, args.data_dir, 'test', n_ex=min(args.n_ex, 64))
    with torch.no_grad():
        same = torch.equal(model(x), reloaded(x))
    if not same:
        raise CommandFailed('the reloaded export does not reproduce the logits')
    print(f"[demo] exported {export_dir}; timm.create_model('local-dir:...') reproduces the logits exactly")
    return export_dir


def _accuracy(report: Dict, key: str) -> Optional[float]:
    value = report.get(key)
    return None if value is None else float(value)


def _fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.2f} %'


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run('demo', lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = time.strftime('runs/demo-%Y%m%d-%H%M%S')
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f'{out} already holds a demo run; pass --overwrite to replace it or --out elsewhere')
    start = time.time()
    edl_final, cfg = _train(args, 'edlnet', [])
    conv_final, _ = _train(args, 'conv_twin', ['--model-kwargs.edl_layers', 'none'])
    eps = args.eps or str(cfg.eps)
    reports = {name: _evaluate(args, folder, name, eps)
               for name, folder in (('edlnet', edl_final), ('conv_twin', conv_final))}
    export_dir = _export_and_reload(args, edl_final, reports['edlnet'])

    label = reports['edlnet'].get('data_label') or reports['edlnet'].get('dataset') or args.dataset
    rows = [('clean', 'clean_acc'), ('adaptive PGD', 'pgd_acc'), ('AutoAttack', 'autoattack_acc')]
    print(f'\n[demo] {label}, {args.n_ex} test points, Linf eps = {eps}, same recipe and seed '
          f'({Path(args.recipe).name}, {args.epochs} epochs):\n')
    print('| accuracy | EDLNet | conv twin |')
    print('|---|---|---|')
    for title, key in rows:
        print(f'| {title} | {_fmt(_accuracy(reports["edlnet"], key))} | {_fmt(_accuracy(reports["conv_twin"], key))} |')
    for name, report in reports.items():
        failed = report.get('failed_checks') or []
        print(f'[demo] {name}: gradient-masking checks ' + ('FAILED: ' + ', '.join(map(str, failed)) if failed else 'passed'))
    print(f'\n[demo] runs: {edl_final.parent}, {conv_final.parent}\n[demo] reports: {Path(args.out) / "eval"}'
          f'\n[demo] Hub-ready export: {export_dir}\n[demo] total {time.time() - start:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
