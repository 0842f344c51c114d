"""The zoo: train, evaluate, export and ship the CPU-trained EDLNets of ``timm-edl`` (``make zoo``).

For each dataset (Fashion-MNIST, CIFAR-10-JPEG) two jobs, each with the project's own
commands (``timm_edl.train`` on the recipe, ``timm-edl eval``):

* ``edl``: ``edlnet_resnet8_in`` on ``recipes/edlnet_resnet8_in_<dataset>_pgd.yaml``;
* ``conv``: its conv twin (``edl_layers: none``), same recipe, same seed.

Every model gets two evaluations: clean + PGD-20 on the whole test set, and AutoAttack
standard + PGD-20 + noise + every gradient-masking check on the first 1,000 test points; then,
once, common corruptions (generated, ``timm-edl eval --threat-model corruptions``) on the first
1,000 test points, kept in ``<arm>_corruptions/`` beside the job's JSON.
A finished job is one JSON in ``experiments/cache/zoo/<size>/<dataset>/<arm>.json`` (spec, training
curve, both evaluation reports, wall time, commit, machine) plus its final weights folder
``<arm>_final/`` (config.json and model.safetensors); the cache is committed, so any later run
resumes from it and never retrains.  Runs go to ``runs/zoo/`` (not committed).  A cached job
made with other settings is an error.

Then, from the cache only, for each dataset whose two jobs are done and whose checks all pass:

* ``timm-edl export`` of the EDL model with both evaluation JSONs and the conv twin's
  numbers on the same points, card to ``hub_cards/<model_name>.md``;
* its ``model.safetensors`` copied to ``timm_edl/_zoo/<model_name>.safetensors`` and recorded
  (sha256, bytes, commit, wall times) in ``timm_edl/_zoo/manifest.json``, which makes
  ``timm.create_model('<model_name>', pretrained=True)`` load it; the package copy is then the
  only one: the cache's ``edl_final/model.safetensors`` is removed, and shipping again reads
  the package file, checked against the sha256 in ``edl_final/config.json``;
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
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import elastic_decision as ed
from _jobs import REPO, git_commit, machine_info, read_cached, single_thread, write_json
from _sections import write_section

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
    single_thread()
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
              'evals': evals, 'wall_seconds': time.time() - started, 'commit': git_commit(),
              'machine': machine_info(), 'finished': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}
    write_json(cache, result)
    return result


def plan(size: Size, cache_dir: Path, run_dir: Path) -> list[tuple[str, Path, Path, dict[str, Any]]]:
    """(key, job folder, cache file, spec) of every job: the EDL models first."""
    return [(f'{ds}/{arm}', run_dir / ds / arm, cache_dir / ds / f'{arm}.json', job_spec(size, ds, arm))
            for arm in ARMS for ds in size.datasets]


# ----------------------------------------------------------------------------- shipping (from the cache only)

def _cached(jobs, ds: str) -> dict[str, dict[str, Any]]:
    out = {}
    for key, _, cache, spec in jobs:
        if spec['dataset'] == ds:
            data = read_cached(cache, spec)
            if data is not None:
                out[spec['arm']] = dict(data, final=cache.with_name(cache.stem + '_final'))
    return out


def final_folder(final: Path, shipped: Path, work: Path) -> Path:
    """A ``local-dir`` folder of a cached job's final weights: ``final`` itself when it holds
    ``model.safetensors``; else (a shipped model, whose one stored copy is the package's) ``work``
    with ``final/config.json`` and the package copy ``shipped``, checked against the sha256 that
    config.json recorded when training wrote the weights."""
    from timm_edl.weights import file_sha256
    if (final / 'model.safetensors').is_file():
        return final
    config = json.loads((final / 'config.json').read_text())
    sha = (config.get('timm_edl') or {}).get('weights_sha256')
    if not shipped.is_file() or file_sha256(shipped) != sha:
        raise RuntimeError(f"{final} has no model.safetensors and the package copy {shipped} "
                           f"{'is missing' if not shipped.is_file() else 'does not match its sha256 ' + str(sha)}: "
                           f"restore the file from git (git checkout -- {shipped}), or delete {final} and its "
                           f"cached JSON to train the job again")
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(final / 'config.json', work / 'config.json')
    shutil.copy2(shipped, work / 'model.safetensors')
    return work


def drop_cached_weights(final: Path, shipped: Path, log) -> None:
    """Keep one copy of a shipped model's weights, the package's: remove ``final/model.safetensors``
    when it is byte-identical to ``shipped`` (:func:`final_folder` finds it there by its sha256)."""
    from timm_edl.weights import file_sha256
    cached = final / 'model.safetensors'
    if cached.is_file() and file_sha256(cached) == file_sha256(shipped):
        cached.unlink()
        log(f"{final}: weights kept once, in the package ({shipped.name})")


def _rel(command: str) -> str:
    """A job's command with its run folder relative to the checkout (jobs may run in another worktree)."""
    return re.sub(r'(?<![\w.-])/[^\s:]*/runs/zoo/', 'runs/zoo/', command)


def _commit(text: str) -> str:
    return text.split()[0][:12] + (' + uncommitted changes' if 'uncommitted' in text else '')


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def _machine_text(m: dict[str, Any]) -> str:
    """Jobs run one thread each (``_jobs.single_thread``), ``--jobs`` of them side by side."""
    return f"{m.get('cpu', 'CPU')} ({m.get('cores', '?')} cores), one thread per job, no GPU" if m else 'unknown'


CHECK_CLEAN_N, CHECK_PGD_N = 1000, 200  # what tests/test_zoo.py reproduces


def check_numbers(edl: dict[str, Any]) -> tuple[float, float]:
    """Clean accuracy (%) on the first CHECK_CLEAN_N test points and PGD-20 accuracy (%) on the
    first CHECK_PGD_N, from the per-point record of the AutoAttack evaluation."""
    from timm_edl.stats import unpack_correct
    report = edl['evals']['aa']['report']
    clean = unpack_correct(report['per_point']['clean'], report['n_ex'])[:CHECK_CLEAN_N]
    pgd = unpack_correct(report['per_point']['pgd'], report['n_ex'])[:CHECK_PGD_N]
    return 100 * sum(clean) / len(clean), 100 * sum(pgd) / len(pgd)


def card_notes(ds: str, edl: dict[str, Any], conv: dict[str, Any]) -> str:
    info = DATASETS[ds]
    epochs = edl['train']['epochs']
    last = epochs[-1] if epochs else {}
    scope = ("Fashion-MNIST (28x28 grey images), not CIFAR-10." if ds == 'fashion-mnist' else
             "**CIFAR-10-JPEG, not CIFAR-10**: every image of CIFAR-10 re-encoded as JPEG (lossy); its numbers are "
             "not comparable with CIFAR-10 results or RobustBench's CIFAR-10 leaderboard.")
    check = ''
    if edl['evals']['aa']['report']['n_ex'] >= CHECK_CLEAN_N:
        clean, pgd = check_numbers(edl)
        check = f"""## Check it yourself

- Clean accuracy on the first 1,000 test points: {clean:.2f} %
- PGD-20 accuracy on the first 200 test points: {pgd:.2f} %

```bash
timm-edl eval --model {model_name(ds)} --dataset {ds} --n-ex 200 --attacks pgd --pgd-steps 20 --no-checks --eps {info['eps_text']}
```

(timm-edl's `tests/test_zoo.py` reproduces both numbers on every test run: the clean accuracy exactly, PGD-20
within 1 point.)

"""
    return check + f"""## How it was trained

- Command: `{edl['train_command']}` (recipe `{edl['spec']['recipe']}`), made by `make zoo`
  (`experiments/zoo.py`) at commit `{_commit(edl['commit'])}`.
- PGD-3 adversarial training, Linf eps {info['eps_text']}, on all {info['n_train']:,} training images, {len(epochs)} epochs,
  vanilla dictionary learning (beta = 1 frozen in every EDL layer: the default that `make decision` chose).
- Last epoch's monitoring curve (first 1,000 test images, PGD-10; nothing was selected on it, the final
  weights ship): clean {last.get('eval_clean_top1', float('nan')):.2f} %, PGD-10 {last.get('eval_robust_top1', float('nan')):.2f} %.
- Machine: {_machine_text(edl.get('machine') or {})}; training {_minutes(edl['train']['wall_seconds'])},
  training + evaluation {_minutes(edl['wall_seconds'])} (the conv twin: {_minutes(conv['wall_seconds'])}).
- Evaluation commands: `{_rel(edl['evals']['full']['command'])}` and `{_rel(edl['evals']['aa']['command'])}`.

## What it is not

- {scope}
- Not paper scale: a 3-stage ResNet-8 with about 80k parameters and 6 EDL layers, trained for
  {len(epochs)} epochs on a 2-core CPU; the paper's models are ResNet-18 / WideResNets trained for
  100+ epochs on GPUs. Use it to try timm-edl end to end, as a fine-tuning start on small grey or
  32x32 images, or as a baseline at this scale, not as a reference robustness number for EDLNets.
- Its conv twin (same network, same recipe, plain convolutions) is in the comparison table above; at this
  scale an EDLNet with beta = 1 is not expected to beat it (see `docs/results.md`)."""


CORRUPTION_N = {'cpu': 1000}  # common corruptions (generated) on the first n test points; other sizes: none


def corruption_dir(cache: Path) -> Path:
    """Where the corruption evaluation of a cached job lives (beside its JSON, not in its spec)."""
    return cache.with_name(cache.stem + '_corruptions')


def corruption_json(cache: Path) -> Path | None:
    found = sorted(corruption_dir(cache).glob('*.json'))
    return found[0] if found else None


def evaluate_corruptions(size: Size, jobs, run_dir: Path, zoo_dir: Path, log) -> None:
    """``timm-edl eval --threat-model corruptions`` of every cached job's final weights (once; the
    JSON is kept in ``<arm>_corruptions/`` beside the job's cache)."""
    from timm_edl.cli.eval import main as eval_main
    n = CORRUPTION_N.get(size.name)
    if n is None:
        return
    for key, _, cache, spec in jobs:
        final = cache.with_name(cache.stem + '_final')
        if corruption_json(cache) is not None or read_cached(cache, spec) is None:
            continue
        model = final_folder(final, zoo_dir / f"{model_name(spec['dataset'])}.safetensors",
                             run_dir / 'corruptions' / key / 'final')
        log(f"{key}: common corruptions (generated) on the first {n} test points")
        argv = ['--model', f'local-dir:{model}', '--dataset', spec['dataset'], '--threat-model', 'corruptions',
                '--n-ex', str(n), '--batch-size', '500', '--seed', '0', '--device', 'cpu', '--no-progress',
                '--out', str(corruption_dir(cache))]
        if eval_main(argv) != 0:
            raise RuntimeError(f"timm-edl eval {shlex.join(argv)} failed")


def _severities(report: dict[str, Any]) -> str:
    means = report['mean_per_severity']
    return ' / '.join(f"{100 * means[k]:.1f}" for k in sorted(means, key=int))


def corruptions_markdown(shipped: list[dict[str, Any]]) -> str:
    """EDLNet vs conv twin on the generated corruptions of each shipped dataset (paired)."""
    from _paired import corruption_row, verdict
    lines = ['## Common corruptions of the zoo (`make zoo`)', '',
             'Generated corruptions (`timm-edl eval --threat-model corruptions`: the 15 corruptions x 5 severities '
             'of imagecorruptions-imaug, seeded, on the first 1,000 test points; not CIFAR-10-C, see '
             '`docs/evaluation.md`). Accuracy in %; mean per severity 1 to 5. Paired test: per test point, the '
             'number of its 75 corrupted copies each model gets right; exact sign test of the points where the '
             'EDLNet gets more against those where the twin does (ties dropped).', '',
             '| Model | Corrupted set | Clean EDL / twin | Mean EDL / twin | Per severity, EDL | Per severity, twin '
             '| Points EDL / twin better | Sign test p | |', '|---|---|---|---|---|---|---|---|---|']
    for s in shipped:
        cache = {arm: s[arm]['final'].with_name(f'{arm}.json') for arm in ('edl', 'conv')}
        found = {arm: corruption_json(c) for arm, c in cache.items()}
        if None in found.values():
            continue
        a, b = (json.loads(found[arm].read_text()) for arm in ('edl', 'conv'))
        row = corruption_row(a, b)
        lines.append(f"| `{s['name']}` | {a['corruption_label']} | {_acc(a, 'clean_acc')} / {_acc(b, 'clean_acc')} "
                     f"| {_acc(a, 'corruptions_acc')} / {_acc(b, 'corruptions_acc')} | {_severities(a)} | {_severities(b)} "
                     f"| {row['only_a']} / {row['only_b']} | {row['p']:.3g} | {verdict(row)} |")
    return '\n'.join(lines) if len(lines) > 7 else ''


def _write_eval_jsons(folder: Path, data: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ('full', 'aa'):
        p = folder / f'eval_{name}.json'
        p.write_text(json.dumps(data['evals'][name]['report'], indent=1))
        paths.append(p)
    return paths


def ship(ds: str, jobs, args, run_dir: Path, zoo_dir: Path, log) -> dict[str, Any] | None:
    """Export, ship and describe the EDL model of ``ds``; None when its jobs are not all cached
    or a check failed."""
    from timm_edl.cli.export import main as export_main
    from timm_edl.weights import file_sha256
    cached = _cached(jobs, ds)
    if set(cached) != set(ARMS):
        log(f"{ds}: not shipped, jobs not finished: {sorted(set(ARMS) - set(cached))}")
        return None
    edl, conv = cached['edl'], cached['conv']
    failed = edl['evals']['aa']['report'].get('failed_checks') or []
    if failed:
        log(f"{ds}: NOT SHIPPED, gradient-masking checks failed: {failed}")
        return None
    name = model_name(ds)
    work = run_dir / 'ship' / name
    target = zoo_dir / f'{name}.safetensors'
    source = final_folder(edl['final'], target, work / 'final')
    edl_jsons = _write_eval_jsons(work / 'edl', edl)
    conv_jsons = _write_eval_jsons(work / 'conv', conv)
    for arm, paths in (('edl', edl_jsons), ('conv', conv_jsons)):
        found = corruption_json(cached[arm]['final'].with_name(f'{arm}.json'))
        paths += [found] if found is not None else []
    notes = work / 'card_notes.md'
    notes.write_text(card_notes(ds, edl, conv))
    out = work / 'export'
    argv = (['--model', f"local-dir:{source}", '--eval-results', *map(str, edl_jsons),
             '--compare-results', *[f'conv twin (edl_layers: none, same recipe)={p}' for p in conv_jsons],
             '--card-notes', str(notes), '--model-name', name, '--out', str(out), '--overwrite',
             '--card-dir', str(args.card_dir)])
    if export_main(argv) != 0:
        raise RuntimeError(f"timm-edl export {' '.join(map(shlex.quote, argv))} failed")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / 'model.safetensors', target)
    entry = {'file': target.name, 'sha256': file_sha256(target), 'bytes': target.stat().st_size,
             'recipe': edl['spec']['recipe'], 'train_command': edl['train_command'],
             'commit': edl['commit'], 'machine': edl['machine'], 'finished': edl['finished'],
             'train_wall_seconds': round(edl['train']['wall_seconds']), 'job_wall_seconds': round(edl['wall_seconds']),
             'card': f'hub_cards/{name}.md'}
    manifest = zoo_dir / 'manifest.json'
    entries = json.loads(manifest.read_text()) if manifest.exists() else {}
    entries[name] = entry
    tmp = manifest.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + '\n')
    tmp.replace(manifest)
    log(f"{ds}: shipped {name} ({entry['bytes']:,} bytes, sha256 {entry['sha256'][:16]}...)")
    drop_cached_weights(edl['final'], target, log)
    return {'name': name, 'ds': ds, 'edl': edl, 'conv': conv, 'entry': entry}


