"""The EDL layer against independent references: the adjoint identity, a convex solver
(cvxpy), plain ISTA, finite differences, and nn.Conv2d's shape arithmetic."""

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st, HealthCheck

from timm_edl.layers import (
    EDLConv2d, analysis, edl_conv2d, edl_layer_stats, edl_layers, elastic_objective, operator_norm_sq,
    set_beta_mode, synthesis,
)

GEOMETRIES = [  # (H, W, kernel, stride, padding)
    (5, 5, 3, 2, 1), (6, 7, 3, 2, 1), (7, 8, 2, 1, 0), (8, 9, 4, 2, 1), (9, 6, 3, 1, 1),
    (6, 7, 1, 2, 0), (11, 10, 5, 2, 2), (7, 7, 3, 1, 0), (10, 10, 4, 2, 2),
]


def dense_synthesis_matrix(weight, stride, padding, in_size):
    """Matrix M with A*(z) = M z (columns: A* applied to the code basis), and the code shape."""
    code = analysis(torch.zeros(1, weight.shape[1], *in_size, dtype=weight.dtype), weight, stride, padding)
    n = code.numel()
    basis = torch.eye(n, dtype=weight.dtype).view(n, *code.shape[1:])
    cols = synthesis(basis, weight, stride, padding, in_size)
    return cols.reshape(n, -1).T, tuple(code.shape[1:])


def cvxpy_minimizer(M, x, beta, lam, eps, reweight='floor', c=None):
    """argmin_z beta/2||x-Mz||^2 + (1-beta) D(x-Mz) + lam||z||_1 with the data term D of the
    module docstring: 'floor' 1/2 sum h_eps (Huber), 'additive' 1/2 sum rho_eps, 'scale_free'
    c sum rho_{eps c}, rho_e(r) = |r| - e log(1 + |r|/e) (eps=0: the plain l1 term)."""
    z = cp.Variable(M.shape[1])
    r = x - M @ z
    weight = c if reweight == 'scale_free' else 0.5
    e = eps * c if reweight == 'scale_free' else eps
    constraints = []
    if eps == 0:
        l1 = cp.norm1(r)
    elif reweight == 'floor':
        l1 = cp.sum(cp.huber(r, eps) / (2 * eps) + eps / 2)
    else:  # rho is increasing in t = |r| and convex: minimise it over t >= |r|
        t = cp.Variable(M.shape[0])
        constraints = [t >= r, t >= -r]
        l1 = cp.sum(t - e * cp.log(1 + t / e))
    objective = beta / 2 * cp.sum_squares(r) + (1 - beta) * weight * l1 + lam * cp.norm1(z)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    tol = 1e-12 if not constraints else 1e-10  # exponential cones: Clarabel stops short of 1e-12
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    assert problem.status == cp.OPTIMAL
    return z.value, problem.value


# ---------------------------------------------------------------- operators

@pytest.mark.parametrize('H,W,k,s,p', GEOMETRIES)
def test_synthesis_is_adjoint_of_analysis(H, W, k, s, p):
    g = torch.Generator().manual_seed(H * 100 + W)
    weight = torch.randn(4, 3, k, k, generator=g, dtype=torch.float64)
    u = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    Au = analysis(u, weight, [s, s], [p, p])
    z = torch.randn(Au.shape, generator=g, dtype=torch.float64)
    Asz = synthesis(z, weight, [s, s], [p, p], [H, W])
    assert Asz.shape == u.shape
    lhs, rhs = (Au * z).sum().item(), (u * Asz).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)


@pytest.mark.parametrize('H,W,k,s,p', GEOMETRIES)
def test_output_shape_matches_conv2d(H, W, k, s, p):
    layer = EDLConv2d(3, 5, k, s, p, power_iters=3)
    conv = nn.Conv2d(3, 5, k, s, p)
    x = torch.rand(2, 3, H, W)
    assert layer(x).shape == conv(x).shape


