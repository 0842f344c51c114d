"""Writing an evaluation report: JSON, Markdown, the Hub model-index (YAML), the curve (PNG)."""
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..results import pct_text as _pct

__all__ = ['markdown', 'write_outputs', 'plot_sweep', 'output_stem', 'reserve_stem', 'OUTPUT_SUFFIXES']

OUTPUT_SUFFIXES = ('.json', '.md', '.model-index.yaml', '.png', '.autoattack.log')


def _secs(v: Optional[float]) -> str:
    if v is None:
        return '-'
    return f"{v:.1f} s" if v < 600 else f"{v / 60:.1f} min"


def output_stem(report: Dict[str, Any]) -> str:
    """``<model>_<dataset>_<threat model>_<eps>``, file-name safe."""
    model = report['model'].get('spec') or report['architecture']
    model = Path(model).stem if model.lower().endswith(('.safetensors', '.pth', '.pt', '.bin')) else model
    model = model.split(':', 1)[-1]
    raw = f"{model}_{report['dataset']}_{report['threat_model']}_{report['eps_text']}"
    return re.sub(r'[^A-Za-z0-9._=-]+', '_', raw.replace('/', '_')).strip('_')


def _unique_stem(out_dir: Path, stem: str, overwrite: bool) -> str:
    if overwrite:
        return stem
    candidate, i = stem, 1
    while any((out_dir / f"{candidate}{s}").exists() for s in OUTPUT_SUFFIXES):
        i += 1
        candidate = f"{stem}-{i}"
    return candidate


def markdown(report: Dict[str, Any], files: Optional[Dict[str, str]] = None) -> str:
    """The human-readable report: results table, FAILED CHECK section, checks, sweep, EDL layers."""
    r = report
    model = r['model']
    lines: List[str] = []
    title = model.get('spec') or r['architecture']
    lines.append(f"## Robustness of `{title}` on {r['data_label']} ({r['split']}, first {r['n_ex']} points)")
    lines.append('')
    weights = model.get('weights')
    setting = (f"Threat model **{r['threat_model']}**, eps = **{r['eps_text']}**"
               + (f" ({r['eps']:.6g})" if '/' in r['eps_text'] else '')
               + f"; seed {r['seed']}; device `{r['device']}`; architecture `{r['architecture']}` "
               f"({model['num_params']:,} parameters, {model['edl']['num_layers']} EDL layers); weights: {weights}.")
    lines.append(setting)
    if weights == 'random-init':
        lines.append('')
        lines.append('**UNTRAINED WEIGHTS**: randomly initialised model; the accuracies say nothing about robustness.')
    if r['data'].get('lossy'):
        lines.append('')
        lines.append(f"**Data: {r['data_label']}**, a lossy copy: do not compare with published numbers on the "
                     f"original dataset.")
    lines.append('')
    lines.append('| Evaluation | Accuracy | Correct | Wall time | CPU time | Wall time / 100 points |')
    lines.append('|---|---:|---:|---:|---:|---:|')
    for key in ('clean', 'noise', 'pgd', 'autoattack', 'worst_case', 'naive', 'transfer'):
        row = r['results'].get(key)
        if row is None:
            continue
        label = row['label']
        if key == 'autoattack' and row.get('resumed'):
            label += ' [resumed]'
        lines.append(f"| {label} | {_pct(row['accuracy'])} | {row['n_correct']} / {row['n']} "
                     f"| {_secs(row['seconds'])} | {_secs(row.get('cpu_seconds'))} | {_secs(row['seconds_per_100'])} |")
    aa = r['results'].get('autoattack')
    if aa and aa.get('per_attack'):
        lines.append('')
        lines.append('AutoAttack, robust accuracy after each attack: ' + ', '.join(
            f"{k} {_pct(v)}" for k, v in aa['per_attack'].items()) + '.')
    failed = [c for c in r['checks'] if c['status'] == 'failed']
    warned = [c for c in r['checks'] if c['status'] == 'warning']
    lines.append('')
    if failed:
        lines.append(f"### FAILED CHECK ({len(failed)} of {len(r['checks'])}): the robust accuracy above may be "
                     f"OVERSTATED")
        lines.append('')
        for c in failed:
            lines.append(f"- **FAILED CHECK `{c['name']}`**: {c['summary']}")
    else:
        ran = [c for c in r['checks'] if c['status'] != 'skipped']
        lines.append(f"### Checks: none failed ({len(ran)} ran, {len(r['checks']) - len(ran)} skipped, "
                     f"{len(warned)} warning{'s' if len(warned) != 1 else ''})")
    if warned:
        lines.append('')
        for c in warned:
            lines.append(f"- WARNING `{c['name']}`: {c['summary']}")
    lines.append('')
    lines.append('| Check | Status | Result |')
    lines.append('|---|---|---|')
    for c in r['checks']:
        status = c['status'].upper() if c['status'] in ('failed', 'warning') else c['status']
        lines.append(f"| {c['name']} | {status} | {c['summary'].replace('|', '/')} |")
    if r.get('eps_sweep'):
        lines.append('')
        pts = r['eps_sweep']
        lines.append(f"Accuracy vs eps ({pts[0]['attack']}, first {pts[0]['n']} points):")
        lines.append('')
        lines.append('| eps | ' + ' | '.join(p['eps'] for p in pts) + ' |')
        lines.append('|---|' + '---:|' * len(pts))
        lines.append('| accuracy | ' + ' | '.join(_pct(p['accuracy']) for p in pts) + ' |')
    layers = model['edl']['layers']
    if layers:
        lines.append('')
        lines.append('EDL layers (beta clamped to [0, 1] as in the forward; objective and sparsity on the first '
                     'clean batch):')
        lines.append('')
        lines.append('| layer | beta | lam | K | step rule | sparsity | objective |')
        lines.append('|---|---:|---:|---:|---|---:|---:|')
        for name, v in layers.items():
            sp = '-' if v.get('sparsity') is None else f"{100 * v['sparsity']:.1f} %"
            ob = '-' if v.get('objective') is None else f"{v['objective']:.4g}"
            lines.append(f"| {name} | {v['beta']:.3f} | {v['lam']:.3g} | {v['num_steps']} | {v['step_rule']} "
                         f"| {sp} | {ob} |")
    lines.append('')
    t = r['timings']
    lines.append(f"Total wall time {_secs(t.get('total'))} (CPU {_secs((r.get('cpu_timings') or {}).get('total'))}); "
                 f"library versions: " + ', '.join(
        f"{k} {v}" for k, v in r['versions'].items() if v) + '.')
    if files:
        lines.append('')
        lines.append('Files: ' + ', '.join(f"`{p}`" for p in files.values()) + '.')
    return '\n'.join(lines) + '\n'


