"""The evaluation-result schema: what ``timm-edl eval`` writes and what an export's card reads.

One entry per threat model (accuracies are fractions in [0, 1]):

==================  ========  =======================================================
field               required  meaning
==================  ========  =======================================================
``dataset``         yes       dataset name as in :mod:`timm_edl.data` (``cifar10``,
                              ``fashion-mnist-small``, ...)
``split``           no        default ``test``
``n_ex``            yes       number of test points evaluated (int > 0)
``clean_acc``       yes       clean accuracy
``threat_model``    if robust ``Linf`` | ``L2`` | ``L1`` (any alias of :mod:`timm_edl.threat`)
``eps``             if robust radius in [0, 1]-pixel units (e.g. 0.0313725 = 8/255)
``autoattack_acc``  no        robust accuracy under AutoAttack
``pgd_acc``         no        robust accuracy under PGD
``attack``          no        attack name behind ``autoattack_acc`` (default
                              ``autoattack``); may be a dict ``{"name", "version"}``
``version``         no        AutoAttack version (``standard``, ``plus``, ``rand``, ``custom``)
``pgd_steps``       no        PGD iterations (int)
``pgd_restarts``    no        PGD restarts (int)
``architecture``    no        timm architecture evaluated
``weights_digest``  no        :func:`timm_edl.weights.state_dict_digest` of the evaluated model
``eps_text``        no        how to print eps (``8/255``); default: derived from ``eps``
``data_label``      no        dataset display name (``CIFAR-10-JPEG``); default: from
                              :mod:`timm_edl.data`
``footnote``        no        caveats printed under the results table
``unreliable``      no        true when a gradient-masking check failed (also implied by
                              a non-empty ``failed_checks`` list)
``checks``          no        the gradient-masking checks run: a list of ``{"name",
                              "status", "summary"}`` (status ``passed`` / ``failed`` /
                              ``warning`` / ``skipped``)
``per_point``       no        which of the ``n_ex`` points stayed correct, by attack
                              (``clean``, ``pgd``, ``autoattack``, ...): hex strings of
                              :func:`timm_edl.stats.pack_correct` (``timm-edl eval``
                              writes them; the card's paired McNemar tests read them)
==================  ========  =======================================================

A common-corruptions entry (``threat_model`` = ``corruptions``, written by ``timm-edl eval
--threat-model corruptions``) has no ``eps`` and no attack; ``clean_acc`` is optional there and
``corruptions_acc`` (the mean accuracy over every corruption and severity evaluated) is
required; optional: ``corruption_label`` (``CIFAR-10-C``, or the label of generated
corruptions), ``corruptions``, ``severities``, ``corruption_accuracy`` (``{corruption:
{severity: accuracy}}``) and ``mean_per_severity`` (``{severity: accuracy}``).

"Robust" means ``autoattack_acc`` or ``pgd_acc`` is present.  Unknown fields are ignored.
:func:`model_index` turns entries into the Hub's ``model-index`` with huggingface_hub's
:class:`~huggingface_hub.EvalResult`.

Certified robustness (``timm-edl certify``, schema ``timm-edl-certify/1``, randomized
smoothing) has entries of its own, read by :func:`read_certified_results`: ``dataset``,
``split``, ``n_ex``, ``sigma``, ``n0``, ``n``, ``alpha``, ``certified_accuracy`` (a list of
``{"radius", "accuracy"}``, L2 radii, accuracies as fractions), ``abstention_rate``, and
optionally ``architecture``, ``weights_digest``, ``data_label``, ``base_clean_acc``;
:func:`certified_eval_results` gives one ``certified-accuracy`` metric per radius.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .stats import unpack_correct
from .threat import ThreatModelError, canonical_threat_model, format_eps

__all__ = ['INDEX_FIELDS', 'corruption_scope', 'normalize_result', 'read_eval_results', 'model_index', 'eval_results',
           'eps_text', 'attack_label', 'data_label', 'pct', 'pct_text', 'CERTIFY_SCHEMA', 'normalize_certified',
           'read_certified_results', 'certified_eval_results', 'certified_model_index']

CERTIFY_SCHEMA = 'timm-edl-certify/1'

Results = Union[None, str, Path, Dict[str, Any], Sequence[Any]]
CORRUPTIONS = 'corruptions'  # the threat model of a common-corruptions entry
#: the fields of an evaluation report that its own ``model-index`` entry is built from
INDEX_FIELDS = ('dataset', 'split', 'n_ex', 'clean_acc', 'autoattack_acc', 'pgd_acc', 'threat_model', 'eps',
                'eps_text', 'version', 'pgd_steps', 'data_label', 'corruptions_acc', 'corruption_label',
                'corruptions', 'severities', 'corruption_accuracy', 'mean_per_severity')


def pct(value: float) -> float:
    """A fraction as a percentage with two decimals (how cards and tables print accuracies)."""
    return round(100.0 * value, 2)


def pct_text(value: Optional[float], missing: str = '-') -> str:
    """``0.8512`` -> ``'85.12 %'``; ``None`` -> ``missing``."""
    return missing if value is None else f"{100 * value:.2f} %"


def _fraction(entry: Dict[str, Any], key: str, where: str) -> Optional[float]:
    value = entry.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {key}={value} is not a fraction in [0, 1] (accuracies are fractions, "
                         f"not percentages)")
    return value


def normalize_result(entry: Dict[str, Any], where: str = 'evaluation results') -> Dict[str, Any]:
    """One entry checked against the schema, with defaults filled and unknown fields dropped."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an evaluation result must be a JSON object, got {type(entry).__name__}")
    if str(entry.get('threat_model') or '').lower() == CORRUPTIONS:
        return _normalize_corruptions(entry, where)
    out: Dict[str, Any] = {}
    for key in ('dataset', 'n_ex', 'clean_acc'):
        if entry.get(key) is None:
            raise ValueError(f"{where}: required field {key!r} is missing (fields: dataset, n_ex, clean_acc, "
                             f"threat_model, eps, autoattack_acc, pgd_acc, attack, version)")
    out.update(_points(entry, where))
    out['clean_acc'] = _fraction(entry, 'clean_acc', where)
    for key in ('autoattack_acc', 'pgd_acc'):
        value = _fraction(entry, key, where)
        if value is not None:
            out[key] = value
    attack = entry.get('attack')
    version = entry.get('version')
    if isinstance(attack, dict):
        version = version or attack.get('version')
        attack = attack.get('name')
    if 'autoattack_acc' in out or 'pgd_acc' in out:
        if entry.get('threat_model') is None or entry.get('eps') is None:
            raise ValueError(f"{where}: robust accuracies need 'threat_model' and 'eps'")
        try:
            out['threat_model'] = canonical_threat_model(entry['threat_model'])
        except ThreatModelError as e:
            raise ValueError(f"{where}: {e}") from None
        try:
            eps = float(entry['eps'])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: eps must be a number, got {entry['eps']!r}") from None
        if not eps >= 0:
            raise ValueError(f"{where}: eps must be >= 0, got {eps}")
        out['eps'] = eps
    if 'autoattack_acc' in out:
        out['attack'] = str(attack or 'autoattack')
        if version is not None:
            out['version'] = str(version)
    for key in ('pgd_steps', 'pgd_restarts'):
        if entry.get(key) is not None and 'pgd_acc' in out:
            out[key] = int(entry[key])
    for key in ('architecture', 'weights_digest', 'eps_text', 'data_label', 'footnote'):
        if entry.get(key):
            out[key] = str(entry[key])
    checks = entry.get('checks')
    if checks:
        if not isinstance(checks, list) or not all(isinstance(c, dict) and c.get('name') for c in checks):
            raise ValueError(f"{where}: checks must be a list of {{'name', 'status', 'summary'}} objects")
        out['checks'] = [{k: str(c.get(k) or '') for k in ('name', 'status', 'summary')} for c in checks]
    _keep_per_point(entry, out, where)
    failed = entry.get('failed_checks') or []
    if entry.get('unreliable') or failed:
        out['unreliable'] = True
        if failed:
            out['failed_checks'] = [str(c) for c in failed]
    return out