@pytest.mark.parametrize('cin,cout,H,W,k,s,p', [
    (3, 4, 7, 6, 3, 2, 1), (3, 4, 9, 6, 3, 1, 1), (2, 5, 11, 10, 5, 2, 2), (8, 8, 12, 12, 3, 1, 1),
    (8, 16, 13, 12, 3, 2, 1), (1, 8, 14, 14, 3, 1, 1),
])
def test_step_size_bound_against_dense_eigenvalue(cin, cout, H, W, k, s, p):
    """L from the default cold start (float32, as in the layer) is an upper bound of the
    exact largest eigenvalue of A* A (dense, float64), and at most 2 % above it."""
    g = torch.Generator().manual_seed(cin * 100 + H)
    weight = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    M, _ = dense_synthesis_matrix(weight, [s, s], [p, p], [H, W])
    exact = torch.linalg.eigvalsh(M @ M.T).max().item()
    L, u = operator_norm_sq(weight.float(), [H, W], [s, s], [p, p])
    assert exact <= L.item() <= 1.02 * exact
    # a refresh warm-started from the Ritz vector, after a small update, stays a bound
    weight2 = weight + 1e-3 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    M2, _ = dense_synthesis_matrix(weight2, [s, s], [p, p], [H, W])
    exact2 = torch.linalg.eigvalsh(M2 @ M2.T).max().item()
    L2, _ = operator_norm_sq(weight2.float(), [H, W], [s, s], [p, p], init=u, min_iters=2)
    assert exact2 <= L2.item() <= 1.02 * exact2


