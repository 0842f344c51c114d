"""Randomized smoothing (``timm_edl.evaluation.smoothing``, ``timm-edl certify``): the certificates
against a linear classifier's closed form, the binomial statistics against scipy, abstention,
exact reproducibility across seeds, batch sizes, chunks and interrupted runs, the command and
the model card."""
import json
from pathlib import Path
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn as nn
from scipy import stats

from timm_edl.cli import main
from timm_edl.evaluation import smoothing as S

PHI = NormalDist()


class Linear(nn.Module):
    """f(x) = argmax(W x + b), float64."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def two_class_problem(distances, d=5, seed=0):
    """A 2-class linear model and one point at each signed distance from its boundary
    (positive: class 0).  Returns (model, x, y, |distance|, ||w1 - w2||)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, d, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    diff, bias = w[0] - w[1], b[0] - b[1]
    norm = float(diff.norm())
    t = torch.as_tensor(distances, dtype=torch.float64)
    base = torch.randn(len(t), d, generator=g, dtype=torch.float64)
    base = base - ((base @ diff + bias) / norm ** 2)[:, None] * diff          # onto the boundary
    x = base + t[:, None] * diff / norm
    return Linear(w, b), x, (t < 0).long(), t.abs(), norm


# ----------------------------------------------------------------------------- the linear classifier

def test_certified_radius_never_exceeds_the_true_distance():
    """The smoothed linear classifier is the classifier itself (pA = Phi(dist / sigma) for the
    point's side), so a valid radius is at most the distance to the boundary.  Over 120
    certificates at alpha = 0.001 (a failure would have probability <= 12 % for a fresh seed;
    these seeds are fixed)."""
    sigma, checked = 0.5, 0
    for seed in range(3):
        model, x, y, dist, _ = two_class_problem(torch.linspace(-1.0, 1.0, 40) + 0.0125, seed=seed)
        records = S.certify(model, x, y, sigma=sigma, n0=50, n=1000, alpha=0.001, batch=256, seed=seed)
        for r, true in zip(records, dist.tolist()):
            p_a = PHI.cdf(true / sigma)
            assert r['pA_lower'] <= p_a
            if r['radius'] is not None:
                checked += 1
                assert r['prediction'] == r['label'] and r['correct']
                assert r['radius'] <= true
    assert checked > 60


def test_certified_radius_approaches_the_true_distance_as_n_grows():
    sigma = 0.5
    model, x, y, dist, _ = two_class_problem([0.15, -0.3, 0.45, -0.6, 0.75], seed=1)
    gaps = []
    for n in (1_000, 10_000, 100_000):
        records = S.certify(model, x, y, sigma=sigma, n0=100, n=n, alpha=0.001, batch=10_000, seed=0)
        assert all(r['correct'] for r in records)
        # the sampled frequency agrees with the closed form pA = Phi(dist / sigma) (5 standard errors)
        for r, true in zip(records, dist.tolist()):
            p_a = PHI.cdf(true / sigma)
            assert abs(r['count'] / n - p_a) < 5 * math.sqrt(p_a * (1 - p_a) / n)
        gaps.append(sum(t - r['radius'] for r, t in zip(records, dist.tolist())) / len(records))
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 0.03 * sigma


# ----------------------------------------------------------------------------- binomial statistics

@pytest.mark.parametrize('n', [1, 2, 7, 10, 100, 1000, 100_000])
@pytest.mark.parametrize('alpha', [0.001, 0.05, 0.5])
def test_clopper_pearson_lower_matches_the_beta_quantile(n, alpha):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        ours = S.clopper_pearson_lower(k, n, alpha)
        if k == 0:
            assert ours == 0.0
            continue
        reference = stats.beta.ppf(alpha, k, n - k + 1)
        assert ours == pytest.approx(reference, rel=1e-8, abs=1e-15), (k, n)


