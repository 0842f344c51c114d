"""The report of a randomized-smoothing certification (``timm-edl certify``): its dictionary
(schema :data:`SCHEMA`), Markdown, the certified-accuracy curve (PNG) and the files.

The report holds the setting (``sigma``, ``n0``, ``n``, ``alpha``, ``seed``), the model and
data, ``certified_accuracy`` (one row per L2 radius: ``radius``, ``accuracy`` as a fraction
of all points, ``n_certified``), ``abstention_rate``, one record per point (``points``: see
:func:`timm_edl.evaluation.smoothing.certify`), the Hub ``model_index`` (certified accuracy
at each radius, :func:`timm_edl.results.certified_eval_results`), timings, versions and the
command.  :func:`timm_edl.results.read_certified_results` reads it back for a model card.
"""
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import results as result_schema
from ..results import pct_text
from .smoothing import RADII, certified_accuracy

__all__ = ['SCHEMA', 'build_report', 'markdown', 'plot_certified', 'write_outputs', 'output_stem', 'reserve_stem']

SCHEMA = 'timm-edl-certify/1'
_SUFFIXES = ('.json', '.md', '.png')


def build_report(records: Sequence[Dict[str, Any]], *, model: Dict[str, Any], data: Dict[str, Any],
                 sigma: float, n0: int, n: int, alpha: float, seed: int, batch_size: int, device: str,
                 base_clean_acc: Optional[float], timings: Dict[str, float], versions: Dict[str, Any],
                 radii: Sequence[float] = RADII) -> Dict[str, Any]:
    """The report dictionary of finished ``records`` (one per point, in point order).

    ``model``: :func:`timm_edl.evaluation.describe_model`; ``data``: name, display_name,
    split, n_ex, n_total, lossy; ``base_clean_acc``: the base classifier's accuracy without noise.
    """
    table = certified_accuracy(records, radii)
    report: Dict[str, Any] = {
        'schema': SCHEMA,
        'method': 'randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), CERTIFY',
        'architecture': model['architecture'], 'weights_digest': model['weights_digest'],
        'dataset': data['name'], 'data_label': data['display_name'], 'split': data['split'], 'n_ex': len(records),
        'threat_model': 'L2', 'sigma': float(sigma), 'n0': int(n0), 'n': int(n), 'alpha': float(alpha),
        'seed': int(seed), 'batch_size': int(batch_size), 'device': device,
        'base_clean_acc': base_clean_acc,
        'smoothed_acc': table['radii'][0]['accuracy'] if table['radii'] and table['radii'][0]['radius'] == 0 else None,
        'certified_accuracy': table['radii'], 'abstention_rate': table['abstention_rate'],
        'n_abstained': table['n_abstained'],
        'points': list(records),
        'timings': {k: round(v, 3) for k, v in timings.items()},
        'model': model, 'data': data, 'versions': versions,
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }
    name = model.get('spec') or model['architecture']
    name = Path(name.split(':', 1)[-1]).name.removesuffix('.safetensors')
    report['model_index'] = result_schema.certified_model_index(
        name, [result_schema.normalize_certified(report, 'certification report')])
    return report


def output_stem(report: Dict[str, Any]) -> str:
    """``<model>_<dataset>_certify_sigma=<sigma>``, file-name safe."""
    model = report['model'].get('spec') or report['architecture']
    model = Path(model).stem if model.lower().endswith(('.safetensors', '.pth', '.pt', '.bin')) else model
    raw = f"{model.split(':', 1)[-1]}_{report['dataset']}_certify_sigma={report['sigma']:g}"
    return re.sub(r'[^A-Za-z0-9._=-]+', '_', raw.replace('/', '_')).strip('_')