def test_layer_step_size_is_safe_for_a_realistic_dictionary():
    """64 -> 64, 3x3 at 32x32, unit atoms: 30 cold power iterations gave 0.91 lambda_max;
    the layer's L must not be below lambda_max (reference: 300 float64 Lanczos steps)."""
    g = torch.Generator().manual_seed(0)
    layer = EDLConv2d(64, 64, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    layer(torch.rand(1, 64, 32, 32))
    ref, _ = operator_norm_sq(layer.dictionary().detach().double(), [32, 32], [1, 1], [1, 1], num_iters=300,
                              safety=1.0)
    assert ref.item() <= layer.lipschitz.item() <= 1.02 * ref.item()


# ---------------------------------------------------------------- the solver

CONVEX_CASES = [  # (name, weight shape, stride, padding, input size)
    ('dense', (6, 10, 1, 1), 1, 0, (1, 1)),  # a 1x1 conv on one pixel: a dense 10x6 dictionary
    ('conv_s1', (2, 3, 3, 3), 1, 1, (4, 5)),
    ('conv_s2_odd', (3, 2, 3, 3), 2, 1, (5, 5)),  # 27 codes for 50 inputs
]


def warm_start_scale(M, x, lam, L):
    """c of 'scale_free' after the warm start, by hand: mean |x - M z_1|, z_1 = T(M^T x / L)."""
    u = M.T @ x / L
    z1 = np.sign(u) * np.maximum(np.abs(u) - lam / L, 0.0)
    return float(np.abs(x - M @ z1).mean())


# (reweight, init, beta): beta = 1 is the same function for every reweighting
SOLVER_CASES = [('floor', 'zero', 1.0)] + [(rw, init, b) for b in (0.0, 0.3)
                                           for rw, init in (('floor', 'zero'), ('additive', 'ista'),
                                                            ('scale_free', 'ista'))]


@pytest.mark.parametrize('reweight,init,beta', SOLVER_CASES)
@pytest.mark.parametrize('case', CONVEX_CASES, ids=[c[0] for c in CONVEX_CASES])
def test_rista_converges_to_cvxpy_minimizer(case, reweight, init, beta):
    """Many safe RISTA steps reach the minimizer of the smoothed objective the module
    docstring states for each reweighting ('scale_free': with c from the warm start).

    Measured here (float64, 25k steps, eps=0.1): relative objective gap <= 1e-10 for
    'floor' (most at 1e-14..1e-16); asserted: gap <= 1e-8 relative (1e-7 for the
    log-smoothed terms, which cvxpy solves through exponential cones), distance <= 1e-4.
    """
    _, wshape, s, p, in_size = case
    g = torch.Generator().manual_seed(int(beta * 10) + len(wshape))
    weight = torch.randn(wshape, generator=g, dtype=torch.float64)
    x = torch.randn(1, wshape[1], *in_size, generator=g, dtype=torch.float64)
    lam, eps = 0.1, 0.1
    M, _ = dense_synthesis_matrix(weight, [s, s], [p, p], list(in_size))
    L = torch.linalg.matrix_norm(M, ord=2) ** 2
    xf = x.flatten().numpy()
    c = warm_start_scale(M.numpy(), xf, lam, L.item()) if reweight == 'scale_free' else None
    z_ref, f_ref = cvxpy_minimizer(M.numpy(), xf, beta, lam, eps, reweight, c)

    z = edl_conv2d(x, weight, beta, lam, L, s, p, num_steps=25000, eps=eps, step_rule='safe',
                   init=init, reweight=reweight)
    scale = torch.tensor([c], dtype=torch.float64) if c is not None else None
    f = elastic_objective(x, z, weight, beta, lam, s, p, eps=eps, reweight=reweight, scale=scale).item()
    tol = 1e-8 if reweight == 'floor' else 1e-7
    assert f >= f_ref - tol * abs(f_ref)  # cvxpy's optimum is a lower bound (solver accuracy)
    assert (f - f_ref) <= tol * abs(f_ref)
    dist = np.linalg.norm(z.flatten().numpy() - z_ref) / max(np.linalg.norm(z_ref), 1e-12)
    assert dist <= 1e-4

    if reweight == 'floor':  # F_eps is within (1-beta) eps n / 4 of the true (unsmoothed) minimum
        _, f_true = cvxpy_minimizer(M.numpy(), xf, beta, lam, 0.0)
        f_unsmoothed = elastic_objective(x, z, weight, beta, lam, s, p, eps=0.0).item()
        assert f_true - 1e-7 <= f_unsmoothed <= f_true + (1 - beta) * eps * x.numel() / 4 + 1e-7


@pytest.mark.parametrize('beta', [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize('nonneg', [False, True])
@pytest.mark.parametrize('reweight,eps', [('floor', 1e-3), ('additive', 1e-2), ('scale_free', 0.1)])
def test_safe_step_decreases_objective_monotonically(beta, nonneg, reweight, eps):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(3, 3, 9, 8, generator=g, dtype=torch.float64)  # 3 samples, each its own objective
    lam = 0.2
    M, _ = dense_synthesis_matrix(weight, [2, 2], [1, 1], [9, 8])
    L = torch.linalg.matrix_norm(M, ord=2) ** 2
    scale = x.abs().mean(dim=[1, 2, 3], keepdim=True) if reweight == 'scale_free' else None  # c held fixed
    z = None
    values = []
    for _ in range(60):
        z = edl_conv2d(x, weight, beta, lam, L, 2, 1, num_steps=1, eps=eps, nonneg=nonneg,
                       step_rule='safe', z_init=z, init='zero', reweight=reweight, scale=scale)
        values.append(elastic_objective(x, z, weight, beta, lam, 2, 1, eps=eps, reweight=reweight, scale=scale))
    values = torch.stack(values)  # (steps, batch)
    increases = values[1:] - values[:-1]
    assert (increases <= 1e-12 * values[:-1].abs()).all(), increases.max()
    assert (values[-1] < values[0]).all()


def test_beta_one_is_plain_ista():
    """With beta=1 the layer is ISTA on the Lasso, written here independently with matrices."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    M, code_shape = dense_synthesis_matrix(weight, [2, 2], [1, 1], [6, 7])
    L = torch.linalg.matrix_norm(M, ord=2).item() ** 2
    lam, steps = 0.3, 7
    for nonneg in (False, True):
        z_ista = torch.zeros(2, M.shape[1], dtype=torch.float64)
        xf = x.flatten(1)
        for _ in range(steps):
            u = z_ista + (xf - z_ista @ M.T) @ M / L
            z_ista = torch.relu(u - lam / L) if nonneg else torch.sign(u) * torch.relu(u.abs() - lam / L)
        for init, reweight in (('zero', 'floor'), ('ista', 'scale_free'), ('ista', 'additive')):
            z = edl_conv2d(x, weight, 1.0, lam, L, 2, 1, num_steps=steps, nonneg=nonneg, step_rule='fixed',
                           init=init, reweight=reweight)
            assert torch.allclose(z.flatten(1), z_ista, atol=1e-10, rtol=0), (init, reweight)


def test_first_step_from_zero_needs_no_synthesis():
    """z_1 = T(s A(a_0 x)) with a_0 = beta + (1-beta)/(2 max(|x|, eps)), computed by hand."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    beta, lam, L, eps = 0.4, 0.05, 7.0, 1e-3
    a0 = beta + (1 - beta) / (2 * x.abs().clamp_min(eps))
    u = nn.functional.conv2d(a0 * x, weight, padding=1) / L
    expected = torch.sign(u) * torch.relu(u.abs() - lam / L)
    z = edl_conv2d(x, weight, beta, lam, L, 1, 1, num_steps=1, eps=eps, init='zero', reweight='floor')
    assert torch.allclose(z, expected, atol=1e-13, rtol=0)


@pytest.mark.parametrize('beta', [0.0, 0.375])
def test_warm_start_and_scale_free_step_by_hand(beta):
    """The default layer with K = 2: z_1 = T(s A(x)) (plain ISTA, whatever beta), then one
    reweighted step with a = beta + (1-beta) c / (|r_1| + 0.1 c), c = mean |r_1| per sample."""
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    lam, L = 0.0625, 7.0  # exact in float32, in which the layer keeps lam

    def shrink(u):
        return torch.sign(u) * torch.relu(u.abs() - lam / L)

    z1 = shrink(nn.functional.conv2d(x, weight, padding=1) / L)
    r1 = x - nn.functional.conv_transpose2d(z1, weight, padding=1)
    c = r1.abs().mean(dim=[1, 2, 3], keepdim=True)
    a1 = beta + (1 - beta) * c / (r1.abs() + 0.1 * c)
    expected = shrink(z1 + nn.functional.conv2d(a1 * r1, weight, padding=1) / L)
    layer = EDLConv2d(3, 4, 3, beta=beta, lam=lam, fixed_lipschitz=L, normalize_atoms=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    for fused in (True, False):
        layer.fused = fused
        assert torch.allclose(layer(x), expected, atol=1e-13, rtol=0), fused


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize('step_rule', ['fixed', 'safe'])
def test_gradcheck_functional(step_rule):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, beta, lam):
        return edl_conv2d(x, weight, beta, lam, 9.0, 2, 1, num_steps=3, eps=1e-3, step_rule=step_rule)

    assert torch.autograd.gradcheck(fn, (x, weight, beta, lam), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_gradcheck_module_input_and_parameters():
    torch.manual_seed(0)
    layer = EDLConv2d(2, 3, 3, stride=2, num_steps=3, beta=0.6, lam=0.05, power_iters=200).double()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    layer(x)  # compute and cache L (a constant for differentiation)
    params = (layer.weight, layer.beta)

    def fn(x, weight, beta):
        return torch.func.functional_call(layer, {'weight': weight, 'beta': beta}, (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-7, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- module behaviour

def test_autocast_bfloat16_finite_and_close():
    torch.manual_seed(0)
    layer = EDLConv2d(8, 16, 3, num_steps=3, beta=0.5)
    x = torch.rand(4, 8, 16, 16)
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.beta.grad).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_deterministic():
    torch.manual_seed(0)
    a = EDLConv2d(3, 8, 3, num_steps=2, beta=0.3)
    torch.manual_seed(0)
    b = EDLConv2d(3, 8, 3, num_steps=2, beta=0.3)
    x = torch.rand(2, 3, 12, 12)
    out_a1, out_a2, out_b = a(x), a(x), b(x)
    assert torch.equal(out_a1, out_a2) and torch.equal(out_a1, out_b)


def test_step_size_cached_until_weight_changes():
    layer = EDLConv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    layer(x)
    L0 = layer.lipschitz.clone()
    layer(x)
    assert torch.equal(layer.lipschitz, L0)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, 4).view(4, 1, 1, 1))  # atoms normalised: change directions
        layer.weight[0, 0] += 5
    layer(x)
    assert not torch.equal(layer.lipschitz, L0)
    M, _ = dense_synthesis_matrix(layer.dictionary().detach().double(), [1, 1], [1, 1], [8, 8])
    exact = torch.linalg.matrix_norm(M, ord=2).item() ** 2
    assert layer.lipschitz.item() == pytest.approx(exact, rel=0.05)


def test_state_dict_carries_step_size():
    torch.manual_seed(0)
    a = EDLConv2d(3, 4, 3, beta=0.5).eval()
    x = torch.rand(2, 3, 10, 10)
    out = a(x)
    b = EDLConv2d(3, 4, 3, beta=0.5, power_iters=1).eval()  # a poor estimate if it had to compute one
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), out)


def test_nonneg_codes_are_nonnegative_and_sparsity_grows_with_lam():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 10, 10)
    sparsity = []
    for lam in (0.0, 0.1, 1.0, 100.0):
        layer = EDLConv2d(3, 8, 3, lam=lam, nonneg=True)
        torch.manual_seed(1)
        layer.reset_parameters()
        z = layer(x)
        assert (z >= 0).all()
        sparsity.append((z == 0).float().mean().item())
    assert sparsity == sorted(sparsity) and sparsity[-1] == 1.0


