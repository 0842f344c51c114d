"""The decision experiment of the elastic regime: which EDL layer and which beta to ship.

Same PGD adversarial training (the CPU recipes ``recipes/cpu_*_pgd.yaml``: the 80k-parameter
``edlnet_resnet18_in`` of ``docs/results.md``, EDL layers in the residual blocks) for:

* ``conv``: the conv twin (``edl_layers: none``);
* ``vanilla``: beta = 1 fixed (every layer option gives the same function at beta = 1);
* ``robust``: beta = 0 fixed, today's layer (warm start + scale-free reweighting);
* ``elastic``: beta learned, two-stage (vanilla until ``elastic_from``, then released at 1);
* ``elastic_b05``: the same, released at beta = 0.5 (does beta go back to 1?);
* ``beta025`` / ``beta050`` / ``beta075``: beta fixed at 0.25 / 0.5 / 0.75;
* ``robust_old`` / ``elastic_old``: the original layer (z_0 = 0, floored weights, eps 1e-3).

Every model: ``timm-edl eval`` clean + PGD-20 on the whole test set, and AutoAttack standard
+ PGD-20 + noise + every gradient-masking check on the first ``aa_n`` test points; and
dLoss/dbeta per layer (the adversarial training loss on the first 1,000 training images, PGD
examples crafted against the model) at the end of training.  The report gives paired
per-point comparisons on the same test points (McNemar's exact test) for elastic vs vanilla
and elastic vs conv, beta per layer over epochs (plots), and the decision.

Each (dataset, arm, seed) is one job: train, evaluate, measure, then cache one JSON in
``experiments/cache/elastic_decision/<size>/`` (committed, so any later run resumes from
it); weights and logs go to ``runs/elastic_decision/`` (not committed).  Jobs run seed 0 of
every arm first, then the other seeds, ``--jobs`` at a time; re-running skips cached jobs
and a cached job made with other settings is an error.  The report is the section
``elastic-decision`` of ``docs/results.md`` (other sections stay), with its plots in
``docs/results/``, written from the cache only::

    python experiments/elastic_decision.py --jobs 2               # the CPU run (make decision)
    python experiments/elastic_decision.py --report-only          # rewrite the section from the cache
    python experiments/elastic_decision.py --size smoke --cache-dir /tmp/c --out-md /tmp/r.md  # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from _jobs import (REPO, CacheMismatch, git_commit, init_worker, machine_info, parse_experiment_args, read_cached,
                   run_eval_job, run_train_job, single_thread, write_json)
from _sections import write_section
from claims_results import fmt_pm
from claims_setup import DATASETS

SECTION = 'elastic-decision'
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Size:
    """Everything that sets the size of the experiment (recorded in every cached job)."""
    name: str
    datasets: tuple[str, ...]
    seeds: int                  # seeds of the main arms (conv, vanilla, robust, elastic)
    train_n_ex: int
    epochs: int
    elastic_from: int
    val_n_ex: int
    aa_n: int                   # AutoAttack (and the checks) on the first aa_n test points
    full_n: int | None          # clean + PGD-20 on the first full_n test points (None: all)
    check_n: int
    aa_attacks: str | None      # None: AutoAttack standard
    beta_grad_n: int            # training images for dLoss/dbeta


SIZES = {
    # seconds, for the test: the pipeline end to end, numbers meaningless
    'smoke': Size('smoke', ('fashion-mnist',), 1, 256, 2, 1, 64, 16, 64, 16, 'apgd-ce', 32),
    # the CPU run: sized from one timed job (see the module docstring of the section it writes)
    'cpu': Size('cpu', ('fashion-mnist', 'cifar10-jpeg'), 3, 20000, 5, 2, 500, 500, None, 200, None, 1000),
}
LEGACY = "init: zero, reweight: floor, eps: 0.001"
# arm -> (label, model overrides, two-stage?, elastic_beta_init, main arm (all seeds))
ARMS: dict[str, tuple[str, list[str], bool, float | None, bool]] = {
    'conv': ('conv twin', ['--model-kwargs.edl_layers', 'none'], False, None, True),
    'vanilla': ('vanilla DL (beta = 1)', ['--model-kwargs.edl_cfg', '{beta: 1.0, beta_learnable: false}'],
                False, None, True),
    'robust': ('robust DL (beta = 0)', ['--model-kwargs.edl_cfg', '{beta: 0.0, beta_learnable: false}'],
               False, None, True),
    'elastic': ('elastic DL (learned beta)', [], True, None, True),
    'robust_old': ('robust DL (beta = 0), original layer',
                   ['--model-kwargs.edl_cfg', f'{{beta: 0.0, beta_learnable: false, {LEGACY}}}'], False, None, False),
    'elastic_old': ('elastic DL (learned beta), original layer',
                    ['--model-kwargs.edl_cfg', f'{{{LEGACY}}}'], True, None, False),
    'elastic_b05': ('elastic DL, released at beta = 0.5', [], True, 0.5, False),
    'beta025': ('beta = 0.25 fixed', ['--model-kwargs.edl_cfg', '{beta: 0.25, beta_learnable: false}'],
                False, None, False),
    'beta050': ('beta = 0.5 fixed', ['--model-kwargs.edl_cfg', '{beta: 0.5, beta_learnable: false}'],
                False, None, False),
    'beta075': ('beta = 0.75 fixed', ['--model-kwargs.edl_cfg', '{beta: 0.75, beta_learnable: false}'],
                False, None, False),
}
MAIN = [a for a, spec in ARMS.items() if spec[4]]


# ----------------------------------------------------------------------------- jobs

def job_spec(size: Size, ds: str, arm: str, seed: int) -> dict[str, Any]:
    """What one job does (recorded in its cache; a cache made otherwise is an error)."""
    _, model_overrides, two_stage, beta_init, _ = ARMS[arm]
    info = DATASETS[ds]
    overrides = [
        '--train-n-ex', str(size.train_n_ex), '--epochs', str(size.epochs), '--batch-size', '128',
        '--val-every', '1', '--val-split', 'holdout', '--val-n-ex', str(size.val_n_ex), '--val-attack-steps', '10',
        '--seed', str(seed), '--num-workers', '0', '--progress', 'never', '--save-every-steps', '0',
        '--keep-checkpoints', '1', '--objective', 'pgd',
        '--elastic-from-epoch', str(size.elastic_from) if two_stage else 'null',
        '--elastic-beta-init', 'null' if beta_init is None else str(beta_init),
    ] + model_overrides
    common = ['--dataset', ds, '--threat-model', 'Linf', '--eps', info['eps'], '--seed', str(seed),
              '--device', 'cpu', '--no-progress', '--overwrite']
    aa = ['--aa-attacks', size.aa_attacks] if size.aa_attacks else ['--version', 'standard']
    surrogate = [] if arm == 'conv' else ['--surrogate', 'twin']
    eval_aa = (['--attacks', 'noise,pgd,autoattack', '--pgd-steps', '20', '--n-ex', str(size.aa_n),
                '--batch-size', str(min(size.aa_n, 250)), '--check-n', str(min(size.check_n, size.aa_n)),
                '--grad-points', '4', '--grad-dirs', '16', '--eps-sweep', info['sweep']] + aa + surrogate + common)
    eval_full = (['--attacks', 'pgd', '--pgd-steps', '20', '--no-checks', '--batch-size', '500']
                 + (['--n-ex', str(size.full_n)] if size.full_n else []) + common)
    return {'kind': 'elastic-decision', 'cache_version': CACHE_VERSION, 'size': dataclasses.asdict(size),
            'dataset': ds, 'arm': arm, 'seed': seed, 'recipe': info['recipe'], 'overrides': overrides,
            'evals': {'aa': eval_aa, 'full': eval_full}}


def _report_subset(report: dict[str, Any]) -> dict[str, Any]:
    keep = ('clean_acc', 'pgd_acc', 'autoattack_acc', 'noise_acc', 'transfer_acc', 'worst_case_acc', 'n_ex',
            'failed_checks', 'edl_beta', 'timings', 'per_point', 'version', 'eps', 'data_label')
    out = {k: report.get(k) for k in keep}
    out['checks'] = [{k: c.get(k) for k in ('name', 'status', 'summary')} for c in report.get('checks') or []]
    out['edl_beta_raw'] = _raw_betas(report)
    return out


def _raw_betas(report: dict[str, Any]) -> dict[str, float]:
    """beta's parameter per EDL layer before the clamp to [0, 1] (it can leave the box: straight-through)."""
    layers = ((report.get('model') or {}).get('edl') or {}).get('layers') or {}
    return {name: layer['beta_raw'] for name, layer in layers.items() if 'beta_raw' in layer}


