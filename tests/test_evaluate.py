"""Tests for the evaluation entry point (timm_edl.cli.eval / timm_edl.evaluation).

Real data: the embedded Fashion-MNIST subset.  A tiny EDLResNet is adversarially trained
for a few seconds (FGSM-RS, vanilla DL: beta frozen at 1) in a module fixture; it is the
"honest" model, whose report must pass every check.  Two deliberately gradient-masked
variants of it (input rounding; EDL solver detached) must be flagged.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_edl
from timm_edl.attacks import fgsm_rs, input_gradient
from timm_edl.data import load_tensors
from timm_edl.cli.eval import main
from timm_edl.evaluation import (
    EpsError, EvalConfig, EvaluationError, conv_twin, evaluate, naive_surrogate, parse_eps, parse_eps_list,
)
from timm_edl.evaluation.runners import run_autoattack
from timm_edl.layers import edl_layers

TINY = dict(in_chans=1, num_classes=10, widths=(8, 16), layers=(1, 1), stem_width=8, stem_type='imagenet')
TINY_CLI = ['--arch', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16]', 'layers=[1,1]', 'stem_width=8',
            'stem_type=imagenet']
EPS = 0.1  # Fashion-MNIST's usual Linf radius (the dataset default)


def make_tiny(**kwargs) -> nn.Module:
    return timm.create_model('edlnet_resnet18', **{**TINY, **kwargs})


@pytest.fixture(scope='module')
def honest_model() -> nn.Module:
    """Tiny EDLResNet, FGSM-RS adversarially trained for ~100 steps with beta frozen at 1."""
    torch.manual_seed(0)
    model = make_tiny()
    timm_edl.set_beta_mode(model, 'vanilla')
    x, y = load_tensors('fashion-mnist-small', None, 'train')
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)
    steps = 100
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        x_adv = fgsm_rs(model, x[idx], y[idx], eps=EPS, generator=g)
        loss = F.cross_entropy(model(x_adv), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope='module')
def test_points():
    return load_tensors('fashion-mnist-small', None, 'test', 48)


def quick_config(**kwargs) -> EvalConfig:
    base = dict(attacks='pgd', pgd_steps=10, batch_size=48, check_n=48, grad_points=3, grad_dirs=8,
                progress=False, eps_sweep='0,0.05,0.1,0.2', naive=True)
    base.update(kwargs)
    return EvalConfig(**base)


@pytest.fixture(scope='module')
def honest_report(honest_model, test_points):
    x, y = test_points
    return evaluate(honest_model, x, y, quick_config(), dataset='fashion-mnist-small',
                    surrogate=conv_twin(honest_model), surrogate_name='twin', log=lambda m: None)


class RoundInput(nn.Module):
    """Gradient masking by input quantisation: autograd sees a zero gradient."""

    def __init__(self, model: nn.Module, levels: int = 8):
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


# ----------------------------------------------------------------------------- model and eps basics

def test_tiny_edlnet_builds():
    model = make_tiny().eval()
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert len(edl_layers(model)) == 5  # stem + two 3x3 convs per block, 1x1 shortcut plain
    paper = timm.create_model('edlnet_resnet18', in_chans=1, num_classes=10, widths=(8, 16), layers=(1, 1),
                              stem_width=8).eval()
    assert paper(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize('text, value', [('8/255', 8 / 255), ('0.031', 0.031), (' 4 / 255 ', 4 / 255),
                                         ('0.5', 0.5), ('1e-2', 0.01), ('0', 0.0)])
def test_parse_eps_accepts_decimals_and_fractions(text, value):
    assert parse_eps(text, 'Linf') == pytest.approx(value)


@pytest.mark.parametrize('text, message', [
    ('abc', 'invalid eps'), ('8//255', 'invalid eps'), ('8/0', 'division by zero'), ('-0.1', '>= 0'),
    ('nan', 'invalid eps'), ('', 'invalid eps'), ('8', 'did you mean 8/255'),
])
def test_parse_eps_rejects_bad_strings_clearly(text, message):
    with pytest.raises(EpsError, match=message):
        parse_eps(text, 'Linf')


def test_l2_and_l1_accept_radii_above_one():
    assert parse_eps('12', 'L1') == 12.0
    assert parse_eps_list('0.5,0,0.25', 'L2') == [('0', 0.0), ('0.25', 0.25), ('0.5', 0.5)]


# ----------------------------------------------------------------------------- model transforms

def test_naive_surrogates_keep_the_forward_and_change_the_gradient(honest_model, test_points):
    x, y = test_points[0][:8], test_points[1][:8]
    with torch.no_grad():
        reference = honest_model(x)
    full = input_gradient(honest_model, x, y)
    for mode in ('truncate', 'bpda', 'detach'):
        surrogate = naive_surrogate(honest_model, mode)
        assert sum(type(m).__name__ == '_NaiveEDL' for m in surrogate.modules()) == 5
        with torch.no_grad():
            torch.testing.assert_close(surrogate(x), reference, rtol=1e-4, atol=1e-4)
        grad = input_gradient(surrogate, x, y)
        if mode == 'detach':
            assert grad.abs().max() == 0
        else:
            assert grad.abs().max() > 0
            assert not torch.allclose(grad, full)
    one_step = naive_surrogate(honest_model, 'one-step')
    with torch.no_grad():
        assert not torch.allclose(one_step(x), reference)
    assert len(edl_layers(honest_model)) == 5  # the original is untouched
    with pytest.raises(EvaluationError, match='unknown naive mode'):
        naive_surrogate(honest_model, 'nope')


def test_conv_twin_has_no_edl_layers(honest_model, test_points):
    twin = conv_twin(honest_model)
    assert edl_layers(twin) == []
    assert twin(test_points[0][:4]).shape == (4, 10)
    assert len(edl_layers(honest_model)) == 5


# ----------------------------------------------------------------------------- checks

def test_honest_model_passes_every_check(honest_report):
    r = honest_report
    statuses = {c['name']: c['status'] for c in r['checks']}
    assert r['failed_checks'] == [], [c['summary'] for c in r['checks'] if c['status'] == 'failed']
    assert statuses['gradient'] == 'passed'
    assert statuses['eps-sweep'] == 'passed'
    assert statuses['transfer'] == 'passed'
    assert statuses['autoattack-checks'] == 'skipped'
    assert r['clean_acc'] >= 0.4  # it learned something
    assert r['pgd_acc'] <= r['clean_acc'] and r['worst_case_acc'] <= r['pgd_acc']
    assert r['pgd_acc'] < r['clean_acc']  # the attack works
    sweep = [p['accuracy'] for p in r['eps_sweep']]
    assert sweep == sorted(sweep, reverse=True) and sweep[-1] <= 0.05
    assert r['unreliable'] is False



def test_random_noise_accuracy(honest_model, test_points):
    """Attack 'noise': worst of several random draws per point, no gradient; it lies between
    the PGD and the clean accuracy, stays in the threat model, and is reproducible."""
    from timm_edl.attacks import random_noise_attack
    x, y = test_points
    for dist in ('corners', 'uniform'):
        g = torch.Generator().manual_seed(0)
        x_noisy = random_noise_attack(honest_model, x, y, eps=EPS, draws=4, distribution=dist, generator=g)
        assert (x_noisy - x).abs().max() <= EPS + 1e-6 and x_noisy.min() >= 0 and x_noisy.max() <= 1
        if dist == 'corners':  # every pixel at a corner of the ball, unless the box clipped it
            delta = (x_noisy - x).abs()
            clipped = (x_noisy == 0) | (x_noisy == 1)
            assert torch.all((delta - EPS).abs().le(1e-6) | clipped)
    with pytest.raises(ValueError, match='draws'):
        random_noise_attack(honest_model, x, y, eps=EPS, draws=0)
    with pytest.raises(ValueError, match='distribution'):
        random_noise_attack(honest_model, x, y, eps=EPS, distribution='gaussian')

    config = quick_config(attacks='noise,pgd', noise_draws=5, eps_sweep=None, naive=False, checks=False)
    report = evaluate(honest_model, x, y, config, dataset='fashion-mnist-small', log=lambda m: None)
    noise = report['results']['noise']
    assert noise['draws'] == 5 and noise['distribution'] == 'corners'
    assert report['pgd_acc'] <= report['noise_acc'] <= report['clean_acc']
    assert 'noise' in report['results']['worst_case']['attacks']
    check = next(c for c in report['checks'] if c['name'] == 'noise-vs-attack')
    assert check['status'] == 'passed'
    again = evaluate(honest_model, x, y, config, dataset='fashion-mnist-small', log=lambda m: None)
    assert again['noise_acc'] == report['noise_acc']
    # one draw cannot be worse than the worst of five (draw 1 is the same point: same seed)
    one = evaluate(honest_model, x, y, quick_config(attacks='noise', noise_draws=1, eps_sweep=None, naive=False,
                                                    checks=False),
                   dataset='fashion-mnist-small', log=lambda m: None)
    assert one['noise_acc'] >= report['noise_acc']
    with pytest.raises(EvaluationError, match='Linf and L2'):
        evaluate(honest_model, x, y, quick_config(attacks='noise', threat_model='L1', pgd_steps=5),
                 log=lambda m: None)


def test_noise_check_flags_attacks_weaker_than_noise():
    from timm_edl.evaluation.checks import check_noise
    assert check_noise(0.30, 0.50, n=100, tolerance=0.01, attack='PGD-10').status == 'failed'
    assert check_noise(0.60, 0.50, n=100, tolerance=0.01).status == 'passed'
    assert check_noise(None, 0.50, n=100, tolerance=0.01).status == 'skipped'


@pytest.mark.parametrize('masking', ['round-input', 'detached-edl-solver'])
def test_gradient_masked_models_are_flagged(masking, honest_model, test_points):
    x, y = test_points
    masked = RoundInput(honest_model) if masking == 'round-input' else naive_surrogate(honest_model, 'detach')
    report = evaluate(masked, x, y, quick_config(naive=False), dataset='fashion-mnist-small',
                      surrogate=honest_model, surrogate_name='honest', log=lambda m: None)
    assert 'gradient' in report['failed_checks']
    assert report['unreliable'] is True
    assert 'FAILED CHECK' in report['footnote']
    gradient = next(c for c in report['checks'] if c['name'] == 'gradient')
    assert 'exactly zero' in gradient['summary']
    # the white-box attack cannot move, a surrogate's gradients can
    assert 'transfer' in report['failed_checks']


@pytest.mark.parametrize('threat_model, eps_text', [('L2', '0.5'), ('L1', '12')])
def test_l2_and_l1_use_robustbench_radii(threat_model, eps_text, honest_model, test_points):
    x, y = test_points[0][:8], test_points[1][:8]
    report = evaluate(honest_model, x, y, quick_config(threat_model=threat_model.lower(), pgd_steps=5, batch_size=8,
                                                       eps_sweep=None, naive=False, check_n=8, grad_points=1),
                      dataset='fashion-mnist-small', log=lambda m: None)
    assert report['threat_model'] == threat_model and report['eps_text'] == eps_text
    assert report['results']['pgd']['attack'] == ('apgd-ce' if threat_model == 'L1' else 'pgd')
    assert report['pgd_acc'] <= report['clean_acc']
    if threat_model == 'L1':
        with pytest.raises(EvaluationError, match='>= 5 for L1'):
            evaluate(honest_model, x, y, quick_config(threat_model='L1', pgd_steps=3), log=lambda m: None)


# ----------------------------------------------------------------------------- the report against direct runs

def _direct(model, x, y, batch_size, attack):
    """Correctness per point after ``attack(x_batch, y_batch)``, batch by batch, without the
    evaluation's machinery."""
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            out.append(model(attack(xb, yb)).argmax(-1) == yb)
    return torch.cat(out)