def test_beta_modes_freeze_and_release():
    model = nn.Sequential(EDLConv2d(3, 4, 3, beta=0.7), nn.ReLU(), EDLConv2d(4, 4, 3, beta=0.7))
    x = torch.rand(2, 3, 8, 8)
    set_beta_mode(model, 'vanilla')
    assert all(m.beta.item() == 1.0 and not m.beta.requires_grad for m in (model[0], model[2]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    assert model[0].beta.item() == 1.0 and model[0].beta.grad is None

    set_beta_mode(model, 'elastic')
    assert model[0].beta.requires_grad
    model(x).square().mean().backward()
    assert model[0].beta.grad is not None and model[0].beta.grad.abs().item() > 0

    set_beta_mode(model, 'robust')
    assert model[2].beta.item() == 0.0 and not model[2].beta.requires_grad
    with pytest.raises(ValueError, match='unknown beta mode'):
        set_beta_mode(model, 'sideways')
    with pytest.raises(ValueError, match='no EDLConv2d'):
        set_beta_mode(nn.Conv2d(1, 1, 1), 'vanilla')
    fixed = EDLConv2d(3, 4, 3, beta_learnable=False)
    with pytest.raises(ValueError, match='beta_learnable=False'):
        set_beta_mode(fixed, 'elastic')


def test_beta_outside_box_is_clamped_and_can_return():
    layer = EDLConv2d(3, 4, 3, beta=1.0)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        layer.beta.fill_(1.3)
    out = layer(x)
    with torch.no_grad():
        layer.beta.fill_(1.0)
    assert torch.equal(out, layer(x))  # forward uses clamp(beta, 0, 1)
    with torch.no_grad():
        layer.beta.fill_(1.3)
    layer(x).sum().backward()
    assert layer.beta.grad.abs().item() > 0  # straight-through: gradient still reaches beta


def test_layer_stats_match_independent_objective():
    torch.manual_seed(0)
    layer = EDLConv2d(3, 6, 3, stride=2, beta=0.4, lam=0.2, init='zero', reweight='floor')
    x = torch.rand(2, 3, 9, 9)
    stats = edl_layer_stats(layer, x)['']
    z = layer(x)
    A = layer.dictionary().detach()
    r = x - nn.functional.conv_transpose2d(z, A, stride=2, padding=1)  # 9x9 -> 5x5 -> 9x9, no output padding
    expected = (0.4 / 2 * r.pow(2).flatten(1).sum(1) + 0.6 / 2 * r.abs().flatten(1).sum(1)
                + 0.2 * z.abs().flatten(1).sum(1)).mean()
    assert stats['objective'] == pytest.approx(expected.item(), rel=1e-5)
    assert stats['sparsity'] == pytest.approx((z == 0).float().mean().item())
    assert stats['beta'] == pytest.approx(0.4)
    assert layer.track_stats is False


def test_layer_stats_scale_free_objective_by_hand():
    """'scale_free' stats: the unsmoothed F, beta/2||r||^2 + (1-beta) c ||r||_1 + lam||z||_1,
    with c = mean |x - A*(z_1)| after the plain warm-start step."""
    torch.manual_seed(0)
    layer = EDLConv2d(3, 6, 3, beta=0.4, lam=0.2)
    x = torch.rand(2, 3, 9, 9)
    stats = edl_layer_stats(layer, x)['']
    z = layer(x)
    A = layer.dictionary().detach()
    L = layer.lipschitz
    u = nn.functional.conv2d(x, A, padding=1) / L
    z1 = torch.sign(u) * torch.relu(u.abs() - 0.2 / L)
    c = (x - nn.functional.conv_transpose2d(z1, A, padding=1)).abs().flatten(1).mean(1, keepdim=True)
    r = (x - nn.functional.conv_transpose2d(z, A, padding=1)).flatten(1)
    expected = (0.2 * r.pow(2).sum(1) + 0.6 * c[:, 0] * r.abs().sum(1) + 0.2 * z.abs().flatten(1).sum(1)).mean()
    assert stats['objective'] == pytest.approx(expected.item(), rel=1e-5)


def test_learnable_lam_and_step_scale_get_gradients():
    layer = EDLConv2d(3, 4, 3, lam_learnable=True, step_rule='learnable', beta=0.5)
    layer(torch.rand(2, 3, 8, 8)).sum().backward()
    assert layer.lam.grad is not None and layer.step_scale.grad is not None


def test_fixed_lipschitz_one_step_is_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    layer = EDLConv2d(3, 5, 3, 2, 1, num_steps=1, lam=0.0, beta=1.0, normalize_atoms=False,
                      fixed_lipschitz=1.0, bias=True)
    layer.load_state_dict({**conv.state_dict(), 'beta': torch.tensor(1.0), 'lam': torch.tensor(0.0),
                           'lipschitz': torch.tensor(0.0), 'lipschitz_size': torch.tensor([-1, -1])})
    x = torch.rand(2, 3, 9, 9)
    assert torch.allclose(layer(x), conv(x), atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_steps=0), 'num_steps'),
    (dict(beta=1.5), 'beta'),
    (dict(lam=-1.0), 'lam'),
    (dict(step_rule='adam'), 'step_rule'),
    (dict(eps=0.0), 'eps'),
    (dict(fixed_lipschitz=-1.0), 'fixed_lipschitz'),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDLConv2d(3, 4, 3, **kwargs)


def test_bad_inputs_raise_clear_errors():
    layer = EDLConv2d(3, 4, 5, padding=0)
    with pytest.raises(ValueError, match=r'expected input of shape \(B, 3, H, W\)'):
        layer(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match='smaller than the kernel'):
        layer(torch.rand(2, 3, 3, 3))
    with pytest.raises(ValueError, match='num_steps'):
        edl_conv2d(torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3), 1.0, 0.1, 1.0, num_steps=0)