def backfill_raw_betas(cache: Path, run_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Jobs cached before ``edl_beta_raw`` was kept: take it from the job's own evaluation JSON in
    ``run_dir`` (when still there) and rewrite the cache with it; the spec is unchanged."""
    report = data['evals']['aa']['report']
    source = run_dir / 'eval_aa.json'
    if 'edl_beta_raw' not in report and source.exists():
        report['edl_beta_raw'] = _raw_betas(json.loads(source.read_text())['report'])
        write_json(cache, data)
    return data


def beta_gradients(folder: Path, ds: str, eps: float, n: int, seed: int) -> dict[str, float]:
    """dLoss/dbeta per EDL layer: mean cross-entropy on PGD-10 examples (crafted against the
    model, eps as in training) of the first ``n`` training images, BN in eval mode.  Negative:
    a larger beta lowers the adversarial loss (beta wants to go up, to 1)."""
    import torch
    import torch.nn.functional as F
    from timm_edl.attacks import pgd_attack
    from timm_edl.data import load_tensors
    from timm_edl.hub import load
    from timm_edl.layers import edl_layers
    model = load(f'local-dir:{folder}').eval()
    layers = edl_layers(model)
    if not layers:
        return {}
    x, y = load_tensors(ds, split='train', n_ex=n)
    gen = torch.Generator().manual_seed(seed)
    x_adv = torch.cat([pgd_attack(model, x[i:i + 250], y[i:i + 250], eps=eps, steps=10, step_size=eps / 4,
                                  generator=gen) for i in range(0, n, 250)])
    for _, layer in layers:
        layer.beta.requires_grad_(True)
        layer.beta.grad = None
    for i in range(0, n, 250):
        loss = F.cross_entropy(model(x_adv[i:i + 250]), y[i:i + 250], reduction='sum') / n
        loss.backward()
    return {name: float(layer.beta.grad) for name, layer in layers}


def train_and_evaluate(job_dir: str, spec: dict[str, Any], keep=lambda report: report):
    """``timm-edl train`` on ``spec['recipe']`` + ``spec['overrides']``, then each ``timm-edl eval``
    of ``spec['evals']`` on the final weights: ``(train result, {name: {report, wall_seconds, command}})``
    with each report passed through ``keep``."""
    train = run_train_job(job_dir, {'kind': 'train', 'recipe': spec['recipe'], 'overrides': spec['overrides']})
    evals = {}
    for name, argv in spec['evals'].items():
        data = run_eval_job(job_dir, {'kind': 'eval', 'name': name, 'weights': 'final', 'argv': argv})
        evals[name] = {'report': keep(data['report']), 'wall_seconds': data['wall_seconds'],
                       'command': data['command'].replace(str(REPO) + '/', '')}
    return train, evals


def run_job(job_dir: str, cache: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train, evaluate and measure one (dataset, arm, seed); cache one JSON (worker process)."""
    single_thread()
    from timm_edl.threat import parse_eps
    started = time.time()
    job = Path(job_dir)
    train, evals = train_and_evaluate(job_dir, spec, _report_subset)
    grads = beta_gradients(job / 'train' / 'final', spec['dataset'], parse_eps(DATASETS[spec['dataset']]['eps']),
                           spec['size']['beta_grad_n'], spec['seed'])
    result = {'spec': spec, 'train': {k: train[k] for k in ('wall_seconds', 'best_epoch', 'best_metric', 'epochs')},
              'evals': evals, 'beta_grad': grads, 'wall_seconds': time.time() - started,
              'commit': git_commit(), 'machine': machine_info(),
              'finished': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(cache), result)
    return result


def plan(size: Size, cache_dir: Path, run_dir: Path) -> list[tuple[str, Path, Path, dict[str, Any]]]:
    """(key, job folder, cache file, spec) of every job, in run order: seed 0 of every arm
    (both datasets) first, then the other seeds of the main arms."""
    jobs = []
    for seed in range(size.seeds):
        for arm in ARMS:
            if seed > 0 and arm not in MAIN:
                continue
            for ds in size.datasets:
                key = f'{ds}/{arm}/s{seed}'
                jobs.append((key, run_dir / ds / f'{arm}_s{seed}', cache_dir / ds / f'{arm}_s{seed}.json',
                             job_spec(size, ds, arm, seed)))
    return jobs


def run_jobs(jobs, n_workers: int, log, worker=None) -> int:
    """Run the uncached jobs, ``n_workers`` at a time, in plan order, each as
    ``worker(job_dir, cache, spec)`` (default :func:`run_job`); returns the number failed."""
    worker = worker or run_job
    todo = [j for j in jobs if read_cached(j[2], j[3]) is None]
    log(f"{len(jobs)} jobs, {len(jobs) - len(todo)} cached, {len(todo)} to run with {n_workers} worker(s)")
    failed = 0
    started = time.time()
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=max(n_workers, 1), mp_context=mp.get_context('spawn'),
                             initializer=init_worker) as pool:
        running = {}
        while todo or running:
            while todo and len(running) < max(n_workers, 1):
                key, job_dir, cache, spec = todo.pop(0)
                running[pool.submit(worker, str(job_dir), str(cache), spec)] = (key, time.time())
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                key, t0 = running.pop(fut)
                try:
                    fut.result()
                    log(f"done {key} ({time.time() - t0:.0f} s; {len(todo)} waiting, "
                        f"{(time.time() - started) / 60:.1f} min so far)")
                except Exception:  # noqa: BLE001  (logged; the others go on)
                    failed += 1
                    log(f"FAILED {key}:\n{traceback.format_exc()}")
    return failed


