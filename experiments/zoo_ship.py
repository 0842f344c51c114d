"""Shipping the zoo's model pairs (``experiments/zoo_pairs.py``): export, package, compare.

From the pair's committed folder only: for each arm, ``timm-edl export`` of ``best/`` with the
arm's evaluation JSONs and its twin's on the same points (card in ``hub_cards/``), the weights
copied into ``timm_edl/_zoo/`` and recorded in its manifest; then the paired comparison
(exact McNemar tests on the per-point results of both models) in ``docs/zoo.md``,
``docs/results.md`` and the README's zoo table.
"""
from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from _jobs import REPO, git_commit, machine_info
from _paired import bits, paired_rows, paired_table, verdict
from _sections import write_section
from zoo import drop_cached_weights, final_folder
from zoo_pairs import (ARMS, PAIRS, Pair, build_parser, cache_dir, eval_dir, status, step_json, thread_counts,
                       train_dir)

SECTION = 'zoo-pairs'
OTHER = {'edl': 'conv', 'conv': 'edl'}


def _label(pair: Pair, arm: str) -> str:
    kind = 'EDLNet' if arm == 'edl' else 'conv twin'
    return f"{kind} ({pair.archs[arm]}, same recipe and seed)"


def reports(pair: Pair, arm: str, root: Path | None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """step name -> (JSON path, report) of the arm's finished evaluations."""
    out = {}
    for step in pair.steps:
        path = step_json(eval_dir(pair, arm, step, root))
        if path is not None:
            out[step.name] = (path, json.loads(path.read_text()))
    return out


def training_summary(folder: Path, log: Path | None = None) -> dict[str, Any]:
    """Epochs, best epoch and the summed epoch times of a run folder (``summary.csv``), and the
    thread counts of its runs (from ``zoo_pairs``' ``log``)."""
    with open(folder / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    best = json.loads((folder / 'best' / 'config.json').read_text())['timm_edl'].get('evaluation') or [{}]
    threads = [n for n, _ in itertools.groupby(thread_counts(log) if log else [])] or [1]
    return {'epochs': len(rows), 'train_seconds': sum(float(r['train_epoch_time']) for r in rows),
            'rows': rows, 'best': best[0], 'folder': folder, 'threads': threads}



# ----------------------------------------------------------------------------- export and ship

def _scope(pair: Pair) -> str:
    if pair.dataset == 'cifar10-jpeg':
        return (f"{pair.label}, not CIFAR-10: every CIFAR-10 image re-encoded as JPEG (lossy); its numbers are not "
                "comparable with CIFAR-10 leaderboards.")
    return f"{pair.label}, not CIFAR-10: its numbers are not comparable with CIFAR-10 leaderboards."


def card_notes(pair: Pair, arm: str, train: dict[str, Any], evals: dict[str, tuple[Path, dict]],
               rows: list[dict[str, Any]]) -> str:
    import yaml
    cfg = yaml.safe_load((train['folder'] / 'config.yaml').read_text())
    best = train['best']
    picked = {'noisy': 'accuracy under one seeded draw of the training noise',
              'robust': f"PGD-{cfg.get('val_attack_steps')} accuracy"}.get(cfg.get('val_select') or 'robust', 'accuracy')
    lines = ["## How it was trained", '',
             f"- Command: `timm-edl train --config {pair.recipe}"
             + (f" --model {pair.archs[arm]}`" if arm != 'edl' else '`')
             + f" ({pair.about}); run by `make zoo` (`experiments/zoo_pairs.py`, resumable).",
             f"- {train['epochs']} epochs, {train['train_seconds'] / 3600:.1f} h of training steps (sum of the epoch "
             f"times) on {machine_info().get('cpu', 'a CPU')}, "
             + ("one thread" if train['threads'] == [1] else
                ', then '.join(map(str, train['threads'])) + " threads (`zoo_pairs` shares the cores among the arms at work)")
             + ", no GPU.",
             f"- The weights are the epoch with the best {picked} on a hold-out of {cfg.get('val_n_ex'):,} training "
             f"images never trained on (there: clean {100 * best.get('clean_acc', float('nan')):.1f} %). The test set "
             "selected nothing.", '']
    if rows:
        lines += ['## Paired comparison with its twin', '',
                  f"EDLNet `{pair.name('edl')}` vs conv twin `{pair.name('conv')}` (same recipe and seed) on the same "
                  "test points; McNemar's exact test on the points where exactly one of them is right.", '',
                  paired_table(rows), '']
    full = evals.get('full', (None, {}))[1]
    clean, pgd = bits(full, 'clean') if full else None, bits(full, 'pgd') if full else None
    if clean is not None and len(clean) >= 1000:
        lines += ['## Check it yourself', '', f"- Clean accuracy on the first 1,000 test points: "
                                              f"{100 * sum(clean[:1000]) / 1000:.2f} %"]
        if pgd is not None and len(pgd) >= 200:
            lines.append(f"- PGD-20 accuracy on the first 200 test points: {100 * sum(pgd[:200]) / 200:.2f} %")
        lines += ['', "(`tests/test_zoo.py` reproduces them: the clean accuracy exactly, PGD-20 within 1 point.)", '']
    lines += ['## What it is not', '', f"- {_scope(pair)}",
              "- A small model trained on two CPU cores, not a paper-scale EDLNet."]
    return '\n'.join(lines)


def _training(pair: Pair, arm: str, root: Path | None) -> dict[str, Any]:
    return training_summary(train_dir(pair, arm, root), cache_dir(pair, root) / 'logs' / f'{arm}_train.log')


def _manifest(args) -> dict[str, Any]:
    manifest = args.zoo_dir / 'manifest.json'
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def shipped_before(pair: Pair, args) -> dict[str, dict[str, Any]] | None:
    """Both arms of a pair as shipped earlier (in the manifest, every step in the cache), read
    back without exporting anything; None if the pair is not shipped."""
    entries, state = _manifest(args), status(pair, args.cache_root)
    if not all(pair.name(arm) in entries and all(state[arm].values()) for arm in ARMS):
        return None
    return {arm: {'name': pair.name(arm), 'evals': reports(pair, arm, args.cache_root),
                  'train': _training(pair, arm, args.cache_root), 'entry': entries[pair.name(arm)]} for arm in ARMS}


def ship_arm(pair: Pair, arm: str, args, log) -> dict[str, Any]:
    from timm_edl.cli.export import main as export_main
    from timm_edl.weights import file_sha256
    root, name = args.cache_root, pair.name(arm)
    work = args.run_dir / pair.key / arm
    target = args.zoo_dir / f'{name}.safetensors'
    best = train_dir(pair, arm, root) / 'best'
    source = final_folder(best, target, work / 'model')
    evals, others = reports(pair, arm, root), reports(pair, OTHER[arm], root)
    train = _training(pair, arm, root)
    notes = work / 'card_notes.md'
    work.mkdir(parents=True, exist_ok=True)
    edl_conv = (evals, others) if arm == 'edl' else (others, evals)
    notes.write_text(card_notes(pair, arm, train, evals, paired_rows(*edl_conv)))
    certify = {s.name for s in pair.steps if s.command == 'certify'}
    argv = ['--model', f'local-dir:{source}',
            '--eval-results', *[str(p) for k, (p, _) in evals.items() if k not in certify],
            '--compare-results', *[f"{_label(pair, OTHER[arm])}={p}" for k, (p, _) in others.items() if k not in certify],
            *(['--certify-results', *[str(evals[k][0]) for k in certify]] if certify else []),
            '--card-notes', str(notes), '--model-name', name, '--out', str(work / 'export'), '--overwrite',
            '--card-dir', str(args.card_dir)]
    if export_main(argv) != 0:
        raise RuntimeError(f"timm-edl export {' '.join(argv)} failed")
    args.zoo_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(work / 'export' / 'model.safetensors', target)
    entry = {'file': target.name, 'sha256': file_sha256(target), 'bytes': target.stat().st_size,
             'recipe': pair.recipe, 'train_command': f"timm-edl train --config {pair.recipe}"
             + (f" --model {pair.archs[arm]}" if arm != 'edl' else ''),
             'commit': git_commit().split()[0][:12], 'machine': machine_info(),
             'train_wall_seconds': round(train['train_seconds']), 'card': f'hub_cards/{name}.md'}
    manifest = args.zoo_dir / 'manifest.json'
    entries = _manifest(args)
    entries[name] = entry
    tmp = manifest.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + '\n')
    tmp.replace(manifest)
    drop_cached_weights(best, target, log)
    log(f"{pair.key}: shipped {name} ({entry['bytes']:,} bytes)")
    return {'name': name, 'evals': evals, 'train': train, 'entry': entry}


def _in_checkout(command: str) -> str:
    """A recorded command with the checkout's own paths written relative to it (as they run from there)."""
    return command.replace(f"{REPO}/", '')


def verdicts(rows: list[dict[str, Any]]) -> str:
    """'Clean: EDL helps (p = 8.9e-07); PGD-20: tie (p = 0.53).' for the paired rows (5 % level)."""
    return '; '.join(f"{r['metric'].split(' (')[0]}: {verdict(r)} (p = {r['p']:.2g})" for r in rows) + '.'


def pair_markdown(pair: Pair, shipped: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [f"### {pair.label}: `{pair.archs['edl']}` vs `{pair.archs['conv']}` ({pair.about})", '',
             paired_table(rows), '',
             'Paired on the same test points (exact McNemar test on the points where exactly one model is right; '
             'for the corruptions, the exact sign test per point): ' + verdicts(rows), '']
    for arm in ARMS:
        s = shipped[arm]
        lines.append(f"- `{s['name']}`: {s['train']['epochs']} epochs, {s['train']['train_seconds'] / 3600:.1f} h "
                     f"of training steps; `{s['entry']['train_command']}`; evaluations: "
                     + '; '.join(f"`{_in_checkout(r['command'])}`" for _, r in s['evals'].values()))
    return '\n'.join(lines)


def _pct(report: dict[str, Any] | None, key: str) -> str:
    value = None if report is None else report.get(key)
    return '-' if value is None else f"{100 * value:.2f}"


def readme_rows(pair: Pair, shipped: dict[str, dict[str, Any]]) -> list[str]:
    """One README zoo row per shipped model of the pair (accuracies in %, points in parentheses)."""
    rows = []
    for arm in ARMS:
        ev = {k: r for k, (_, r) in shipped[arm]['evals'].items()}
        full, aa, cert, cor = (ev.get(k) for k in ('full', 'aa', 'certify', 'corruptions'))
        robust = (f"PGD-20 {_pct(full, 'pgd_acc')} ({full['n_ex']:,}); AA {_pct(aa, 'autoattack_acc')} "
                  f"({aa['n_ex']:,})" if aa else '')
        if cert:
            radii = {row['radius']: row['accuracy'] for row in cert['certified_accuracy']}
            robust = (f"certified L2 0.25 / 0.5: {100 * radii[0.25]:.1f} / {100 * radii[0.5]:.1f} "
                      f"({cert['n_ex']:,}, sigma {cert['sigma']:g}, n {cert['n']:,})")
        corrupt = f"{_pct(cor, 'corruptions_acc')} ({cor['n_ex']:,})" if cor else '-'
        rows.append(f"| `{pair.archs[arm]}` | `{pair.tag}` | {pair.label} | {pair.about} | {_pct(full, 'clean_acc')} "
                    f"({full['n_ex']:,}) | {robust} | {corrupt} | `make zoo` (`{pair.recipe}`) |")
    return rows


def ship_pair(pair: Pair, args, log) -> dict[str, dict[str, Any]] | None:
    """Both arms exported and shipped; None (and why, logged) if a step is missing or a check failed."""
    state = status(pair, args.cache_root)
    if not all(all(v for v in state[arm].values()) for arm in ARMS):
        log(f"{pair.key}: not shipped yet, steps left: "
            + ', '.join(f"{arm}/{k}" for arm in ARMS for k, v in state[arm].items() if not v))
        return None
    failed = [f"{arm}/{k}" for arm in ARMS for k, (_, r) in reports(pair, arm, args.cache_root).items()
              if r.get('failed_checks')]
    if failed:
        log(f"{pair.key}: NOT SHIPPED, checks failed in {failed}")
        return None
    return {arm: ship_arm(pair, arm, args, log) for arm in ARMS}


def ship_pairs(pairs: list[Pair], args, log) -> list[str]:
    """Export and ship ``pairs``; the README's and the docs' pair sections are rewritten with
    them and with every other pair shipped before, which keep their rows."""
    names, sections, rows, summary = [], [], [], []
    wanted = {pair.key: pair for pair in pairs}
    for pair in sorted({**PAIRS, **wanted}.values(), key=lambda p: p.key):
        shipped = ship_pair(pair, args, log) if pair.key in wanted else shipped_before(pair, args)
        if shipped is None:
            continue
        compared = paired_rows(shipped['edl']['evals'], shipped['conv']['evals'])
        sections.append(pair_markdown(pair, shipped, compared))
        rows += readme_rows(pair, shipped)
        summary.append(f"- `{pair.name('edl')}` vs its twin, paired on the same points (exact tests, 5 % level): "
                       + verdicts(compared))
        if pair.key in wanted:
            names += [shipped[arm]['name'] for arm in ARMS]
    if sections:
        body = '## Model pairs (`experiments/zoo_pairs.py`)\n\n' + '\n\n'.join(sections)
        for path in (args.out_md, args.out_md.parent / 'results.md'):
            write_section(path, SECTION, body)
        write_section(args.readme, SECTION, '\n'.join(
            ['| Model | Tag | Data | Training | Clean | Robust | Corruptions (generated) | Made by |',
             '|---|---|---|---|---|---|---|---|'] + rows + [''] + summary))
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(f"[zoo ship {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)

    shipped = ship_pairs([PAIRS[k] for k in (args.pair or sorted(PAIRS))], args, log)
    log(f"shipped: {', '.join(shipped) or 'none'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