def _fraction(correct):
    return int(correct.sum()) / len(correct)


def _direct_pgd(model, x, y, *, eps=EPS, steps=5, restarts=1, seed=0, grad_model=None, batch_size=8):
    from timm_edl.attacks import pgd_attack
    g = torch.Generator().manual_seed(seed)  # one generator over the batches, like the evaluation
    return _direct(model, x, y, batch_size, lambda xb, yb: pgd_attack(
        model, xb, yb, eps=eps, norm='Linf', steps=steps, restarts=restarts, random_start=True,
        grad_model=grad_model, keep_best=True, generator=g))


def test_report_rows_and_checks_match_direct_runs(honest_model, test_points):
    """Every row, per-point result, sweep point, ladder rung and check of a full report
    (noise, PGD, AutoAttack, naive, transfer, sweep, checks) equals what the attacks give when
    run directly with the same seeds, in the documented order and layout."""
    from timm_edl.attacks import random_noise_attack
    from timm_edl.results import model_index, normalize_result
    from timm_edl.stats import unpack_correct
    x, y = test_points[0][:16], test_points[1][:16]
    twin = conv_twin(honest_model)
    config = quick_config(attacks='noise,pgd,autoattack', aa_attacks=['apgd-ce'], pgd_steps=5, batch_size=8,
                          check_n=12, grad_points=2, grad_dirs=4, eps_sweep='0,0.05,0.1')
    r = evaluate(honest_model, x, y, config, dataset='fashion-mnist-small', surrogate=twin, surrogate_name='twin',
                 log=lambda m: None)

    with torch.no_grad():
        clean = honest_model(x).argmax(-1) == y
    g = torch.Generator().manual_seed(0)
    expected = {
        'clean': clean,
        'noise': _direct(honest_model, x, y, 8, lambda xb, yb: random_noise_attack(
            honest_model, xb, yb, eps=EPS, draws=10, distribution='corners', generator=g)) & clean,
        'pgd': _direct_pgd(honest_model, x, y) & clean,
        'autoattack': run_autoattack(honest_model, x, y, threat_model='Linf', eps=EPS, version='custom',
                                     attacks=['apgd-ce'], seed=0, batch_size=8, progress=False)['correct'] & clean,
        'naive': _direct_pgd(honest_model, x, y, grad_model=naive_surrogate(honest_model, 'truncate')) & clean,
        'transfer': _direct_pgd(honest_model, x, y, grad_model=twin) & clean,
    }
    expected['worst_case'] = clean & expected['noise'] & expected['pgd'] & expected['autoattack'] & \
        expected['naive'] & expected['transfer']
    assert list(r['results']) == ['clean', 'noise', 'pgd', 'autoattack', 'naive', 'transfer', 'worst_case']
    assert list(r['per_point']) == list(r['results'])
    for key, correct in expected.items():
        row = r['results'][key]
        assert unpack_correct(r['per_point'][key], 16) == correct.tolist(), key
        assert row['n_correct'] == int(correct.sum()) and row['n'] == 16 and row['accuracy'] == row['n_correct'] / 16
        assert ('cpu_seconds' in row) == (key != 'worst_case')
    assert r['results']['worst_case']['attacks'] == ['noise', 'pgd', 'autoattack', 'naive', 'transfer']
    assert r['results']['pgd']['raw_accuracy'] == _fraction(_direct_pgd(honest_model, x, y))
    assert r['results']['pgd']['step_size'] == pytest.approx(2.5 * EPS / 5)
    assert r['results']['autoattack']['label'] == 'AutoAttack custom (apgd-ce)'
    assert [r[k] for k in ('clean_acc', 'pgd_acc', 'autoattack_acc', 'noise_acc', 'naive_acc', 'transfer_acc',
                           'worst_case_acc')] == [r['results'][k]['accuracy'] for k in (
                               'clean', 'pgd', 'autoattack', 'noise', 'naive', 'transfer', 'worst_case')]

    # the sweep on the first 12 points: clean at 0, the PGD row at eps, 0.05 attacked, 0.5 added by the checks
    m, clean_m = 12, clean[:12]
    sweep = {p['eps']: p for p in r['eps_sweep']}
    assert list(sweep) == ['0', '0.05', '0.1', '0.5']
    assert sweep['0']['accuracy'] == _fraction(clean_m)
    assert sweep['0.1']['accuracy'] == _fraction(expected['pgd'][:m])
    assert sweep['0.05']['accuracy'] == _fraction(_direct_pgd(honest_model, x[:m], y[:m], eps=0.05) & clean_m)
    assert sweep['0.5']['accuracy'] == _fraction(_direct_pgd(honest_model, x[:m], y[:m], eps=0.5) & clean_m)
    assert [p['added_by_check'] for p in sweep.values()] == [False, False, False, True]
    assert all(p['n'] == m and p['attack'] == 'PGD-5' for p in sweep.values())

    checks = {c['name']: c for c in r['checks']}
    assert list(checks) == ['ordering', 'eps-sweep', 'pgd-steps-restarts', 'gradient', 'transfer',
                            'noise-vs-attack', 'naive-vs-adaptive', 'autoattack-checks']
    rungs = checks['pgd-steps-restarts']['values']['rungs']
    assert [(q['steps'], q['restarts'], q['n']) for q in rungs] == [(1, 1, m), (5, 1, m), (10, 2, m)]
    assert [q['accuracy'] for q in rungs] == [
        _fraction(_direct_pgd(honest_model, x[:m], y[:m], steps=1, seed=1) & clean_m),
        _fraction(expected['pgd'][:m]),
        _fraction(_direct_pgd(honest_model, x[:m], y[:m], steps=10, restarts=2, seed=2) & clean_m)]
    assert [q['index'] for q in checks['gradient']['values']['points']] == torch.nonzero(clean_m).flatten()[:2].tolist()
    ordering = checks['ordering']['values']
    assert ordering['points_pgd_breaks_but_autoattack_does_not'] == int(
        (expected['autoattack'] & ~expected['pgd']).sum())
    assert checks['transfer']['values']['surrogate'] == 'twin'
    assert checks['naive-vs-adaptive']['values']['mode'] == 'truncate'
    assert list(r['timings']) == ['clean', 'noise', 'pgd', 'autoattack', 'naive', 'transfer', 'eps_sweep',
                                  'check_ladder', 'check_gradient', 'total']
    assert list(r['cpu_timings']) == list(r['timings'])
    assert r['model_index'] == model_index('edlnet_resnet18', [normalize_result({
        'dataset': 'fashion-mnist-small', 'split': 'test', 'n_ex': 16, 'clean_acc': _fraction(clean),
        'autoattack_acc': _fraction(expected['autoattack']), 'pgd_acc': _fraction(expected['pgd']),
        'threat_model': 'Linf', 'eps': EPS, 'eps_text': '0.1', 'version': 'custom', 'pgd_steps': 5,
        'data_label': 'Fashion-MNIST-small'})])