def test_binomial_test_matches_scipy():
    for m in (1, 2, 9, 10, 101, 5000):
        for k in sorted({0, 1, m // 3, m // 2, (m + 1) // 2, m - 1, m}):
            assert S.binomial_test_half(k, m) == pytest.approx(stats.binomtest(k, m, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize('k, n, alpha', [(3, 2, 0.1), (-1, 5, 0.1), (1, 0, 0.1), (1, 5, 0.0), (1, 5, 1.0)])
def test_clopper_pearson_refuses_bad_input(k, n, alpha):
    with pytest.raises(ValueError):
        S.clopper_pearson_lower(k, n, alpha)


# ----------------------------------------------------------------------------- abstention

class RandomClasses(nn.Module):
    """Uniformly random classes whatever the input."""

    def __init__(self, classes=10):
        super().__init__()
        self.classes, self.g = classes, torch.Generator().manual_seed(0)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.rand(len(x), self.classes, generator=self.g)


def test_abstains_on_random_classes_and_on_the_boundary():
    x = torch.rand(4, 1, 6, 6)
    records = S.certify(RandomClasses(), x, torch.zeros(4, dtype=torch.long), sigma=0.25, n0=20, n=2000)
    assert all(r['prediction'] == S.ABSTAIN and r['radius'] is None and not r['correct'] for r in records)
    model, x, y, _, _ = two_class_problem([0.0, 0.0, 0.0], seed=2)
    records = S.certify(model, x, y, sigma=0.5, n0=100, n=10_000, alpha=0.001)
    assert all(r['prediction'] == S.ABSTAIN for r in records)
    assert (S.predict(model, x, sigma=0.5, n=10_000, alpha=0.001) == S.ABSTAIN).all()
    far, xf, yf, _, _ = two_class_problem([2.0, -2.0], seed=2)
    assert S.predict(far, xf, sigma=0.5, n=1000, alpha=0.001).tolist() == yf.tolist()


def test_abstains_exactly_when_the_bound_is_at_most_one_half():
    model, x, y, _, _ = two_class_problem(torch.linspace(-0.2, 0.2, 21), seed=3)
    records = S.certify(model, x, y, sigma=0.5, n0=30, n=500, alpha=0.01)
    assert {r['prediction'] == S.ABSTAIN for r in records} == {True, False}
    for r in records:
        assert (r['prediction'] == S.ABSTAIN) == (r['pA_lower'] <= 0.5) == (r['radius'] is None)
        assert r['pA_lower'] == S.clopper_pearson_lower(r['count'], 500, 0.01)
        if r['radius'] is not None:
            assert r['radius'] == pytest.approx(0.5 * PHI.inv_cdf(r['pA_lower']))
    table = S.certified_accuracy(records)
    abstained = sum(r['prediction'] == S.ABSTAIN for r in records)
    assert table['abstention_rate'] == abstained / 21 and table['n_abstained'] == abstained
    assert table['radii'][0]['accuracy'] == sum(r['correct'] for r in records) / 21


# ----------------------------------------------------------------------------- reproducibility

def test_same_seed_same_certificate_whatever_the_batch_size_and_chunks():
    model, x, y, _, _ = two_class_problem(torch.linspace(-0.5, 0.5, 6), seed=4)
    kw = dict(sigma=0.5, n0=37, n=301, alpha=0.001, seed=7)
    whole = S.certify(model, x, y, batch=1000, **kw)
    assert S.certify(model, x, y, batch=1000, **kw) == whole
    assert S.certify(model, x, y, batch=7, **kw) == whole
    chunked = []
    for start in range(0, 6, 2):
        chunked += S.certify(model, x[start:start + 2], y[start:start + 2], batch=64,
                             indices=range(start, start + 2), **kw)
    assert chunked == whole
    other = S.certify(model, x, y, batch=1000, **{**kw, 'seed': 8})
    assert [r['count'] for r in other] != [r['count'] for r in whole]


# ----------------------------------------------------------------------------- the command

TINY = ['--model', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16]', 'layers=[1,1]', 'stem_width=8',
        'stem_type=imagenet', '--dataset', 'fashion-mnist-small', '--n-ex', '6', '--sigma', '0.25', '--n0', '8',
        '--n', '40', '--batch-size', '16', '--device', 'cpu', '--no-progress']


def _records(out_dir):
    (path,) = sorted(p for p in out_dir.glob('*.json'))
    return json.loads(path.read_text())


def test_cli_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    assert main(['certify', *TINY, '--out', str(tmp_path / 'whole')]) == 0
    report = _records(tmp_path / 'whole')
    assert '| certified accuracy |' in capsys.readouterr().out
    assert report['schema'] == 'timm-edl-certify/1' and report['n_ex'] == 6 and report['sigma'] == 0.25
    assert [row['radius'] for row in report['certified_accuracy']] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report['certified_accuracy'] == S.certified_accuracy(report['points'])['radii']
    assert report['command'].startswith('timm-edl certify') and report['versions']['torch']
    assert (tmp_path / 'whole' / (report['files']['curve'].rsplit('/', 1)[-1])).stat().st_size > 1000
    # a time budget stops after the first chunk (exit 75); reruns finish it: same records
    budget = ['certify', *TINY, '--out', str(tmp_path / 'parts'), '--chunk-size', '2', '--time-budget-min', '1e-6']
    assert main(budget) == 75
    assert 'Rerun the same command' in capsys.readouterr().err
    (state,) = (tmp_path / 'parts' / '.certify-state').glob('*.json')
    assert len(json.loads(state.read_text())['records']) == 2
    # Ctrl-C during the next chunk: exit 130, the finished chunks kept
    real = S.certify
    calls = {'n': 0}

    def interrupted(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(S, 'certify', interrupted)
    assert main(['certify', *TINY, '--out', str(tmp_path / 'parts'), '--chunk-size', '2']) == 130
    assert 'rerun the same command' in capsys.readouterr().err.lower()
    assert len(json.loads(state.read_text())['records']) == 4
    monkeypatch.setattr(S, 'certify', real)
    assert main(['certify', *TINY, '--out', str(tmp_path / 'parts'), '--chunk-size', '4']) == 0
    resumed = _records(tmp_path / 'parts')
    assert resumed['points'] == report['points'] and resumed['timings']['resumed_points'] == 4


@pytest.mark.parametrize('flag, value', [('--sigma', '0'), ('--sigma', '-1'), ('--n0', '0'), ('--n', '0'),
                                         ('--alpha', '0'), ('--alpha', '1.5'), ('--batch-size', '0'),
                                         ('--chunk-size', '0'), ('--n-ex', '0'), ('--time-budget-min', '0'),
                                         ('--device', 'nope')])
def test_cli_bad_flags_exit_2_naming_the_flag(flag, value, tmp_path, capsys):
    args = [a for a in TINY] + ['--out', str(tmp_path)]
    i = args.index(flag) if flag in args else None
    if i is None:
        args += [flag, value]
    else:
        args[i + 1] = value
    assert main(['certify', *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-edl certify: error: ') and flag in err and 'Traceback' not in err
    assert not any(tmp_path.iterdir())


def test_card_has_the_certified_section_and_metrics(tmp_path, capsys):
    import timm
    import yaml

    from timm_edl import hub
    assert main(['certify', *TINY, '--out', str(tmp_path / 'cert')]) == 0
    report = _records(tmp_path / 'cert')
    torch.manual_seed(0)  # the command's random initialisation (--seed 0)
    model = timm.create_model('edlnet_resnet18', in_chans=1, num_classes=10, widths=[8, 16], layers=[1, 1],
                              stem_width=8, stem_type='imagenet')
    folder = hub.export(model, tmp_path / 'export', certify_results=[report['files']['json']],
                        model_name='edlnet_resnet18.t', card_dir=tmp_path / 'cards')
    card = (folder / 'README.md').read_text()
    assert '### Certified robustness (randomized smoothing)' in card and 'sigma = 0.25' in card
    # the command's plot ships beside the card (the export folder and the card folder), linked from it
    plot = 'edlnet_resnet18.t.certified_accuracy.png'
    assert f'![Certified accuracy against the L2 radius]({plot})' in card
    for where in (folder, tmp_path / 'cards'):
        assert (where / plot).read_bytes() == Path(report['files']['json']).with_suffix('.png').read_bytes()
    hub.export(model, folder, overwrite=True)  # re-exported without the certification: no stale plot
    assert not (folder / plot).exists() and 'Certified robustness' not in (folder / 'README.md').read_text()
    header = yaml.safe_load(card.split('---')[1])
    metrics = header['model-index'][0]['results'][0]['metrics']
    assert [m['args']['radius'] for m in metrics] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [m['value'] for m in metrics] == [round(100 * r['accuracy'], 2) for r in report['certified_accuracy']]
    other = dict(report, weights_digest='sha256:' + '0' * 64)
    with pytest.raises(ValueError, match='other weights'):
        hub.export(model, tmp_path / 'export2', certify_results=[other])
