"""What every claim's section of ``docs/results.md`` is made of: the cached results of one run of
``paper_claims.py`` (:class:`Results`), mean ± sample std over seeds, paired gaps, and the plot
helpers (bar charts, per-epoch curves).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _jobs import read_cached
from claims_setup import COLORS, DATASETS, MODELS, Scale, plan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of ``values``; the std of one value is 0.

    >>> mean_std([0.5, 0.6, 0.7])
    (0.6, 0.1)
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"mean_std got a non-finite value: {vals}")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return round(mean, 12), round(math.sqrt(var), 12)


def fmt_pm(values: Sequence[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """``'52.3 ± 1.2'`` (values x ``scale``, mean ± sample std over seeds); 'n/a' if any is missing."""
    if not values or any(v is None for v in values):
        return 'n/a'
    m, s = mean_std([scale * v for v in values])
    return f'{m:.{digits}f} ± {s:.{digits}f}'


class Results:
    """The cached JSONs of one experiment, indexed for the tables."""

    def __init__(self, scale: Scale, seeds: int, out_dir: Path, datasets: Sequence[str]):
        self.scale, self.seeds, self.out_dir, self.datasets = scale, seeds, out_dir, list(datasets)
        self.train: dict[tuple[str, str, str, int], dict[str, Any]] = {}
        self.evals: dict[tuple[str, str, str, int, str], dict[str, Any]] = {}
        self.eval_seconds: dict[tuple[str, str, str, int, str], float] = {}
        self.missing: list[str] = []
        for job in plan(scale, seeds, out_dir, datasets):
            data = read_cached(job.cache, job.spec)
            ds, regime, model, s, what = job.key.split('/')
            key = (ds, regime, model, int(s[1:]))
            if data is None:
                self.missing.append(job.key)
            elif job.kind == 'train':
                self.train[key] = data
            else:
                self.evals[key + (what[len('eval_'):],)] = data['report']
                self.eval_seconds[key + (what[len('eval_'):],)] = data['wall_seconds']

    def report(self, ds, regime, model, seed, name='final') -> dict[str, Any] | None:
        return self.evals.get((ds, regime, model, seed, name))

    def values(self, ds, regime, model, metric, name='final') -> list[float | None]:
        """``metric`` of every seed: 'clean', 'noise', 'pgd', 'autoattack', 'naive:<mode>',
        'train_seconds' (wall clock of the run), 'best_epoch' (1-based)."""
        out = []
        for seed in range(self.seeds):
            if metric == 'train_seconds':
                t = self.train.get((ds, regime, model, seed))
                out.append(None if t is None else t['wall_seconds'])
                continue
            if metric == 'best_epoch':
                t = self.train.get((ds, regime, model, seed))
                out.append(None if t is None or t['best_epoch'] is None else t['best_epoch'] + 1)
                continue
            if metric.startswith('naive:'):
                mode = metric.split(':', 1)[1]
                rep = self.report(ds, regime, model, seed, 'final')
                if rep is None or rep['results'].get('naive', {}).get('mode') != mode:
                    rep = self.report(ds, regime, model, seed, f'naive-{mode}')
                out.append(None if rep is None else rep['results'].get('naive', {}).get('accuracy'))
                continue
            rep = self.report(ds, regime, model, seed, name)
            out.append(None if rep is None else rep['results'].get(metric, {}).get('accuracy'))
        return out

    def failed_checks_text(self, ds, regime, model, name='final') -> str:
        """'passed', or which checks failed in how many seeds (final weights by default)."""
        failed: dict[str, int] = {}
        n = 0
        for seed in range(self.seeds):
            rep = self.report(ds, regime, model, seed, name)
            if rep is None:
                continue
            n += 1
            for c in rep['failed_checks']:
                failed[c] = failed.get(c, 0) + 1
        if n == 0:
            return 'n/a'
        partial = '' if n == self.seeds else f' ({n} of {self.seeds} seeds evaluated)'
        if not failed:
            return 'passed' + partial
        return 'FAILED ' + ', '.join(f'{c} ({k}/{n})' for c, k in failed.items()) + partial

    def worker_seconds(self, regime: str) -> float:
        """Sum of the wall clock of every cached training and evaluation of ``regime``."""
        return (sum(t['wall_seconds'] for k, t in self.train.items() if k[1] == regime)
                + sum(w for k, w in self.eval_seconds.items() if k[1] == regime))

    def betas(self, ds, regime, model) -> dict[str, list[float]]:
        """Per EDL layer, the final beta of every seed (from the evaluation report)."""
        layers: dict[str, list[float]] = {}
        for seed in range(self.seeds):
            rep = self.report(ds, regime, model, seed)
            for layer, beta in (rep or {}).get('edl_beta', {}).items():
                layers.setdefault(layer, []).append(beta)
        return layers

    def curve(self, ds, model, column='eval_robust_top1', regime='at') -> list[list[float]]:
        """Per seed, the per-epoch value of a summary.csv column of an adversarial run."""
        out = []
        for seed in range(self.seeds):
            t = self.train.get((ds, regime, model, seed))
            if t is not None:
                out.append([r.get(column) for r in t['epochs']])
        return out


# ----------------------------------------------------------------------------- statistics of seeds


def gap_text(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, str]:
    """Paired difference a - b over seeds (points): mean, std, and a neutral description
    relative to the seed spread (|mean| vs the std of the paired difference and of b)."""
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    noise = max(s, mean_std([100 * y for y in b])[1])
    if len(diffs) == 1:
        return m, s, 'one seed: no spread to compare with'
    word = 'larger than the seed std' if abs(m) > noise else 'within the seed std'
    higher = sum(d > 0 for d in diffs)
    lower = sum(d < 0 for d in diffs)
    return m, s, f"{word}, higher in {higher} and lower in {lower} of {len(diffs)} seeds"


def complete(*lists: Sequence[float | None]) -> bool:
    """Every list non-empty and free of missing (None) values."""
    return all(lst and all(v is not None for v in lst) for lst in lists)


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def mean_curve(curves: list) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, std) over the complete curves (all values numbers), up to the shortest."""
    curves = [c for c in curves if c and all(isinstance(v, float) for v in c)]
    if not curves:
        return [], [], []
    stats = [mean_std([c[e] for c in curves]) for e in range(min(len(c) for c in curves))]
    return list(range(1, len(stats) + 1)), [s[0] for s in stats], [s[1] for s in stats]


