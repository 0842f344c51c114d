"""``timm-edl certify``: certified L2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, 2019).

Example::

    timm-edl certify --model edlnet_resnet18.cifar10 --dataset cifar10 --data-dir data \\
        --sigma 0.25 --n0 100 --n 100000 --alpha 0.001 --n-ex 500 --batch-size 1000 --out results/

Each point gets Cohen et al.'s CERTIFY (:func:`timm_edl.evaluation.smoothing.certify`): a
prediction of the smoothed classifier and an L2 radius, or an abstention.  The points are
certified in chunks of ``--chunk-size``; after each chunk the finished points are saved in
``<out>/.certify-state/certify-<key>.json``, the key a hash of (weights, data, sigma, n0, n,
alpha, seed, device type).  Rerunning the same command skips the finished points, so a
killed run loses at most one chunk, and the result equals an uninterrupted run's (each
point's noise is seeded by the point's index alone).

Exit status (:mod:`timm_edl.cli.errors`): 0 done; 2 a usage error (the message names the
flag); 75 (:data:`~timm_edl.cli.errors.EXIT_INCOMPLETE`) stopped at a chunk boundary by
``--time-budget-min`` with points left (rerun the same command to continue); 130 interrupted
(rerun the same command to continue).
"""
import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .args import add_data_options, add_model_options, model_options
from .errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, UsageError, run

__all__ = ['main', 'build_parser', 'STATE_DIR']

