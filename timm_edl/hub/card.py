"""The model card of an export: the Hub metadata (huggingface_hub's ``ModelCardData`` with one
``EvalResult`` per metric) and the Markdown sections of ``hub_cards/model_card.md.tmpl``."""
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..convert import PRESERVE_FUNCTION, edl_layer_config
from ..layers import edl_layers
from ..results import (
    attack_label, certified_eval_results, corruption_scope, data_label, eps_text, eval_results, pct, pct_text,
)
from ..stats import mcnemar_exact, paired_counts, sign_test, unpack_correct

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / '_cards' / 'model_card.md.tmpl'  # hub_cards/ links to it
_TAGS = ('image-classification', 'timm', 'edlnet', 'adversarial-robustness', 'timm-edl',
         'elastic-dictionary-learning', 'sparse-coding')


def float32_list(t: torch.Tensor) -> List[float]:
    """A tensor's values as the shortest decimals that read back to the same float32."""
    import numpy as np
    return [float(str(np.float32(v))) for v in t.detach().float().cpu().flatten().tolist()]


def metadata_yaml(model_name: str, license: str, datasets: List[str], results: List[Dict[str, Any]],
                  extra_tags: Sequence[str], certified: Sequence[Dict[str, Any]] = ()) -> str:
    """The card's YAML header: tags, license, datasets and the ``model-index`` of ``results``
    and of the ``certified`` entries (:func:`timm_edl.results.read_certified_results`)."""
    from huggingface_hub import ModelCardData
    tags = list(_TAGS) + [t for t in extra_tags if t not in _TAGS]
    metrics = eval_results(results) + certified_eval_results(certified)
    data = ModelCardData(library_name='timm', pipeline_tag='image-classification', license=license, tags=tags,
                         datasets=list(datasets) or None, model_name=model_name if metrics else None,
                         eval_results=metrics or None)
    return data.to_yaml()


def evaluation_markdown(results: List[Dict[str, Any]]) -> str:
    """The card's results table (clean and adversarial), then the common-corruptions section
    of the corruption results (:func:`corruptions_markdown`)."""
    if not results:
        return ("**No evaluation results are recorded for these weights.** Their clean and robust accuracy "
                "are unknown: do not assume that this model is robust.")
    corrupted = [r for r in results if r.get('threat_model') == 'corruptions']
    results = [r for r in results if r.get('threat_model') != 'corruptions']
    if not results:
        return ("**No adversarial evaluation is recorded for these weights**: do not assume that this model is "
                "robust to attacks." + corruptions_markdown(corrupted))
    rows = ['| Dataset (split) | Test points | Threat model | eps | Clean accuracy | AutoAttack accuracy '
            '| PGD accuracy |', '|---|---|---|---|---|---|---|']
    notes = []
    for i, r in enumerate(results, start=1):
        tm = r.get('threat_model', '-')
        eps = eps_text(r) if 'eps' in r else '-'
        aa = f"{pct(r['autoattack_acc']):.2f} % ({attack_label(r, 'autoattack_acc')})" \
            if 'autoattack_acc' in r else '-'
        pgd = '-'
        if 'pgd_acc' in r:
            detail = ', '.join(x for x in (f"{r['pgd_steps']} steps" if r.get('pgd_steps') else '',
                                           f"{r['pgd_restarts']} restart{'s' if r['pgd_restarts'] != 1 else ''}"
                                           if r.get('pgd_restarts') else '') if x)
            pgd = f"{pct(r['pgd_acc']):.2f} %" + (f" ({detail})" if detail else '')
        mark = ''
        if r.get('footnote') or r.get('unreliable'):
            mark = f" [{i}]"
            text = r.get('footnote') or ''
            if r.get('unreliable') and 'FAILED CHECK' not in text:
                failed = ', '.join(r.get('failed_checks', [])) or 'a gradient-masking check'
                text = f"FAILED CHECK: {failed}; the robust accuracy may be overstated. {text}".strip()
            notes.append(f"[{i}] {'**' if r.get('unreliable') else ''}{text}{'**' if r.get('unreliable') else ''}")
        rows.append(f"| {data_label(r)} ({r['split']}){mark} | {r['n_ex']} | {tm} | {eps} "
                    f"| {pct(r['clean_acc']):.2f} % | {aa} | {pgd} |")
    note = ("\n\nAccuracies are percentages of the test points, copied by `timm_edl.hub.export` from the "
            "evaluation entry point's JSON output (also stored in `config.json` under `timm_edl.evaluation`). "
            "They are not verified by the Hub.")
    if not any('autoattack_acc' in r or 'pgd_acc' in r for r in results):
        note += " **No robust accuracy is recorded.**"
    if notes:
        note += '\n\n' + '\n\n'.join(notes)
    return '\n'.join(rows) + note + corruptions_markdown(corrupted)