def markdown(report: Dict[str, Any], files: Optional[Dict[str, str]] = None) -> str:
    """The human-readable report: setting, certified accuracy per radius, abstention, timing."""
    r = report
    title = r['model'].get('spec') or r['architecture']
    lines: List[str] = [
        f"## Certified robustness of `{title}` on {r['data_label']} ({r['split']}, first {r['n_ex']} points)", '',
        f"Randomized smoothing (Cohen et al., 2019), Gaussian noise sigma = **{r['sigma']:g}** on [0, 1] pixels; "
        f"n0 = {r['n0']} selection samples, n = {r['n']:,} estimation samples, alpha = {r['alpha']:g} "
        f"(each radius holds with probability >= {1 - r['alpha']:g} per point); seed {r['seed']}; device "
        f"`{r['device']}`; architecture `{r['architecture']}`; weights: {r['model'].get('weights')}."]
    if r['model'].get('weights') == 'random-init':
        lines += ['', '**UNTRAINED WEIGHTS**: randomly initialised model; the numbers say nothing about robustness.']
    if r['data'].get('lossy'):
        lines += ['', f"**Data: {r['data_label']}**, a lossy copy: do not compare with published numbers."]
    lines += ['', '| L2 radius | ' + ' | '.join(f"{row['radius']:g}" for row in r['certified_accuracy']) + ' |',
              '|---|' + '---:|' * len(r['certified_accuracy']),
              '| certified accuracy | ' + ' | '.join(pct_text(row['accuracy']) for row in r['certified_accuracy'])
              + ' |', '']
    lines.append(f"Abstained on {r['n_abstained']} of {r['n_ex']} points ({pct_text(r['abstention_rate'])}); "
                 f"base classifier without noise: {pct_text(r['base_clean_acc'])}.")
    t = r['timings']
    lines += ['', f"Wall time {t.get('total', 0):.1f} s ({t.get('seconds_per_point', 0):.2f} s per point; "
              f"{r['timings'].get('resumed_points', 0):g} points taken from an earlier run's state)."]
    if files:
        lines += ['', 'Files: ' + ', '.join(f"`{p}`" for p in files.values()) + '.']
    return '\n'.join(lines) + '\n'


def plot_certified(report: Dict[str, Any], path: Path) -> Path:
    """Certified accuracy vs L2 radius: the step curve of every point's radius, and the table's radii."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    radii = sorted((p['radius'] for p in report['points'] if p['correct'] and p['radius'] is not None), reverse=True)
    n = report['n_ex']
    top = max([report['certified_accuracy'][-1]['radius']] + radii) * 1.05 or 1.0
    xs = [0.0] + [r for r in sorted(radii)] + [top]
    ys = [100 * len(radii) / n] + [100 * (len(radii) - i - 1) / n for i in range(len(radii))] + [0.0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.step(xs, ys, where='post', label=f"sigma = {report['sigma']:g}, n = {report['n']:,}")
    ax.plot([row['radius'] for row in report['certified_accuracy']],
            [100 * row['accuracy'] for row in report['certified_accuracy']], 'o', color='C3', label='table radii')
    ax.set_xlabel('L2 radius')
    ax.set_ylabel('certified accuracy (%)')
    ax.set_ylim(-2, 102)
    ax.set_title(f"{report['model'].get('spec') or report['architecture']} on {report['data_label']} "
                 f"({n} points)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reserve_stem(out_dir: Path, stem: str, overwrite: bool) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... so that no existing output is replaced."""
    candidate, i = stem, 1
    while not overwrite and any((Path(out_dir) / f"{candidate}{s}").exists() for s in _SUFFIXES):
        i += 1
        candidate = f"{stem}-{i}"
    return candidate


def write_outputs(report: Dict[str, Any], out_dir: Path, stem: str) -> Dict[str, str]:
    """Write ``<stem>.json``, ``.md`` and ``.png`` into ``out_dir``; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {'json': str(out_dir / f"{stem}.json"), 'markdown': str(out_dir / f"{stem}.md"),
             'curve': str(out_dir / f"{stem}.png")}
    report['files'] = files
    plot_certified(report, Path(files['curve']))
    Path(files['markdown']).write_text(markdown(report, files), encoding='utf-8')
    Path(files['json']).write_text(json.dumps(report, indent=2, allow_nan=False) + '\n', encoding='utf-8')
    return files