@pytest.mark.parametrize('options, option, message', [
    (dict(pgd_steps=0), 'pgd_steps', '{} must be >= 1, got 0'),
    (dict(grad_dirs=1), 'grad_dirs', '{} must be >= 2, got 1'),
    (dict(threat_model='L1', pgd_steps=3), 'pgd_steps', '{} must be >= 5 for L1'),
    (dict(naive_mode='nope'), 'naive_mode', "unknown {} 'nope'"),
    (dict(device='nope'), 'device', "invalid {} 'nope'"),
    (dict(attacks='autoattack', version='custom'), 'aa_attacks', "needs a list of attacks ({})"),
    (dict(attacks='noise', noise_dist='gaussian'), 'noise_dist', "unknown {} 'gaussian'"),
])
def test_bad_options_name_the_option(options, option, message):
    """The config names the option; the command line says the same with its flag."""
    from timm_edl.evaluation import OptionError
    with pytest.raises(OptionError) as error:
        EvalConfig(**options).resolve()
    assert error.value.option == option and message.format(option) in str(error.value)
    flag = '--' + option.replace('_', '-')
    assert message.format(flag) in error.value.worded(lambda name: '--' + name.replace('_', '-'))


def test_cli_bad_option_names_the_flag(capsys):
    code, out, err = _cli(['--model', 'edlnet_resnet18', '--dataset', 'fashion-mnist-small', '--pgd-steps', '0'],
                          capsys)
    assert code == 2 and 'error: --pgd-steps must be >= 1, got 0' in err and 'Traceback' not in err