def _acc(report: dict[str, Any], key: str) -> str:
    v = report.get(key)
    return '-' if v is None else f"{100 * v:.2f}"


def _flag(report: dict[str, Any]) -> str:
    failed = report.get('failed_checks') or []
    return f" (failed check: {', '.join(failed)})" if failed else ''


def package_size_line(shipped: list[dict[str, Any]]) -> str:
    weights = sum(s['entry']['bytes'] for s in shipped)
    files = f"{len(shipped)} safetensors file{'s' if len(shipped) != 1 else ''}"
    return f"Their weights add {weights:,} bytes to the package ({files} in `timm_edl/_zoo/`, listed in `manifest.json`)."


def zoo_table(shipped: list[dict[str, Any]]) -> str:
    rows = ['| Model | Tag | Data | Threat model | Clean | PGD-20 | AutoAttack '
            '| Conv twin: clean / PGD-20 / AA | Params | Made by |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for s in shipped:
        info = DATASETS[s['ds']]
        full, aa = s['edl']['evals']['full']['report'], s['edl']['evals']['aa']['report']
        cfull, caa = s['conv']['evals']['full']['report'], s['conv']['evals']['aa']['report']
        rows.append(
            f"| `{ARCH}` | `{info['tag']}` | {info['label']} | Linf {info['eps_text']} "
            f"| {_acc(full, 'clean_acc')} ({full['n_ex']:,}) "
            f"| {_acc(full, 'pgd_acc')} ({full['n_ex']:,}) | {_acc(aa, 'autoattack_acc')} ({aa['n_ex']:,}) "
            f"| {_acc(cfull, 'clean_acc')} / {_acc(cfull, 'pgd_acc')} / {_acc(caa, 'autoattack_acc')}{_flag(caa)} "
            f"| {s['params'] / 1e3:.0f}k | `make zoo` (`{s['edl']['spec']['recipe']}`) |")
    return '\n'.join(rows)


def plot_curves(shipped: list[dict[str, Any]], plot_path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(shipped), figsize=(5.5 * len(shipped), 3.8), squeeze=False)
    for ax, s in zip(axes[0], shipped):
        for arm, style in (('edl', '-'), ('conv', '--')):
            rows = s[arm]['train']['epochs']
            ep = [r['epoch'] + 1 for r in rows]  # 1-based, as the training log counts
            ax.plot(ep, [r['eval_clean_top1'] for r in rows], style, color='tab:blue', label=f'{arm} clean')
            ax.plot(ep, [r['eval_robust_top1'] for r in rows], style, color='tab:red', label=f'{arm} PGD-10')
        ax.set_title(f"{DATASETS[s['ds']]['label']} (first 1,000 test images)")
        ax.set_xlabel('epoch')
        ax.set_ylabel('accuracy (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)


def _checks_line(report: dict[str, Any]) -> str:
    return ', '.join(f"{c['name']}: {c['status']}" for c in report.get('checks') or []) or 'none run'


def zoo_markdown(shipped: list[dict[str, Any]], plot_rel: str | None) -> str:
    lines = ['## The zoo (`make zoo`)', '',
             'Written by `experiments/zoo.py` from its cache (`experiments/cache/zoo/`); every number below is '
             "copied from a `timm-edl eval` JSON. Accuracies in %, number of test points in parentheses; "
             'PGD-20 = adaptive PGD through every unrolled RISTA step; AA = AutoAttack standard.', '',
             zoo_table(shipped), '', package_size_line(shipped), '']
    if plot_rel:
        lines += [f'![validation curves]({plot_rel})', '',
                  'Monitoring curves (first 1,000 test images, PGD-10, every epoch; the final weights ship, nothing '
                  'is selected on them), EDLNet solid, conv twin dashed.', '']
    lines += ['| Model | Epochs | Training | Train + eval (EDL / twin) | Machine | Commit | Checks (EDL, AutoAttack points) '
              '| Conv twin\'s failed checks |',
              '|---|---|---|---|---|---|---|---|']
    for s in shipped:
        e, c = s['edl'], s['conv']
        lines.append(f"| `{s['name']}` | {len(e['train']['epochs'])} | {_minutes(e['train']['wall_seconds'])} "
                     f"| {_minutes(e['wall_seconds'])} / {_minutes(c['wall_seconds'])} "
                     f"| {_machine_text(e.get('machine') or {})} | `{_commit(e['commit'])}` "
                     f"| {_checks_line(e['evals']['aa']['report'])} "
                     f"| {', '.join(c['evals']['aa']['report'].get('failed_checks') or []) or 'none'} |")
    lines += ['', 'Commands (each job):', '']
    for s in shipped:
        for arm in ('edl', 'conv'):
            d = s[arm]
            lines += [f"- `{s['name']}` {arm}: `{d['train_command']}`; `{_rel(d['evals']['full']['command'])}`; "
                      f"`{_rel(d['evals']['aa']['command'])}`"]
    return '\n'.join(lines)


def ship_all(size, jobs, args, log) -> list[str]:
    run_dir = args.run_dir or REPO / 'runs' / 'zoo' / size.name
    zoo_dir = args.zoo_dir or REPO / 'timm_edl' / '_zoo'
    shipped = []
    for ds in size.datasets:
        s = ship(ds, jobs, args, run_dir, zoo_dir, log)
        if s is not None:
            s['params'] = s['edl']['evals']['full']['report']['model']['num_params']
            shipped.append(s)
    if not shipped:
        return []
    plot_path = args.out_md.parent / 'zoo' / 'curves.png'
    plot_curves(shipped, plot_path)
    plot_rel = str(plot_path.relative_to(args.out_md.parent))
    write_section(args.out_md, SECTION, zoo_markdown(shipped, plot_rel))
    write_section(args.readme, SECTION, zoo_table(shipped) + '\n\n' + package_size_line(shipped))
    corrupted = corruptions_markdown(shipped)
    if corrupted:
        write_section(args.out_md.parent / 'results.md', 'zoo-corruptions', corrupted)
    return [s['name'] for s in shipped]


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
    if not args.ship_only:
        single_thread()
        evaluate_corruptions(size, jobs, run_dir, args.zoo_dir or REPO / 'timm_edl' / '_zoo', log)
    shipped = ship_all(size, jobs, args, log)
    log(f"{failed} job(s) failed; shipped: {', '.join(shipped) or 'none'}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
