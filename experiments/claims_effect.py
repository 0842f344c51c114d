"""Claim (b), the EDL effect: conv twin, vanilla DL (beta = 1), robust DL (beta = 0) and elastic DL
(beta learned, two-stage) under the same PGD adversarial training; its table, learned betas,
summary, bar chart and beta curves."""
from __future__ import annotations

from pathlib import Path

from claims_results import Results, bar_figure, complete, epoch_curves, fmt_pm, gap_text, mean_std
from claims_setup import DATASETS, MODELS, REGIMES


def effect_section(res: Results, ds: str) -> list[str]:
    label = DATASETS[ds]['label']
    models = REGIMES['at']
    lines = [f'### {label}', '',
             (f'| model | clean | random noise | PGD-{res.scale.pgd_steps} | AutoAttack | worst case | '
              f'training time (s) | best val. epoch | masking checks |'),
             '|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for model in models:
        lines.append(f"| {MODELS[model][0]} | {fmt_pm(res.values(ds, 'at', model, 'clean'))} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'noise'))} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'pgd'))} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'autoattack'))} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'worst_case'))} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'train_seconds'), scale=1.0, digits=0)} | "
                     f"{fmt_pm(res.values(ds, 'at', model, 'best_epoch'), scale=1.0, digits=1)} | "
                     f"{res.failed_checks_text(ds, 'at', model)} |")
    lines += ['', ('Accuracy in % of the final weights (mean ± std over seeds). Worst case: a point counts only '
                   'if it survives every attack run on it (noise, PGD, AutoAttack, the naive and the transfer '
                   'attack). Masking checks: see (d); a model that fails one has an overstated PGD number. '
                   'Training time: wall clock of '
                   '`train()`, the whole run including the per-epoch robust validation and the exports, on a '
                   '2-core machine shared with the other job and with other work (its load varied during the '
                   'run): a rough cost indication, compare it within this table only.'), '']
    # betas
    layer_names: list[str] = []
    for model in ('vanilla', 'robust', 'elastic'):
        for layer in res.betas(ds, 'at', model):
            if layer not in layer_names:
                layer_names.append(layer)
    if layer_names:
        lines += ['Learned beta per EDL layer (final weights, mean ± std over seeds; vanilla and robust are fixed):',
                  '', '| model | ' + ' | '.join(f'`{n}`' for n in layer_names) + ' |',
                  '|---|' + '---:|' * len(layer_names)]
        for model in ('vanilla', 'robust', 'elastic'):
            b = res.betas(ds, 'at', model)
            lines.append(f'| {MODELS[model][0]} | ' + ' | '.join(
                fmt_pm(b.get(n), scale=1.0, digits=3) if b.get(n) else 'n/a' for n in layer_names) + ' |')
        lines.append('')
    aa = {m: res.values(ds, 'at', m, 'autoattack') for m in models}
    clean = {m: res.values(ds, 'at', m, 'clean') for m in models}
    if not complete(*aa.values(), *clean.values()):
        return lines + ['*What we see:* not all runs are finished; no summary.', '']
    means = {m: mean_std(aa[m])[0] for m in models}
    order = sorted(models, key=lambda m: -means[m])
    sentences = ["Ranking by mean AutoAttack accuracy: "
                 + ' > '.join(f"{MODELS[m][0]} ({100 * means[m]:.1f})" for m in order)]
    for m in ('vanilla', 'robust', 'elastic'):
        g, sd, word = gap_text(aa[m], aa['conv'])
        gc, sc, _ = gap_text(clean[m], clean['conv'])
        sentences.append(f"{MODELS[m][0]} minus the conv twin: AutoAttack {g:+.1f} ± {sd:.1f} points ({word}), "
                         f"clean {gc:+.1f} ± {sc:.1f}")
    g_ev, s_ev, word_ev = gap_text(aa['elastic'], aa['vanilla'])
    sentences.append(f"Elastic minus vanilla DL: AutoAttack {g_ev:+.1f} ± {s_ev:.1f} points ({word_ev})")
    moved = None
    eb = res.betas(ds, 'at', 'elastic')
    if eb:
        layer_means = {n: mean_std(v)[0] for n, v in eb.items()}
        lo = min(layer_means, key=layer_means.get)
        moved = max(abs(1 - v) for v in layer_means.values())
        sentences.append(f"The learned betas (mean per layer) range from {min(layer_means.values()):.3f} "
                         f"(`{lo}`) to {max(layer_means.values()):.3f}; all start at 1 when beta is released at "
                         f"epoch {res.scale.elastic_from + 1}, so beta moved by at most {moved:.3f}")
    flagged = [m for m in models if res.failed_checks_text(ds, 'at', m).startswith('FAILED')]
    if flagged:
        sentences.append("Gradient-masking checks failed for " + ', '.join(
            f"{MODELS[m][0]} ({res.failed_checks_text(ds, 'at', m)[len('FAILED '):]})" for m in flagged)
            + ": for these models PGD overstates robustness, and AutoAttack / the worst case is the number to "
              "read")
    t_conv = mean_std(res.values(ds, 'at', 'conv', 'train_seconds'))[0]
    t_el = mean_std(res.values(ds, 'at', 'elastic', 'train_seconds'))[0]
    sentences.append(f"Elastic DL took {t_el / t_conv:.1f}x the conv twin's training time")

    def relation(g, word, a, b):
        if word.startswith('larger'):
            return f"{a} is {'above' if g > 0 else 'below'} {b} by more than the seed spread"
        return f"{a} and {b} are not separable at this scale"

    g_ec, _, word_ec = gap_text(aa['elastic'], aa['conv'])
    verdict = (f"under AutoAttack, {relation(g_ec, word_ec, 'elastic DL', 'the conv twin')}, and "
               f"{relation(g_ev, word_ev, 'elastic DL', 'vanilla DL')}")
    if moved is not None and moved < 0.1:
        verdict += ("; since beta stayed within 0.1 of 1, elastic DL is nearly vanilla DL here, and a difference "
                    "from the conv twin cannot be credited to learning beta")
    lines += [f"*What we see ({label}, computed from the numbers above):* "
              + '. '.join(x[0].upper() + x[1:] for x in sentences) + f". In short: {verdict}.", '']
    return lines


def plot_effect(res: Results, plot_dir: Path, rel: str) -> str:
    """Bar chart of clean, noise, PGD and AutoAttack accuracy of the adversarial runs, per dataset."""
    groups = [('clean', 'clean'), ('noise', 'noise'), ('pgd', 'PGD'), ('autoattack', 'AutoAttack')]
    return bar_figure(res, plot_dir, rel, 'edl_effect', '(b) EDL effect', groups, REGIMES['at'], 'at',
                      'PGD adversarial training')


def plot_beta(res: Results, plot_dir: Path, rel: str) -> str:
    """Mean beta over the EDL layers per epoch of the adversarial runs."""
    models = ('vanilla', 'robust', 'elastic')
    return epoch_curves(res, plot_dir, rel, 'train_beta_mean', models, models, 'mean beta over EDL layers',
                        'beta during adversarial training', 'beta')


def effect_part(res: Results, plots: dict[str, str]) -> list[str]:
    """Part (b) of the document: a table, the betas and a summary per dataset, then the plots."""
    lines = ['## (b) The EDL effect: the same PGD adversarial training for every model', '']
    for ds in res.datasets:
        lines += effect_section(res, ds)
    lines += [f"![EDL effect]({plots['edl_effect']})", '', f"![beta during training]({plots['beta']})", '']
    return lines