# ----------------------------------------------------------------------------- AutoAttack

def test_autoattack_on_16_points_is_not_above_pgd(honest_model, test_points):
    x, y = test_points[0][:16], test_points[1][:16]
    report = evaluate(honest_model, x, y, quick_config(attacks='autoattack,pgd', checks=False, eps_sweep=None,
                                                       naive=False, pgd_steps=20, batch_size=16),
                      dataset='fashion-mnist-small', log=lambda m: None)
    aa = report['results']['autoattack']
    assert aa['attacks'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    assert set(aa['per_attack']) == {'apgd-ce', 'apgd-t', 'fab-t', 'square'}
    assert report['autoattack_acc'] <= report['pgd_acc'] + 1 / 16 + 1e-9
    assert report['autoattack_acc'] <= report['clean_acc']
    ordering = report['checks'][0]
    assert ordering['name'] == 'ordering' and ordering['status'] in ('passed', 'warning')
    assert report['version'] == 'standard'


class _Interrupted(Exception):
    pass


class InterruptAfter(nn.Module):
    """Same function as ``model``; raises after ``calls`` forward passes (a simulated kill)."""

    def __init__(self, model: nn.Module, calls: int):
        super().__init__()
        self.model = model
        self.calls = calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise _Interrupted
        return self.model(x)


def test_interrupted_autoattack_resumes_to_the_same_result(honest_model, test_points, tmp_path):
    x, y = test_points[0][:16], test_points[1][:16]
    kwargs = dict(threat_model='Linf', eps=EPS, version='custom', attacks=['apgd-ce'], seed=0,
                  batch_size=8, progress=False)  # two chunks of 8 points
    full = run_autoattack(honest_model, x, y, state_path=tmp_path / 'full.json', **kwargs)

    state = tmp_path / 'resumed.json'
    killer = InterruptAfter(honest_model, 10 ** 9)

    def arm(record):  # once the first chunk is saved, "kill" the run 20 forward passes later
        if record.getMessage().startswith('apgd-ce - 1/'):
            killer.calls = 20
    with pytest.raises(_Interrupted):
        run_autoattack(killer, x, y, state_path=state, on_record=arm, **kwargs)
    saved = json.loads(state.read_text())
    assert saved['done'] == [] and saved['chunks_done'] == {'apgd-ce': 1}

    resumed = run_autoattack(honest_model, x, y, state_path=state, **kwargs)
    assert resumed['resumed'] is True
    assert any('resuming from' in r['message'] for r in resumed['log'])
    assert torch.equal(resumed['correct'], full['correct'])
    assert resumed['accuracy'] == full['accuracy'] and resumed['per_attack'] == full['per_attack']

    # a finished state is a cached result: nothing is attacked again
    again = run_autoattack(honest_model, x, y, state_path=state, **kwargs)
    assert again['already_run'] == ['apgd-ce'] and torch.equal(again['correct'], full['correct'])
    # a state from another setting is refused, not silently mixed in
    with pytest.raises(EvaluationError, match='another run'):
        run_autoattack(honest_model, x[:8], y[:8], state_path=state, **kwargs)


_AA_CE = dict(threat_model='Linf', eps=EPS, version='custom', attacks=['apgd-ce'], seed=0, progress=False)


@pytest.fixture(scope='module')
def chunked_aa(honest_model, test_points):
    """AutoAttack (APGD-CE) on 16 points in two chunks of 8."""
    return run_autoattack(honest_model, test_points[0][:16], test_points[1][:16], batch_size=8, **_AA_CE)


def test_an_autoattack_chunk_rerun_alone_reproduces_its_points_exactly(honest_model, test_points, chunked_aa):
    """Each chunk is attacked with the same seed, so a chunk's result depends on its points only:
    the second chunk, run by itself, gives exactly its points' flags in the 16-point run."""
    second = run_autoattack(honest_model, test_points[0][8:16], test_points[1][8:16], batch_size=8, **_AA_CE)
    assert torch.equal(second['correct'], chunked_aa['correct'][8:])


def test_chunked_autoattack_agrees_with_unchunked_up_to_random_starts(honest_model, test_points, chunked_aa):
    """Chunks of 8 vs one chunk of 16: the same attack on the same points; only the random
    starts differ (drawn per chunk), so at most a point or two may come out differently."""
    whole = run_autoattack(honest_model, test_points[0][:16], test_points[1][:16], batch_size=16, **_AA_CE)
    assert whole['clean_accuracy'] == chunked_aa['clean_accuracy']
    assert 0 < whole['accuracy'] < whole['clean_accuracy']  # the attack breaks some points, not all
    assert int((chunked_aa['correct'] != whole['correct']).sum()) <= 2


# ----------------------------------------------------------------------------- command line and files

@pytest.fixture(scope='module')
def checkpoint(honest_model, tmp_path_factory):
    import safetensors.torch
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in honest_model.state_dict().items()}, str(path))
    return path