# ---------------------------------------------------------------- property-based

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    in_chans=st.integers(1, 4),
    out_chans=st.integers(1, 5),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 2),
    height=st.integers(4, 11),
    width=st.integers(4, 11),
    num_steps=st.integers(1, 4),
    beta=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 2.0),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    nonneg=st.booleans(),
    step_rule=st.sampled_from(['fixed', 'safe', 'learnable']),
    reweight=st.sampled_from(['scale_free', 'additive', 'floor']),
    init=st.sampled_from(['ista', 'zero']),
)
def test_random_shapes_and_values_give_finite_outputs(
        batch, in_chans, out_chans, kernel, stride, height, width, num_steps, beta, lam, scale, nonneg, step_rule,
        reweight, init):
    init = 'zero' if num_steps == 1 else init
    layer = EDLConv2d(in_chans, out_chans, kernel, stride, num_steps=num_steps, beta=beta, lam=lam,
                      nonneg=nonneg, step_rule=step_rule, power_iters=5, reweight=reweight, init=init)
    x = torch.randn(batch, in_chans, height, width) * scale
    out = layer(x)
    conv_shape = nn.functional.conv2d(x, layer.weight, stride=stride, padding=layer.padding).shape
    assert out.shape == conv_shape
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------- the fused fast path

def _layer_pair(**kwargs):
    torch.manual_seed(0)
    fused = EDLConv2d(3, 5, 3, fused=True, **kwargs).double()
    reference = EDLConv2d(3, 5, 3, fused=False, **kwargs).double()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


