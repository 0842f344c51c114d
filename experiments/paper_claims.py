"""Reproduce the claims of the EDL paper (arXiv:2502.00834) at a scale a CPU can do.

One script runs every training and every evaluation through the project's own entry points
(:func:`timm_edl.train.train` = ``timm-edl train`` and :func:`timm_edl.cli.eval.main` =
``timm-edl eval``), caches each finished job as JSON, and writes ``docs/results.md`` plus PNG
plots in ``docs/results/``. Every number in the Markdown is computed from the cached JSONs.

What is measured, per dataset (Fashion-MNIST, Linf eps 0.1; a CIFAR-10-JPEG subset, Linf
eps 8/255) and per seed:

(a) the robustness illusion: a vanilla-DL network (beta = 1 fixed, SDNet-style) and its conv
    twin, both naturally trained; clean accuracy, accuracy under random noise, under naive
    attacks (PGD with gradients through a truncated / linearised / one-step solver), under
    adaptive PGD and under AutoAttack;
(b) the EDL effect: conv twin, vanilla DL (beta = 1 fixed), robust DL (beta = 0 fixed) and
    elastic DL (beta learned, two-stage: frozen at 1, released at ``elastic_from``), all with
    the same PGD adversarial-training recipe; clean, PGD, AutoAttack accuracy, the learned
    betas per layer and the training time;
(c) robust overfitting: the same adversarial runs use a multistep learning-rate schedule and
    a robust validation on held-out training images after every epoch; the test PGD accuracy
    of the best-validation checkpoint is compared with that of the last one; and separate long
    runs (regime 'ro': conv twin, vanilla DL, elastic DL; the recipe of (b) on fewer images,
    for more epochs, piecewise lr) where robust overfitting usually shows;
(d) the gradient-masking checks of ``timm-edl eval`` for every evaluated model.

Usage::

    python experiments/paper_claims.py --jobs 2                   # the CPU-scale run (default)
    python experiments/paper_claims.py --scale smoke --out-dir /tmp/x --out-md /tmp/x/results.md
    python experiments/paper_claims.py --report-only              # rewrite the Markdown from the cache

Re-running skips every job whose JSON is in the cache (``--out-dir``, default
``runs/paper_claims/<scale>``). A cached job made with other settings is an error, not silently
reused. The Markdown file is only replaced when it was written by this script (``--force``
overrides).

This file is the command line; the settings and jobs are in ``claims_setup.py``, the job
machinery in ``_jobs.py``, one module per claim (``claims_illusion.py``, ``claims_effect.py``,
``claims_overfitting.py``, ``claims_checks.py``) and the document in ``claims_document.py``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

from _jobs import REPO, CacheMismatch, git_commit, parse_experiment_args, read_cached, run_jobs, write_json
from claims_document import MARKER, write_markdown
from claims_results import Results
from claims_setup import DATASETS, SCALES, plan

OUT_MARKER = '.paper_claims'   # marks an --out-dir as this script's cache


def _check_out_md(out_md: Path, force: bool) -> None:
    if out_md.exists() and not force and MARKER not in out_md.read_text(errors='replace'):
        raise SystemExit(f"paper_claims: {out_md} exists and was not written by this script; refusing to overwrite "
                         f"it (use --out-md elsewhere or --force)")


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / OUT_MARKER).exists():
        raise SystemExit(f"paper_claims: {out_dir} exists, is not empty and is not a paper_claims cache; refusing "
                         f"to write into it (use another --out-dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUT_MARKER).write_text('cache of experiments/paper_claims.py\n')


def _command(argv: list[str]) -> str:
    return ' '.join(['.venv/bin/python experiments/paper_claims.py'] + [shlex.quote(a) for a in argv])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--scale', choices=sorted(SCALES), default='cpu',
                   help='smoke: seconds, for the test; cpu: the real run (~45 min with --jobs 2 on 2 cores)')
    p.add_argument('--seeds', type=int, default=None, help="number of seeds (default: the scale's, 3 for cpu)")
    p.add_argument('--datasets', default=None, help="comma list (default: the scale's)")
    p.add_argument('--jobs', type=int, default=1, help='parallel worker processes (one thread each)')
    p.add_argument('--out-dir', default=None, help='job cache (default runs/paper_claims/<scale>)')
    p.add_argument('--out-md', default=str(REPO / 'docs' / 'results.md'),
                   help='the Markdown to write; plots go to <its folder>/<its stem>/')
    p.add_argument('--report-only', action='store_true', help='only rewrite the Markdown from the cache')
    p.add_argument('--force', action='store_true', help='overwrite an --out-md not written by this script')
    return p


def main(argv: list[str] | None = None) -> int:
    argv, args = parse_experiment_args(build_parser(), argv)
    scale = SCALES[args.scale]
    seeds = args.seeds or scale.seeds
    if seeds < 1:
        raise SystemExit('paper_claims: --seeds must be >= 1')
    datasets = scale.datasets if args.datasets is None else tuple(d.strip() for d in args.datasets.split(','))
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"paper_claims: unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    out_dir = Path(args.out_dir or REPO / 'runs' / 'paper_claims' / scale.name)
    out_md = Path(args.out_md)
    _check_out_md(out_md, args.force)
    _prepare_out_dir(out_dir)

    def log(msg: str) -> None:
        print(f"[paper_claims {dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    meta_path = out_dir / 'invocations.json'
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {'invocations': []}
    started = time.time()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')
    n_run = n_failed = 0
    commit_at_start = git_commit()
    if not args.report_only:
        jobs = plan(scale, seeds, out_dir, datasets)
        try:
            regimes_todo = sorted({j.key.split('/')[1] for j in jobs if read_cached(j.cache, j.spec) is None})
            n_run, n_failed = run_jobs(jobs, args.jobs, log)
        except CacheMismatch as e:
            raise SystemExit(f"paper_claims: {e}") from None
        meta['invocations'].append({'started': stamp, 'wall_seconds': time.time() - started, 'jobs_run': n_run,
                                    'jobs_failed': n_failed, 'jobs': args.jobs, 'argv': argv,
                                    'regimes': regimes_todo,
                                    'commit_at_start': commit_at_start, 'commit_at_end': git_commit()})
        meta['jobs'] = args.jobs
        write_json(meta_path, meta)
    try:
        res = Results(scale, seeds, out_dir, datasets)
    except CacheMismatch as e:
        raise SystemExit(f"paper_claims: {e}") from None
    # the command that ran the jobs (the last invocation that did), and this one if it only rewrote the file
    ran = [r for r in meta.get('invocations', []) if r.get('jobs_run', 0) > 0]
    job_argv = ran[-1]['argv'] if ran else argv
    command = _command(job_argv)
    if args.report_only:
        command += f"\n# this file was then regenerated from the cache with:\n{_command(argv)}"
    write_markdown(res, out_md, meta, command)
    log(f"wrote {out_md} ({len(res.missing)} job(s) missing); {time.time() - started:.0f} s")
    return 1 if (n_failed or res.missing) else 0


if __name__ == '__main__':
    sys.exit(main())
