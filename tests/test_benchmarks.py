"""Smoke tests of the benchmark scripts: they run (``--quick``) and print their tables.

No timing is asserted: the point is that the scripts keep working as the package changes.
"""
import importlib.util
import json
import math
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
ATTACK_COLUMNS = ['K', 'pass', 'conv twin ms', 'EDL ms', 'spread twin / EDL', 'conv twin img/s', 'EDL img/s',
                  'measured ratio', 'ratio of minima', 'FLOP ratio (counted)', 'measured / FLOP ratio']


def _run(script: str, tmp_path: Path, *extra: str):
    out_json = tmp_path / f'{script}.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / f'{script}.py'), '--quick', '--threads', '1',
         '--json', str(out_json), *extra],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f'{script} failed:\n{proc.stdout}\n{proc.stderr}'
    return proc.stdout, json.loads(out_json.read_text())


def _table(stdout: str, first_column: str, second_column: str, nth: int = 0):
    """The rows (lists of cells) of the ``nth`` Markdown table whose header starts with the given columns."""
    lines = stdout.splitlines()
    prefix = f'| {first_column} | {second_column} |'
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(starts) > nth, f'no table (number {nth}) starting with {prefix!r} in:\n{stdout}'
    i = starts[nth]
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
    _, layer_rows = _table(stdout, 'layer', 'conv')
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
    (fwd, _fwd_bwd) = data['results']
    assert fwd['K'] == 2 and fwd['flop_ratio_counted'] == pytest.approx(3.0)


def test_bench_model_quick_k2_skips(tmp_path):
    stdout, data = _run('bench_model', tmp_path, '--steps', '2', '--no-fwd-bwd', '--no-layer-table')
    _, rows = _table(stdout, 'K', 'pass')
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


def test_bench_attack_quick(tmp_path):
    """PGD-10 AT step and APGD-CE throughput rows; every ratio and rate is finite and positive."""
    stdout, data = _run('bench_attack', tmp_path)
    assert '**Machine**' in stdout and 'threads: 1' in stdout
    header, rows = _table(stdout, 'K', 'pass')
    assert header == ATTACK_COLUMNS
    assert [(r[0], r[1]) for r in rows] == [('1', 'PGD-10 AT step (L refresh incl.)'),
                                            ('1', 'AutoAttack (APGD-CE, n_iter=2)')]
    for r in rows:
        for cell in r[2:4] + r[5:]:  # times, img/s, measured ratio, ratio of minima, FLOP ratio, quotient
            value = float(cell)
            assert math.isfinite(value) and value > 0, (header, r)
    _, detail = _table(stdout, 'K', 'pass', 1)
    assert [r[2] for r in detail] == ['2', '2']  # images per call (--quick: batch 2, aa-batch 2)
    (result,) = data['results']
    at, aa = result['passes']['at_step'], result['passes']['apgd_ce']
    # each SGD step changes every dictionary: one L refresh per EDL layer per AT step
    assert at['power_iterations_per_call'] == 17
    assert aa['power_iterations_per_call'] == 0  # APGD does not change the weights
    # labelled with their own clean predictions, both models attack every point
    assert aa['points_attacked_twin'] == aa['points_attacked_edl'] == 2
    for r in (at, aa):
        assert r['flops_edl'] >= r['flops_twin'] > 0  # K=1, parameters frozen in APGD: equal
        assert r['images_per_s_twin'] > 0 and r['images_per_s_edl'] > 0
    assert data['machine']['commit']


