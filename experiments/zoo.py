"""The zoo: train, evaluate, export and ship the CPU-trained EDLNets of ``timm-edl`` (``make zoo``).

For each dataset (Fashion-MNIST, CIFAR-10-JPEG) two jobs, each with the project's own
commands (``timm_edl.train`` on the recipe, ``timm-edl eval``):

* ``edl``: ``edlnet_resnet8_in`` on ``recipes/edlnet_resnet8_in_<dataset>_pgd.yaml``;
* ``conv``: its conv twin (``edl_layers: none``), same recipe, same seed.

Every model gets two evaluations: clean + PGD-20 on the whole test set, and AutoAttack
standard + PGD-20 + noise + every gradient-masking check on the first 1,000 test points.
A finished job is one JSON in ``experiments/cache/zoo/<dataset>/<arm>.json`` (spec, training
curve, both evaluation reports, wall time, commit, machine) plus its final weights folder
``<arm>_final/`` (committed: a later session resumes from them and never retrains); runs go
to ``runs/zoo/`` (not committed).  A cached job made with other settings is an error.

Then, from the cache only, for each dataset whose two jobs are done and whose checks all pass:

* ``timm-edl export`` of the EDL model with both evaluation JSONs and the conv twin's
  numbers on the same points, card to ``hub_cards/<model_name>.md``;
* its ``model.safetensors`` copied to ``timm_edl/_zoo/<model_name>.safetensors`` and recorded
  (sha256, bytes, commit, wall times) in ``timm_edl/_zoo/manifest.json``, which makes
  ``timm.create_model('<model_name>', pretrained=True)`` load it;
* ``docs/zoo.md`` (zoo table, curves, per-check status) and the README's zoo table.

::

    python experiments/zoo.py --jobs 2          # make zoo: everything, resuming from the cache
    python experiments/zoo.py --ship-only       # export + ship + tables from the cache
    python experiments/zoo.py --size smoke --cache-dir /tmp/c --run-dir /tmp/r --zoo-dir /tmp/z \\
        --card-dir /tmp/cards --out-md /tmp/zoo.md --readme /tmp/README.md   # seconds, for the test
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import elastic_decision as ed
import paper_claims as pc

REPO = pc.REPO
CACHE_VERSION = 1
ARCH = 'edlnet_resnet8_in'
ARMS = {'edl': [], 'conv': ['--model-kwargs.edl_layers', 'none']}
DATASETS = {
    'fashion-mnist': dict(tag='fashion_mnist_pgd_linf', label='Fashion-MNIST', eps='0.1', eps_text='0.1',
                          sweep='0,0.05,0.1,0.2', recipe='recipes/edlnet_resnet8_in_fashion_mnist_pgd.yaml',
                          n_train=60000),
    'cifar10-jpeg': dict(tag='cifar10_jpeg_pgd_linf', label='CIFAR-10-JPEG', eps='8/255', eps_text='8/255',
                         sweep='0,4/255,8/255,16/255', recipe='recipes/edlnet_resnet8_in_cifar10_jpeg_pgd.yaml',
                         n_train=50000),
}
SECTION = 'zoo'


@dataclasses.dataclass(frozen=True)
class Size:
    """What sets the size of the zoo run (recorded in every cached job)."""
    name: str
    datasets: tuple[str, ...]
    overrides: tuple[str, ...]  # extra training overrides (none for the real zoo: the recipes are the spec)
    full_n: int | None          # clean + PGD-20 on the first full_n test points (None: all)
    aa_n: int                   # AutoAttack + checks on the first aa_n test points
    check_n: int
    aa_attacks: str | None      # None: AutoAttack standard


SIZES = {
    'smoke': Size('smoke', ('fashion-mnist',), ('--train-n-ex', '256', '--epochs', '1', '--val-n-ex', '64'),
                  64, 32, 16, 'apgd-ce'),
    'cpu': Size('cpu', tuple(DATASETS), (), None, 1000, 200, None),
}


def model_name(ds: str) -> str:
    return f"{ARCH}.{DATASETS[ds]['tag']}"


def job_spec(size: Size, ds: str, arm: str) -> dict[str, Any]:
    info = DATASETS[ds]
    overrides = ['--num-workers', '0', '--progress', 'never', '--keep-checkpoints', '1'] + ARMS[arm] + list(size.overrides)
    common = ['--dataset', ds, '--threat-model', 'Linf', '--eps', info['eps'], '--seed', '0',
              '--device', 'cpu', '--no-progress', '--overwrite']
    aa = ['--aa-attacks', size.aa_attacks] if size.aa_attacks else ['--version', 'standard']
    surrogate = ['--surrogate', 'twin'] if arm == 'edl' else []
    eval_aa = (['--attacks', 'noise,pgd,autoattack', '--pgd-steps', '20', '--n-ex', str(size.aa_n),
                '--batch-size', '250', '--check-n', str(size.check_n), '--grad-points', '4', '--grad-dirs', '16',
                '--eps-sweep', info['sweep']] + aa + surrogate + common)
    eval_full = (['--attacks', 'pgd', '--pgd-steps', '20', '--no-checks', '--batch-size', '500']
                 + (['--n-ex', str(size.full_n)] if size.full_n else []) + common)
    return {'kind': 'zoo', 'cache_version': CACHE_VERSION, 'size': dataclasses.asdict(size), 'dataset': ds,
            'arm': arm, 'recipe': info['recipe'], 'overrides': overrides, 'evals': {'full': eval_full, 'aa': eval_aa}}


def run_job(job_dir: str, cache: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (dataset, arm); cache its JSON and final weights (worker process)."""
    pc._single_thread()
    started = time.time()
    job = Path(job_dir)
    train, evals = ed.train_and_evaluate(job_dir, spec)
    cache = Path(cache)
    final = cache.with_name(cache.stem + '_final')
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    for f in ('model.safetensors', 'config.json'):
        shutil.copy2(job / 'train' / 'final' / f, final / f)
    result = {'spec': spec, 'train': {k: train[k] for k in ('wall_seconds', 'cpu_seconds', 'epochs')},
              'train_command': f"timm-edl train --config {spec['recipe']} "
                               + ' '.join(map(shlex.quote, spec['overrides'])),
              'evals': evals, 'wall_seconds': time.time() - started, 'commit': pc._git_commit(),
              'machine': pc._machine(), 'finished': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}
    pc._write_json(cache, result)
    return result