SOLVERS = [dict(init='zero', reweight='floor', eps=1e-2), dict(init='ista', reweight='additive'),
           dict(init='ista', reweight='scale_free'), dict(init='zero', reweight='scale_free')]
SOLVER_IDS = ['zero-floor', 'ista-additive', 'ista-scale_free', 'zero-scale_free']


@pytest.mark.parametrize('stride,size', [(1, 8), (2, 9)])
@pytest.mark.parametrize('nonneg', [False, True])
@pytest.mark.parametrize('num_steps', [1, 2, 3])
@pytest.mark.parametrize('solver', SOLVERS, ids=SOLVER_IDS)
def test_fused_path_matches_reference_values_and_gradients(stride, size, nonneg, num_steps, solver):
    """The hand-written backward against autograd through the reference solver."""
    if num_steps == 1 and solver['init'] == 'ista':
        pytest.skip("init='ista' with one step is plain ISTA (covered by beta = 1)")
    fused, reference = _layer_pair(stride=stride, nonneg=nonneg, num_steps=num_steps, beta=0.4,
                                   lam=0.05, lam_learnable=True, **solver)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    out_f, out_r = fused(x), reference(x)
    assert torch.equal(fused.lipschitz, reference.lipschitz)
    assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0)
    g = torch.randn_like(out_f)
    params_f = [x, fused.weight, fused.beta, fused.lam]
    params_r = [x, reference.weight, reference.beta, reference.lam]
    grads_f = torch.autograd.grad(out_f, params_f, g)
    grads_r = torch.autograd.grad(out_r, params_r, g)
    for name, a, b in zip(['x', 'weight', 'beta', 'lam'], grads_f, grads_r):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), name