def corruptions_markdown(results: List[Dict[str, Any]]) -> str:
    """The ``Common corruptions`` section ('' without corruption results): per result, its
    mean corruption accuracy, the means per severity and (when recorded) the corruption x
    severity table."""
    parts = []
    for r in results:
        sev = r.get('severities') or sorted(int(s) for s in r.get('mean_per_severity') or {})
        text = (f"{r.get('corruption_label') or data_label(r)} ({r['split']}, first {r['n_ex']} points): "
                f"corruption accuracy **{pct_text(r['corruptions_acc'])}** ({corruption_scope(r)}); clean accuracy "
                f"of the same points {pct_text(r.get('clean_acc'), 'not recorded')}.")
        if r.get('footnote'):
            text += f" {r['footnote']}"
        table = r.get('corruption_accuracy') or {}
        means = r.get('mean_per_severity') or {}
        if table or means:
            rows = ['| Corruption | ' + ' | '.join(f"severity {s}" for s in sev) + ' |', '|---|' + '---:|' * len(sev)]
            rows += [f"| {c} | " + ' | '.join(pct_text(row.get(str(s))) for s in sev) + ' |' for c, row in table.items()]
            if means:
                rows.append('| **Mean** | ' + ' | '.join(pct_text(means.get(str(s))) for s in sev) + ' |')
            text += '\n\n' + '\n'.join(rows)
        parts.append(text)
    if not parts:
        return ''
    return ("\n\n### Common corruptions\n\nAccuracy on corrupted copies of the test points (`timm-edl eval "
            "--threat-model corruptions`; RobustBench's corruptions track).\n\n" + '\n\n'.join(parts))


def checks_markdown(results: List[Dict[str, Any]]) -> str:
    """The gradient-masking checks of each evaluation that ran them ('' when none did)."""
    parts = []
    for r in results:
        if not r.get('checks'):
            continue
        ran = [c for c in r['checks'] if c['status'] != 'skipped']
        skipped = [c['name'] for c in r['checks'] if c['status'] == 'skipped']
        rows = ['| Check | Status | Result |', '|---|---|---|']
        rows += [f"| `{c['name']}` | {c['status']} | {c['summary'].replace('|', '/')} |" for c in ran]
        failed = [c['name'] for c in ran if c['status'] == 'failed']
        verdict = (f"**Failed: {', '.join(failed)}; the robust accuracy above may be overstated.**" if failed
                   else f"Every check that ran passed{' (not run: ' + ', '.join(skipped) + ')' if skipped else ''}.")
        parts.append(f"Gradient-masking checks of `timm-edl eval` ({data_label(r)}, first {r['n_ex']} test points). "
                     f"{verdict}" + ('\n\n' + '\n'.join(rows) if ran else ''))
    return ''.join(f"\n\n{p}" for p in parts)


def certified_markdown(certified: Sequence[Dict[str, Any]], plots: Optional[Dict[str, Any]] = None) -> str:
    """The "Certified robustness (randomized smoothing)" section ('' without certifications);
    ``plots``: file names of certified-accuracy plots shipped beside the card."""
    parts = []
    for r in certified:
        rows = ['| L2 radius | ' + ' | '.join(f"{row['radius']:g}" for row in r['certified_accuracy']) + ' |',
                '|---|' + '---:|' * len(r['certified_accuracy']),
                '| Certified accuracy | ' + ' | '.join(pct_text(row['accuracy']) for row in r['certified_accuracy'])
                + ' |']
        base = f" Base classifier without noise: {pct_text(r['base_clean_acc'])}." if 'base_clean_acc' in r else ''
        parts.append(
            f"{data_label(r)} ({r['split']}), first {r['n_ex']} test points; Gaussian noise sigma = {r['sigma']:g} "
            f"on [0, 1] pixels, n0 = {r['n0']}, n = {r['n']:,}, alpha = {r['alpha']:g} (Cohen, Rosenfeld & "
            f"Kolter, ICML 2019, CERTIFY, written by `timm-edl certify`). Certified accuracy at radius r: the "
            f"fraction of the points that the smoothed classifier predicts correctly with a certified L2 radius of "
            f"at least r; abstentions count as errors.\n\n" + '\n'.join(rows)
            + f"\n\nAbstained on {pct_text(r['abstention_rate'])} of the points.{base}")
    if not parts:
        return ''
    images = [f"![Certified accuracy against the L2 radius]({name})" for name in plots or {}]
    return "\n\n### Certified robustness (randomized smoothing)\n\n" + '\n\n'.join(parts + images)


