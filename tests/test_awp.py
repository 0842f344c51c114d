"""Adversarial weight perturbation (timm_edl.train.awp): size and direction of the
perturbation against a direct computation, bitwise restoration, and the trainer option."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_edl  # noqa: F401  (registers edlnet_*)
from timm_edl.layers.edl import edl_layers
from timm_edl.train import ConfigError, load_config, train
from timm_edl.train.awp import awp_perturbation, perturb_weights, perturbable_parameters
from timm_edl.train.objectives import training_loss


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize('objective', ['pgd', 'trades'])
def test_perturbation_size_and_direction_match_a_direct_computation(objective):
    model = _tiny_net().train()
    x, y = _batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    gamma = 0.01

    def loss_fn(m):
        return training_loss(objective, m, x, x_adv, y, trades_beta=6.0)[0]

    # direct computation on an independent copy, in train mode
    ref = copy.deepcopy(model)
    loss = loss_fn(ref)
    weights = [p for p in ref.parameters() if p.ndim > 1]
    grads = torch.autograd.grad(loss, weights)
    expected = [gamma * w.detach().norm() * g / g.norm() for w, g in zip(weights, grads)]

    before = copy.deepcopy(model.state_dict())
    awp = perturb_weights(model, loss_fn, gamma)
    perturbed = [n for n, _ in perturbable_parameters(model)]
    assert perturbed == ['0.weight', '4.weight']  # conv and linear weights; no bias, no BN
    for (name, p), v in zip(perturbable_parameters(model), expected):
        delta = p.detach() - before[name]
        torch.testing.assert_close(delta, v, rtol=1e-4, atol=1e-7)
        # size: gamma * ||w|| exactly (relative to the layer's norm); direction: the gradient
        assert delta.norm().item() == pytest.approx(gamma * before[name].norm().item(), rel=1e-4)
        cos = F.cosine_similarity(delta.flatten(), v.flatten(), dim=0).item()
        assert cos == pytest.approx(1.0, abs=1e-5)
    for name, value in model.state_dict().items():  # biases, BN affine and BN statistics untouched
        if name not in perturbed:
            assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())  # .grad left alone
    awp.restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # bitwise


def test_restore_is_bitwise_after_a_backward_at_the_perturbed_weights():
    model = _tiny_net().train()
    x, y = _batch()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    awp = perturb_weights(model, lambda m: F.cross_entropy(m(x), y), gamma=0.5)
    assert not torch.equal(params['0.weight'], before['0.weight'])
    loss = F.cross_entropy(model(x), y)
    loss.backward()  # the gradient at w + v
    awp.restore()
    awp.restore()  # idempotent
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_zero_gradient_gives_zero_perturbation():
    w = [torch.randn(3, 3), torch.randn(2, 4)]
    v = awp_perturbation(w, [torch.zeros(3, 3), None], gamma=0.1)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in v)


def test_edl_dictionaries_are_perturbed_and_betas_are_not():
    model = timm.create_model('edlnet_resnet18', num_classes=10, in_chans=1, stem_type='imagenet',
                              layers=(1, 1), widths=(8, 16), stem_width=8, edl_cfg=dict(power_iters=5)).train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    names = {n for n, _ in perturbable_parameters(model)}
    for name, layer in edl_layers(model):
        assert f'{name}.weight' in names
        assert f'{name}.beta' not in names
    before = copy.deepcopy(model.state_dict())
    awp = perturb_weights(model, lambda m: F.cross_entropy(m(x), y), gamma=0.01)
    out = model(x)  # the forward at w + v (L refreshed for the perturbed dictionaries)
    assert torch.isfinite(out).all()
    awp.restore()
    state = model.state_dict()
    for n in names:
        assert torch.equal(state[n], before[n]), n


def test_awp_config_validation(tmp_path):
    cfg = load_config(None, ['--objective', 'trades', '--awp-gamma', '0.005', '--awp-warmup', '10'])
    assert cfg.awp_gamma == 0.005 and cfg.awp_warmup == 10
    with pytest.raises(ConfigError, match='awp_gamma'):
        load_config(None, ['--objective', 'fast', '--awp-gamma', '0.01'])
    with pytest.raises(ConfigError, match='awp_gamma'):
        load_config(None, ['--awp-gamma', '-0.1'])


def test_trainer_runs_with_awp_and_warmup(tmp_path):
    """PGD-AT + AWP from epoch 1 (warm-up 1): epoch 0 is the plain run bit for bit, and
    epoch 1 differs from it (the perturbation changed the gradients)."""
    common = ['--dataset', 'fashion-mnist-small', '--model', 'edlnet_resnet18', '--model-kwargs',
              '{stem_type: imagenet, layers: [1, 1], widths: [8, 16], stem_width: 8}', '--batch-size', '32',
              '--train-n-ex', '64', '--val-n-ex', '16', '--attack-steps', '1', '--val-attack-steps', '1',
              '--num-workers', '0', '--lr', '0.05', '--progress', 'never', '--sched', 'cosine']
    runs = {}
    for name, epochs, gamma in (('plain1', 1, 0.0), ('awp1', 1, 0.01), ('plain2', 2, 0.0), ('awp2', 2, 0.01)):
        cfg = load_config(None, common + ['--epochs', str(epochs), '--awp-gamma', str(gamma), '--awp-warmup', '1',
                                          '--output', str(tmp_path / name)])
        result = train(cfg)
        assert result.completed
        runs[name] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    assert all(torch.equal(runs['plain1'][k], runs['awp1'][k]) for k in runs['plain1'])  # warm-up: off
    assert any(not torch.equal(runs['plain2'][k], runs['awp2'][k]) for k in runs['plain2'])
    assert all(torch.isfinite(v.float()).all() for v in runs['awp2'].values())


def test_awp_under_ddp_keeps_the_ranks_identical(tmp_path):
    """2 CPU processes (gloo), PGD-AT + AWP: each rank perturbs from its own batch, all restore the
    same weights, so both end with identical parameters and buffers, the EDL layers' step-size
    caches aside (L is refreshed per process after each perturbation, warm-started from that
    process's own vector; a derived cache, which weights digests leave out too)."""
    from test_train import launch_two_cpu_ranks, tiny_args
    args = tiny_args(tmp_path / 'run', batch_size=16, objective='pgd', awp_gamma=0.01, epochs=1, train_n_ex=64)
    s0, s1 = (rank['state'] for rank in launch_two_cpu_ranks(tmp_path, args))
    caches = ('.lipschitz', '.lipschitz_size')
    assert not [k for k in s0 if not k.endswith(caches) and not torch.equal(s0[k], s1[k])]
    assert any(k.endswith('.lipschitz') for k in s0)