STATE_DIR = '.certify-state'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='timm-edl certify',
        description='Certified L2 robustness by randomized smoothing (Cohen et al., ICML 2019): per point the '
                    'smoothed classifier\'s prediction and a radius it provably keeps with probability >= 1 - alpha. '
                    'Resumable: rerun the same command after an interruption.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_data_options(p)
    g = p.add_argument_group('smoothing')
    g.add_argument('--sigma', type=float, required=True,
                   help='standard deviation of the Gaussian noise, on [0, 1] pixels (e.g. 0.12, 0.25, 0.5)')
    g.add_argument('--n0', type=int, default=100, help='noisy samples per point that select the top class')
    g.add_argument('--n', type=int, default=100_000, help='noisy samples per point that bound its probability')
    g.add_argument('--alpha', type=float, default=0.001, help='failure probability of each certificate')
    g = p.add_argument_group('run')
    g.add_argument('--batch-size', type=int, default=1000, help='noisy samples per forward pass')
    g.add_argument('--seed', type=int, default=0, help="seed of the noise (each point's noise: seed and its index)")
    g.add_argument('--chunk-size', type=int, default=100, help='points certified between two saves of the state')
    g.add_argument('--time-budget-min', type=float, default=None,
                   help='stop at the first chunk boundary after which the next chunk would pass this many minutes '
                        f'(exit status {EXIT_INCOMPLETE}); rerun the same command to continue')
    g.add_argument('--device', default='auto', help="cpu, cuda, cuda:1, or auto")
    g.add_argument('--out', default='results', help='output folder')
    g.add_argument('--overwrite', action='store_true', help='replace result files of the same name')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run('certify', lambda: _run(args, argv))
    except KeyboardInterrupt:
        print(f"\ntimm-edl certify: interrupted. Rerun the same command to continue from the finished chunks "
              f"in {Path(args.out) / STATE_DIR}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _check(args: argparse.Namespace) -> None:
    """Every flag that can be checked before anything is loaded; a bad one raises UsageError naming it."""
    if not args.sigma > 0:
        raise UsageError(f"--sigma must be > 0, got {args.sigma}")
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    for flag, value in (('--n0', args.n0), ('--n', args.n), ('--batch-size', args.batch_size),
                        ('--chunk-size', args.chunk_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.n_ex is not None and args.n_ex < 1:
        raise UsageError(f"--n-ex must be >= 1, got {args.n_ex}")
    if args.time_budget_min is not None and not args.time_budget_min > 0:
        raise UsageError(f"--time-budget-min must be > 0, got {args.time_budget_min}")


def _device(name: str):
    from ..evaluation.config import OptionError, resolve_device
    try:
        return resolve_device(name)
    except OptionError as e:
        raise UsageError(e.worded(lambda option: '--' + option.replace('_', '-'))) from None


# ----------------------------------------------------------------------------- the state of a run

def _state_path(out_dir: Path, model, x, y, args: argparse.Namespace, device) -> Path:
    from ..evaluation.core import state_key
    from ..weights import state_dict_digest
    key = state_key(weights=state_dict_digest(model), data=state_dict_digest({'x': x, 'y': y}), sigma=args.sigma,
                    n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed, device=device.type)
    return out_dir / STATE_DIR / f'certify-{key}.json'


def _load_state(path: Path) -> Dict[str, Any]:
    """``{'records': {index: record}, 'seconds': certification seconds so far}`` (empty when absent)."""
    if not path.is_file():
        return {'records': {}, 'seconds': 0.0}
    state = json.loads(path.read_text(encoding='utf-8'))
    return {'records': {int(r['index']): r for r in state['records']}, 'seconds': float(state['seconds'])}


def _save_state(path: Path, state: Dict[str, Any], args: argparse.Namespace) -> None:
    """Written to a temporary file, then renamed: a kill leaves the previous state or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {'schema': 'timm-edl-certify-state/1', 'sigma': args.sigma, 'n0': args.n0, 'n': args.n,
            'alpha': args.alpha, 'seed': args.seed, 'seconds': state['seconds'],
            'records': [state['records'][i] for i in sorted(state['records'])]}
    tmp = path.with_name(f'.{path.name}.partial')
    tmp.write_text(json.dumps(body) + '\n', encoding='utf-8')
    os.replace(tmp, path)


def _certify_chunks(model, x, y, args: argparse.Namespace, device, state_path: Path) -> Dict[str, Any]:
    """Certify the points the state lacks, ``--chunk-size`` at a time, saving the state after
    each chunk; stop early (``state['complete'] = False``) when ``--time-budget-min`` would be passed."""
    from ..evaluation.runners import progress_bar
    from ..evaluation.smoothing import certify
    state = _load_state(state_path)
    state['resumed'] = len(state['records'])
    todo = [i for i in range(len(x)) if i not in state['records']]
    started, budget = time.time(), None if args.time_budget_min is None else 60 * args.time_budget_min
    with progress_bar(len(todo), 'certify', not args.no_progress) as bar:
        for k in range(0, len(todo), args.chunk_size):
            chunk = todo[k:k + args.chunk_size]
            t0 = time.time()
            for r in certify(model, x[chunk], y[chunk], sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                             batch=args.batch_size, seed=args.seed, indices=chunk, device=device, progress=bar.update):
                state['records'][r['index']] = r
            state['seconds'] += time.time() - t0
            _save_state(state_path, state, args)
            left = len(todo) - k - len(chunk)
            if left and budget is not None and time.time() - started + (time.time() - t0) > budget:
                state['complete'] = False
                return state
    state['complete'] = True
    return state


# ----------------------------------------------------------------------------- the command

def _run(args: argparse.Namespace, argv: List[str]) -> int:
    _check(args)
    model_opts = model_options(args)
    device = _device(args.device)
    import torch

    from ..data import DatasetError, dataset_info, get_dataset, load_tensors
    from ..evaluation.certify_report import build_report, markdown, output_stem, reserve_stem, write_outputs
    from ..evaluation.core import check_points, package_versions
    from ..evaluation.models import describe_model, load_model
    from ..evaluation.runners import predict_correct

    started = time.time()
    torch.manual_seed(args.seed)  # a randomly initialised model is the same for the same --seed
    info = dataset_info(args.dataset, args.data_dir, image_size=args.image_size)
    try:
        x, y = load_tensors(args.dataset, args.data_dir, args.split, args.n_ex, image_size=args.image_size,
                            download=args.download)
    except ValueError as e:  # e.g. --n-ex larger than the split
        raise UsageError(str(e)) from None
    model, source = load_model(**model_opts, num_classes=info.num_classes, in_chans=x.shape[1])
    model = model.to(device).eval()
    check_points(model, x, y, device, info.display_name, info)
    out_dir = Path(args.out)
    state_path = _state_path(out_dir, model, x, y, args, device)
    state = _certify_chunks(model, x, y, args, device, state_path)
    done = len(state['records'])
    if not state['complete']:
        print(f"timm-edl certify: stopped after the time budget (--time-budget-min {args.time_budget_min:g}): "
              f"{done} of {len(x)} points certified, saved in {state_path}. Rerun the same command to continue.",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    try:  # size of the whole split, for the report
        n_total = len(get_dataset(args.dataset, args.data_dir, args.split, image_size=args.image_size))
    except (DatasetError, ValueError, OSError):
        n_total = None
    clean = predict_correct(model, x, y, batch_size=args.batch_size, device=device, progress=False)
    description = describe_model(model, source, x[:min(len(x), 16)].to(device))
    data = {'name': info.name, 'display_name': info.display_name, 'split': args.split, 'n_ex': len(x),
            'n_total': n_total, 'lossy': bool(getattr(info, 'lossy', False)),
            'data_dir': None if args.data_dir is None else str(Path(args.data_dir).absolute())}
    timings = {'total': time.time() - started, 'certify': state['seconds'],
               'seconds_per_point': state['seconds'] / len(x), 'resumed_points': state['resumed']}
    report = build_report([state['records'][i] for i in range(len(x))], model=description, data=data,
                          sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                          batch_size=args.batch_size, device=str(device), base_clean_acc=int(clean.sum()) / len(x),
                          timings=timings, versions=package_versions())
    report['command'] = 'timm-edl certify ' + ' '.join(shlex.quote(a) for a in argv)
    stem = reserve_stem(out_dir, output_stem(report), args.overwrite)
    files = write_outputs(report, out_dir, stem)
    sys.stdout.write(markdown(report, files))
    sys.stdout.flush()
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