def save_figure(fig, title: str, plot_dir: Path, name: str, rel: str, fontsize: int = 11) -> str:
    """Title, lay out, write ``<plot_dir>/<name>.png`` and close ``fig``; its path relative to the Markdown."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(plot_dir / f'{name}.png', dpi=110)
    plt.close(fig)
    return f'{rel}/{name}.png'


def bar_figure(res: Results, plot_dir: Path, rel: str, name: str, title: str, groups: Sequence[tuple[str, str]],
               series: Sequence[str], regime: str, what: str) -> str:
    """Per dataset, mean ± std bars over seeds of ``res.values(ds, regime, model, metric)`` (in %):
    one group per ``(metric, label)`` of ``groups``, one bar per model of ``series``; written to
    ``<plot_dir>/<name>.png``, its path relative to the Markdown returned."""
    plt = pyplot()
    dss = res.datasets
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4), squeeze=False)
    width = 0.8 / len(series)
    for ax, ds in zip(axes[0], dss):
        for i, model in enumerate(series):
            means, stds = [], []
            for metric, _ in groups:
                vals = res.values(ds, regime, model, metric)
                m, s = mean_std([100 * v for v in vals]) if complete(vals) else (float('nan'), 0.0)
                means.append(m)
                stds.append(s)
            xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(groups))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=MODELS[model][0], color=COLORS[model])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[1] for g in groups], rotation=20, ha='right', fontsize=8)
        ax.set_ylabel('accuracy (%)')
        ax.set_title(f"{DATASETS[ds]['label']}: {what}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis='y', alpha=0.3)
    return save_figure(fig, f'{title} (mean ± std over {res.seeds} seeds)', plot_dir, name, rel)


def epoch_curves(res: Results, plot_dir: Path, rel: str, column: str, models: Sequence[str], emphasize: Sequence[str],
                 ylabel: str, title: str, name: str) -> str:
    """Per dataset, the mean ± std over seeds of a summary.csv column per epoch of the adversarial
    runs (regime 'at'), one line per model, with the lr decays and beta's release marked."""
    plt = pyplot()
    dss = res.datasets
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        for model in models:
            xs, m, sd = mean_curve(res.curve(ds, model, column))
            if not xs:
                continue
            emph = model in emphasize
            ax.plot(xs, m, marker='o', ms=3, lw=2 if emph else 1, alpha=1 if emph else 0.5,
                    label=MODELS[model][0], color=COLORS[model])
            ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.15,
                            color=COLORS[model])
        for ms in res.scale.decay_milestones:
            ax.axvline(ms + 0.5, color='gray', ls='--', lw=0.8)
        ax.axvline(res.scale.elastic_from + 0.5, color='green', ls=':', lw=0.8)
        ax.set_xlabel('epoch (dashed: lr x0.1; dotted: elastic DL releases beta)')
        ax.set_ylabel(ylabel)
        ax.set_title(DATASETS[ds]['label'], fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, f'{title} (mean ± std over {res.seeds} seeds)', plot_dir, name, rel)