def test_bench_attack_apgd_flops_extrapolation_is_exact(monkeypatch):
    """The APGD-CE FLOPs extrapolated from n_iter = 1 and 2 equal a direct count."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH_DIR))  # as when the script runs: its folder is on sys.path
    spec = importlib.util.spec_from_file_location('bench_attack', BENCH_DIR / 'bench_attack.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for kwargs in ({'edl_layers': 'none'}, {'edl_cfg': {'num_steps': 1}}):
        model = bench._make('cpu', torch.float32, **kwargs).eval()
        with torch.no_grad():
            model(x)  # L cached
        direct = bench.T.count_flops(bench._apgd_fn(model, x, 4, 'cpu', torch.float32)[0])
        assert direct == bench.apgd_flops(model, x, 4, 'cpu', torch.float32) > 0


def test_run_all_quick_writes_report_with_summary(tmp_path):
    """`make bench`'s driver: every script's section, and a summary whose rows come from their JSON."""
    out = tmp_path / 'performance.md'
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, str(BENCH_DIR / 'run_all.py'), '--quick', '--threads', '1', '--out', str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    for script in ('bench_layer.py', 'bench_model.py', 'bench_memory.py', 'bench_attack.py'):
        assert f'python benchmarks/{script}' in text
    summary = text.split('## Summary', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith('| ') and not line.startswith('| what')]
    assert any('layer, K=2, fwd |' in r for r in rows) and any('memory_efficient' in r for r in rows)
    assert any('PGD-10 AT step' in r for r in rows) and any('train step' in r for r in rows)
    for r in rows:
        ratio = float(r.split('|')[3])
        assert math.isfinite(ratio) and ratio > 0, r


def test_run_all_keeps_the_included_sections(tmp_path):
    """Sections written by their own command (the H200 estimate) are appended verbatim and survive
    a regeneration of the report (and a re-append does not duplicate them)."""
    spec = importlib.util.spec_from_file_location('run_all', BENCH_DIR / 'run_all.py')
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    include = tmp_path / 'estimate.md'
    include.write_text('## Estimate\n\nnumbers\n')
    includes = [(include, 'python benchmarks/estimate_h200.py')]
    once = run_all.with_includes('# Performance\n\n## Bench\n\ntable\n', includes)
    assert once.index('## Bench') < once.index('## Estimate') and 'estimate_h200.py' in once
    assert run_all.with_includes(once, includes) == once
    include.write_text('## Estimate\n\nnew numbers\n')
    again = run_all.with_includes(once, includes)
    assert 'new numbers' in again and again.count('## Estimate') == 1 and '## Bench' in again
    assert run_all.INCLUDES[0][0].name == 'performance_h200.md'


def test_estimate_h200_script_imports():
    """benchmarks/estimate_h200.py (run by hand: its full-size run takes about 30 s) imports and
    parses its options; its arithmetic uses release_gpu's AutoAttack cost model."""
    spec = importlib.util.spec_from_file_location('estimate_h200', BENCH_DIR / 'estimate_h200.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(['--threads', '1'])
    assert args.fraction == 0.25 and args.ceiling_bf16 == 788.0
    passes = module.R.aa_passes_per_point(module.R.AA_STANDARD, 0.85, 0.5)
    assert passes == pytest.approx(0.85 * 101 + 0.5 * (900 + 900 + 2500) + 21)


def test_allocator_tuning_is_on_by_default_and_can_be_opted_out():
    """glibc: the timm-edl process keeps freed activation buffers; TIMM_EDL_MALLOC_TUNING=0 opts out."""
    code = 'from timm_edl.runtime import keep_freed_memory as k; print(k(), k())'
    for env_value, expected in (('1', 'True True'), ('0', 'False False')):
        env = dict(os.environ, TIMM_EDL_MALLOC_TUNING=env_value)
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if sys.platform.startswith('linux') and os.path.exists('/lib/x86_64-linux-gnu/libc.so.6'):
            assert out.stdout.split() == expected.split()


def test_bench_zoo_arch_quick(tmp_path):
    stdout, data = _run('bench_zoo_arch', tmp_path)
    _, rows = _table(stdout, 'input', 'network')
    assert len(rows) == 8 and len(data['rows']) == 8
    chosen = [r for r in rows if 'zoo' in r[1]]
    assert len(chosen) == 2 and all(r[-1] == '1.00' for r in chosen)
    assert {r[3] for r in rows} == {'19', '18', '6', '0'}  # EDL layers of each candidate


def test_bench_resnet20_quick(tmp_path):
    section = tmp_path / 'section.md'
    stdout, data = _run('bench_resnet20', tmp_path, '--parallel', '--out', str(section))
    text = section.read_text()
    assert text.startswith('## edlnet_resnet20 vs its conv twin')
    assert '--quick --threads 1' in text and '--out' not in text  # the command that printed the tables
    assert _table(text, 'precision', 'memory format')[1] == _table(stdout, 'precision', 'memory format')[1]
    header, rows = _table(stdout, 'precision', 'memory format')
    assert len(rows) == 12 and len(data['rows']) == 12  # 2 precisions x 2 memory formats x 3 objectives
    assert {tuple(r[:3]) for r in rows} == {(p, m, o) for p in ('float32', 'bf16')
                                            for m in ('contiguous', 'channels_last')
                                            for o in ('FGSM-RS', 'PGD-2', 'PGD-3')}
    for r in rows:
        time_ratio, flop_ratio, relative = float(r[6]), float(r[7]), float(r[8])
        assert flop_ratio > 1.0  # every EDL layer counts at least its convolution
        assert math.isclose(relative, time_ratio / flop_ratio, abs_tol=0.02)
    _, parallel = _table(stdout, 'network', '1 process x 2 threads img/s')
    assert [r[0] for r in parallel] == ['edlnet_resnet20', 'edlnet_resnet20_conv']
