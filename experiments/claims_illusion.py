"""Claim (a), the robustness illusion: a naturally trained vanilla-DL network (beta = 1, SDNet-style)
and its conv twin under random noise, naive attacks (gradients through a truncated, linearised or
one-step solver), adaptive PGD and AutoAttack; its table, summary and bar chart."""
from __future__ import annotations

from pathlib import Path

from claims_results import Results, bar_figure, complete, fmt_pm, gap_text, mean_std
from claims_setup import DATASETS, MODELS, REGIMES


def illusion_section(res: Results, ds: str, plots: dict[str, str]) -> list[str]:
    label = DATASETS[ds]['label']
    modes = res.scale.naive_modes
    cols = [('clean', 'clean'), ('noise', 'random noise')] + [(f'naive:{m}', f'naive PGD ({m})') for m in modes] + \
        [('pgd', f'adaptive PGD-{res.scale.pgd_steps}'), ('autoattack', 'AutoAttack')]
    lines = [f'### {label}', '',
             '| model | ' + ' | '.join(c[1] for c in cols) + ' |',
             '|---|' + '---:|' * len(cols)]
    for model in REGIMES['natural']:
        lines.append(f'| {MODELS[model][0]} | ' + ' | '.join(
            fmt_pm(res.values(ds, 'natural', model, c[0])) for c in cols) + ' |')
    lines.append('')
    lines.append("Accuracy in % (mean ± std over seeds). The conv twin has no solver to truncate: its \"naive\" "
                 "attacks are plain PGD through the conv twin (same gradients as the adaptive attack).")
    lines.append('')
    # what we see
    v = {c[0]: res.values(ds, 'natural', 'vanilla', c[0]) for c in cols}
    cv = {c[0]: res.values(ds, 'natural', 'conv', c[0]) for c in cols}
    if not complete(*v.values(), *cv.values()):
        return lines + ['*What we see:* not all runs are finished; no summary.', '']
    parts = []
    illusion_modes = []
    for m in modes:
        gm, gs, word = gap_text(v[f'naive:{m}'], v['pgd'])
        parts.append(f"naive ({m}) minus adaptive PGD: {gm:+.1f} ± {gs:.1f} points ({word})")
        if gm > 0 and word.startswith('larger'):
            illusion_modes.append(m)
    gap_aa, gap_aa_s, word_aa = gap_text(v['pgd'], v['autoattack'])
    noise_drop = mean_std([100 * (a - b) for a, b in zip(v['clean'], v['noise'])])
    conv_noise_drop = mean_std([100 * (a - b) for a, b in zip(cv['clean'], cv['noise'])])
    text = (f"*What we see ({label}, computed from the numbers above):* for vanilla DL, "
            + '; '.join(parts) + '. ')
    if illusion_modes:
        biggest = max(illusion_modes, key=lambda m: mean_std(v[f'naive:{m}'])[0])
        size = mean_std([100 * (a - b) for a, b in zip(v[f'naive:{biggest}'], v['pgd'])])[0]
        text += (f"So a naive evaluation ({', '.join(illusion_modes)}) reports more robustness than the adaptive "
                 f"attack finds, by up to {size:.1f} points ({biggest}): the illusion appears at this scale. ")
    else:
        text += ("No naive attack overstates vanilla DL's robustness by more than the seed spread: the illusion "
                 "does not appear at this scale. ")
    best_naive = max(modes, key=lambda m: mean_std(v[f'naive:{m}'])[0])
    g_naive, s_naive, _ = gap_text(v[f'naive:{best_naive}'], cv['pgd'])
    g_aa, s_aa, word_cross = gap_text(v['autoattack'], cv['autoattack'])
    text += (f"Compared with the conv twin, vanilla DL under its weakest naive attack ({best_naive}) looks "
             f"{g_naive:+.1f} ± {s_naive:.1f} points more robust than the conv twin under PGD; under AutoAttack "
             f"the difference is {g_aa:+.1f} ± {s_aa:.1f} points ({word_cross}). ")
    text += (f"Random noise costs vanilla DL {noise_drop[0]:.1f} points of clean accuracy (conv twin "
             f"{conv_noise_drop[0]:.1f}). AutoAttack is {gap_aa:.1f} ± {gap_aa_s:.1f} points below adaptive PGD "
             f"on vanilla DL ({word_aa}). Under AutoAttack vanilla DL has {fmt_pm(v['autoattack'])} % and the conv "
             f"twin {fmt_pm(cv['autoattack'])} %.")
    lines += [text, '']
    if 'illusion' in plots:
        lines += [f"![robustness illusion]({plots['illusion']})", '']
    return lines


def plot_illusion(res: Results, plot_dir: Path, rel: str) -> str:
    """Bar chart of every attack of the natural-training table, per dataset."""
    groups = ([('clean', 'clean'), ('noise', 'noise')] + [(f'naive:{m}', f'naive {m}') for m in res.scale.naive_modes]
              + [('pgd', 'adaptive PGD'), ('autoattack', 'AutoAttack')])
    return bar_figure(res, plot_dir, rel, 'illusion', '(a) robustness illusion', groups, REGIMES['natural'],
                      'natural', 'natural training')


def illusion_part(res: Results, plots: dict[str, str]) -> list[str]:
    """Part (a) of the document: the question, a table and summary per dataset, the bar chart."""
    lines = ['## (a) The robustness illusion: natural training, vanilla DL vs conv twin', '',
             ("Does a naturally trained vanilla-DL network (beta = 1, SDNet-style) look robust under random noise "
              "and naive attacks, and is that robustness gone under the adaptive attack and AutoAttack?"), '']
    for ds in res.datasets:
        lines += illusion_section(res, ds, plots if ds == res.datasets[-1] else {})
    return lines
