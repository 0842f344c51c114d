"""The common-corruptions evaluation (RobustBench's ``corruptions`` threat model).

:func:`evaluate_corruptions` measures, on the first ``n`` test points, the accuracy under
every (corruption, severity) of a :class:`~timm_edl.data.corruptions.CorruptedSet`::

    acc[c, s] = #{i : argmax f(x_i^{c,s}) = y_i} / n          (exact: a count over n)
    corruptions_acc = sum_{c,s} #correct[c, s] / (|C| |S| n)   (RobustBench's number on 15 x 5)

plus the mean per severity and per corruption and the clean accuracy of the same points.
Per-point correctness of every pair is kept (``pack_correct``) for paired tests between
models.  :func:`corruption_markdown` and :func:`write_corruption_outputs` write the report.
"""
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..results import pct_text
from .config import resolve_device
from .core import dataset_fields, package_versions, model_index, pack_correct
from .errors import EvaluationError
from .models import describe_model
from .runners import progress_bar

__all__ = ['CORRUPTIONS_SCHEMA', 'evaluate_corruptions', 'corruption_markdown', 'write_corruption_outputs']

CORRUPTIONS_SCHEMA = 'timm-edl-eval-corruptions/1'


def _as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (b, H, W, C) -> float32 (b, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255)


@torch.inference_mode()
def _correct(model: nn.Module, images: Any, labels: torch.Tensor, batch_size: int, device: torch.device,
             bar: Any) -> torch.Tensor:
    """(n,) bool correctness; ``images`` uint8 (n, H, W, C) (read batch by batch) or float (n, C, H, W)."""
    out = torch.zeros(len(labels), dtype=torch.bool)
    for start in range(0, len(labels), batch_size):
        end = min(start + batch_size, len(labels))
        batch = images[start:end]
        x = _as_float(batch) if isinstance(batch, np.ndarray) else batch
        out[start:end] = model(x.to(device)).argmax(-1).cpu() == labels[start:end]
        bar.update(end - start)
    return out


def _table(correct: Dict[Tuple[str, int], torch.Tensor], corruptions: Sequence[str],
           severities: Sequence[int], n: int) -> Dict[str, Any]:
    """Accuracies (fractions of counts) per pair, per severity, per corruption and overall."""
    count = {k: int(v.sum()) for k, v in correct.items()}

    def mean(keys: List[Tuple[str, int]]) -> float:
        return sum(count[k] for k in keys) / (len(keys) * n)

    pairs = [(c, s) for c in corruptions for s in severities]
    return {
        'corruption_accuracy': {c: {str(s): count[c, s] / n for s in severities} for c in corruptions},
        'n_correct': {c: {str(s): count[c, s] for s in severities} for c in corruptions},
        'mean_per_severity': {str(s): mean([(c, s) for c in corruptions]) for s in severities},
        'mean_per_corruption': {c: mean([(c, s) for s in severities]) for c in corruptions},
        'corruptions_acc': mean(pairs),
    }