# ----------------------------------------------------------------------------- statistics

def _correct(result: dict[str, Any], which: str, attack: str) -> list[bool]:
    from timm_edl.stats import unpack_correct
    report = result['evals'][which]['report']
    return unpack_correct(report['per_point'][attack], report['n_ex'])


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], which: str, attack: str) -> dict[str, Any] | None:
    """a vs b on the same points, seed s of a against seed s of b; pooled over the seed pairs.

    b_count: points a gets right and b wrong; c_count: the reverse; diff in points (%); p: McNemar's
    exact test (timm_edl.stats)."""
    from timm_edl.stats import mcnemar_exact, paired_counts
    pairs = [(x, y) for x, y in zip(a, b)]
    if not pairs:
        return None
    bs = cs = n = 0
    for x, y in pairs:
        ca = _correct(x, which, attack)
        b_count, c_count = paired_counts(ca, _correct(y, which, attack))
        bs, cs, n = bs + b_count, cs + c_count, n + len(ca)
    return {'b': bs, 'c': cs, 'n': n, 'pairs': len(pairs), 'diff': 100.0 * (bs - cs) / n, 'p': mcnemar_exact(bs, cs)}


# ----------------------------------------------------------------------------- report

def _acc(results: list[dict[str, Any]], which: str, key: str) -> list[float | None]:
    return [r['evals'][which]['report'].get(key) for r in results]


