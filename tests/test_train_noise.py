"""Gaussian-noise training (``sigma``, randomized smoothing's training distribution): the noise
reaches the model with the asked std, fresh at every step and position-seeded (so resumption
stays exact); ``sigma: 0`` leaves the inputs untouched; the hold-out reports the accuracy under
noise and ``val_select: noisy`` selects ``best/`` on it; bad settings are refused.

Runs use the tiny EDLNet of ``test_train`` on the embedded Fashion-MNIST subset.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_train import STEPS_PER_EPOCH, read_summary, tiny_args, tiny_config, tiny_model
from timm_edl.cli.train import main
from timm_edl.train import ConfigError, train
from timm_edl.train.loop import _batches, train_step
from timm_edl.train.trainer import open_run
from timm_edl.train.validation import validate


def _model_inputs(cfg, steps):
    """``[(clean x, what the model saw)]`` for the first ``steps`` training steps of ``cfg``."""
    seen = []
    with open_run(cfg) as run:
        run.raw.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        pairs = []
        for k, (x, y, _) in enumerate(_batches(run, 0, 0)):
            if k == steps:
                break
            seen.clear()
            train_step(run, 0, x, y)
            run.state.step_in_epoch += 1
            assert len(seen) == 1  # natural: one forward per step
            pairs.append((x.clone(), seen[0]))
    return pairs


@pytest.mark.parametrize('sigma', [0.25, 0.5])
def test_noise_reaches_the_model_with_std_sigma_fresh_each_step(tmp_path, sigma):
    pairs = _model_inputs(tiny_config(tmp_path / 'run', objective='natural', sigma=sigma, val_n_ex=0), 3)
    noise = [seen - clean for clean, seen in pairs]
    all_noise = torch.cat([n.flatten() for n in noise])  # 3 x 32 x 784 draws
    assert abs(all_noise.std().item() / sigma - 1) < 0.02
    assert abs(all_noise.mean().item()) < 0.02 * sigma
    assert min(seen.min().item() for _, seen in pairs) < 0 < max(seen.max().item() - 1 for _, seen in pairs)
    assert not torch.equal(noise[0], noise[1])  # a fresh draw every step
    again = _model_inputs(tiny_config(tmp_path / 'again', objective='natural', sigma=sigma, val_n_ex=0), 2)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(pairs, again))  # seeded by the position


def test_sigma_zero_gives_the_model_the_clean_inputs_bitwise(tmp_path):
    for clean, seen in _model_inputs(tiny_config(tmp_path / 'run', objective='natural', val_n_ex=0), 2):
        assert torch.equal(clean, seen)


def test_validation_reports_accuracy_under_one_seeded_draw_of_noise():
    """noisy_top1 is the accuracy on x + sigma n: the last forward of each batch sees exactly that."""
    model = tiny_model().eval()
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    cfg = tiny_config('unused', objective='natural', sigma=0.5, val_attack_steps=1)
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    metrics = validate(model, [(x, y)], cfg, 0.1, accelerator)
    hook.remove()
    noisy = seen[-1]
    assert abs((noisy - x).std().item() / 0.5 - 1) < 0.05
    expected = 100.0 * (model(noisy).argmax(1) == y).sum().item() / len(y)
    assert metrics['noisy_top1'] == expected
    assert validate(model, [(x, y)], cfg, 0.1, accelerator) == metrics  # the same draw every validation
    cfg.sigma = 0.0
    assert set(validate(model, [(x, y)], cfg, 0.1, accelerator)) == {'clean_top1', 'robust_top1'}


def test_killed_and_resumed_noisy_run_matches_uninterrupted_run(tmp_path):
    """2 steps + resume 1 == 3 steps, bitwise (the noise is seeded by the position)."""
    common = dict(objective='natural', sigma=0.25, epochs=1, train_n_ex=96, val_select='noisy',
                  save_every_steps=1)
    ref, out = tmp_path / 'ref', tmp_path / 'run'
    assert main(tiny_args(ref, **common)) == 0
    assert main(tiny_args(out, **common) + ['--stop-after-steps', '2']) == 1
    assert sorted(p.name for p in (out / 'checkpoints').iterdir())[-1] == 'step_000000002'
    assert main(['--resume', '--output', str(out)]) == 0
    for export in ('final', 'best'):
        a, b = load_file(str(ref / export / 'model.safetensors')), load_file(str(out / export / 'model.safetensors'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), export
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'train_epoch_time'} for r in rows]  # noqa: E731
    rows = read_summary(ref / 'summary.csv')
    assert strip(rows) == strip(read_summary(out / 'summary.csv'))
    assert rows[0]['eval_noisy_top1'] != ''


def test_best_is_selected_on_the_noisy_accuracy(tmp_path, monkeypatch):
    """Scripted validations whose PGD and noisy accuracies disagree: val_select: noisy picks the
    noisy maximum (epoch 3), and best/'s card carries that accuracy."""
    import timm_edl.train.loop as loop
    scripted = iter([(30.0, 10.0), (20.0, 20.0), (10.0, 40.0)])
    monkeypatch.setattr(loop, 'validate', lambda *a, **k: dict(
        zip(('robust_top1', 'noisy_top1'), next(scripted)), clean_top1=50.0))
    out = tmp_path / 'run'
    result = train(tiny_config(out, objective='natural', sigma=0.25, val_select='noisy', epochs=3,
                               keep_checkpoints=100))
    assert result.best_epoch == 2 and result.best_metric == 40.0
    best = load_file(str(out / 'best' / 'model.safetensors'))
    at_epoch_3 = load_file(str(out / 'checkpoints' / f'step_{3 * STEPS_PER_EPOCH:09d}' / 'model.safetensors'))
    assert all(torch.equal(best[k], at_epoch_3[k]) for k in best)
    assert [float(r['eval_noisy_top1']) for r in read_summary(out / 'summary.csv')] == [10.0, 20.0, 40.0]
    results = json.loads((out / 'best' / 'config.json').read_text())['timm_edl']['evaluation']
    assert 'one draw of that noise: 40.00 %' in results[0]['footnote']
    assert 'new best accuracy under noise 40.00% at epoch 3' in (out / 'log.txt').read_text()


@pytest.mark.parametrize('overrides, message', [
    (dict(sigma=-0.1, objective='natural'), 'sigma must be >= 0, got -0.1'),
    (dict(sigma='abc', objective='natural'), 'sigma: expected a number'),
    (dict(sigma=0.25, objective='pgd'), "objective natural only, not 'pgd'"),
    (dict(sigma=0.25, objective='trades'), "objective natural only, not 'trades'"),
    (dict(val_select='noisy', objective='natural'), 'val_select: noisy selects best/'),
    (dict(val_select='clean'), "val_select: 'clean' is not one of robust, noisy"),
])
def test_bad_sigma_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('.', r'\.')):
        tiny_config(tmp_path / 'run', **overrides)
