"""Claim (d): the gradient-masking checks of ``timm-edl eval`` for every evaluated model, one row
per (dataset, regime, model, weights) and one cell per check summarising the seeds."""
from __future__ import annotations

from claims_results import Results
from claims_setup import CHECKS, DATASETS, MODELS, REGIME_LABELS, REGIMES


def checks_section(res: Results) -> list[str]:
    lines = ['| data | training | model | weights | ' + ' | '.join(CHECKS) + ' |',
             '|---|---|---|---|' + '---|' * len(CHECKS)]
    n_failed, failed_models = 0, []
    for ds in res.datasets:
        for regime, models in REGIMES.items():
            for model in models:
                names = ['final'] + (['best'] if regime == 'ro' or (regime == 'at' and model in ('conv', 'elastic'))
                                     else [])
                for name in names:
                    cells = []
                    any_failed = False
                    for check in CHECKS:
                        statuses = []
                        for seed in range(res.seeds):
                            rep = res.report(ds, regime, model, seed, name)
                            st = None if rep is None else next(
                                (c['status'] for c in rep['checks'] if c['name'] == check), 'not run')
                            statuses.append(st)
                        cells.append(check_cell(statuses))
                        any_failed |= 'failed' in statuses
                    if any_failed:
                        n_failed += 1
                        failed_models.append(f"{DATASETS[ds]['label']}, {REGIME_LABELS[regime]}, "
                                             f"{MODELS[model][0]} ({name} weights)")
                    lines.append(f"| {DATASETS[ds]['label']} | {REGIME_LABELS[regime]} | "
                                 f"{MODELS[model][0]} | {name} | " + ' | '.join(cells) + ' |')
    lines += ['', ("Per check: `passed k/n` over the n seeds, `FAILED sX` names the seeds where it failed, "
              "`warning` counts warnings (passed, with a remark in the report). `transfer` runs for EDL models "
              "only (surrogate: the conv twin built from the model's dictionaries); `naive-vs-adaptive` needs "
              "the naive attack and `autoattack-checks` AutoAttack, run on the final weights of (a) and (b) only "
              "(not on best checkpoints nor on the long runs of (c))."),
              '']
    if failed_models:
        lines.append(f"*What we see:* {n_failed} of the evaluated models failed at least one check in at least "
                     f"one seed: {'; '.join(failed_models)}. Their robust accuracies may be overstated; read them "
                     f"with the failed check in mind (the per-run reports have the details).")
    else:
        lines.append("*What we see:* no evaluated model failed a gradient-masking check in any seed.")
    lines.append('')
    return lines


def check_cell(statuses: list[str | None]) -> str:
    """One check over the seeds: 'missing', 'FAILED s<i>,...', '-' (never run), or 'passed k/n'."""
    if any(s is None for s in statuses):
        return 'missing'
    n = len(statuses)
    failed = [f's{i}' for i, s in enumerate(statuses) if s == 'failed']
    if failed:
        return 'FAILED ' + ','.join(failed)
    if all(s in ('skipped', 'not run') for s in statuses):
        return '-'
    passed = sum(s in ('passed', 'warning') for s in statuses)
    warn = sum(s == 'warning' for s in statuses)
    return f'passed {passed}/{n}' + (f' ({warn} warning{"s" if warn > 1 else ""})' if warn else '')


def checks_part(res: Results) -> list[str]:
    """Part (d) of the document: the table of every evaluated model's checks and its summary."""
    return ['## (d) Gradient-masking checks of every evaluated model', ''] + checks_section(res)