def _keep_per_point(entry: Dict[str, Any], out: Dict[str, Any], where: str) -> None:
    """``out['per_point']``: the entry's packed per-point results, each checked against ``n_ex``."""
    per_point = entry.get('per_point')
    if not per_point:
        return
    if not isinstance(per_point, dict) or not all(isinstance(v, str) for v in per_point.values()):
        raise ValueError(f"{where}: per_point must map attack names to packed per-point results (hex strings)")
    for key, text in per_point.items():
        try:
            unpack_correct(text, out['n_ex'])
        except ValueError as e:
            raise ValueError(f"{where}: per_point[{key!r}]: {e}") from None
    out['per_point'] = {str(k): v for k, v in per_point.items()}


def _points(entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``dataset``, ``split`` and ``n_ex`` of an entry, checked."""
    n_ex = entry.get('n_ex')
    if isinstance(n_ex, bool) or not isinstance(n_ex, (int, float)) or int(n_ex) != n_ex or n_ex <= 0:
        raise ValueError(f"{where}: n_ex must be a positive integer, got {n_ex!r}")
    return {'dataset': str(entry['dataset']), 'split': str(entry.get('split') or 'test'), 'n_ex': int(n_ex)}


def _normalize_corruptions(entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A common-corruptions entry checked (see the module docstring)."""
    for key in ('dataset', 'n_ex', 'corruptions_acc'):
        if entry.get(key) is None:
            raise ValueError(f"{where}: required field {key!r} of a corruptions result is missing (fields: dataset, "
                             f"n_ex, corruptions_acc, clean_acc, corruption_label, corruption_accuracy)")
    out = {**_points(entry, where), 'threat_model': CORRUPTIONS,
           'corruptions_acc': _fraction(entry, 'corruptions_acc', where)}
    if entry.get('clean_acc') is not None:
        out['clean_acc'] = _fraction(entry, 'clean_acc', where)
    for key in ('corruption_label', 'architecture', 'weights_digest', 'data_label', 'footnote'):
        if entry.get(key):
            out[key] = str(entry[key])
    if entry.get('corruptions'):
        out['corruptions'] = [str(c) for c in entry['corruptions']]
    if entry.get('severities'):
        out['severities'] = [int(s) for s in entry['severities']]
    _keep_per_point(entry, out, where)
    table = entry.get('corruption_accuracy')
    if table:
        out['corruption_accuracy'] = {str(c): {str(s): _fraction(row, s, f"{where}: corruption_accuracy[{c}]")
                                               for s in row} for c, row in table.items()}
    if entry.get('mean_per_severity'):
        out['mean_per_severity'] = {str(s): _fraction(entry['mean_per_severity'], s, f"{where}: mean_per_severity")
                                    for s in entry['mean_per_severity']}
    return out


def read_eval_results(eval_results: Results) -> List[Dict[str, Any]]:
    """Normalised entries from a JSON path, a dict, ``{"results": [...]}`` or a list of them."""
    if eval_results is None:
        return []
    items = list(eval_results) if isinstance(eval_results, (list, tuple)) else [eval_results]
    out: List[Dict[str, Any]] = []
    for item in items:
        where = 'evaluation results'
        if isinstance(item, (str, Path)):
            where = str(item)
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"evaluation results file not found: {path}")
            try:
                item = json.loads(path.read_text(encoding='utf-8'))
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(item, dict) and isinstance(item.get('results'), list):
            out += [normalize_result(e, where) for e in item['results']]
        elif isinstance(item, list):
            out += [normalize_result(e, where) for e in item]
        else:
            out.append(normalize_result(item, where))
    return out


