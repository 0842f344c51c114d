"""Smoke tests of the benchmark scripts: they run (``--quick``) and print their tables.

No timing is asserted: the point is that the scripts keep working as the package changes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / 'benchmarks'

LAYER_COLUMNS = ['K', 'pass', 'conv ms', 'EDL ms', 'spread conv / EDL', 'measured ratio',
                 'ratio of minima', 'FLOP ratio (counted)', '2K-1', 'measured / FLOP ratio']
MODEL_COLUMNS = ['K', 'pass', 'conv twin ms', 'EDL ms', 'spread twin / EDL', 'measured ratio',
                 'ratio of minima', 'FLOP ratio (counted)', 'FLOP ratio (analytic fwd)', 'measured / FLOP ratio']


def _run(script: str, tmp_path: Path, *extra: str):
    out_json = tmp_path / f'{script}.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / f'{script}.py'), '--quick', '--threads', '1',
         '--json', str(out_json), *extra],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{script} failed:\n{proc.stdout}\n{proc.stderr}'
    return proc.stdout, json.loads(out_json.read_text())


def _table(stdout: str, first_column: str, second_column: str):
    """The rows (lists of cells) of the Markdown table whose header starts with the given columns."""
    lines = stdout.splitlines()
    prefix = f'| {first_column} | {second_column} |'
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert starts, f'no table starting with {prefix!r} in:\n{stdout}'
    i = starts[0]
    header = [c.strip() for c in lines[i].strip('|').split('|')]
    assert lines[i + 1].startswith('|---')
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip('|').split('|')])
    assert all(len(r) == len(header) for r in rows)
    return header, rows


def test_bench_layer_quick(tmp_path):
    stdout, data = _run('bench_layer', tmp_path, '--input-grad')
    assert '**Machine**' in stdout and 'torch' in stdout and 'threads: 1' in stdout
    assert 'Power iteration' in stdout
    header, rows = _table(stdout, 'K', 'pass')
    assert header == LAYER_COLUMNS
    # --quick: K = 1, 2; passes fwd, fwd+bwd, fwd+bwd (input grad)
    assert [(r[0], r[1]) for r in rows] == [
        (k, p) for k in ('1', '2') for p in ('fwd', 'fwd+bwd', 'fwd+bwd (input grad)')]
    for r in rows:
        float(r[5]), float(r[6]), float(r[7]), float(r[9])
        assert int(r[8]) == 2 * int(r[0]) - 1
    results = data['results']
    assert len(results) == 6
    for r in results:
        assert r['power_iterations_during_timing'] == 0  # L stayed cached while timing
        if r['pass'] == 'fwd':  # forward FLOPs are exactly 2K - 1 conv-equivalents
            assert r['flop_ratio_counted'] == pytest.approx(2 * r['K'] - 1)
        if r['pass'] == 'fwd+bwd (input grad)':
            assert r['flop_ratio_counted'] == pytest.approx(2 * r['K'] - 1)
    assert data['machine']['threads'] == 1


def test_bench_model_quick(tmp_path):
    stdout, data = _run('bench_model', tmp_path)
    assert '**Machine**' in stdout
    header, rows = _table(stdout, 'K', 'pass')
    assert header == MODEL_COLUMNS
    assert [r[1] for r in rows] == ['inference', 'fwd+bwd', 'train step (L refresh incl.)']
    flop_header, flop_rows = _table(stdout, 'K', 'model')
    assert flop_header[2:4] == ['fwd GFLOP (counted)', 'fwd GFLOP (analytic 2K-1 bound)']
    assert [r[1] for r in flop_rows] == ['conv twin', 'EDL', 'ratio EDL / twin']
    layer_header, layer_rows = _table(stdout, 'layer', 'conv')
    assert len(layer_rows) == 17  # every 3x3 conv of ResNet-18, stem included
    (result,) = data['results']
    assert result['K'] == 1
    # the counted forward FLOPs match the analytic 2K - 1 bound (no power iteration counted)
    assert result['flops_fwd_edl'] == pytest.approx(result['flops_fwd_edl_analytic'])
    passes = result['passes']
    assert passes['inference']['power_iterations_per_call'] == 0
    assert passes['fwd+bwd']['power_iterations_per_call'] == 0
    # each SGD step changes every dictionary: one L refresh per EDL layer per train step
    assert passes['train step']['power_iterations_per_call'] == len(result['edl_layers']) == 17
    iters = passes['train step']['power_iteration_iters_per_refresh']
    assert len(iters) == 17 and min(iters) >= 1  # one warm refresh per layer on the counted step
    assert data['machine']['commit']  # the benchmarked code version is recorded


def test_bench_layer_quick_edl_cfg(tmp_path):
    stdout, data = _run('bench_layer', tmp_path, '--steps', '2', '--edl-cfg', 'lam=0.25')
    assert "EDLNet defaults + {'lam': 0.25}" in stdout
    assert data['edl_cfg']['lam'] == 0.25 and data['edl_settings']['lam'] == 0.25
    (fwd, fwd_bwd) = data['results']
    assert fwd['K'] == 2 and fwd['flop_ratio_counted'] == pytest.approx(3.0)


def test_bench_model_quick_k2_skips(tmp_path):
    stdout, data = _run('bench_model', tmp_path, '--steps', '2', '--no-fwd-bwd', '--no-layer-table')
    header, rows = _table(stdout, 'K', 'pass')
    assert [r[1] for r in rows] == ['inference', 'train step (L refresh incl.)']
    assert '| layer | conv |' not in stdout
    (result,) = data['results']
    assert result['K'] == 2
    assert result['flops_fwd_edl'] == pytest.approx(result['flops_fwd_edl_analytic'])
    assert result['flops_fwd_edl'] > result['flops_fwd_twin']


def test_bench_memory_quick(tmp_path):
    """The memory benchmark runs; its exact accounting shows checkpointing saves memory."""
    stdout, data = _run('bench_memory', tmp_path)
    _, rows = _table(stdout, 'K', 'EDL implementation')
    assert [r[1] for r in rows] == ['reference', 'fused', 'memory_efficient']
    by_impl = {r['implementation']: r for r in data['results']}
    assert by_impl['memory_efficient']['edl_bytes'] < by_impl['fused']['edl_bytes'] < by_impl['reference']['edl_bytes']
