"""Tests of ``experiments/elastic_decision.py``: the paired counts (McNemar's exact test itself:
test_stats.py), the shared-Markdown sections, and two smoke jobs end to end on the real Fashion-MNIST."""
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path('/usr/share/datasets/fashion-mnist')
sys.path.insert(0, str(REPO / 'experiments'))

import _sections  # noqa: E402
import elastic_decision as ed  # noqa: E402
from timm_edl.stats import pack_correct, unpack_correct  # noqa: E402


def test_per_point_packing_round_trip_and_paired_counts():
    import torch
    rng = random.Random(0)
    a = [rng.random() < 0.6 for _ in range(1001)]
    b = [rng.random() < 0.5 for _ in range(1001)]
    assert unpack_correct(pack_correct(torch.tensor(a)), 1001) == a

    def result(bits):
        return {'evals': {'aa': {'report': {'n_ex': len(bits), 'per_point': {'autoattack': pack_correct(
            torch.tensor(bits))}}}}}

    res = ed.paired([result(a)], [result(b)], 'aa', 'autoattack')
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    assert (res['b'], res['c'], res['n']) == (only_a, only_b, 1001)
    assert res['diff'] == pytest.approx(100 * (sum(a) - sum(b)) / 1001)


def test_sections_are_replaced_in_place_and_kept_by_other_writers(tmp_path):
    md = tmp_path / 'results.md'
    md.write_text('# head\n\ntext\n')
    _sections.write_section(md, 'one', 'first body')
    _sections.write_section(md, 'two', 'second body')
    _sections.write_section(md, 'one', 'new body')
    text = md.read_text()
    assert text.startswith('# head\n\ntext\n') and 'first body' not in text
    assert text.index('new body') < text.index('second body')
    kept = _sections.foreign_sections(md, own='two')
    assert 'new body' in kept and 'second body' not in kept


@pytest.mark.skipif(not FMNIST.exists(), reason='needs Debian dataset-fashion-mnist (make data)')
def test_smoke_jobs_cache_and_report(tmp_path):
    cache, runs, md = tmp_path / 'cache', tmp_path / 'runs', tmp_path / 'results.md'
    args = ['--size', 'smoke', '--jobs', '1', '--cache-dir', str(cache), '--run-dir', str(runs), '--out-md', str(md)]
    assert ed.main(args + ['--max-jobs', '2']) == 0
    cached = sorted(p.name for p in (cache / 'fashion-mnist').glob('*.json'))
    assert cached == ['conv_s0.json', 'vanilla_s0.json']
    data = json.loads((cache / 'fashion-mnist' / 'vanilla_s0.json').read_text())
    assert data['evals']['full']['report']['n_ex'] == 64 and data['evals']['aa']['report']['n_ex'] == 16
    assert set(data['beta_grad']) and all(isinstance(v, float) for v in data['beta_grad'].values())
    assert any(k.startswith('train_beta/') for k in data['train']['epochs'][-1])
    text = md.read_text()
    assert '<!-- begin section: elastic-decision -->' in text and '| vanilla vs conv | AutoAttack | 1 |' in text
    assert '| elastic DL (learned beta) | 0 | not run yet' in text and '**Not decided yet**' in text
    # a cached job made with other settings is an error, not silently reused
    spec = data['spec']
    spec['seed'] = 5
    (cache / 'fashion-mnist' / 'vanilla_s0.json').write_text(json.dumps(data))
    with pytest.raises(SystemExit, match='other settings'):
        ed.main(args + ['--report-only'])