@pytest.mark.parametrize('init,reweight,eps', [('zero', 'floor', 1e-3), ('ista', 'scale_free', 0.1),
                                               ('zero', 'scale_free', 0.1), ('ista', 'additive', 1e-2)])
def test_fused_path_gradcheck(init, reweight, eps):
    from timm_edl.layers.rista import rista_fused
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    L = torch.tensor(9.0, dtype=torch.float64)

    def fn(x, weight, beta, lam):
        return rista_fused(x, weight, beta, lam, L, [2, 2], [1, 1], 3, eps, False, init, reweight)

    assert torch.autograd.gradcheck(fn, (x, weight, beta, lam), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_input_gradient_only_when_parameters_are_frozen():
    """Attacks differentiate w.r.t. the input alone: the fused backward skips weight grads."""
    fused, reference = _layer_pair(beta=0.5)
    for p in list(fused.parameters()) + list(reference.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    gx_f, = torch.autograd.grad(fused(x).square().sum(), x)
    gx_r, = torch.autograd.grad(reference(x).square().sum(), x)
    assert torch.allclose(gx_f, gx_r, atol=1e-11)


def test_memory_efficient_backward_gives_identical_gradients():
    torch.manual_seed(0)
    plain = EDLConv2d(3, 5, 3, beta=0.6, num_steps=3)
    saving = EDLConv2d(3, 5, 3, beta=0.6, num_steps=3, memory_efficient=True)
    saving.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    out_p, out_s = plain(x), saving(x)
    assert torch.equal(out_p, out_s)
    grads_p = torch.autograd.grad(out_p.square().sum(), [x, plain.weight, plain.beta])
    grads_s = torch.autograd.grad(out_s.square().sum(), [x, saving.weight, saving.beta])
    for a, b in zip(grads_p, grads_s):
        assert torch.equal(a, b)


def test_copies_keep_the_step_size():
    """deepcopy (EMA, naive surrogates) and pickling reproduce the layer exactly."""
    import copy
    import io
    torch.manual_seed(0)
    layer = EDLConv2d(3, 4, 3, beta=0.5).eval()
    x = torch.rand(2, 3, 9, 9)
    out = layer(x)
    assert torch.equal(copy.deepcopy(layer)(x), out)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), out)
    moved = copy.deepcopy(layer).to(torch.float32)
    assert torch.equal(moved(x), out)
    # and an in-place edit of the copy's dictionary still refreshes the copy's L only
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.weight[0].mul_(-1.0).add_(1.0)
    copied(x)
    assert not torch.equal(copied.lipschitz, layer.lipschitz)
    assert torch.equal(layer(x), out)


@pytest.mark.parametrize('step_rule', ['fixed', 'safe'])
def test_compiled_solver_matches_reference_values_and_gradients(step_rule):
    """compile_solver=True (torch.compile of the solver) against eager autograd, float64,
    over two batch sizes (the second goes through the compiler's dynamic-shape path) and
    with a strided layer; ``memory_efficient`` on top gives the same gradients again."""
    torch.manual_seed(0)
    kwargs = dict(beta=0.4, lam=0.05, lam_learnable=True, eps=1e-2, num_steps=3, step_rule=step_rule)
    for stride, batches in ((1, (2, 3)), (2, (2,))):
        reference = EDLConv2d(3, 4, 3, stride=stride, fused=False, **kwargs).double()
        compiled = EDLConv2d(3, 4, 3, stride=stride, compile_solver=True, **kwargs).double()
        saving = EDLConv2d(3, 4, 3, stride=stride, compile_solver=True, memory_efficient=True, **kwargs).double()
        compiled.load_state_dict(reference.state_dict())
        saving.load_state_dict(reference.state_dict())
        for batch in batches:
            x = torch.randn(batch, 3, 9, 9, dtype=torch.float64, requires_grad=True)
            outs = [m(x) for m in (reference, compiled, saving)]
            assert torch.allclose(outs[1], outs[0], atol=1e-12, rtol=0)
            g = torch.randn_like(outs[0])
            grads = [torch.autograd.grad(o, [x, m.weight, m.beta, m.lam], g)
                     for o, m in zip(outs, (reference, compiled, saving))]
            for other in grads[1:]:
                for name, a, b in zip(['x', 'weight', 'beta', 'lam'], other, grads[0]):
                    assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), (stride, batch, name)


