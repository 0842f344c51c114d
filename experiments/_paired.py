"""Paired comparisons of two models on the same points (the zoo's EDLNets vs their conv twins):
accuracies and McNemar's exact test (:mod:`timm_edl.stats`) from the per-point results of their
evaluation JSONs (``timm-edl eval``, ``--threat-model corruptions``, ``timm-edl certify``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

def bits(report: dict[str, Any], key: str) -> list[bool] | None:
    from timm_edl.evaluation.core import unpack_correct
    packed = (report.get('per_point') or {}).get(key)
    return None if packed is None else unpack_correct(packed, report['n_ex'])


def paired_row(name: str, a: list[bool] | None, b: list[bool] | None) -> dict[str, Any] | None:
    """Accuracies of a and b on the same points and the exact McNemar p-value."""
    from timm_edl.stats import mcnemar_exact
    if a is None or b is None:
        return None
    if len(a) != len(b):
        raise ValueError(f"{name}: the two models were evaluated on different points ({len(a)} vs {len(b)})")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return {'metric': name, 'n': len(a), 'a': 100 * sum(a) / len(a), 'b': 100 * sum(b) / len(b),
            'only_a': only_a, 'only_b': only_b, 'p': mcnemar_exact(only_a, only_b)}


def paired_rows(edl: dict[str, tuple[Path, dict]], conv: dict[str, tuple[Path, dict]]) -> list[dict[str, Any]]:
    """EDLNet (a) vs twin (b) on every metric both have per-point results for."""
    rows = []
    for step, keys in (('full', (('clean', 'Clean'), ('pgd', 'PGD-20'))),
                       ('aa', (('autoattack', 'AutoAttack'),))):
        if step in edl and step in conv:
            for key, label in keys:
                n = edl[step][1]['n_ex']
                rows.append(paired_row(f"{label} ({n:,} points)", bits(edl[step][1], key), bits(conv[step][1], key)))
    if 'corruptions' in edl and 'corruptions' in conv:
        rows.append(corruption_row(edl['corruptions'][1], conv['corruptions'][1]))
    if 'certify' in edl and 'certify' in conv:
        rows += certify_rows(edl['certify'][1], conv['certify'][1])
    return [r for r in rows if r is not None]


def corruption_row(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Per test point, the number of its corrupted copies (corruption x severity) each model gets
    right; the exact sign test of those paired counts (the copies of one image are not independent
    outcomes, the points are). ``only_a`` / ``only_b``: points where a / b gets more right."""
    from timm_edl.stats import sign_test
    keys = [k for k in (a.get('per_point') or {}) if k != 'clean' and k in (b.get('per_point') or {})]
    if not keys:
        return None
    counts = [[sum(col) for col in zip(*(bits(r, k) for k in keys))] for r in (a, b)]
    more, fewer, p = sign_test(*counts)
    total = len(keys) * a['n_ex']
    return {'metric': f"Corruptions ({a['n_ex']:,} points x {len(keys)} corrupted copies; sign test per point)",
            'n': a['n_ex'], 'a': 100 * sum(counts[0]) / total, 'b': 100 * sum(counts[1]) / total,
            'only_a': more, 'only_b': fewer, 'p': p}


def certify_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        ca = [p['correct'] and p['radius'] is not None and p['radius'] >= r for p in a['points']]
        cb = [p['correct'] and p['radius'] is not None and p['radius'] >= r for p in b['points']]
        rows.append(paired_row(f"Certified, L2 radius {r:g} ({len(ca)} points)", ca, cb))
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    lines = ['| Metric | EDLNet | Conv twin | EDL better | Twin better | p (exact) |', '|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['metric']} | {r['a']:.2f} | {r['b']:.2f} | {r['only_a']} | {r['only_b']} | {r['p']:.3g} |")
    return '\n'.join(lines)


def verdict(row: dict[str, Any], level: float = 0.05) -> str:
    if row['p'] >= level:
        return 'tie'
    return 'EDL helps' if row['a'] > row['b'] else 'EDL hurts'