def plan(size: Size, cache_dir: Path, run_dir: Path) -> list[tuple[str, Path, Path, dict[str, Any]]]:
    """(key, job folder, cache file, spec) of every job: the EDL models first."""
    return [(f'{ds}/{arm}', run_dir / ds / arm, cache_dir / ds / f'{arm}.json', job_spec(size, ds, arm))
            for arm in ARMS for ds in size.datasets]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', choices=sorted(SIZES), default='cpu')
    p.add_argument('--jobs', type=int, default=2, help='jobs in parallel (one thread each)')
    p.add_argument('--ship-only', action='store_true', help='export, ship and write the tables from the cache')
    p.add_argument('--cache-dir', type=Path, default=None)
    p.add_argument('--run-dir', type=Path, default=None)
    p.add_argument('--zoo-dir', type=Path, default=None, help='where shipped weights go (default: the package)')
    p.add_argument('--card-dir', type=Path, default=REPO / 'hub_cards')
    p.add_argument('--out-md', type=Path, default=REPO / 'docs' / 'zoo.md')
    p.add_argument('--readme', type=Path, default=REPO / 'README.md')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    cache_dir = args.cache_dir or REPO / 'experiments' / 'cache' / 'zoo' / size.name
    run_dir = args.run_dir or REPO / 'runs' / 'zoo' / size.name

    def log(msg: str) -> None:
        print(f"[zoo {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)

    jobs = plan(size, cache_dir, run_dir)
    failed = 0 if args.ship_only else ed.run_jobs(jobs, args.jobs, log, worker=run_job)
    import zoo_ship  # noqa: E402  (the export half; imports timm_edl)
    shipped = zoo_ship.ship_all(size, jobs, args, log)
    log(f"{failed} job(s) failed; shipped: {', '.join(shipped) or 'none'}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