def _same_points(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    keys = ('dataset', 'split', 'n_ex', 'threat_model')
    if not all(a.get(k) == b.get(k) for k in keys):
        return False
    if a.get('threat_model') == 'corruptions':  # the same corruptions and severities of the same points
        return (a.get('corruption_label'), a.get('corruptions'), a.get('severities')) == \
            (b.get('corruption_label'), b.get('corruptions'), b.get('severities'))
    return abs((a.get('eps') or 0.0) - (b.get('eps') or 0.0)) < 1e-9


#: the metrics of the comparison table: (name, accuracy field, per_point key)
_PAIRED = (('clean', 'clean_acc', 'clean'), ('AutoAttack', 'autoattack_acc', 'autoattack'), ('PGD', 'pgd_acc', 'pgd'))


def paired_p_values(r: Dict[str, Any], o: Dict[str, Any], label: str) -> Tuple[List[Optional[float]], List[str]]:
    """McNemar's exact p-value (:mod:`timm_edl.stats`) of this model's result ``r`` against the
    result ``o`` of ``label`` on the same ``n_ex`` points, per metric of ``_PAIRED``, from their
    packed per-point results; ``None`` where one cannot be computed, with the reason."""
    values, reasons = [], []
    for name, acc_key, key in _PAIRED:
        missing = [who for who, e in (('this model', r), (label, o)) if e.get(acc_key) is None]
        if not missing:
            missing = [f"the evaluation JSON of {who} has no per-point {name} results" for who, e in
                       (('this model', r), (label, o)) if key not in (e.get('per_point') or {})]
        else:
            missing = [f"{name} was not evaluated for {' and '.join(missing)}"]
        if missing:
            values.append(None)
            reasons += missing
            continue
        b, c = paired_counts(unpack_correct(r['per_point'][key], r['n_ex']),
                             unpack_correct(o['per_point'][key], o['n_ex']))
        values.append(mcnemar_exact(b, c))
    return values, reasons


def _p_text(values: List[Optional[float]]) -> str:
    return ' / '.join('-' if p is None else f"{p:.3g}" for p in values)


def comparison_markdown(results: List[Dict[str, Any]], compare: Dict[str, List[Dict[str, Any]]]) -> str:
    """Other models (e.g. the conv twin) on exactly the points of ``results``: one row per
    (evaluation, model), with the paired McNemar p-value of each metric against this model.
    A comparison result that matches no evaluation of this model is an error."""
    if not compare:
        return ''
    names = ' / '.join(name for name, _, _ in _PAIRED)
    rows = ['| Model | Dataset (split) | Test points | Clean accuracy | AutoAttack accuracy | PGD accuracy '
            f'| McNemar p ({names}) |', '|---|---|---|---|---|---|---|']
    reasons: List[str] = []
    corrupted = [r for r in results if r.get('threat_model') == 'corruptions']
    results = [r for r in results if r.get('threat_model') != 'corruptions']
    compare_adv = {k: [o for o in v if o.get('threat_model') != 'corruptions'] for k, v in compare.items()}
    for r in results:
        rows.append(f"| this model | {data_label(r)} ({r['split']}) | {r['n_ex']} | {pct_text(r.get('clean_acc'))} "
                    f"| {pct_text(r.get('autoattack_acc'))} | {pct_text(r.get('pgd_acc'))} | |")
        for label, others in compare_adv.items():
            for o in others:
                if _same_points(r, o):
                    flag = f" (**failed check: {', '.join(o.get('failed_checks') or ['unreliable'])}**)" \
                        if o.get('unreliable') else ''
                    p_values, why = paired_p_values(r, o, label)
                    reasons += [w for w in why if w not in reasons]
                    rows.append(f"| {label}{flag} | {data_label(o)} ({o['split']}) | {o['n_ex']} "
                                f"| {pct_text(o.get('clean_acc'))} | {pct_text(o.get('autoattack_acc'))} "
                                f"| {pct_text(o.get('pgd_acc'))} | {_p_text(p_values)} |")
    for label, others in compare.items():
        for o in others:
            if not any(_same_points(r, o) for r in results + corrupted):
                raise ValueError(f"the comparison results of {label!r} ({data_label(o)}, {o['n_ex']} points) match no "
                                 f"evaluation of this model: compare on the same points")
    note = ("McNemar p: the two-sided exact McNemar test of this model against that row's model on the same "
            "points, from the per-point results of both evaluation JSONs (`per_point`): the binomial test of the "
            "points only this model gets right against the points only the other gets right. A small p: chance "
            "alone hardly explains the difference between the two accuracies on these points.")
    if reasons:
        note += f" '-': {'; '.join(reasons)}."
    table = ("\n\nOn the same test points, with the same attacks (each model's own evaluation JSON):\n\n"
             + '\n'.join(rows) + '\n\n' + note) if results else ''
    return table + corruption_comparison(corrupted, compare)


def _per_image(r: Dict[str, Any]) -> Optional[List[int]]:
    """Per test point, how many of its corrupted copies (corruption x severity) the model got right."""
    per_point = r.get('per_point') or {}
    keys = [k for k in per_point if k != 'clean']
    if not keys:
        return None
    columns = [unpack_correct(per_point[k], r['n_ex']) for k in keys]
    return [sum(col[i] for col in columns) for i in range(r['n_ex'])]


def corruption_comparison(corrupted: List[Dict[str, Any]], compare: Dict[str, List[Dict[str, Any]]]) -> str:
    """The compared models' corruption accuracy on the same corrupted points, with the exact sign
    test (:func:`timm_edl.stats.sign_test`) of the points' numbers of correct corrupted copies ('' without any)."""
    rows = ['| Model | Corrupted set | Test points | Corruption accuracy | Points this model does better / worse '
            '| Sign test p |', '|---|---|---|---|---|---|']
    for r in corrupted:
        rows.append(f"| this model | {r.get('corruption_label') or data_label(r)} | {r['n_ex']} "
                    f"| {pct_text(r['corruptions_acc'])} | | |")
        for label, others in compare.items():
            for o in (o for o in others if _same_points(r, o)):
                a, b = _per_image(r), _per_image(o)
                test = '- | -' if a is None or b is None else '{} / {} | {:.3g}'.format(*sign_test(a, b))
                rows.append(f"| {label} | {o.get('corruption_label') or data_label(o)} | {o['n_ex']} "
                            f"| {pct_text(o['corruptions_acc'])} | {test} |")
    if len(rows) == 2 + len(corrupted):
        return ''
    return ("\n\nCommon corruptions, same points and corruptions. Sign test: per test point, the number of its "
            "corrupted copies each model gets right; the points where this model gets more against those where "
            "it gets fewer, exact two-sided binomial test (ties dropped; the copies of one image are not "
            "independent outcomes, the points are).\n\n" + '\n'.join(rows))


def _range_text(values: List[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if abs(hi - lo) < 5e-4 else f"{lo:.3g} to {hi:.3g}"


def edl_markdown(model: nn.Module) -> Tuple[str, bool]:
    layers = edl_layers(model)
    if not layers:
        return "None: this is the convolutional twin (`edl_layers='none'`), a plain CNN.", False
    cfgs = [edl_layer_config(m) for _, m in layers]
    preserving = all(all(c[k] == v for k, v in PRESERVE_FUNCTION.items()) for c in cfgs)
    betas = [c['beta'] for c in cfgs]
    lams = [c['lam'] for c in cfgs]

    def values(key: str) -> str:
        vs = []
        for c in cfgs:
            v = c[key]
            if v not in vs:
                vs.append(v)
        return ', '.join('L by Lanczos (1.01 x lambda_max)' if (key == 'fixed_lipschitz' and v is None) else f"`{v}`"
                         for v in vs)

    n_conv = len(layers) + sum(1 for m in model.modules() if type(m) is nn.Conv2d)
    rows = [
        '| | |', '|---|---|',
        f"| EDL layers | {len(layers)} of {n_conv} convolutions |",
        f"| Unrolled RISTA steps (`num_steps`) | {values('num_steps')} |",
        f"| beta (per layer{'; learnable' if any(c['beta_learnable'] for c in cfgs) else ''}) | {_range_text(betas)} |",
        f"| lam (sparsity{'; learnable' if any(c['lam_learnable'] for c in cfgs) else ''}) | {_range_text(lams)} |",
        f"| Step rule | {values('step_rule')} |",
        f"| First step (`init`: 'ista' = plain ISTA warm start) | {values('init')} |",
        f"| l1 reweighting (`reweight`) | {values('reweight')} |",
        f"| Lipschitz constant L | {values('fixed_lipschitz')} |",
        f"| Unit-norm atoms (`normalize_atoms`) | {values('normalize_atoms')} |",
        f"| Non-negative codes (`nonneg`) | {values('nonneg')} |",
        f"| Smoothing of the reweighting (`eps`) | {values('eps')} |",
    ]
    text = '\n'.join(rows) + "\n\nThe exact per-layer options are in `config.json`."
    if preserving:
        text += ("\n\nEvery EDL layer is at the function-preserving setting (one step, beta = 1, lam = 0, L = 1, "
                 "no atom normalisation): the network computes exactly what the original convolutional network "
                 "computes. It has not been fine-tuned as an EDL network.")
    return text, preserving


def usage_markdown(repo_id: str, kind: str) -> str:
    if kind == 'edlnet':
        return (
            "```python\nimport timm\nimport timm_edl  # registers the edlnet_* architectures with timm: required\n\n"
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
            "config = timm.data.resolve_model_data_config(model)  # mean 0 / std 1: the model normalises itself\n"
            "# input: images with pixels in [0, 1], shape (B, *config['input_size'])\n```\n\n"
            f'`timm_edl.hub.load("hf-hub:{repo_id}")` does the same with clearer error messages. Without '
            "`import timm_edl`, timm fails with `Unknown model`: timm has no plugin discovery.")
    return (
        "```python\nimport timm\nimport timm_edl  # registers the edl_converted architecture with timm: required\n\n"
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
        "config = timm.data.resolve_model_data_config(model)\n```\n\n"
        "This is a timm model with EDL layers: `config.json` names the `edl_converted` architecture, which builds "
        "the original timm architecture (`model_args.base_model`) and applies the conversion recorded in "
        "`model_args.conversion` before timm loads the weights. "
        f'`timm_edl.hub.load("hf-hub:{repo_id}")` does the same with clearer error messages.')


def render_card(template: Path, fields: Dict[str, str]) -> str:
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template not found: {template} (export needs a source checkout of timm-edl, "
            f"or pass card_template=...)")
    return string.Template(template.read_text(encoding='utf-8')).substitute(fields)


def summary(model: nn.Module, arch: str, kind: str, num_classes: int, results: List[Dict[str, Any]]) -> str:
    n = len(edl_layers(model))
    data = ''
    if results:
        names = []
        for r in results:
            d = data_label(r)
            if d not in names:
                names.append(d)
        data = f", evaluated on {', '.join(names)}"
    if kind == 'edlnet':
        return (f"Elastic Dictionary Learning network `{arch}` ({n} EDL layers, {num_classes} classes{data}) "
                f"from timm-edl.")
    return (f"timm `{arch}` with {n} convolutions converted to EDL layers by timm_edl.convert_to_edl "
            f"({num_classes} classes{data}).")


def details_markdown(model: nn.Module, arch: str, kind: str, num_params: int, input_size: Tuple[int, ...],
                      label_names: Optional[Sequence[str]], datasets: Sequence[str]) -> str:
    if kind == 'edlnet':
        arch_text = f"`{arch}` (timm-edl; `import timm_edl` registers it with timm)"
        mean = float32_list(model.input_norm.mean)
        std = float32_list(model.input_norm.std)
        input_text = (f"{' x '.join(str(s) for s in input_size)}, pixels in [0, 1]; the model normalises them "
                      f"itself (mean {tuple(mean)}, std {tuple(std)}), so timm's data config has mean 0 / std 1")
    else:
        arch_text = f"timm `{arch}`, convolutions converted to EDL layers (`model_args.conversion` in config.json)"
        cfg = model.pretrained_cfg
        input_text = (f"{' x '.join(str(s) for s in input_size)}, normalised by the data pipeline with mean "
                      f"{tuple(cfg.get('mean', ()))}, std {tuple(cfg.get('std', ()))} "
                      f"(`timm.data.resolve_model_data_config(model)`)")
    classes = f"{model.num_classes}"
    if label_names:
        shown = ', '.join(str(n) for n in list(label_names)[:10])
        classes += f" ({shown}{', ...' if len(label_names) > 10 else ''})"
    rows = ['| | |', '|---|---|', f"| Architecture | {arch_text} |",
            f"| Parameters | {num_params / 1e6:.2f} M |", f"| Input | {input_text} |", f"| Classes | {classes} |"]
    if datasets:
        rows.append(f"| Datasets | {', '.join(datasets)} |")
    return '\n'.join(rows)