def eps_text(r: Dict[str, Any]) -> str:
    """The radius as printed: the entry's own ``eps_text``, else ``k/255`` or ``%g``."""
    return r.get('eps_text') or format_eps(r['eps'], r['threat_model'])


def attack_label(r: Dict[str, Any], key: str) -> str:
    """``'PGD-20'`` for ``pgd_acc``; ``'AutoAttack standard'`` for ``autoattack_acc``."""
    if key == 'pgd_acc':
        return f"PGD-{r['pgd_steps']}" if r.get('pgd_steps') else 'PGD'
    name = 'AutoAttack' if r['attack'].lower() == 'autoattack' else r['attack']
    return f"{name} {r['version']}" if r.get('version') else name


def data_label(r: Dict[str, Any]) -> str:
    """The dataset's display name (``CIFAR-10-JPEG``)."""
    if r.get('data_label'):
        return r['data_label']
    from .data import DATASETS
    info = DATASETS.get(r['dataset'])
    return info.display_name if info is not None else r['dataset']


def eval_results(results: Sequence[Dict[str, Any]]) -> List[Any]:
    """huggingface_hub :class:`~huggingface_hub.EvalResult` objects, one per metric of each entry
    (huggingface_hub groups them by task and dataset in the ``model-index``)."""
    from huggingface_hub import EvalResult
    out, seen = [], set()
    for r in results:
        common = dict(task_type='image-classification', task_name='Image Classification',
                      dataset_type=r['dataset'], dataset_name=data_label(r), dataset_split=r['split'], verified=False)
        clean = (r['dataset'], r['split'], r['n_ex'], r.get('clean_acc'))
        if clean not in seen and clean[-1] is not None:  # one clean accuracy per set of points
            seen.add(clean)
            out.append(EvalResult(metric_type='accuracy', metric_name='Clean accuracy',
                                  metric_value=pct(r['clean_acc']), metric_args={'n_ex': r['n_ex']}, **common))
        for key in ('autoattack_acc', 'pgd_acc'):
            if key in r:
                attack = attack_label(r, key)
                out.append(EvalResult(
                    metric_type='robust-accuracy',
                    metric_name=f"Robust accuracy ({attack}, {r['threat_model']} eps={eps_text(r)})",
                    metric_value=pct(r[key]),
                    metric_args={'threat_model': r['threat_model'], 'eps': r['eps'], 'attack': attack,
                                 'n_ex': r['n_ex']}, **common))
        if 'corruptions_acc' in r:
            out.append(EvalResult(
                metric_type='corruption-accuracy', metric_name=f"Corruption accuracy ({corruption_scope(r)})",
                metric_value=pct(r['corruptions_acc']),
                metric_args={'threat_model': CORRUPTIONS, 'n_ex': r['n_ex'], 'corruptions': r.get('corruptions'),
                             'severities': r.get('severities')},
                **{**common, 'dataset_config': CORRUPTIONS,  # its own group, named by the corrupted set
                   'dataset_name': r.get('corruption_label') or f"{data_label(r)} corruptions"}))
    return out