def plot_sweep(report: Dict[str, Any], path: Path) -> Optional[Path]:
    """Accuracy vs eps (PGD on the check points; AutoAttack and clean marked); None if no sweep."""
    pts = report.get('eps_sweep')
    if not pts:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    xs = [p['eps_value'] for p in pts]
    ys = [100 * p['accuracy'] for p in pts]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(xs, ys, 'o-', label=f"{pts[0]['attack']} (first {pts[0]['n']} points)")
    if report.get('autoattack_acc') is not None:
        ax.plot([report['eps']], [100 * report['autoattack_acc']], 's', color='C3',
                label=f"AutoAttack {report.get('version')} ({report['n_ex']} points)")
    ax.axvline(report['eps'], color='gray', lw=0.8, ls=':')
    ax.set_xlabel(f"eps ({report['threat_model']})")
    ax.set_ylabel('accuracy (%)')
    ax.set_ylim(-2, 102)
    title = f"{report['model'].get('spec') or report['architecture']} on {report['data_label']}"
    if report['failed_checks']:
        title += '  [FAILED CHECK]'
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(report: Dict[str, Any], out_dir: Path, *, overwrite: bool = False,
                  stem: Optional[str] = None) -> Dict[str, str]:
    """Write ``<stem>.json``, ``.md``, ``.model-index.yaml`` (and ``.png`` with a sweep) into
    ``out_dir``; never replaces existing files unless ``overwrite`` (a ``-2``, ``-3``, ...
    suffix is added instead).  Returns {kind: path}; ``report['files']`` is set too."""
    import yaml
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = _unique_stem(out_dir, output_stem(report), overwrite)
    files: Dict[str, str] = {'json': str(out_dir / f"{stem}.json"), 'markdown': str(out_dir / f"{stem}.md"),
                             'model_index': str(out_dir / f"{stem}.model-index.yaml")}
    if report.get('eps_sweep') and (report.get('config') or {}).get('eps_sweep'):
        files['curve'] = str(out_dir / f"{stem}.png")
    report['files'] = files
    if files.get('curve'):
        plot_sweep(report, Path(files['curve']))
    Path(files['model_index']).write_text(
        yaml.safe_dump({'model-index': report['model_index']}, sort_keys=False, allow_unicode=True), encoding='utf-8')
    Path(files['markdown']).write_text(markdown(report, files), encoding='utf-8')
    Path(files['json']).write_text(json.dumps(_finite(report), indent=2, allow_nan=False, default=_json_default) + '\n',
                                   encoding='utf-8')
    return files


def _finite(value: Any) -> Any:
    """NaN / infinity -> None (JSON has no such numbers)."""
    import math
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def reserve_stem(out_dir: Path, stem: str, overwrite: bool = False) -> str:
    """The stem to use in ``out_dir``: ``stem`` or ``stem-2``, ... so no existing file is replaced."""
    return _unique_stem(Path(out_dir), stem, overwrite)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, 'tolist'):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
