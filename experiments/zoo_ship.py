"""The export half of ``experiments/zoo.py``: from the cached jobs only, export each EDL model
with ``timm-edl export`` (card from its evaluation JSONs, the conv twin's numbers on the same
points), copy its weights into the package's zoo with a manifest entry, and write
``docs/zoo.md`` and the README's zoo table."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import paper_claims as pc
import zoo
from _sections import write_section

REPO = pc.REPO


def _cached(jobs, ds: str) -> dict[str, dict[str, Any]]:
    out = {}
    for key, _, cache, spec in jobs:
        if spec['dataset'] == ds:
            data = pc._read_cached(cache, spec)
            if data is not None:
                out[spec['arm']] = dict(data, final=cache.with_name(cache.stem + '_final'))
    return out


def _rel(command: str) -> str:
    """A job's command with its run folder relative to the checkout (jobs may run in another worktree)."""
    return re.sub(r'(?<![\w.-])/[^\s:]*/runs/zoo/', 'runs/zoo/', command)


def _commit(text: str) -> str:
    return text.split()[0][:12] + (' + uncommitted changes' if 'uncommitted' in text else '')


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def _machine_text(m: dict[str, Any]) -> str:
    """Jobs run one thread each (``paper_claims._single_thread``), ``--jobs`` of them side by side."""
    return f"{m.get('cpu', 'CPU')} ({m.get('cores', '?')} cores), one thread per job, no GPU" if m else 'unknown'


CHECK_CLEAN_N, CHECK_PGD_N = 1000, 200  # what tests/test_zoo.py reproduces


def check_numbers(edl: dict[str, Any]) -> tuple[float, float]:
    """Clean accuracy (%) on the first CHECK_CLEAN_N test points and PGD-20 accuracy (%) on the
    first CHECK_PGD_N, from the per-point record of the AutoAttack evaluation."""
    from timm_edl.evaluation.core import unpack_correct
    report = edl['evals']['aa']['report']
    if report['n_ex'] < CHECK_CLEAN_N:
        raise ValueError(f"the AutoAttack evaluation has {report['n_ex']} points, fewer than {CHECK_CLEAN_N}")
    clean = unpack_correct(report['per_point']['clean'], report['n_ex'])[:CHECK_CLEAN_N]
    pgd = unpack_correct(report['per_point']['pgd'], report['n_ex'])[:CHECK_PGD_N]
    return 100 * sum(clean) / len(clean), 100 * sum(pgd) / len(pgd)


def card_notes(ds: str, edl: dict[str, Any], conv: dict[str, Any]) -> str:
    info = zoo.DATASETS[ds]
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
timm-edl eval --model {zoo.model_name(ds)} --dataset {ds} --n-ex 200 --attacks pgd --pgd-steps 20 --no-checks --eps {info['eps_text']}
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
    if set(cached) != set(zoo.ARMS):
        log(f"{ds}: not shipped, jobs not finished: {sorted(set(zoo.ARMS) - set(cached))}")
        return None
    edl, conv = cached['edl'], cached['conv']
    failed = edl['evals']['aa']['report'].get('failed_checks') or []
    if failed:
        log(f"{ds}: NOT SHIPPED, gradient-masking checks failed: {failed}")
        return None
    name = zoo.model_name(ds)
    work = run_dir / 'ship' / name
    edl_jsons = _write_eval_jsons(work / 'edl', edl)
    conv_jsons = _write_eval_jsons(work / 'conv', conv)
    notes = work / 'card_notes.md'
    notes.write_text(card_notes(ds, edl, conv))
    out = work / 'export'
    argv = (['--model', f"local-dir:{edl['final']}", '--eval-results', *map(str, edl_jsons),
             '--compare-results', *[f'conv twin (edl_layers: none, same recipe)={p}' for p in conv_jsons],
             '--card-notes', str(notes), '--model-name', name, '--out', str(out), '--overwrite',
             '--card-dir', str(args.card_dir)])
    if export_main(argv) != 0:
        raise RuntimeError(f"timm-edl export {' '.join(map(shlex.quote, argv))} failed")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    target = zoo_dir / f'{name}.safetensors'
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
    return f"The weights add {weights:,} bytes to the package ({files} in `timm_edl/_zoo/`, plus `manifest.json`)."


def zoo_table(shipped: list[dict[str, Any]]) -> str:
    rows = ['| Model | Tag | Data | Threat model | Clean | PGD-20 | AutoAttack '
            '| Conv twin: clean / PGD-20 / AA | Params | Made by |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for s in shipped:
        info = zoo.DATASETS[s['ds']]
        full, aa = s['edl']['evals']['full']['report'], s['edl']['evals']['aa']['report']
        cfull, caa = s['conv']['evals']['full']['report'], s['conv']['evals']['aa']['report']
        rows.append(
            f"| `{zoo.ARCH}` | `{info['tag']}` | {info['label']} | Linf {info['eps_text']} "
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
        ax.set_title(f"{zoo.DATASETS[s['ds']]['label']} (first 1,000 test images)")
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
    write_section(args.out_md, zoo.SECTION, zoo_markdown(shipped, plot_rel))
    write_section(args.readme, zoo.SECTION, zoo_table(shipped) + '\n\n' + package_size_line(shipped))
    return [s['name'] for s in shipped]