def test_compile_solver_is_settable_and_not_exported(tmp_path):
    import timm
    from timm_edl import hub
    from timm_edl.convert import set_edl_options
    model = timm.create_model('edlnet_resnet18', layers=[1, 1, 1, 1], edl_cfg=dict(compile_solver=True))
    assert all(m.compile_solver for _, m in edl_layers(model))
    set_edl_options(model, compile_solver=False)
    assert not any(m.compile_solver for _, m in edl_layers(model))
    set_edl_options(model, compile_solver=True)
    hub.export(model, tmp_path / 'export')
    import json
    edl_cfg = json.loads((tmp_path / 'export' / 'config.json').read_text())['model_args']['edl_cfg']
    assert 'compile_solver' not in edl_cfg
    loaded = hub.load(f'local-dir:{tmp_path / "export"}')
    assert not any(m.compile_solver for _, m in edl_layers(loaded))


@pytest.mark.parametrize('beta', [0.0, 0.4, 0.995, 1.0])
@pytest.mark.parametrize('nonneg', [False, True])
@pytest.mark.parametrize('solver', SOLVERS, ids=SOLVER_IDS)
def test_fused_path_matches_reference_at_every_beta_regime(beta, nonneg, solver):
    """The fused step factors the reweighted residual differently for beta = 0, small
    beta, beta near 1 (for 'floor' the beta coefficient is then the larger) and beta = 1
    (no reweighting at all): each regime against autograd through the reference solver,
    with beta trainable (its gradient is checked too)."""
    fused, reference = _layer_pair(stride=1, nonneg=nonneg, num_steps=3, beta=beta, lam=0.05, **solver)
    assert beta < 0.99 or beta >= (1 - beta) * 0.5 / 1e-2  # 0.995 takes the 'beta is larger' branch
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    out_f, out_r = fused(x), reference(x)
    assert torch.allclose(out_f, out_r, atol=1e-12, rtol=0)
    g = torch.randn_like(out_f)
    grads_f = torch.autograd.grad(out_f, [x, fused.weight, fused.beta], g)
    grads_r = torch.autograd.grad(out_r, [x, reference.weight, reference.beta], g)
    for name, a, b in zip(['x', 'weight', 'beta'], grads_f, grads_r):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), name


@pytest.mark.parametrize('solver', SOLVERS, ids=SOLVER_IDS)
def test_accelerator_path_never_reads_a_value_back_to_the_host(solver):
    """On the meta device a tensor has no value, so any host read (``float()``, ``.item()``,
    a data-dependent branch) raises: the layer's forward, backward, cold step size and the
    warm refresh after a weight update are what a GPU runs without synchronising."""
    layer = EDLConv2d(4, 8, 3, beta=0.5, **solver).to('meta')
    x = torch.empty(2, 4, 8, 8, device='meta', requires_grad=True)
    out = layer(x)  # cold L
    grads = torch.autograd.grad(out.sum(), [x, layer.weight, layer.beta])
    assert [g.shape for g in grads] == [x.shape, layer.weight.shape, torch.Size([])]
    with torch.no_grad():
        layer.weight.mul_(2)  # an optimizer step: the next forward refreshes L from the Ritz vector
    assert layer(x).shape == (2, 8, 8, 8)


def test_compiled_edlnet_trains_without_recompiles_and_matches_eager():
    """``torch.compile`` of a whole EDLNet: the step-size cache runs outside the graph, so
    after the first training step nothing is compiled again (weight updates change the
    cache's key every step), and the compiled model computes what the eager one does.
    The counting backend sees every graph dynamo hands over (public API only)."""
    import copy
    import timm
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    torch.manual_seed(0)
    eager = timm.create_model('edlnet_resnet18', layers=[1, 1, 1], channels=[4, 8, 8], stem_width=4,
                              num_classes=3)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=counting_backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    counts = []
    for _ in range(4):
        losses = []
        for m, opt in zip((eager, compiled), opts):
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        counts.append(len(graphs))
        assert torch.allclose(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert counts[0] > 0
    assert counts[1:] == [counts[0]] * 3, f"graphs compiled after each step: {counts}"
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    torch.compiler.reset()
