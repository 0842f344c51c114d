"""Elastic Dictionary Learning (EDL) layer: a convolution replaced by sparse coding.

Notation (shapes for one layer, batch ``B``)::

    x   : (B, C_in,  H,  W )    layer input
    A   : (C_out, C_in, k, k)   convolutional dictionary (shaped like a conv weight)
    z   : (B, C_out, H', W')    sparse code = layer output (H', W' as for conv2d)

    analysis   A(u)  = conv2d(u, A, stride, padding)                 input -> code space
    synthesis  A*(z) = conv_transpose2d(z, A, stride, padding, op)   code -> input space

``op`` (output padding) is chosen so that ``A*(z)`` has exactly the spatial size of
``x``; with it ``A*`` is the adjoint of ``A`` for every stride, padding and odd size.

The elastic objective (per sample; ``r = x - A*(z)``, ``n`` entries)::

    F(z) = beta/2 ||r||_2^2 + (1-beta) * D(r) + lam ||z||_1

with the l1 data term ``D`` set by ``reweight`` (``rho_e(r) = |r| - e log(1 + |r|/e)``,
a smoothed ``|r|`` with ``rho_e'(r) = r / (|r| + e)``; ``h_e`` the Huber function,
``r^2/(2e) + e/2`` inside ``|r| < e``, ``|r|`` outside)::

    'scale_free' [default]  D = c sum rho_{eps c}(r),  c = mean |r_1| per sample, eps = 0.1
    'additive'              D = 1/2 sum rho_eps(r),     eps = 1e-2 (absolute)
    'floor'                 D = 1/2 sum h_eps(r),       eps = 1e-3 (absolute; the original layer)

``r_1`` is the residual at the first reweighted step (``x - A*(z_1)`` after the warm
start, ``x`` from z_0 = 0): ``c`` is fixed within the layer, so ``F`` is one fixed convex
function per input; gradients do flow through ``c``.  As ``eps -> 0`` every ``D`` tends
to the l1 error (times ``c``, or ``1/2``).  ``c`` makes the l1 part scale-free: scaling
the input scales ``c`` and ``r`` alike and leaves the weights below unchanged, so beta
means the same at every activation scale, and the weights average about 1, which fits
the step ``1/L``.

RISTA, unrolled for ``K = num_steps`` steps::

    init='ista' [default]: z_1 = T_{lam s}(s A(x))   (a plain ISTA step, a = 1: the warm
                           start counts as the first of the K steps, no extra convolution)
    init='zero':           z_0 = 0
    then for each further step t:
        r_t = x - A*(z_t)
        a_t = beta + (1 - beta) w(r_t)
        z_{t+1} = T_{lam s_t}( z_t + s_t A(a_t * r_t) )

    w(r) = c / (|r| + eps c)  |  1 / (2 (|r| + eps))  |  1 / (2 max(|r|, eps))

``T_c`` is soft-thresholding (``nonneg=True``: ``max(u - c, 0)``).  ``beta = 1`` is the
Lasso solved by ISTA (vanilla dictionary learning; every init and reweighting then
computes the same function), ``beta = 0`` is robust (l1) DL.

Why it is a descent method: for an even ``psi`` with ``psi'(r)/r`` non-increasing in
``|r|``, ``psi(r) <= psi(r_t) + w_t/2 (r^2 - r_t^2)`` with ``w_t = psi'(r_t)/r_t``.  The
weights above are exactly these ratios for ``psi = c rho_{eps c}``, ``rho_eps / 2`` and
``h_eps / 2`` (``e = max(|r|, eps)`` minimises ``r^2/(2e) + e/2`` over ``e >= eps``).  So each
step is a proximal-gradient step on a quadratic majorizer of ``F``, tight at ``z_t``;
with ``s_t <= 1 / (L max(a_t))``, ``L = ||A||^2`` (the largest eigenvalue of ``A A*``),
``F(z_t)`` is non-increasing and RISTA converges to the minimiser of ``F`` (tested
against cvxpy).  A K = 2 layer is an unrolled map, far from that minimiser at beta < 1.

Why the defaults (measured on ``edlnet_resnet18`` at initialisation, float64): the
floored weights have slope ``1/(2 eps) = 500`` inside ``|r| < eps`` and 0 outside; through
17 layers the input gradient reached 1e10 to 1e20 for beta <= 0.8 and no longer matched
finite differences, and from z_0 = 0 a beta = 0 layer saw only ``sign(x)``.  With the warm
start and the scale-free weights the slopes are bounded by ``(1-beta)/eps = 10`` relative
to the residual scale, and the input gradient matches finite differences at every beta
(``tests/test_models.py::test_input_gradient_is_sane_at_every_beta``).

Design choices (keyword arguments; defaults in brackets):
  * ``step_rule`` ['fixed']: ``'fixed'`` ``s = 1/L`` (SDNet), ``'safe'``
    ``s_t = 1/(L max_i a_t)`` per sample (guaranteed descent for any beta),
    ``'learnable'`` ``s = c/L`` with a learned per-layer scale ``c`` (init 1).
  * ``L`` = 1.01 x a converged Lanczos estimate of ``lambda_max(A* A)`` at the input's
    spatial size, under ``no_grad`` (see :func:`operator_norm_sq`; the step size is a
    constant, as in SDNet).  It is cached and recomputed only when the dictionary changes
    (warm-started, a few steps) or the input size changes (cold start), so all forwards
    of an attack share one L.  A loaded model keeps the L it was saved with.
  * ``beta`` is one scalar per layer kept in [0, 1] by a clamp whose backward is the
    identity (straight-through), so a learnable beta that leaves the box can return.
    Not a sigmoid of a logit: the two-stage schedule releases beta at exactly 1 (the
    vanilla solution), where a sigmoid would need an infinite logit and pass no gradient;
    the trainer's ``elastic_beta_init`` sets where the elastic stage starts instead.
  * ``init`` ['ista'], ``reweight`` ['scale_free'], ``eps`` [per reweighting, above];
    ``nonneg`` [False]; ``normalize_atoms`` [True]: every atom ``A[c]`` is scaled to unit
    l2 norm on every forward (SDNet); ``lam`` [0.1] fixed, or learnable (kept >= 0 by the
    same straight-through clamp).  Layers exported before ``init`` / ``reweight`` existed
    are rebuilt with ``init='zero', reweight='floor'`` (:func:`with_legacy_options`).
  * ``fused`` [True]: for the 'fixed' rule the steps run in place with a hand-written
    backward (:class:`_RistaStep`, every init and reweighting); :func:`rista` (autograd
    through every op) is the reference it is tested against, and the path of the other
    step rules.  ``memory_efficient`` [False] recomputes the layer in the backward
    instead of storing its intermediates.  ``compile_solver`` [False] runs :func:`rista`
    through ``torch.compile`` (one compiled solver per layer geometry).  Optional; needs
    a working ``torch.compile`` (a C++ compiler on CPU, Triton on GPU).

Caveat of ``init='zero', reweight='floor'`` (the original layer): a layer whose beta
reaches 0 sees, in its first step, only ``clip(x, -eps, eps) / (2 eps)``, i.e. ``sign(x)``
where ``|x| > eps``: piecewise constant, with a vanishing input gradient, so gradient
attacks overstate its robustness.  ``timm-edl eval``'s gradient checks flag such models.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from timm.layers import register_notrace_module

__all__ = [
    'EDLConv2d', 'edl_conv2d', 'rista', 'elastic_objective', 'analysis', 'synthesis',
    'output_padding', 'operator_norm_sq', 'normalize_atoms', 'rista_step_sizes',
    'set_beta_mode', 'edl_layers', 'edl_layer_stats', 'reweight_coefficient', 'residual_scale',
    'with_legacy_options', 'STEP_RULES', 'INITS', 'REWEIGHTS', 'LEGACY_OPTIONS',
]

STEP_RULES = ('fixed', 'safe', 'learnable')
INITS = ('zero', 'ista')
REWEIGHTS = ('floor', 'additive', 'scale_free')
# What a layer built before ``init`` / ``reweight`` existed computes: exports whose recorded
# options lack these keys are rebuilt with these values (see :func:`with_legacy_options`).
LEGACY_OPTIONS: Dict[str, str] = {'init': 'zero', 'reweight': 'floor'}
LANCZOS_SAFETY = 1.01  # L = 1.01 x the converged Lanczos estimate (see operator_norm_sq)
_IntPair = Union[int, Tuple[int, int]]


def _pair(v: _IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_padding(
        in_size: List[int], code_size: List[int], kernel_size: List[int],
        stride: List[int], padding: List[int],
) -> List[int]:
    """Output padding that makes ``conv_transpose2d`` return exactly ``in_size``.

    ``conv_transpose2d`` gives ``(H' - 1) s - 2p + k`` rows; the rows of ``x`` that
    ``conv2d`` never reads (``(H + 2p - k) mod s`` of them) are added back as zeros.
    """
    out: List[int] = []
    for i in range(2):
        out.append(in_size[i] - ((code_size[i] - 1) * stride[i] - 2 * padding[i] + kernel_size[i]))
    return out


def analysis(u: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int]) -> torch.Tensor:
    """A(u) = conv2d(u, A): (B, C_in, H, W) -> (B, C_out, H', W')."""
    return F.conv2d(u, weight, None, stride, padding)


def synthesis(
        z: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int], in_size: List[int],
) -> torch.Tensor:
    """A*(z) = conv_transpose2d(z, A): (B, C_out, H', W') -> (B, C_in, H, W), adjoint of A."""
    op = output_padding(in_size, [z.shape[-2], z.shape[-1]], [weight.shape[-2], weight.shape[-1]], stride, padding)
    return F.conv_transpose2d(z, weight, None, stride, padding, op)


def normalize_atoms(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale every atom ``weight[c]`` (shape (C_in, k, k)) to unit l2 norm."""
    norms = weight.flatten(1).norm(p=2, dim=1).clamp_min(eps)
    return weight / norms.view(-1, 1, 1, 1)


def _scalar_like(v: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A float or 0-dim tensor as a tensor of x's dtype and device (autograd kept)."""
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=x.dtype)
    return torch.tensor(float(v), device=x.device, dtype=x.dtype)


def _step_dtype(x: torch.Tensor) -> torch.dtype:
    """Step sizes and L stay in float32 (float64 for float64 x), even for bf16/fp16 x."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _step_dtype_scalar(v: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    dtype = _step_dtype(x)
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=dtype)
    return torch.tensor(float(v), device=x.device, dtype=dtype)


def _clamp_ste(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(v, lo, hi) in the forward, identity in the backward (straight-through)."""
    return v + (v.clamp(lo, hi) - v).detach()


def operator_norm_sq(
        weight: torch.Tensor, in_size: List[int], stride: List[int], padding: List[int],
        num_iters: int = 40, init: Optional[torch.Tensor] = None, min_iters: int = -1, tol: float = 1e-4,
        safety: float = LANCZOS_SAFETY,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``L``, an upper estimate of ``||A||^2`` (largest eigenvalue of A* A) at input size ``in_size``.

    Lanczos with full reorthogonalisation on ``M = A* A``: after ``k`` steps the largest
    eigenvalue ``theta`` of the tridiagonal ``T_k`` (the top Ritz value) approaches
    ``lambda_max`` from below, much faster than power iteration (whose Rayleigh quotient,
    after 30 cold steps, under-estimated ``lambda_max`` by about 9 % on a 64->64 3x3
    dictionary at 32x32).  The Ritz pair ``(theta, y)`` has residual
    ``rho = ||M y - theta y|| = |b_k s_k|`` (``b_k`` the last off-diagonal, ``s_k`` the last
    entry of ``T_k``'s top eigenvector), and some eigenvalue of ``M`` lies in
    ``[theta - rho, theta + rho]``.  Returned: ``L = safety * (theta + rho)`` and the unit
    Ritz vector ``y`` of shape (1, C_in, H, W) to warm-start the next call.

    Why both a converged estimate and a safety factor: a conv operator's spectrum is dense
    near its top, so before convergence ``theta + rho`` can still lie below ``lambda_max``
    (0.93 lambda_max after 10 steps on a 64->64 3x3 dictionary at 32x32).  From a cold
    start the default 40 steps converged in every case measured (``theta + rho`` within
    +0.7 % of the 400-step value, never below it); the 1 % safety factor covers what is
    left, so ``s = 1/L`` keeps the descent guarantee of the module docstring (tested against
    the exact eigenvalue of small operators built densely).

    ``num_iters`` steps from a cold start; ``min_iters >= 0`` is a warm refresh after a
    weight update, from ``init`` (the last Ritz vector): on the CPU, where reading a value
    is free, at least ``min_iters + 1`` steps and more (up to ``num_iters``) while ``theta``
    still moves by more than ``tol`` (relative), so a large edit of the weights is tracked
    too; on an accelerator exactly ``min_iters + 1`` steps (the small change of one
    optimizer step), with nothing read back to the host: the refresh after every step never
    synchronises the GPU.  The top eigenpair of ``T_k`` comes from repeated squaring of
    ``T_k`` on its device (no ``eigh``, which checks its status on the host).  No gradient flows; float32 (float64 for a float64 weight); call it
    outside autocast.  The default start vector is a fixed deterministic pattern, so
    results do not depend on the global RNG.
    """
    with torch.no_grad():
        dtype = _step_dtype(weight)
        w = weight.detach().to(dtype)
        shape = [1, w.shape[1], in_size[0], in_size[1]]
        numel = w.shape[1] * in_size[0] * in_size[1]
        if init is None or init.numel() != numel:
            q = torch.sin(torch.arange(numel, dtype=dtype, device=w.device) * 12.9898 + 0.5)
        else:
            q = init.detach().to(device=w.device, dtype=dtype).flatten()
        q = q / q.norm().clamp_min(1e-30)
        host = w.device.type == 'cpu'
        steps = max(num_iters, 1) if (min_iters < 0 or host) else max(min(num_iters, min_iters + 1), 1)
        theta_prev = 0.0
        basis = torch.zeros(steps, numel, dtype=dtype, device=w.device)  # Lanczos vectors, one per row
        alphas = torch.zeros(steps, dtype=dtype, device=w.device)
        offdiag = torch.zeros(steps, dtype=dtype, device=w.device)
        k = 0
        for i in range(steps):
            k = i + 1
            basis[i] = q
            v = synthesis(analysis(q.view(shape), w, stride, padding), w, stride, padding, in_size).flatten()
            alphas[i] = torch.dot(q, v)
            Q = basis[:k]
            for _ in range(2):  # twice is enough (Kahan): keeps the basis orthogonal in float32
                v = v - Q.t().mv(Q.mv(v))
            b = v.norm()
            offdiag[i] = b
            if host and float(b) <= 1e-7 * float(alphas[:k].abs().max()) + 1e-30:
                break  # invariant subspace: the Ritz values are exact eigenvalues
            if host and 0 <= min_iters <= i:  # warm refresh on the CPU: stop once theta settles
                theta_now = float(_ritz_value(alphas[:k], offdiag[:k - 1]))
                if abs(theta_now - theta_prev) <= tol * abs(theta_now):
                    break
                theta_prev = theta_now
            q = v / b.clamp_min(1e-30)
        T = _tridiagonal(alphas[:k], offdiag[:k - 1])
        s_top = _top_eigenvector(T)
        theta = torch.dot(s_top, T.mv(s_top))
        rho = (offdiag[k - 1] * s_top[-1]).abs()
        y = basis[:k].t().mv(s_top)
        y = y / y.norm().clamp_min(1e-30)
        return ((theta + rho) * safety).clamp_min(1e-12), y.view(shape)


def _tridiagonal(diagonal: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    T = torch.diag(diagonal)
    if off.numel() > 0:
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _ritz_value(diagonal: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    T = _tridiagonal(diagonal, off)
    s = _top_eigenvector(T)
    return torch.dot(s, T.mv(s))


def _top_eigenvector(T: torch.Tensor, squarings: int = 12) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of a small PSD matrix, by ``T^(2^squarings) e_1``.

    ``T = Q^T M Q`` is positive semi-definite, and ``e_1`` (the Lanczos start) has a non-zero
    component on every eigenvector of an unreduced tridiagonal ``T``.  After 12 squarings the
    components of eigenvalues ``lambda < lambda_1`` are damped by ``(lambda / lambda_1)^4096``:
    the Rayleigh quotient then lies within about 1e-4 lambda_1 of the top eigenvalue whatever
    the gap (a near-degenerate top only mixes eigenvalues that close).  Runs on T's device
    with no host synchronisation (``eigh`` would check its status on the host).
    """
    P = T
    for _ in range(squarings):
        P = P @ P
        P = P / P.abs().amax().clamp_min(1e-30)
    s = P[:, 0]
    return s / s.norm().clamp_min(1e-30)


def rista_step_sizes(
        a_max: torch.Tensor, lipschitz: torch.Tensor, step_rule: str, step_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Step size per sample, shape (B, 1, 1, 1) or scalar (see module docstring)."""
    if step_rule == 'fixed':
        return 1.0 / lipschitz
    if step_rule == 'safe':
        return 1.0 / (lipschitz * a_max)
    if step_rule == 'learnable' and step_scale is not None:
        return step_scale / lipschitz
    raise ValueError("unknown step_rule '" + step_rule + "'; choose one of 'fixed', 'safe', 'learnable'")


def _shrink(u: torch.Tensor, threshold: torch.Tensor, nonneg: bool) -> torch.Tensor:
    if nonneg:
        return F.relu(u - threshold)
    return torch.sign(u) * F.relu(u.abs() - threshold)


def residual_scale(r: torch.Tensor) -> torch.Tensor:
    """``c``: each sample's mean ``|r|``, shape (B, 1, 1, 1) (floored at 1e-12 for r = 0)."""
    return r.abs().mean(dim=[1, 2, 3], keepdim=True).clamp_min(1e-12)


def reweight_coefficient(
        r: torch.Tensor, beta: torch.Tensor, eps: float, reweight: str, c: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """RISTA's elementwise weights ``a = beta + (1 - beta) w(r)`` (see the module docstring).

    ``'floor'``: ``w = 1 / (2 max(|r|, eps))``; ``'additive'``: ``w = 1 / (2 (|r| + eps))``;
    ``'scale_free'``: ``w = c / (|r| + eps c)`` with ``c`` (B, 1, 1, 1) the residual scale.
    """
    if reweight == 'floor':
        w = 0.5 / r.abs().clamp_min(eps)
    elif reweight == 'additive':
        w = 0.5 / (r.abs() + eps)
    elif reweight == 'scale_free':
        assert c is not None, "reweight='scale_free' needs the residual scale c"
        w = c / (r.abs() + eps * c)
    else:
        raise ValueError("unknown reweight '" + reweight + "'; choose one of 'floor', 'additive', 'scale_free'")
    return beta + (1.0 - beta) * w


def rista(
        x: torch.Tensor,
        weight: torch.Tensor,
        beta: torch.Tensor,
        lam: torch.Tensor,
        lipschitz: torch.Tensor,
        stride: List[int],
        padding: List[int],
        num_steps: int,
        eps: float,
        nonneg: bool,
        step_rule: str,
        step_scale: Optional[torch.Tensor] = None,
        z_init: Optional[torch.Tensor] = None,
        init: str = 'zero',
        reweight: str = 'floor',
        scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``num_steps`` unrolled RISTA steps (the reference path: autograd through every op).

    Starts from ``z_init`` (None: z_0 = 0, saving one synthesis).  ``init='ista'`` makes
    the first of the ``num_steps`` steps a plain ISTA step (``a = 1``, the beta = 1 step)
    when no ``z_init`` is given.  ``scale`` is ``c`` for ``reweight='scale_free'`` (None:
    the mean ``|r|`` of the first reweighted step's residual, kept for the later steps;
    gradients flow through it).  Shapes: x (B, C_in, H, W), weight (C_out, C_in, k, k),
    beta/lam/lipschitz 0-dim tensors; returns z_K of shape (B, C_out, H', W').  Typed for
    TorchScript; use :func:`edl_conv2d` from Python.
    """
    in_size = [x.shape[-2], x.shape[-1]]
    beta = beta.to(x.dtype)
    lam = lam.to(x.dtype)
    lipschitz = lipschitz.to(_step_dtype(x))  # step sizes cast to x's dtype per step
    ones = torch.ones((), device=x.device, dtype=lipschitz.dtype)
    z = z_init
    c = scale
    for t in range(num_steps):
        if z is None:
            r = x
        else:
            r = x - synthesis(z, weight, stride, padding, in_size)
        if t == 0 and z_init is None and init == 'ista':
            step = rista_step_sizes(ones, lipschitz, step_rule, step_scale).to(x.dtype)
            u = analysis(r, weight, stride, padding) * step
        else:
            if reweight == 'scale_free' and c is None:
                c = residual_scale(r)
            a = reweight_coefficient(r, beta, eps, reweight, c)
            if step_rule == 'safe':
                a_max = a.flatten(1).amax(dim=1).view(-1, 1, 1, 1).to(lipschitz.dtype)
            else:
                a_max = ones
            step = rista_step_sizes(a_max, lipschitz, step_rule, step_scale).to(x.dtype)
            u = analysis(a * r, weight, stride, padding) * step
        if z is not None:
            u = z + u
        z = _shrink(u, lam * step, nonneg)
    assert z is not None, "num_steps must be >= 1"
    return z


class _RistaStep(torch.autograd.Function):
    """One fixed-step RISTA step, computed in place, with a hand-written backward.

    The same math as :func:`rista`, written so that it needs a handful of elementwise
    passes instead of a dozen and saves only ``r`` (and ``c``) for the backward.  With
    ``p(r)`` the l1 part's reweighted residual (``w(r) r``; ``mode='plain'``: the plain ISTA
    step of ``init='ista'``, ``a = 1``)::

        r = x - A*(z);  q = beta r + (1 - beta) p(r)   (= a * r)
        u = z + s A(q);  z' = u - clip(u, +-lam s)      (nonneg: relu(u - lam s))

        p(r) = clip(r, +-eps) / (2 eps)     'floor'    (r / (2 max(|r|, eps)) without the reciprocal)
               r / (2 (|r| + eps))          'additive'
               c r / (|r| + eps c)          'scale_free', c = mean |r| per sample

    Backward, with g = dLoss/dz' and m = 1{z' != 0} (the support, read off z')::

        du = g m;  dq = s A*(du);  dr = dq (beta + (1 - beta) p'(r)) [+ dc sign(r) / n]
        dx = dr;  dz = du - A(dr);  dbeta = <dq, r - p(r)>;  dlam = -s <g, sign(z')>
        dA = s dW_conv(q, du) - dW_conv(dr, z)
        p'(r) = 1{|r| < eps} / (2 eps) | eps / (2 (|r| + eps)^2) | eps c^2 / (|r| + eps c)^2
        dc = <dq, (1 - beta) r |r| / (|r| + eps c)^2> per sample (+ the gradient of c as an output)

    ``scale_free`` with ``c=None`` computes ``c`` from this step's ``r`` (``n`` entries
    per sample) and returns it as a second output for the later steps, which take it as
    an input and return its gradient; other modes return an empty, non-differentiable
    second output.  ``z is None`` is the first step from z_0 = 0 (``r = x``).  The step
    ``s`` is a constant (the 'fixed' rule); double backward is not supported (use the
    reference path, ``fused=False``, for that).
    """

    @staticmethod
    def forward(ctx, x, z, weight, beta, lam, step, c, stride, padding, eps, nonneg, mode):
        ctx.set_materialize_grads(False)
        in_size = [x.shape[-2], x.shape[-1]]
        if z is None:
            r = x
        else:
            r = synthesis(z, weight, stride, padding, in_size)
            r = torch.sub(x, r, out=r)
        # at beta = 1 (read for free on the CPU) c is needed only for dLoss/dbeta
        c_local = c is None and mode == 'scale_free' and (_host_value(beta) != 1.0 or ctx.needs_input_grad[3])
        if c_local:
            c = residual_scale(r)
        scale, q = _reweighted_residual(r, beta, eps, mode, c)
        u = F.conv2d(q, weight * (step * scale), None, stride, padding)
        del q
        if z is not None:
            u.add_(z)
        threshold = lam * step
        if nonneg:
            z_next = u.sub_(threshold).relu_()
        elif u.device.type == 'cpu':  # one pass: u - clip(u, +-c)
            z_next = F.softshrink(u, float(threshold))
        else:
            z_next = u.sub_(u.clamp(-threshold, threshold))
        ctx.save_for_backward(r, z, weight, beta, step, z_next, c)
        ctx.conf = (stride, padding, eps, mode, c_local)
        if c_local:
            return z_next, c
        c_out = x.new_empty(0)
        ctx.mark_non_differentiable(c_out)
        return z_next, c_out

    @staticmethod
    def backward(ctx, grad, grad_c):
        r, z, weight, beta, step, z_next, c = ctx.saved_tensors
        stride, padding, eps, mode, c_local = ctx.conf
        need_x, need_z, need_w, need_beta, need_lam, _, need_c = ctx.needs_input_grad[:7]
        if grad is None:
            grad = torch.zeros_like(z_next)
        dilation, no_padding = [1, 1], [0, 0]
        du = torch.where(z_next != 0, grad, 0.0)
        b = _host_value(beta) if mode != 'plain' else 1.0
        need_dc = mode == 'scale_free' and b != 1.0 and (need_c or c_local)
        scale, q = _reweighted_residual(r, beta, eps, mode, c) if need_w else (1.0, r)
        # backward of u = conv2d(q, s A): dq (it does not depend on q) and, if wanted, dA
        dq, dw, _ = torch.ops.aten.convolution_backward(
            du, q, weight * step, None, stride, padding, dilation, False, no_padding, 1,
            [True, need_w, False])
        del q
        if dw is not None:
            dw = dw.mul_(step * scale)
        dx = dz = dbeta = dlam = dc = None
        if need_beta and mode != 'plain':  # d(a r)/dbeta = r - p(r)
            t = torch.sub(r, _l1_part(r, eps, mode, c))
            dbeta = torch.dot(dq.reshape(-1), t.reshape(-1)).reshape(beta.shape)
            del t
        slope = None
        if mode == 'scale_free' and b != 1.0:  # one pass over |r| for p'(r) and dc
            absr = r.abs()
            inv2 = torch.addcdiv(torch.full_like(c, eps), absr, c).reciprocal_().square_()  # (|r|/c + eps)^-2
            if need_dc:  # dLoss/dc = (1-beta) <dq, r |r| / (|r| + eps c)^2> = (1-beta) / c^2 <dq, r |r| inv2>
                t = absr.mul_(r).mul_(inv2).mul_(dq)
                dc = t.sum(dim=[1, 2, 3], keepdim=True).div_(c * c).mul_(1.0 - beta)
                del t
            del absr
            slope = inv2.mul_((1.0 - beta) * eps).add_(beta)
        if need_x or need_z or need_w or c_local:
            if b == 1.0:  # vanilla DL / the plain step: a = 1, dr = dq
                dr = dq
            else:
                dr = dq.mul_(slope if slope is not None else _l1_slope(r, beta, eps, mode))
            if c_local and dc is not None:  # c = mean |r| is a function of r too
                if grad_c is not None:
                    dc = dc + grad_c
                dr = dr.addcmul_(torch.sign(r), dc / (r[0].numel()))
                dc = None
            dx = dr if need_x else None
            if z is not None and (need_z or need_w):
                # backward of r = x - conv_transpose2d(z, A): dz and dA in one call
                op = output_padding([r.shape[-2], r.shape[-1]], [z.shape[-2], z.shape[-1]],
                                    [weight.shape[-2], weight.shape[-1]], stride, padding)
                gz, gw, _ = torch.ops.aten.convolution_backward(
                    dr, z, weight, None, stride, padding, dilation, True, op, 1, [need_z, need_w, False])
                if need_z:
                    dz = du.sub_(gz)
                if need_w:
                    dw = dw.sub_(gw)
        if need_lam:
            dlam = -(grad * torch.sign(z_next)).sum().mul(step).reshape(())
        return dx, dz, dw, dbeta, dlam, None, dc if need_c else None, None, None, None, None, None


def _host_value(t: torch.Tensor) -> Optional[float]:
    """The value of a 0-dim CPU tensor (free to read); None on an accelerator (a sync)."""
    return float(t) if t.device.type == 'cpu' else None


def _l1_part(r: torch.Tensor, eps: float, mode: str, c: Optional[torch.Tensor]) -> torch.Tensor:
    """``p(r) = w(r) r``, the l1 data term's reweighted residual (a new tensor)."""
    if mode == 'floor':
        return r.clamp(-eps, eps).mul_(0.5 / eps)
    if mode == 'additive':
        return torch.div(r, r.abs().add_(eps).mul_(2.0))
    assert c is not None
    return torch.div(r, torch.addcdiv(torch.full_like(c, eps), r.abs(), c))  # r / (|r| / c + eps)


def _l1_slope(r: torch.Tensor, beta: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    """``beta + (1 - beta) p'(r)`` for 'floor' and 'additive' (a new tensor; the backward
    computes 'scale_free''s slope together with dLoss/dc)."""
    if mode == 'floor':
        return torch.where(r.abs() < eps, beta + (1.0 - beta) * (0.5 / eps), beta)
    d = r.abs().add_(eps)
    return d.mul_(d).reciprocal_().mul_((1.0 - beta) * 0.5 * eps).add_(beta)


def _reweighted_residual(r: torch.Tensor, beta: torch.Tensor, eps: float, mode: str,
                         c: Optional[torch.Tensor]) -> Tuple[float, torch.Tensor]:
    """``(k, q)`` with ``k q = a * r = beta r + (1 - beta) p(r)`` (``mode='plain'``: ``r``).

    The scalar ``k`` is folded into the (small) dictionary of the next convolution, so on
    the CPU, where beta's value can be read for free, ``q`` takes one to three elementwise
    passes, and none at all for beta = 1 or the plain step (``q`` is then ``r`` itself:
    read it, never write it).
    """
    if mode == 'plain':
        return 1.0, r
    if mode == 'floor':
        return _scaled_floor_residual(r, beta, eps)
    b = _host_value(beta)
    if b == 1.0:
        return 1.0, r
    t = _l1_part(r, eps, mode, c)
    if b is None:
        return 1.0, t.lerp_(r, beta)
    if b == 0.0:
        return 1.0, t
    return 1.0 - b, torch.add(t, r, alpha=b / (1.0 - b), out=t)


def _scaled_floor_residual(r: torch.Tensor, beta: torch.Tensor, eps: float) -> Tuple[float, torch.Tensor]:
    """:func:`_reweighted_residual` for ``'floor'``: ``k q = beta r + (1 - beta) clip(r, +-eps) / (2 eps)``.

    The larger of the two coefficients is factored out, so the remaining one is at most 1.
    """
    c = 0.5 / eps
    b = _host_value(beta)
    if b is None:
        return 1.0, r.clamp(-eps, eps).mul_(c).lerp_(r, beta)
    if b == 1.0:
        return 1.0, r
    t = r.clamp(-eps, eps)
    k = (1.0 - b) * c
    if b == 0.0:
        return k, t
    if b >= k:
        return b, torch.add(r, t, alpha=k / b, out=t)
    return k, torch.add(t, r, alpha=b / k, out=t)


_COMPILED_SOLVERS: Dict[Tuple, object] = {}


@torch.jit.unused
def compiled_rista(stride: List[int], padding: List[int], num_steps: int, eps: float, nonneg: bool,
                   step_rule: str, key: Tuple = (), init: str = 'zero', reweight: str = 'floor'):
    """``torch.compile`` of :func:`rista` for one solver configuration (cached).

    Returns ``solve(x, weight, beta, lam, lipschitz, step_scale)``.  Each configuration
    (``key`` adds e.g. channel counts) gets its own code object, so the compiler's
    recompile limit, which is counted per code object, is spent per layer geometry and
    not shared by every EDL layer of a network.  The batch size is left to the
    compiler's automatic dynamic shapes (attacks shrink the batch as points fall).
    """
    full_key = (tuple(stride), tuple(padding), num_steps, eps, nonneg, step_rule, init, reweight) + tuple(key)
    solver = _COMPILED_SOLVERS.get(full_key)
    if solver is None:
        def solve(x, weight, beta, lam, lipschitz, step_scale):
            return rista(x, weight, beta, lam, lipschitz, stride, padding, num_steps, eps, nonneg,
                         step_rule, step_scale, None, init, reweight)
        solve.__code__ = solve.__code__.replace(co_name=f'rista_{len(_COMPILED_SOLVERS)}')
        solver = torch.compile(solve)
        _COMPILED_SOLVERS[full_key] = solver
    return solver


@torch.jit.unused
def rista_fused(
        x: torch.Tensor,
        weight: torch.Tensor,
        beta: torch.Tensor,
        lam: torch.Tensor,
        lipschitz: torch.Tensor,
        stride: List[int],
        padding: List[int],
        num_steps: int,
        eps: float,
        nonneg: bool,
        init: str = 'zero',
        reweight: str = 'floor',
) -> torch.Tensor:
    """:func:`rista` for the 'fixed' step rule without ``z_init``, through :class:`_RistaStep`."""
    step = (1.0 / lipschitz.to(_step_dtype(x))).to(x.dtype)
    beta = beta.to(x.dtype)
    lam = lam.to(x.dtype)
    z: Optional[torch.Tensor] = None
    c: Optional[torch.Tensor] = None
    for t in range(num_steps):
        mode = 'plain' if (t == 0 and init == 'ista') else reweight
        z, c_out = _RistaStep.apply(x, z, weight, beta, lam, step, c, stride, padding, eps, nonneg, mode)
        if c is None and c_out.numel() > 0:
            c = c_out
    assert z is not None
    return z


def default_eps(reweight: str) -> float:
    """The smoothing ``eps`` used when none is given: absolute for 'floor' (1e-3, the
    authors' related code) and 'additive' (1e-2, as in their RUNG code), relative to the
    residual scale ``c`` for 'scale_free' (0.1)."""
    if reweight not in REWEIGHTS:
        raise ValueError(f"unknown reweight {reweight!r}; choose one of {REWEIGHTS}")
    return {'floor': 1e-3, 'additive': 1e-2, 'scale_free': 0.1}[reweight]


def _check_solver_options(num_steps: int, step_rule: str, init: str, reweight: str) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"unknown step_rule {step_rule!r}; choose one of {STEP_RULES}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if reweight not in REWEIGHTS:
        raise ValueError(f"unknown reweight {reweight!r}; choose one of {REWEIGHTS}")


def edl_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        beta: Union[float, torch.Tensor],
        lam: Union[float, torch.Tensor],
        lipschitz: Union[float, torch.Tensor],
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        num_steps: int = 2,
        eps: Optional[float] = None,
        nonneg: bool = False,
        step_rule: str = 'fixed',
        step_scale: Optional[torch.Tensor] = None,
        z_init: Optional[torch.Tensor] = None,
        init: str = 'ista',
        reweight: str = 'scale_free',
        scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Functional EDL layer: ``num_steps`` unrolled RISTA steps (see the module docstring).

    Args:
        x: (B, C_in, H, W) input.
        weight: (C_out, C_in, k, k) dictionary, used as given (normalise beforehand if wanted).
        beta: weight of the l2 data term in [0, 1] (float or 0-dim tensor; gradients flow).
        lam: sparsity weight >= 0.
        lipschitz: ``L = ||A||^2`` at this input size (see :func:`operator_norm_sq`).
        eps: smoothing of the reweighting (None: :func:`default_eps` of ``reweight``).
        z_init: start code (default 0; given, it replaces the warm start of ``init='ista'``).
        init: 'ista' (the first step is a plain ISTA step) | 'zero'.
        reweight: 'scale_free' | 'additive' | 'floor' (see the module docstring).
        scale: ``c`` (B, 1, 1, 1) for 'scale_free' (default: the first reweighted residual's mean |r|).
    Returns:
        (B, C_out, H', W') code ``z_K``.
    """
    _check_solver_options(num_steps, step_rule, init, reweight)
    if step_rule == 'learnable' and step_scale is None:
        raise ValueError("step_rule='learnable' needs a step_scale tensor")
    return rista(
        x, weight, _scalar_like(beta, x), _scalar_like(lam, x), _step_dtype_scalar(lipschitz, x),
        list(_pair(stride)), list(_pair(padding)), num_steps, default_eps(reweight) if eps is None else eps,
        nonneg, step_rule, step_scale, z_init, init, reweight, scale)


def smoothed_abs(r: torch.Tensor, eps: Union[float, torch.Tensor], reweight: str) -> torch.Tensor:
    """The smoothed ``|r|`` whose majorize-minimize weights RISTA uses (elementwise).

    'floor': Huber ``h_eps(r) = r^2 / (2 eps) + eps / 2`` inside ``|r| < eps``, ``|r|``
    outside; 'additive' and 'scale_free': ``rho_eps(r) = |r| - eps log(1 + |r| / eps)``
    (``rho'(r) = r / (|r| + eps)``); ``eps = 0``: ``|r|``.
    """
    absr = r.abs()
    if isinstance(eps, float) and eps == 0.0:
        return absr
    if reweight == 'floor':
        return torch.where(absr < eps, r * r / (2 * eps) + eps / 2, absr)
    return absr - eps * torch.log1p(absr / eps)


def elastic_objective(
        x: torch.Tensor,
        z: torch.Tensor,
        weight: torch.Tensor,
        beta: Union[float, torch.Tensor],
        lam: Union[float, torch.Tensor],
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        eps: float = 0.0,
        reweight: str = 'floor',
        scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample elastic objective, shape (B,): the function RISTA decreases.

    'floor' / 'additive': ``beta/2 ||r||^2 + (1-beta)/2 sum S(r) + lam ||z||_1``;
    'scale_free': ``beta/2 ||r||^2 + (1-beta) c sum S(r) + lam ||z||_1`` with ``c`` =
    ``scale`` (per sample) and smoothing ``eps c``; ``S`` = :func:`smoothed_abs`
    (``eps = 0``: the unsmoothed F of the module docstring).
    """
    stride_ = list(_pair(stride))
    padding_ = list(_pair(padding))
    r = (x - synthesis(z, weight, stride_, padding_, [x.shape[-2], x.shape[-1]])).flatten(1)
    if reweight == 'scale_free':
        if scale is None:
            raise ValueError("reweight='scale_free' needs the residual scale c (scale=...)")
        c = scale.reshape(-1, 1).to(r.dtype)
        l1 = (1 - beta) * c[:, 0] * smoothed_abs(r, eps * c if eps > 0 else 0.0, reweight).sum(1)
    else:
        l1 = (1 - beta) / 2 * smoothed_abs(r, eps, reweight).sum(1)
    return beta / 2 * (r * r).sum(1) + l1 + lam * z.flatten(1).abs().sum(1)


@register_notrace_module  # unrolled solver with size-dependent caching: an FX leaf
class EDLConv2d(nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` whose output is an elastic sparse code.

    Args:
        in_chans, out_chans, kernel_size, stride, padding: as for ``nn.Conv2d``
            (``padding`` defaults to ``(k - 1) // 2``; groups and dilation are not supported).
        num_steps: K unrolled RISTA steps (>= 1).
        beta: initial beta in [0, 1].
        beta_learnable: make beta a trained parameter (elastic DL); else a fixed buffer.
        lam: sparsity weight; ``lam_learnable`` makes it a parameter (kept >= 0).
        step_rule: 'fixed' | 'safe' | 'learnable' (see module docstring).
        init: 'ista' (the first of the K steps is a plain ISTA step, the warm start) | 'zero'.
        reweight: 'scale_free' | 'additive' | 'floor' (the weights of the l1 data term).
        eps: smoothing of the reweighting (None: 0.1 relative for 'scale_free', 1e-2 for
            'additive', 1e-3 for 'floor'; see :func:`default_eps`).
        nonneg: non-negative soft-thresholding.
        normalize_atoms: unit-norm atoms on every forward.
        bias: add a learnable per-channel bias to the code (like a conv bias).
        power_iters: Lanczos steps for L when no estimate exists for this input size
            (cold start); after a weight update L is refreshed from the previous Ritz
            vector in at least ``power_iters_warm + 1`` steps, more while it still moves.
        fixed_lipschitz: use this constant for L instead of Lanczos (e.g. 1.0
            with num_steps=1, lam=0, beta=1, normalize_atoms=False makes the layer compute
            exactly ``conv2d(x, weight)``: the function-preserving conversion setting).
        fused: for the 'fixed' step rule, run the in-place steps with the hand-written
            backward of :class:`_RistaStep` (same math and gradients as the reference
            :func:`rista`, fewer memory passes, one saved tensor per step); False, other
            step rules, and TorchScript use the autograd reference.
        memory_efficient: in training, keep only the layer input and recompute the
            solver in the backward (activation checkpointing; identical gradients).
        compile_solver: run the solver through ``torch.compile`` (:func:`compiled_rista`;
            the same math as :func:`rista`, elementwise work fused by the compiler;
            the first call per geometry compiles).  Takes precedence over ``fused``;
            with ``memory_efficient`` the compiled solver is checkpointed.

    Shapes: input (B, C_in, H, W) -> output (B, C_out, H', W'), H', W' as for ``nn.Conv2d``.
    """
    # TorchScript needs these annotated
    track_stats: bool
    last_objective: Optional[torch.Tensor]
    last_sparsity: Optional[torch.Tensor]

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            kernel_size: _IntPair = 3,
            stride: _IntPair = 1,
            padding: Optional[_IntPair] = None,
            *,
            num_steps: int = 2,
            beta: float = 1.0,
            beta_learnable: bool = True,
            lam: float = 0.1,
            lam_learnable: bool = False,
            step_rule: str = 'fixed',
            init: str = 'ista',
            reweight: str = 'scale_free',
            eps: Optional[float] = None,
            nonneg: bool = False,
            normalize_atoms: bool = True,
            bias: bool = False,
            power_iters: int = 40,
            power_iters_warm: int = 2,
            fixed_lipschitz: Optional[float] = None,
            fused: bool = True,
            memory_efficient: bool = False,
            compile_solver: bool = False,
    ):
        super().__init__()
        if in_chans <= 0 or out_chans <= 0:
            raise ValueError(f"EDLConv2d needs positive channel counts, got in_chans={in_chans}, out_chans={out_chans}")
        _check_solver_options(num_steps, step_rule, init, reweight)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if init == 'ista' and num_steps < 2 and beta != 1.0:
            raise ValueError(f"init='ista' with num_steps=1 is a plain ISTA step whatever beta is (beta={beta}): "
                             f"use num_steps >= 2 (the warm start is the first of the K steps) or init='zero'")
        eps = default_eps(reweight) if eps is None else float(eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it smooths |r| in the reweighting 1/|r|), got {eps}")
        k = _pair(kernel_size)
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.kernel_size = k
        self.stride = list(_pair(stride))
        self.padding = list(_pair(padding if padding is not None else ((k[0] - 1) // 2, (k[1] - 1) // 2)))
        self.num_steps = num_steps
        self.step_rule = step_rule
        self.init = init
        self.reweight = reweight
        self.eps = eps
        self.nonneg = nonneg
        self.normalize = normalize_atoms
        self.power_iters = power_iters
        self.power_iters_warm = power_iters_warm
        if fixed_lipschitz is not None and not fixed_lipschitz > 0:
            raise ValueError(f"fixed_lipschitz must be > 0, got {fixed_lipschitz}")
        self.fixed_lipschitz = float(fixed_lipschitz) if fixed_lipschitz is not None else 0.0
        self.fused = fused
        self.memory_efficient = memory_efficient
        self.compile_solver = compile_solver

        self.weight = nn.Parameter(torch.empty(out_chans, in_chans, k[0], k[1]))
        self.bias = nn.Parameter(torch.zeros(out_chans)) if bias else None
        beta_t = torch.tensor(float(beta))
        if beta_learnable:
            self.beta = nn.Parameter(beta_t)
        else:
            self.register_buffer('beta', beta_t)
        lam_t = torch.tensor(float(lam))
        if lam_learnable:
            self.lam = nn.Parameter(lam_t)
        else:
            self.register_buffer('lam', lam_t)
        self.step_scale = nn.Parameter(torch.ones(())) if step_rule == 'learnable' else None
        # L and the input size it was computed at are saved with the weights, so a loaded
        # model reproduces the step sizes it was trained with; the power-iteration vector
        # (as large as one input) is only a warm start and is not saved.
        self.register_buffer('lipschitz', torch.zeros(()))
        self.register_buffer('lipschitz_size', torch.tensor([-1, -1], dtype=torch.long))
        self.register_buffer('power_vector', torch.zeros(0), persistent=False)
        self._cache_key: List[int] = [-1, -1, -1, -1]  # H, W, weight version, weight address
        self.track_stats = False
        self.last_objective = None
        self.last_sparsity = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_step_cache()

    def reset_step_cache(self) -> None:
        """Forget the cached ``L`` (eager mode notices weight updates by itself; a scripted
        layer in eval mode does not, so call this after editing its weights)."""
        self._cache_key = [-1, -1, -1, -1]
        self.power_vector = torch.zeros(0, device=self.weight.device)

    def extra_repr(self) -> str:
        return (f"{self.in_chans}, {self.out_chans}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_steps={self.num_steps}, beta={self.beta.item():.3g}, "
                f"beta_learnable={isinstance(self.beta, nn.Parameter)}, lam={self.lam.item():.3g}, "
                f"step_rule={self.step_rule}, init={self.init}, reweight={self.reweight}, eps={self.eps}, "
                f"nonneg={self.nonneg}, "
                f"normalize_atoms={self.normalize}, bias={self.bias is not None}")

    def _resync_step_cache(self) -> None:
        # a copy or a device/dtype move holds the same dictionary as the original: keep
        # its L (re-estimating it would make the copy a slightly different function)
        if self._cache_key[0] > 0 and self.weight is not None:
            self._cache_key = self._cache_key[:2] + self._weight_identity()

    def __setstate__(self, state):  # deepcopy / pickle
        super().__setstate__(state)
        self._resync_step_cache()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(), ...
        out = super()._apply(fn, *args, **kwargs)
        self._resync_step_cache()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.reset_step_cache()
        size = [int(v) for v in self.lipschitz_size.tolist()]
        if size[0] > 0 and float(self.lipschitz) > 0:
            self._cache_key = [size[0], size[1]] + self._weight_identity()

    def dictionary(self) -> torch.Tensor:
        """The dictionary A used in the forward (atoms normalised if ``normalize_atoms``)."""
        return normalize_atoms(self.weight) if self.normalize else self.weight

    def beta_value(self) -> torch.Tensor:
        """beta clamped to [0, 1] (straight-through gradient)."""
        return _clamp_ste(self.beta, 0.0, 1.0)

    def lam_value(self) -> torch.Tensor:
        return _clamp_ste(self.lam, 0.0, float('inf'))

    @torch.jit.unused
    def _autocast_inputs(self, x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Under autocast run the whole solver in the autocast dtype, not just its convs."""
        if x.device.type != 'meta' and torch.is_autocast_enabled(x.device.type):  # meta: no autocast
            dtype = torch.get_autocast_dtype(x.device.type)
            return x.to(dtype), weight.to(dtype)
        return x, weight

    @torch.jit.unused
    def _compiled_solve(self, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                        lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        solve = compiled_rista(self.stride, self.padding, self.num_steps, self.eps, self.nonneg, self.step_rule,
                               key=(self.in_chans, self.out_chans, tuple(self.kernel_size)),
                               init=self.init, reweight=self.reweight)
        return solve(x, weight, beta, lam, L, self.step_scale)

    @torch.jit.unused
    def _checkpointed_rista(self, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                            lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        if self.compile_solver:
            return torch.utils.checkpoint.checkpoint(self._compiled_solve, x, weight, beta, lam, L,
                                                     use_reentrant=False)
        return torch.utils.checkpoint.checkpoint(
            rista_fused, x, weight, beta, lam, L, self.stride, self.padding, self.num_steps, self.eps,
            self.nonneg, self.init, self.reweight, use_reentrant=False)

    @torch.jit.unused
    def _record_stats(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                      beta: torch.Tensor, lam: torch.Tensor, L: torch.Tensor) -> None:
        with torch.no_grad():
            x, z, weight = x.float(), z.float(), weight.float()
            scale = self.residual_scale(x, weight, lam.float(), L) if self.reweight == 'scale_free' else None
            obj = elastic_objective(x, z, weight, beta.float(), lam.float(), self.stride, self.padding,
                                    reweight=self.reweight, scale=scale)
            self.last_objective = obj.mean()
            self.last_sparsity = (z == 0).float().mean()

    @torch.jit.unused
    def residual_scale(self, x: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor,
                       L: torch.Tensor) -> torch.Tensor:
        """``c`` of 'scale_free' for input ``x``: the mean ``|r|`` of the first reweighted step's
        residual (``x`` itself for ``init='zero'``, ``x - A*(z_1)`` after the warm start)."""
        r = x
        if self.init == 'ista' and self.num_steps > 1:
            ones = torch.ones((), device=x.device, dtype=x.dtype)
            z1 = rista(x, weight, ones, lam.to(x.dtype), L, self.stride, self.padding, 1, self.eps, self.nonneg,
                       self.step_rule, self.step_scale, None, 'zero', 'floor')
            r = x - synthesis(z1, weight, self.stride, self.padding, [x.shape[-2], x.shape[-1]])
        return residual_scale(r)

    @torch.jit.unused
    def _power_iteration(
            self, weight: torch.Tensor, in_size: List[int], num_iters: int, init: Optional[torch.Tensor],
            min_iters: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if weight.device.type == 'meta':  # no autocast on meta (shape-only runs)
            return operator_norm_sq(weight, in_size, self.stride, self.padding, num_iters, init, min_iters)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return operator_norm_sq(weight, in_size, self.stride, self.padding, num_iters, init, min_iters)

    @torch.jit.unused
    def _weight_identity(self) -> List[int]:
        """(in-place version counter, storage address) of the weight: changes on every update."""
        return [int(self.weight._version), int(self.weight.data_ptr())]

    def _lipschitz(self, weight: torch.Tensor, in_size: List[int]) -> torch.Tensor:
        """L = ||A||^2 at ``in_size``, recomputed only when the weight or the size changed.

        A weight update (optimizer step, load_state_dict) triggers a warm-started refresh
        of a few Lanczos steps; a new input size a cold start.  So L is constant across
        the many forwards of an attack and across a checkpointed recompute.
        """
        if self.fixed_lipschitz > 0:
            return torch.full((), self.fixed_lipschitz, device=weight.device)
        identity = [-1, -1]  # TorchScript has no version counter
        if not torch.jit.is_scripting():
            identity = self._weight_identity()
        key = [in_size[0], in_size[1], identity[0], identity[1]]
        same_size = key[0] == self._cache_key[0] and key[1] == self._cache_key[1]
        if identity[0] >= 0 and key == self._cache_key:
            return self.lipschitz
        if identity[0] < 0 and same_size and not self.training and float(self.lipschitz) > 0:
            return self.lipschitz  # scripted eval: the weights are taken as fixed
        warm = same_size and self.power_vector.numel() > 0
        # warm: at least power_iters_warm iterations, more only while the estimate still moves
        min_iters = self.power_iters_warm if warm else -1
        init = self.power_vector if warm else None
        if torch.jit.is_scripting():
            L, u = operator_norm_sq(weight, in_size, self.stride, self.padding, self.power_iters, init, min_iters)
        else:
            L, u = self._power_iteration(weight, in_size, self.power_iters, init, min_iters)
        self.lipschitz = L.to(torch.float32)
        self.lipschitz_size = torch.tensor(in_size, dtype=torch.long, device=L.device)
        self.power_vector = u.to(torch.float32)
        self._cache_key = key
        return self.lipschitz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"EDLConv2d expected input of shape (B, {self.in_chans}, H, W), got {list(x.shape)}")
        k = self.kernel_size
        if x.shape[-2] + 2 * self.padding[0] < k[0] or x.shape[-1] + 2 * self.padding[1] < k[1]:
            raise ValueError(
                f"EDLConv2d input {x.shape[-2]}x{x.shape[-1]} is smaller than the kernel {k[0]}x{k[1]} "
                f"with padding {self.padding}: use a larger image")
        weight = self.dictionary()
        if not torch.jit.is_scripting():
            x, weight = self._autocast_inputs(x, weight)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        in_size = [x.shape[-2], x.shape[-1]]
        L = self._lipschitz(weight, in_size)
        beta = self.beta_value()
        lam = self.lam_value()
        if torch.jit.is_scripting():
            z = rista(
                x, weight, beta, lam, L, self.stride, self.padding, self.num_steps,
                self.eps, self.nonneg, self.step_rule, self.step_scale, None, self.init, self.reweight)
        elif self.memory_efficient and torch.is_grad_enabled() and (
                self.compile_solver or (self.fused and self.step_rule == 'fixed')):
            z = self._checkpointed_rista(x, weight, beta, lam, L)
        elif self.compile_solver:
            z = self._compiled_solve(x, weight, beta, lam, L)
        elif not (self.fused and self.step_rule == 'fixed'):
            z = rista(
                x, weight, beta, lam, L, self.stride, self.padding, self.num_steps,
                self.eps, self.nonneg, self.step_rule, self.step_scale, None, self.init, self.reweight)
        else:
            z = rista_fused(x, weight, beta, lam, L, self.stride, self.padding, self.num_steps, self.eps, self.nonneg,
                            self.init, self.reweight)
        if self.track_stats and not torch.jit.is_scripting():
            self._record_stats(x, z, weight, beta, lam, L)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1).to(z.dtype)
        return z


def with_legacy_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """EDLConv2d options as recorded by an export: fill in what older layers computed.

    Exports record every option of their layers.  A record that spells out the solver
    (``num_steps``, ``step_rule``, ``eps``, ``nonneg``, ``normalize_atoms``) but neither
    ``init`` nor ``reweight`` was written before those options existed: its layers started
    from z_0 = 0 with the floored weights, so it gets :data:`LEGACY_OPTIONS` and keeps
    computing what it computed.  Anything else is returned unchanged (a copy).
    """
    out = dict(options)
    spelled_out = {'num_steps', 'step_rule', 'eps', 'nonneg', 'normalize_atoms'} <= set(out)
    if spelled_out and not any(k in out for k in LEGACY_OPTIONS):
        out.update(LEGACY_OPTIONS)
    return out


def edl_layers(model: nn.Module) -> List[Tuple[str, EDLConv2d]]:
    """All EDL layers of ``model`` as (qualified name, module), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EDLConv2d)]


def set_beta_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every EDL layer of ``model`` between the paper's regimes.

    * ``'vanilla'``: beta = 1, frozen (vanilla DL / Lasso; stage 1 of the two-stage schedule)
    * ``'robust'``: beta = 0, frozen (robust l1 DL)
    * ``'elastic'``: beta trainable from its current value (stage 2)
    * ``'frozen'``: beta kept at its current value, not trained

    beta stays a ``nn.Parameter`` throughout (only ``requires_grad`` changes), so
    optimizers built before the switch keep working and state dicts keep their keys.
    Layers built with ``beta_learnable=False`` hold beta as a buffer: 'elastic' on them
    raises. Returns ``model``.
    """
    modes = ('vanilla', 'robust', 'elastic', 'frozen')
    if mode not in modes:
        raise ValueError(f"unknown beta mode {mode!r}; choose one of {modes}")
    layers = edl_layers(model)
    if not layers:
        raise ValueError("model has no EDLConv2d layers: nothing to switch")
    for name, layer in layers:
        with torch.no_grad():
            if mode == 'vanilla':
                layer.beta.fill_(1.0)
            elif mode == 'robust':
                layer.beta.fill_(0.0)
            else:
                layer.beta.clamp_(0.0, 1.0)
        if isinstance(layer.beta, nn.Parameter):
            layer.beta.requires_grad_(mode == 'elastic')
        elif mode == 'elastic':
            raise ValueError(f"layer {name!r} was built with beta_learnable=False; cannot make beta trainable")
    return model


@torch.no_grad()
def edl_layer_stats(model: nn.Module, x: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
    """Diagnostics per EDL layer: beta, and (if ``x`` is given) the mean final objective
    F(z_K) over the batch and the code sparsity (fraction of exact zeros) on input ``x``.

    Runs one forward pass on ``x`` in the model's current mode (no gradients).
    """
    layers = edl_layers(model)
    stats: Dict[str, Dict[str, float]] = {n: {'beta': float(m.beta.clamp(0, 1))} for n, m in layers}
    if x is not None:
        for _, m in layers:
            m.track_stats = True
        try:
            model(x)
        finally:
            for _, m in layers:
                m.track_stats = False
        for n, m in layers:
            if m.last_objective is not None and m.last_sparsity is not None:
                stats[n]['objective'] = float(m.last_objective)
                stats[n]['sparsity'] = float(m.last_sparsity)
            m.last_objective = None
            m.last_sparsity = None
    return stats
