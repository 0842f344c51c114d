"""Claim (c), robust overfitting: the best-validation checkpoint against the last one, for the
adversarial runs of (b) and for the long runs on a small training set (regime 'ro'); tables,
summaries, validation curves, and the wall time of the long runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from claims_results import (Results, complete, epoch_curves, fmt_pm, gap_text, mean_curve, mean_std, pyplot,
                            save_figure)
from claims_setup import COLORS, DATASETS, MODELS, REGIMES


def overfitting_section(res: Results, ds: str, regime: str = 'at', heading: str = '###') -> list[str]:
    """The best-vs-last table of (c) for the short runs of (b) (``regime='at'``) or the long runs ('ro')."""
    label = DATASETS[ds]['label']
    sc = res.scale
    models = ('conv', 'elastic') if regime == 'at' else REGIMES['ro']
    lines = [f'{heading} {label}', '',
             (f'| model | best val. epoch | val. robust acc., best epoch | val. robust acc., last epoch | '
             f'test PGD-{sc.pgd_steps}, best checkpoint | test PGD-{sc.pgd_steps}, last checkpoint | '
             f'best minus last (test) |'),
             '|---|---:|---:|---:|---:|---:|---:|']
    summary = []
    gaps: dict[str, tuple[float, str]] = {}
    diffs: dict[str, list[float]] = {}
    for model in models:
        curves = res.curve(ds, model, regime=regime)
        best_val = [max(c) / 100 for c in curves]
        last_val = [c[-1] / 100 for c in curves]
        best = res.values(ds, regime, model, 'pgd', name='best')
        last = res.values(ds, regime, model, 'pgd', name='final')
        diff = ([b - la for b, la in zip(best, last)] if complete(best, last) else [None])
        lines.append(f"| {MODELS[model][0]} | {fmt_pm(res.values(ds, regime, model, 'best_epoch'), 1.0)} | "
                     f"{fmt_pm(best_val)} | {fmt_pm(last_val)} | {fmt_pm(best)} | {fmt_pm(last)} | "
                     f"{fmt_pm(diff)} |")
        if complete(best, last) and curves:
            m, s, word = gap_text(best, last)
            gaps[model] = (m, word)
            diffs[model] = diff
            vm = mean_std([100 * (b - la) for b, la in zip(best_val, last_val)])[0]
            text = (f"{MODELS[model][0]}: the best-validation checkpoint is {m:+.1f} ± {s:.1f} points "
                    f"(test PGD) from the last one ({word}); on the validation curve the peak is "
                    f"{vm:.1f} points above the last epoch")
            if regime == 'ro':
                first = sc.ro_decay_milestones[0] if sc.ro_decay_milestones else None
                epochs = [e for e in res.values(ds, regime, model, 'best_epoch') if e is not None]
                if first is not None:
                    after = sum(first + 1 <= e <= first + 2 for e in epochs)
                    text += (f"; the best validation epoch is one of the two epochs right after the first lr "
                             f"decay (epochs {first + 1}-{first + 2}) in {after} of {len(epochs)} seeds")
            summary.append(text)
    val_text = (f"Validation: PGD-{sc.val_attack_steps} on {sc.val_n_ex} held-out training images after every "
                f"epoch (selects `best/`). Test: the first {sc.n_test} test points, ")
    val_text += ("same attack as table (b). Accuracy in %." if regime == 'at' else
                 f"adaptive PGD-{sc.pgd_steps} as in table (b) (no AutoAttack on these runs). Accuracy in %.")
    lines += ['', val_text, '']
    if not summary:
        return lines + ['*What we see:* not all runs are finished; no summary.', '']
    text = f"*What we see ({label}, computed from the numbers above):* " + '; '.join(summary) + '. '
    if regime == 'ro' and len(gaps) == len(models):
        shown = [MODELS[m][0] for m in models if gaps[m][0] > 0 and gaps[m][1].startswith('larger')]
        not_shown = [MODELS[m][0] for m in models if MODELS[m][0] not in shown]
        if shown:
            text += (f"Robust overfitting (best checkpoint above the last by more than the seed std) shows for "
                     f"{', '.join(shown)}" + (f", not for {', '.join(not_shown)}" if not_shown else '') + '. ')
        else:
            text += "Robust overfitting (best checkpoint above the last by more than the seed std) shows for no model. "
        reverse = [MODELS[m][0] for m in models if gaps[m][0] < 0 and gaps[m][1].startswith('larger')]
        if reverse:
            text += (f"The last checkpoint is above the best-validation one by more than the seed std for "
                     f"{', '.join(reverse)}: the epoch picked on the validation images did worse on the test "
                     f"points. ")
        fits = []
        for m in models:
            tr = [c[-1] for c in res.curve(ds, m, 'train_robust_top1', regime='ro') if c]
            va = [c[-1] for c in res.curve(ds, m, regime='ro') if c]
            if tr and va and all(isinstance(v, float) for v in tr + va):
                fits.append(f"{MODELS[m][0]} {mean_std(tr)[0]:.1f} % vs {mean_std(va)[0]:.1f} %")
        if fits:
            text += ("Training vs validation robust accuracy at the last epoch (training: PGD-3 on the augmented "
                     "batches; validation: PGD-10): " + ', '.join(fits) + ". ")
        if 'elastic' in diffs and 'conv' in diffs:
            g, sd, word = gap_text(diffs['elastic'], diffs['conv'])
            text += (f"Elastic DL's best-minus-last gap minus the conv twin's: {g:+.1f} ± {sd:.1f} points "
                     f"({word}). ")
        text += "A difference within the seed std means the effect is not separable from noise at this scale."
    else:
        text += ("Robust overfitting shows as a best checkpoint clearly above the last one; a difference within "
                 "the seed std means it is not visible at this scale.")
    return lines + [text, '']


def ro_wall_text(res: Results, meta: dict[str, Any]) -> str:
    """The wall time of the long runs of (c): invocations that ran only those jobs, and worker time."""
    only = [r for r in meta.get('invocations', []) if r.get('jobs_run', 0) > 0 and r.get('regimes') == ['ro']]
    worker = res.worker_seconds('ro') / 60
    if only:
        return (f"{sum(r['wall_seconds'] for r in only) / 60:.1f} min wall with --jobs "
                f"{only[-1].get('jobs', '?')} (the invocation(s) that ran only these jobs), "
                f"{worker:.1f} worker-minutes in trainings and evaluations")
    return f"{worker:.1f} worker-minutes in trainings and evaluations (run together with other jobs)"


def plot_overfitting(res: Results, plot_dir: Path, rel: str) -> str:
    """Robust validation accuracy per epoch of the adversarial runs of (b)."""
    return epoch_curves(res, plot_dir, rel, 'eval_robust_top1', REGIMES['at'], ('conv', 'elastic'),
                        'validation PGD accuracy (%)', '(c) robust validation accuracy per epoch',
                        'robust_overfitting')


def plot_overfitting_long(res: Results, plot_dir: Path, rel: str) -> str:
    """Robust validation (mean ± std) and training accuracy per epoch of the long runs."""
    plt = pyplot()
    dss = res.datasets
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        for model in REGIMES['ro']:
            for column, style, alpha, what in (('eval_robust_top1', '-', 1.0, 'validation'),
                                               ('train_robust_top1', ':', 0.6, 'training')):
                xs, m, sd = mean_curve(res.curve(ds, model, column, regime='ro'))
                if not xs:
                    continue
                ax.plot(xs, m, ls=style, marker='o' if what == 'validation' else None, ms=3, alpha=alpha,
                        lw=2 if what == 'validation' else 1, color=COLORS[model],
                        label=f"{MODELS[model][0]}, {what}")
                if what == 'validation':
                    ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                    alpha=0.15, color=COLORS[model])
        for ms in res.scale.ro_decay_milestones:
            ax.axvline(ms + 0.5, color='gray', ls='--', lw=0.8)
        ax.axvline(res.scale.elastic_from + 0.5, color='green', ls=':', lw=0.8)
        ax.set_xlabel('epoch (dashed: lr x0.1; dotted: elastic DL releases beta)')
        ax.set_ylabel('PGD accuracy (%)')
        ax.set_title(f"{DATASETS[ds]['label']}: {res.scale.ro_train_n_ex} training images", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(
        fig, f'(c) long runs: robust accuracy per epoch (validation PGD-{res.scale.val_attack_steps}, '
             f'mean ± std over {res.seeds} seeds; training PGD-3 on the batches, mean)',
        plot_dir, 'robust_overfitting_long', rel, fontsize=10)


def overfitting_part(res: Results, meta: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Part (c) of the document: the short runs of (b), then the long runs, each with its plot."""
    sc = res.scale
    ro_models = ', '.join(MODELS[m][0] for m in REGIMES['ro'])
    lines = ['## (c) Robust overfitting: best vs last checkpoint', '',
             ("Robust overfitting (Rice et al. 2020): in adversarial training with a piecewise learning rate, the "
              "test robust accuracy peaks shortly after the first lr decay and then falls, so the last checkpoint "
              "is below the best one. Every run below has a robust validation after every epoch; `best/` is the "
              "epoch with the highest validation PGD accuracy."), '',
             '### Short runs: the adversarial runs of (b)', '',
             (f"No separate run: a multistep schedule ({sc.epochs} epochs, lr x0.1 at "
              f"epochs {', '.join(str(m + 1) for m in sc.decay_milestones)}) on {sc.train_n_ex} images."), '']
    for ds in res.datasets:
        lines += overfitting_section(res, ds, 'at', '####')
    lines += [f"![robust overfitting]({plots['robust_overfitting']})", '',
              '### Long runs on a small training set', '',
              (f"Separate runs ({ro_models}), where robust overfitting usually shows: the recipe of (b) (PGD-3 "
               f"training, batch {sc.batch_size}, SGD lr {sc.lr}, elastic DL two-stage with beta frozen at 1 for "
               f"epochs 1-{sc.elastic_from}) on only the first {sc.ro_train_n_ex} training images (the same "
               f"{sc.val_n_ex} held-out validation images), for {sc.ro_epochs} epochs with lr x0.1 at epochs "
               f"{', '.join(str(m + 1) for m in sc.ro_decay_milestones)} (1-based: from that epoch on). "
               f"Both the best-validation and the last checkpoint are evaluated on the same test points. "
               f"Cost of this part: {ro_wall_text(res, meta)}."), '']
    for ds in res.datasets:
        lines += overfitting_section(res, ds, 'ro', '####')
    lines += [f"![robust overfitting, long runs]({plots['robust_overfitting_long']})", '']
    return lines