def _checks(results: list[dict[str, Any]]) -> str:
    failed = sorted({c for r in results for c in r['evals']['aa']['report']['failed_checks'] or []})
    return 'passed' if not failed else 'FAILED: ' + ', '.join(failed)


def _final_betas(result: dict[str, Any]) -> dict[str, float]:
    row = result['train']['epochs'][-1]
    return {k[len('train_beta/'):]: v for k, v in row.items() if k.startswith('train_beta/')}


def _fmt_p(p: float) -> str:
    return f'{p:.2g}' if p >= 1e-4 else f'{p:.0e}'


def plot_betas(by: dict, datasets, plot_dir: Path) -> str | None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    arms = [a for a in ('elastic', 'elastic_b05', 'elastic_old') if any(by.get((ds, a)) for ds in datasets)]
    if not arms:
        return None
    fig, axes = plt.subplots(len(datasets), len(arms), figsize=(4.2 * len(arms), 3.2 * len(datasets)),
                             squeeze=False, sharey=True)
    for i, ds in enumerate(datasets):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            for s, result in enumerate(by.get((ds, arm), [])):
                rows = result['train']['epochs']
                names = [k for k in rows[0] if k.startswith('train_beta/')]
                for li, name in enumerate(names):
                    ax.plot([int(r['epoch']) + 1 for r in rows], [r[name] for r in rows], color=f'C{li}',
                            alpha=0.8, linestyle=['-', '--', ':'][s % 3],
                            label=name[len('train_beta/'):] if s == 0 else None)
            ax.axvline(result['spec']['size']['elastic_from'] + 0.5, color='grey', lw=0.8)
            ax.set_title(f"{DATASETS[ds]['label']}: {ARMS[arm][0]}", fontsize=8)
            ax.set_xlabel('epoch')
            ax.set_ylim(-0.05, 1.05)
            if j == 0:
                ax.set_ylabel('beta')
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / 'elastic_decision_beta.png'
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def report(size: Size, jobs, out_md: Path, meta: dict[str, str]) -> str:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing = []
    for key, job_dir, cache, spec in jobs:
        data = read_cached(cache, spec)
        if data is None:
            missing.append(key)
        else:
            by.setdefault((spec['dataset'], spec['arm']), []).append(backfill_raw_betas(cache, job_dir, data))
    plot = plot_betas(by, size.datasets, out_md.parent / 'results')
    L = ['## The elastic regime: the decision experiment (`experiments/elastic_decision.py`)', '',
         '<!-- generated by experiments/elastic_decision.py from its cache: edits are overwritten -->', '',
         "Which EDL layer and which beta to ship. The sections above (`paper_claims.py`) were made with the "
         "original layer (z_0 = 0, floored weights `1/(2 max(|r|, 1e-3))`); here 'robust' and 'elastic' use "
         "today's defaults (a plain ISTA warm start, then weights `c / (|r| + 0.1 c)` with `c` the sample's "
         "mean residual), and the '(original layer)' arms repeat them with the original layer.", '']
    results = [r for v in by.values() for r in v]
    done = len(results)
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cores']} cores, torch {r['machine']['torch']})"
                       for r in results})
    commits = sorted({r['commit'] for r in results})
    job_hours = sum(r['wall_seconds'] for r in results) / 3600
    L += [f"Made by `{meta['command']}`, resumable (each job is cached; this section is rewritten from the "
          f"cache with `--report-only`). Cache: `{meta['cache_dir']}`: {done} of {len(jobs)} jobs done"
          f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. Sum of the jobs' wall times: "
          f"{job_hours:.1f} h (jobs run two at a time, one thread each), on {', '.join(machines) or '-'}; "
          f"code at commit(s) {', '.join(commits) or '-'}.", '',
          f"Setup: the first {size.train_n_ex} training images outside a fixed random hold-out of {size.val_n_ex} "
          f"(PGD-10 validation after every epoch), PGD-3 adversarial training for {size.epochs} epochs with the CPU recipes "
          f"(`recipes/cpu_*_pgd.yaml`: `edlnet_resnet18_in`, layers [1,1,1], widths [16,32,64], 6 EDL layers "
          f"(K = 2) in the residual blocks, plain stem; cosine lr from 0.05); two-stage arms are vanilla for "
          f"{size.elastic_from} epochs, then beta is trained. Evaluation: clean and PGD-20 on the "
          f"{'whole test set' if size.full_n is None else f'first {size.full_n} test points'} ('full'), "
          f"AutoAttack {size.aa_attacks or 'standard'} with PGD-20, noise and every masking check on the first "
          f"{size.aa_n} ('AA'). Values: mean ± std over seeds (n = seeds), in %.", '']
    for ds in size.datasets:
        label = DATASETS[ds]['label']
        L += [f'### {label} (Linf eps = {DATASETS[ds]["eps"]})', '',
              '| arm | n | clean (full) | PGD-20 (full) | clean (AA pts) | PGD-20 (AA pts) | AutoAttack | '
              'AA - PGD | final beta (mean over layers) | beta before the clamp (min / max layer) | checks |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
        for arm, spec in ARMS.items():
            rs = by.get((ds, arm), [])
            if not rs:
                L.append(f'| {spec[0]} | 0 | not run yet | | | | | | | | |')
                continue
            gaps = [None if (a is None or p is None) else a - p
                    for a, p in zip(_acc(rs, 'aa', 'autoattack_acc'), _acc(rs, 'aa', 'pgd_acc'))]
            betas = [_final_betas(r) for r in rs]
            beta_txt = (fmt_pm([sum(b.values()) / len(b) for b in betas], scale=1.0, digits=3)
                        if all(betas) else '-')
            raw = [v for r in rs for v in (r['evals']['aa']['report'].get('edl_beta_raw') or {}).values()]
            raw_txt = f'{min(raw):.3f} / {max(raw):.3f}' if raw else '-'
            L.append(f"| {spec[0]} | {len(rs)} | {fmt_pm(_acc(rs, 'full', 'clean_acc'))} | "
                     f"{fmt_pm(_acc(rs, 'full', 'pgd_acc'))} | {fmt_pm(_acc(rs, 'aa', 'clean_acc'))} | "
                     f"{fmt_pm(_acc(rs, 'aa', 'pgd_acc'))} | {fmt_pm(_acc(rs, 'aa', 'autoattack_acc'))} | "
                     f"{fmt_pm(gaps)} | {beta_txt} | {raw_txt} | {_checks(rs)} |")
        L += ['', f'Paired per-point comparisons on the same test points ({label}), seed s against seed s, '
                  'pooled over the seed pairs: b = points only the first model gets right, c = only the second; '
                  "McNemar's exact two-sided p.", '',
              '| comparison | metric | seed pairs | b | c | difference (points) | p |', '|---|---|---|---|---|---|---|']
        for first, second in (('elastic', 'vanilla'), ('elastic', 'conv'), ('vanilla', 'conv'),
                              ('robust', 'vanilla'), ('elastic', 'elastic_old')):
            a, b = by.get((ds, first), []), by.get((ds, second), [])
            for which, attack, name in (('full', 'clean', 'clean (full)'), ('full', 'pgd', 'PGD-20 (full)'),
                                        ('aa', 'autoattack', 'AutoAttack')):
                res = paired(a, b, which, attack)
                if res:
                    L.append(f"| {first} vs {second} | {name} | {res['pairs']} | {res['b']} | {res['c']} | "
                             f"{res['diff']:+.2f} % | {_fmt_p(res['p'])} |")
        L += ['', f'dLoss/dbeta at the end of training ({label}; adversarial cross-entropy on PGD-10 examples of '
                  f'the first {size.beta_grad_n} training images; negative = a larger beta lowers the loss), '
                  'mean over layers and seeds, and the most negative / most positive layer:', '',
              '| arm | mean dL/dbeta | min layer | max layer |', '|---|---|---|---|']
        for arm, spec in ARMS.items():
            grads = [r['beta_grad'] for r in by.get((ds, arm), []) if r.get('beta_grad')]
            if grads:
                allv = [v for g in grads for v in g.values()]
                L.append(f"| {spec[0]} | {sum(allv) / len(allv):+.2e} | {min(allv):+.2e} | {max(allv):+.2e} |")
        L.append('')
    if plot:
        L += [f'![beta per layer over epochs](results/{plot})', '',
              'beta of every EDL layer per epoch, as the forward uses it (clamped to [0, 1]; the parameter before '
              'the clamp is in the tables) (colour: layer; line style: seed; grey line: release of beta).', '']
    L += decision(size, by)
    return '\n'.join(L)


def decision(size: Size, by) -> list[str]:
    """The rule, applied to the cache: elastic (new layer) replaces vanilla as the default only if, on every
    dataset, its pooled AutoAttack difference against vanilla is positive with p < 0.05 and its checks pass."""
    lines = ['### Decision', '',
             'Rule (fixed before the runs): learned beta (elastic) becomes the default only if, on every dataset, '
             'it beats vanilla DL in AutoAttack accuracy on the same points (pooled McNemar p < 0.05, positive '
             'difference) with every masking check passing; otherwise vanilla (beta = 1) stays the default.', '']
    verdicts = []
    for ds in size.datasets:
        e, v = by.get((ds, 'elastic'), []), by.get((ds, 'vanilla'), [])
        res = paired(e, v, 'aa', 'autoattack')
        if res is None:
            lines.append(f"* {DATASETS[ds]['label']}: not enough runs yet.")
            verdicts.append(None)
            continue
        ok = res['diff'] > 0 and res['p'] < 0.05 and _checks(e) == 'passed'
        verdicts.append(ok)
        lines.append(f"* {DATASETS[ds]['label']}: elastic - vanilla = {res['diff']:+.2f} points of AutoAttack "
                     f"accuracy ({res['pairs']} seed pair(s), p = {_fmt_p(res['p'])}), elastic checks "
                     f"{_checks(e)}: {'elastic wins' if ok else 'no win for elastic'}.")
    pairs = min((len(by.get((ds, 'elastic'), [])) for ds in size.datasets), default=0)
    if any(v is None for v in verdicts):
        lines += ['', '**Not decided yet** (runs missing).']
    elif pairs < size.seeds:
        lines += ['', f"**Provisional** ({pairs} of {size.seeds} seeds done): "
                      + ('elastic wins on every dataset so far.' if all(verdicts) else
                         'elastic does not beat vanilla so far; beta = 1 stays the EDLNet default until the '
                         'remaining seeds are in.')]
    elif all(verdicts):
        lines += ['', '**Elastic wins on every dataset.**']
    else:
        lines += ['', '**Elastic does not beat vanilla here: beta = 1 stays the EDLNet default** (layer defaults: '
                      'warm start + scale-free reweighting, which at beta = 1 compute exactly the vanilla layer).']
    return lines + ['']


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--size', choices=sorted(SIZES), default='cpu')
    p.add_argument('--jobs', type=int, default=2, help='parallel worker processes (one thread each)')
    p.add_argument('--cache-dir', default=None, help='default experiments/cache/elastic_decision/<size>')
    p.add_argument('--run-dir', default=None, help='weights and logs (default runs/elastic_decision/<size>)')
    p.add_argument('--out-md', default=str(REPO / 'docs' / 'results.md'))
    p.add_argument('--report-only', action='store_true')
    p.add_argument('--max-jobs', type=int, default=None, help='run at most this many uncached jobs, then report')
    return p


def main(argv: list[str] | None = None) -> int:
    argv, args = parse_experiment_args(build_parser(), argv)
    size = SIZES[args.size]
    cache_dir = Path(args.cache_dir or REPO / 'experiments' / 'cache' / 'elastic_decision' / size.name)
    run_dir = Path(args.run_dir or REPO / 'runs' / 'elastic_decision' / size.name)
    out_md = Path(args.out_md)

    def log(msg: str) -> None:
        print(f"[elastic_decision {dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    jobs = plan(size, cache_dir, run_dir)
    failed = 0
    if not args.report_only:
        todo = [j for j in jobs if read_cached(j[2], j[3]) is None]
        selected = todo[:args.max_jobs] if args.max_jobs is not None else todo
        try:
            failed = run_jobs([j for j in jobs if j not in todo or j in selected], args.jobs, log)
        except CacheMismatch as e:
            raise SystemExit(f"elastic_decision: {e}") from None
    default_dirs = args.cache_dir is None and args.run_dir is None
    command = ('make decision' if size.name == 'cpu' and default_dirs else
               ' '.join(['python experiments/elastic_decision.py', '--size', size.name]
                        + ([] if default_dirs else ['--cache-dir', str(cache_dir), '--run-dir', str(run_dir)])))
    info = {'command': command, 'cache_dir': os.path.relpath(cache_dir, REPO)}
    try:
        body = report(size, jobs, out_md, info)
    except CacheMismatch as e:
        raise SystemExit(f"elastic_decision: {e}") from None
    write_section(out_md, SECTION, body)
    log(f"wrote section '{SECTION}' of {out_md}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