def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_complete_json_report(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / 'results'
    args = ['--model', str(checkpoint), *TINY_CLI, '--dataset', 'fashion-mnist-small', '--n-ex', '24',
            '--attacks', 'autoattack,pgd', '--aa-attacks', 'apgd-ce', '--pgd-steps', '5', '--batch-size', '24',
            '--eps-sweep', '0,0.05,0.1', '--check-n', '24', '--grad-points', '2', '--grad-dirs', '4',
            '--naive', '--surrogate', 'twin', '--out', str(out_dir), '--no-progress', '--device', 'cpu',
            '--info', 'name=Tiny test model', 'venue=none']
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    assert 'Traceback' not in err
    assert '| Clean |' in out and 'Fashion-MNIST-small' in out
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    stem = 'tiny_fashion-mnist-small_Linf_0.1'
    assert files == sorted(f"{stem}{s}" for s in ('.json', '.md', '.model-index.yaml', '.png', '.autoattack.log'))
    report = json.loads((out_dir / f"{stem}.json").read_text())

    types = {
        # RobustBench model_info fields
        'link': (type(None),), 'name': (str,), 'authors': (type(None),), 'additional_data': (type(None), bool),
        'number_forward_passes': (int,), 'dataset': (str,), 'venue': (str,), 'architecture': (str,),
        'eps': (float,), 'clean_acc': (float,), 'reported': (type(None),), 'autoattack_acc': (float,),
        'external': (type(None), float), 'footnote': (type(None), str), 'unreliable': (bool,),
        # read by timm-edl export
        'split': (str,), 'n_ex': (int,), 'threat_model': (str,), 'pgd_acc': (float,), 'attack': (str,),
        'version': (str,), 'pgd_steps': (int,), 'pgd_restarts': (int,), 'weights_digest': (str,),
        # ours
        'schema': (str,), 'eps_text': (str,), 'data_label': (str,), 'data': (dict,), 'worst_case_acc': (float,),
        'naive_acc': (float,), 'transfer_acc': (float,), 'seed': (int,), 'device': (str,), 'results': (dict,),
        'eps_sweep': (list,), 'checks': (list,), 'failed_checks': (list,), 'timings': (dict,), 'model': (dict,),
        'edl_beta': (dict,), 'config': (dict,), 'versions': (dict,), 'date': (str,), 'robustbench': (dict,),
        'model_index': (list,), 'command': (str,), 'files': (dict,),
    }
    for key, allowed in types.items():
        assert key in report, key
        assert isinstance(report[key], allowed), (key, report[key])
    assert report['dataset'] == 'fashion-mnist-small' and report['data_label'] == 'Fashion-MNIST-small'
    assert report['n_ex'] == 24 and report['threat_model'] == 'Linf' and report['eps'] == pytest.approx(EPS)
    assert report['name'] == 'Tiny test model' and report['architecture'] == 'edlnet_resnet18'
    assert report['version'] == 'custom' and report['results']['autoattack']['attacks'] == ['apgd-ce']
    for key in ('clean_acc', 'pgd_acc', 'autoattack_acc', 'worst_case_acc', 'naive_acc', 'transfer_acc'):
        assert 0.0 <= report[key] <= 1.0
    assert set(report['results']) == {'clean', 'pgd', 'autoattack', 'worst_case', 'naive', 'transfer'}
    for row in report['results'].values():
        assert isinstance(row['seconds'], float) and isinstance(row['n_correct'], int) and row['n'] == 24
    assert {c['name'] for c in report['checks']} == {
        'ordering', 'eps-sweep', 'pgd-steps-restarts', 'gradient', 'transfer', 'naive-vs-adaptive',
        'autoattack-checks'}
    assert all(c['status'] in ('passed', 'failed', 'warning', 'skipped') for c in report['checks'])
    assert set(report['timings']) >= {'clean', 'pgd', 'autoattack', 'naive', 'transfer', 'total'}
    assert all(report['versions'][k] for k in ('torch', 'timm', 'pyautoattack', 'python'))
    edl = report['model']['edl']
    assert edl['num_layers'] == 5 and set(report['edl_beta']) == set(edl['layers'])
    assert all(v['beta'] == 1.0 and v['num_steps'] == 2 for v in edl['layers'].values())
    rb = report['robustbench']
    assert rb['eps'] == '0.1' and isinstance(rb['clean_acc'], str) and float(rb['clean_acc']) == pytest.approx(
        100 * report['clean_acc'], abs=0.006)
    metrics = report['model_index'][0]['results'][0]['metrics']
    assert metrics[0]['type'] == 'accuracy' and metrics[0]['value'] == pytest.approx(100 * report['clean_acc'],
                                                                                     abs=0.006)
    assert (out_dir / f"{stem}.png").read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    import yaml
    assert yaml.safe_load((out_dir / f"{stem}.model-index.yaml").read_text())['model-index'][0]['results']
    # timm-edl export reads these fields
    from timm_edl.hub import read_eval_results
    entry, = read_eval_results(out_dir / f"{stem}.json")
    assert entry['autoattack_acc'] == report['autoattack_acc'] and entry['pgd_steps'] == 5

    # a second run never replaces the first one's files
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    assert (out_dir / f"{stem}-2.json").is_file()
    assert json.loads((out_dir / f"{stem}.json").read_text())['date'] == report['date']
    # and AutoAttack was served from its saved state
    assert json.loads((out_dir / f"{stem}-2.json").read_text())['results']['autoattack']['resumed'] is True


def test_cli_missing_data_says_where_it_looked(tmp_path, capsys):
    code, out, err = _cli(['--model', 'edlnet_resnet18', '--dataset', 'cifar10', '--data-dir', str(tmp_path),
                           '--n-ex', '10'], capsys)
    assert code == 2
    assert 'Traceback' not in err and 'not found' in err and str(tmp_path) in err


def test_cli_unknown_model_is_a_clear_error(capsys):
    code, out, err = _cli(['--model', 'edlnet_resnet81', '--dataset', 'fashion-mnist-small', '--n-ex', '4'], capsys)
    assert code == 2
    assert 'unknown model' in err and 'edlnet_resnet18' in err and 'Traceback' not in err


@pytest.mark.parametrize('eps, message', [('8//255', 'invalid eps'), ('8', 'did you mean 8/255'),
                                          ('eight', 'invalid eps')])
def test_cli_wrong_eps_is_a_clear_error(eps, message, capsys):
    code, out, err = _cli(['--model', 'edlnet_resnet18', '--dataset', 'fashion-mnist-small', '--eps', eps], capsys)
    assert code == 2 and message in err and 'Traceback' not in err


def test_cli_bare_checkpoint_needs_an_architecture(checkpoint, capsys):
    code, out, err = _cli(['--model', str(checkpoint), '--dataset', 'fashion-mnist-small', '--n-ex', '4'], capsys)
    assert code == 2 and '--arch' in err


def test_timm_edl_eval_dispatches_here(capsys):
    from timm_edl.cli import main as cli_main
    with pytest.raises(SystemExit) as exc:
        cli_main(['eval', '--help'])
    assert exc.value.code == 0
    assert '--threat-model' in capsys.readouterr().out