def evaluate_corruptions(
        model: nn.Module,
        corrupted: Any,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        *,
        corruptions: Sequence[str],
        severities: Sequence[int],
        dataset: Any = 'cifar10',
        split: str = 'test',
        batch_size: int = 100,
        device: str = 'cpu',
        seed: int = 0,
        model_source: Optional[Dict[str, Any]] = None,
        info: Optional[Dict[str, Any]] = None,
        n_total: Optional[int] = None,
        progress: bool = True,
        log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Accuracy of ``model`` (eval mode, float32) on every (corruption, severity) of ``corrupted``.

    Args:
        corrupted: a :class:`~timm_edl.data.corruptions.CorruptedSet` of ``n`` points (its
            ``label`` names the data in the report).
        x, y: the same ``n`` points, clean ((n, C, H, W) in [0, 1], (n,)); without ``x`` the
            clean accuracy is not measured (None), without ``y`` the set's labels are used.
        corruptions, severities: the pairs to evaluate (RobustBench: all 15 x 5).
        dataset: a ``timm_edl.data`` name or ``DatasetInfo`` of the clean data.
        info: RobustBench fields (link, name, authors, venue, reported, footnote, ...).
        n_total: size of the whole split (the footnote notes a subset).

    Returns the report dictionary (fields in docs/evaluation.md).
    """
    started = time.time()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    n = int(corrupted.n)
    labels = torch.as_tensor(corrupted.labels, dtype=torch.long) if y is None else y
    if len(labels) != n or (x is not None and len(x) != n):
        raise EvaluationError(f"the clean points ({len(labels)}) and the corrupted set ({n} per severity) differ")
    if int(batch_size) < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    device_ = resolve_device(device)
    model = model.to(device_).eval()
    correct: Dict[Any, torch.Tensor] = {}
    timings: Dict[str, float] = {}
    pairs = [(c, s) for c in corruptions for s in severities]
    with progress_bar((len(pairs) + (x is not None)) * n, 'corruptions', progress) as bar:
        if x is not None:
            t = time.time()
            correct['clean'] = _correct(model, x, labels, int(batch_size), device_, bar)
            timings['clean'] = time.time() - t
        for c, s in pairs:
            t = time.time()
            correct[c, s] = _correct(model, corrupted.images(c, s), labels, int(batch_size), device_, bar)
            timings[f'{c}/{s}'] = time.time() - t
    table = _table({k: v for k, v in correct.items() if k != 'clean'}, corruptions, severities, n)
    clean_acc = int(correct['clean'].sum()) / n if 'clean' in correct else None
    log(f"[corruptions] {100 * table['corruptions_acc']:.2f}% mean over {len(pairs)} corruption-severity pairs"
        + ('' if clean_acc is None else f"; clean {100 * clean_acc:.2f}%"))
    timings['total'] = time.time() - started
    example = x[:int(batch_size)] if x is not None else _as_float(corrupted.images(*pairs[0])[:int(batch_size)])
    description = describe_model(model, model_source, example.to(device_))
    per_point = {('clean' if k == 'clean' else f'{k[0]}/{k[1]}'): pack_correct(v) for k, v in correct.items()}
    return _report(corrupted, table, clean_acc, description, dataset=dataset, split=split, n_total=n_total,
                   info=info or {}, corruptions=corruptions, severities=severities, seed=seed, device=device_,
                   batch_size=int(batch_size), timings=timings, per_point=per_point)


def _footnote(*, generated: bool, corruption_label: str, lossy: bool, label: str, n: int, n_total: Optional[int],
              split: str, complete: bool, pairs: int, weights: Any, extra: Optional[str]) -> Optional[str]:
    notes = []
    if generated:
        notes.append(f"{corruption_label}: ImageNet-C parameters of the library, not the published CIFAR-10-C / "
                     f"CIFAR-100-C sets: not comparable with RobustBench's corruptions leaderboard.")
    if lossy:
        notes.append(f"Clean images from {label}, a lossy copy of the dataset.")
    if n_total and n < n_total:
        notes.append(f"First {n} of {n_total} {split} points.")
    if not complete:
        notes.append(f"Mean over {pairs} of the 75 corruption-severity pairs (RobustBench averages all 75).")
    if weights == 'random-init':
        notes.append("UNTRAINED (randomly initialised) weights.")
    text = ' '.join(notes) or None
    return f"{extra} {text or ''}".strip() if extra else text


def _report(corrupted: Any, table: Dict[str, Any], clean_acc: Optional[float], description: Dict[str, Any], *,
            dataset: Any, split: str, n_total: Optional[int], info: Dict[str, Any], corruptions: Sequence[str],
            severities: Sequence[int], seed: int, device: torch.device, batch_size: int, timings: Dict[str, float],
            per_point: Dict[str, str]) -> Dict[str, Any]:
    from ..data.corruptions import CORRUPTIONS, SEVERITIES
    name, label, _, data_info = dataset_fields(dataset, None)
    n, generated = int(corrupted.n), corrupted.generated is not None
    complete = tuple(corruptions) == CORRUPTIONS and tuple(severities) == SEVERITIES
    lossy = bool(getattr(data_info, 'lossy', False))
    footnote = _footnote(generated=generated, corruption_label=corrupted.label, lossy=lossy, label=label, n=n,
                         n_total=n_total, split=split, complete=complete, pairs=len(corruptions) * len(severities),
                         weights=description.get('weights'), extra=info.get('footnote'))
    versions = package_versions()
    if generated:
        versions[corrupted.generated['library']] = corrupted.generated['version']
    report: Dict[str, Any] = {
        'schema': CORRUPTIONS_SCHEMA,
        # RobustBench model_info fields (fractions; `robustbench` below has its string format)
        'link': info.get('link'), 'name': info.get('name'), 'authors': info.get('authors'),
        'additional_data': info.get('additional_data'),
        'number_forward_passes': info.get('number_forward_passes', 1), 'dataset': name, 'venue': info.get('venue'),
        'architecture': description['architecture'], 'eps': None, 'clean_acc': clean_acc,
        'reported': info.get('reported'), 'corruptions_acc': table['corruptions_acc'], 'footnote': footnote,
        'unreliable': False,
        # also read by `timm-edl export`
        'split': split, 'n_ex': n, 'threat_model': 'corruptions', 'weights_digest': description['weights_digest'],
        'data_label': label, 'corruption_label': corrupted.label,
        'corruptions': list(corruptions), 'severities': list(severities), 'complete': complete,
        **{k: v for k, v in table.items() if k != 'corruptions_acc'},
        # ours
        'data': {'name': name, 'display_name': label, 'split': split, 'n_ex': n, 'n_total': n_total, 'lossy': lossy,
                 'corrupted': {'label': corrupted.label, 'folder': str(Path(corrupted.folder).absolute()),
                               'source': 'generated' if generated else 'published',
                               'n_per_severity': int(corrupted.n_per_severity), 'generator': corrupted.generated}},
        'seed': seed, 'device': str(device),
        'timings': {k: round(v, 3) for k, v in timings.items()},
        'per_point': per_point,
        'model': description,
        'config': {'corruptions': list(corruptions), 'severities': list(severities), 'batch_size': batch_size,
                   'seed': seed, 'device': str(device)},
        'versions': versions,
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'robustbench': {'dataset': name, 'eps': None, 'architecture': description['architecture'],
                        'clean_acc': None if clean_acc is None else f"{100 * clean_acc:.2f}",
                        'corruptions_acc': f"{100 * table['corruptions_acc']:.2f}", 'footnote': footnote,
                        **{k: info.get(k) for k in ('link', 'name', 'authors', 'additional_data', 'venue',
                                                    'reported')}},
    }
    report['model_index'] = model_index(report)
    return report


def corruption_markdown(report: Dict[str, Any], files: Optional[Dict[str, str]] = None) -> str:
    """The human-readable report: the corruption x severity table with its means."""
    r, sev = report, report['severities']
    title = r['model'].get('spec') or r['architecture']
    lines = [f"## Common corruptions: `{title}` on {r['corruption_label']} ({r['split']}, first {r['n_ex']} points)",
             '',
             f"Mean corruption accuracy **{pct_text(r['corruptions_acc'])}** over {len(r['corruptions'])} corruptions "
             f"x {len(sev)} severities; clean accuracy of the same {r['data_label']} points "
             f"{pct_text(r['clean_acc'], 'not measured (clean split not found)')}. Seed {r['seed']}; device "
             f"`{r['device']}`; architecture `{r['architecture']}`; weights: {r['model'].get('weights')}."]
    if r.get('footnote'):
        lines += ['', f"Note: {r['footnote']}"]
    lines += ['', '| Corruption | ' + ' | '.join(f"severity {s}" for s in sev) + ' | Mean |',
              '|---|' + '---:|' * (len(sev) + 1)]
    for c in r['corruptions']:
        row = r['corruption_accuracy'][c]
        lines.append(f"| {c} | " + ' | '.join(pct_text(row[str(s)]) for s in sev)
                     + f" | {pct_text(r['mean_per_corruption'][c])} |")
    lines.append('| **Mean** | ' + ' | '.join(pct_text(r['mean_per_severity'][str(s)]) for s in sev)
                 + f" | **{pct_text(r['corruptions_acc'])}** |")
    lines += ['', f"Total wall time {r['timings']['total']:.1f} s; library versions: "
              + ', '.join(f"{k} {v}" for k, v in r['versions'].items() if v) + '.']
    if files:
        lines += ['', 'Files: ' + ', '.join(f"`{p}`" for p in files.values()) + '.']
    return '\n'.join(lines) + '\n'


def write_corruption_outputs(report: Dict[str, Any], out_dir: Path, stem: str) -> Dict[str, str]:
    """Write ``<stem>.json``, ``.md`` and ``.model-index.yaml`` into ``out_dir`` (the caller
    picks a ``stem`` that replaces nothing it should not); ``report['files']`` is set too."""
    import yaml
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {'json': str(out_dir / f"{stem}.json"), 'markdown': str(out_dir / f"{stem}.md"),
             'model_index': str(out_dir / f"{stem}.model-index.yaml")}
    report['files'] = files
    Path(files['model_index']).write_text(
        yaml.safe_dump({'model-index': report['model_index']}, sort_keys=False, allow_unicode=True), encoding='utf-8')
    Path(files['markdown']).write_text(corruption_markdown(report, files), encoding='utf-8')
    Path(files['json']).write_text(json.dumps(report, indent=2, allow_nan=False) + '\n', encoding='utf-8')
    return files