def corruption_scope(r: Dict[str, Any]) -> str:
    """``'mean over 15 corruptions x 5 severities'`` (what a corruption accuracy averages)."""
    corruptions, severities = r.get('corruptions'), r.get('severities')
    if not corruptions or not severities:
        return 'mean over corruptions and severities'
    return f"mean over {len(corruptions)} corruptions x {len(severities)} severities"


def model_index(model_name: str, results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The Hub card's ``model-index`` block for normalised ``results`` (huggingface_hub's layout)."""
    from huggingface_hub.repocard_data import eval_results_to_model_index
    return eval_results_to_model_index(model_name, eval_results(results))


# ----------------------------------------------------------------------------- certified robustness

def _positive(entry: Dict[str, Any], key: str, where: str, kind: type = float) -> Any:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind(value) != value or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def normalize_certified(entry: Dict[str, Any], where: str = 'certification results') -> Dict[str, Any]:
    """One certification report (``timm-edl certify``'s JSON) checked, reduced to what a card shows."""
    if not isinstance(entry, dict) or entry.get('schema') != CERTIFY_SCHEMA:
        raise ValueError(f"{where}: not a {CERTIFY_SCHEMA} report (write one with `timm-edl certify`)")
    out: Dict[str, Any] = {'dataset': str(entry.get('dataset')), 'split': str(entry.get('split') or 'test')}
    out['n_ex'] = _positive(entry, 'n_ex', where, int)
    out['n0'] = _positive(entry, 'n0', where, int)
    out['n'] = _positive(entry, 'n', where, int)
    out['sigma'] = _positive(entry, 'sigma', where)
    alpha = _positive(entry, 'alpha', where)
    if alpha >= 1:
        raise ValueError(f"{where}: alpha must be in (0, 1), got {alpha}")
    out['alpha'] = alpha
    rows = entry.get('certified_accuracy')
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where}: certified_accuracy must be a non-empty list of {{'radius', 'accuracy'}}")
    out['certified_accuracy'] = [{'radius': float(r['radius']), 'accuracy': _fraction(r, 'accuracy', where)}
                                 for r in rows]
    out['abstention_rate'] = _fraction(entry, 'abstention_rate', where)
    if entry.get('base_clean_acc') is not None:
        out['base_clean_acc'] = _fraction(entry, 'base_clean_acc', where)
    for key in ('architecture', 'weights_digest', 'data_label'):
        if entry.get(key):
            out[key] = str(entry[key])
    return out


def read_certified_results(paths: Results) -> List[Dict[str, Any]]:
    """Normalised certification entries from JSON paths or dicts (one report each)."""
    if paths is None:
        return []
    out = []
    for item in list(paths) if isinstance(paths, (list, tuple)) else [paths]:
        where = 'certification results'
        if isinstance(item, (str, Path)):
            where, path = str(item), Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"certification results file not found: {path}")
            try:
                item = json.loads(path.read_text(encoding='utf-8'))
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        out.append(normalize_certified(item, where))
    return out


def certified_eval_results(results: Sequence[Dict[str, Any]]) -> List[Any]:
    """One huggingface_hub :class:`~huggingface_hub.EvalResult` per radius of each certification
    (``metric_type: certified-accuracy``, the L2 radius, sigma, n, n0, alpha and points in
    ``metric_args``)."""
    from huggingface_hub import EvalResult
    out = []
    for r in results:
        common = dict(task_type='image-classification', task_name='Image Classification',
                      dataset_type=r['dataset'], dataset_name=data_label(r), dataset_split=r['split'], verified=False)
        for row in r['certified_accuracy']:
            out.append(EvalResult(
                metric_type='certified-accuracy',
                metric_name=f"Certified accuracy (randomized smoothing, L2 radius {row['radius']:g}, "
                            f"sigma={r['sigma']:g})",
                metric_value=pct(row['accuracy']),
                metric_args={'threat_model': 'L2', 'radius': row['radius'], 'sigma': r['sigma'], 'n': r['n'],
                             'n0': r['n0'], 'alpha': r['alpha'], 'n_ex': r['n_ex']}, **common))
    return out


def certified_model_index(model_name: str, results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ``model-index`` block of certification entries alone (huggingface_hub's layout)."""
    from huggingface_hub.repocard_data import eval_results_to_model_index
    return eval_results_to_model_index(model_name, certified_eval_results(results))
