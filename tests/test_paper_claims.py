"""Tests of ``experiments/paper_claims.py`` and its ``claims_*`` modules: the aggregation helpers, and the whole pipeline at
``--scale smoke`` (train, evaluate, cache, Markdown, plots) on the real Fashion-MNIST."""
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path('/usr/share/datasets/fashion-mnist')


def _load(*names):
    # as when run as a script: experiments/ on the path (its modules sit beside it), and one module
    # object per name, shared with tests/test_elastic_decision.py (worker processes unpickle by name)
    sys.path.insert(0, str(REPO / 'experiments'))
    return [importlib.import_module(name) for name in names]


pc, results, checks, setup, document = _load('paper_claims', 'claims_results', 'claims_checks', 'claims_setup',
                                             'claims_document')


def test_mean_std_matches_hand_computed_values():
    assert results.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    # 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32 / 7
    m, s = results.mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert m == pytest.approx(5.0) and s == pytest.approx(math.sqrt(32 / 7))
    assert results.mean_std([0.42]) == (0.42, 0.0)  # one seed: no spread
    with pytest.raises(ValueError, match='at least one'):
        results.mean_std([])
    with pytest.raises(ValueError, match='non-finite'):
        results.mean_std([0.1, float('nan')])


def test_fmt_pm_formats_percent_and_missing_values():
    assert results.fmt_pm([0.5, 0.6, 0.7]) == '60.0 ± 10.0'
    assert results.fmt_pm([10.0, 20.0], scale=1.0, digits=0) == '15 ± 7'
    assert results.fmt_pm([0.5, None]) == 'n/a'
    assert results.fmt_pm([]) == 'n/a'


def test_check_cell_summarises_seeds():
    assert checks.check_cell(['passed', 'passed', 'warning']) == 'passed 3/3 (1 warning)'
    assert checks.check_cell(['passed', 'failed', 'failed']) == 'FAILED s1,s2'
    assert checks.check_cell(['skipped', 'skipped']) == '-'
    assert checks.check_cell(['passed', None]) == 'missing'


def test_markdown_is_never_written_over_a_foreign_file(tmp_path):
    foreign = tmp_path / 'results.md'
    foreign.write_text('# my notes\n')
    with pytest.raises(SystemExit, match='not written by this script'):
        pc._check_out_md(foreign, force=False)
    (tmp_path / 'cache').mkdir()
    (tmp_path / 'cache' / 'something').write_text('x')
    with pytest.raises(SystemExit, match='not a paper_claims cache'):
        pc._prepare_out_dir(tmp_path / 'cache')


@pytest.mark.skipif(not FMNIST.is_dir(), reason='Fashion-MNIST (Debian dataset-fashion-mnist) not installed')
def test_smoke_run_writes_every_table_with_finite_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out_md = tmp_path / 'docs' / 'results.md'
    argv = ['--scale', 'smoke', '--out-dir', str(tmp_path / 'cache'), '--out-md', str(out_md), '--jobs', '1']
    assert pc.main(argv) == 0
    text = out_md.read_text()
    assert text.startswith(document.MARKER)
    for heading in ('## (a) The robustness illusion', '## (b) The EDL effect', '## (c) Robust overfitting',
                    '## (d) Gradient-masking checks'):
        assert heading in text
    assert 'n/a' not in text and 'missing' not in text and not re.search(r'\bnan\b', text, re.IGNORECASE)
    rows = [line for line in text.splitlines() if line.startswith('| ')]

    def row(model_label, section):
        body = text.split(section, 1)[1]
        line = next(r for r in body.splitlines() if r.startswith(f'| {model_label} |'))
        numbers = re.findall(r'(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)', line)
        assert numbers, line
        assert all(math.isfinite(float(a)) and math.isfinite(float(b)) for a, b in numbers)
        return numbers

    for model in ('conv twin', 'vanilla DL (beta = 1)'):
        assert len(row(model, '## (a)')) == 7  # clean, noise, 3 naive modes, PGD, AutoAttack
    for model in ('conv twin', 'vanilla DL (beta = 1)', 'robust DL (beta = 0)', 'elastic DL (learned beta)'):
        assert len(row(model, '## (b)')) == 7  # clean, noise, PGD, AA, worst case, time, best epoch
    for model in ('conv twin', 'elastic DL (learned beta)'):
        assert len(row(model, '## (c)')) == 6
    # (c), long runs on a small training set: best epoch, val best / last, test best / last, best - last
    long_runs = '### Long runs on a small training set'
    assert long_runs in text
    for model in ('conv twin', 'vanilla DL (beta = 1)', 'elastic DL (learned beta)'):
        assert len(row(model, long_runs)) == 6
    assert 'Cost of this part: ' in text and 'worker-minutes' in text
    long_text = text.split(long_runs, 1)[1].split('## (d)', 1)[0]
    assert '*What we see (Fashion-MNIST' in long_text and 'Robust overfitting' in long_text
    # every model of every table has a row of check results
    check_rows = [r for r in rows if r.startswith('| Fashion-MNIST |')]
    # natural x2, AT x4, best checkpoints of conv and elastic, final + best of each long run
    assert len(check_rows) == 2 + 4 + 2 + 2 * len(setup.REGIMES['ro'])
    assert sum('| PGD-AT long (c) |' in r for r in check_rows) == 2 * len(setup.REGIMES['ro'])
    assert all('missing' not in r for r in check_rows)
    assert text.count('*What we see') >= 5
    for png in ('illusion.png', 'edl_effect.png', 'robust_overfitting.png', 'robust_overfitting_long.png',
                'beta.png'):
        path = out_md.parent / 'results' / png
        assert path.is_file() and path.stat().st_size > 1000, png
        assert f'results/{png}' in text
    # a second run finds everything cached and only rewrites the document
    cached = tmp_path / 'cache' / 'fashion-mnist' / 'at_elastic_s0' / 'train.json'
    before = cached.stat().st_mtime
    assert pc.main(argv) == 0
    assert cached.stat().st_mtime == before
