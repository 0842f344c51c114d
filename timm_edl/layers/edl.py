"""Elastic Dictionary Learning (EDL) layer: a convolution replaced by sparse coding.

Notation (shapes for one layer, batch ``B``)::

    x   : (B, C_in,  H,  W )    layer input
    A   : (C_out, C_in, k, k)   convolutional dictionary (shaped like a conv weight)
    z   : (B, C_out, H', W')    sparse code = layer output (H', W' as for conv2d)

    analysis   A(u)  = conv2d(u, A, stride, padding)                 input -> code space
    synthesis  A*(z) = conv_transpose2d(z, A, stride, padding, op)   code -> input space

``op`` (output padding) is chosen so that ``A*(z)`` has exactly the spatial size of
``x``; with it ``A*`` is the adjoint of ``A`` for every stride, padding and odd size.

The layer output is the code found by ``K`` unrolled steps of RISTA (reweighted ISTA)
on the elastic objective, per sample::

    F(z) = beta/2 ||x - A*(z)||_2^2 + (1-beta)/2 ||x - A*(z)||_1 + lam ||z||_1

    z_0 = 0;  for t = 0..K-1:
        r_t = x - A*(z_t)
        a_t = beta + (1 - beta) / (2 max(|r_t|, eps))
        z_{t+1} = T_{lam s_t}( z_t + s_t A(a_t * r_t) )

``T_c`` is soft-thresholding (``nonneg=True``: ``max(u - c, 0)``).  ``beta = 1`` is the
Lasso solved by ISTA (vanilla dictionary learning), ``beta = 0`` is robust (l1) DL.

Why it is a descent method: for ``e > 0``, ``|r| <= r^2/(2e) + e/2``.  Minimising the
right-hand side over ``e >= eps`` gives the Huber function
``h_eps(r) = r^2/(2 eps) + eps/2`` for ``|r| < eps`` and ``|r|`` otherwise, attained at
``e = max(|r|, eps)``.  So each step is a proximal-gradient step on a quadratic
majorizer (tight at ``z_t``) of the *smoothed* objective ``F_eps`` (``|.|`` of the l1
data term replaced by ``h_eps``).  With ``s_t <= 1 / (L max(a_t))``, ``L = ||A||^2``
(the largest eigenvalue of ``A A*``), ``F_eps(z_t)`` is non-increasing and RISTA
converges to the minimizer of ``F_eps``; ``0 <= F_eps - F <= (1-beta) eps n / 4`` for
``n`` input entries, so ``eps -> 0`` recovers ``F``.

Design choices (keyword arguments; defaults in brackets):
  * ``step_rule`` ['fixed']: ``'fixed'`` ``s = 1/L`` (SDNet), ``'safe'``
    ``s_t = 1/(L max_i a_t)`` per sample (guaranteed descent for any beta),
    ``'learnable'`` ``s = c/L`` with a learned per-layer scale ``c`` (init 1).
  * ``L`` from power iteration on ``A* A`` at the input's spatial size, under
    ``no_grad`` (the step size is treated as a constant, as in SDNet).  It is cached and
    recomputed only when the dictionary changes (warm-started, a few iterations) or the
    input size changes (cold start), so all forwards of an attack share one L.
  * ``beta`` is one scalar per layer kept in [0, 1] by a clamp whose backward is the
    identity (straight-through), so a learnable beta that leaves the box can return.
  * ``eps`` [1e-3] floor of ``|r|``; ``nonneg`` [False]; ``normalize_atoms`` [True]:
    every atom ``A[c]`` is scaled to unit l2 norm on every forward (SDNet);
    ``lam`` [0.1] fixed, or learnable (kept >= 0 by the same straight-through clamp).
  * ``fused`` [True]: for the 'fixed' rule the steps run in place with a hand-written
    backward (:class:`_RistaStep`); :func:`rista` (autograd through every op) is the
    reference it is tested against.  ``memory_efficient`` [False] recomputes the layer
    in the backward instead of storing its intermediates.  ``compile_solver`` [False]
    runs :func:`rista` through ``torch.compile`` (one compiled solver per layer
    geometry): the compiler fuses every elementwise pass of a step into one loop and
    derives a matching backward, which the eager paths cannot do.  Optional; needs a
    working ``torch.compile`` (a C++ compiler on CPU, Triton on GPU).

Caveat (seen in training): a layer whose beta reaches 0 sees, in its first step from
z_0 = 0, only ``clip(x, -eps, eps) / (2 eps)``, i.e. ``sign(x)`` where ``|x| > eps``: it
is piecewise constant, its input gradient vanishes, and gradient attacks overstate its
robustness.  ``timm-edl eval``'s gradient checks flag such models.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from timm.layers import register_notrace_module

__all__ = [
    'EDLConv2d', 'edl_conv2d', 'rista', 'elastic_objective', 'analysis', 'synthesis',
    'output_padding', 'operator_norm_sq', 'normalize_atoms', 'rista_step_sizes',
    'set_beta_mode', 'edl_layers', 'edl_layer_stats', 'STEP_RULES',
]

STEP_RULES = ('fixed', 'safe', 'learnable')
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
        num_iters: int = 50, init: Optional[torch.Tensor] = None, min_iters: int = -1, tol: float = 1e-3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Power iteration for ``L = ||A||^2`` (largest eigenvalue of A* A) at input size ``in_size``.

    Returns ``(L, u)`` with ``u`` the (1, C_in, H, W) unit iterate, to warm-start the next
    call.  No gradient flows; runs in float32 (float64 for a float64 weight); call it
    outside autocast.  The start vector is a fixed deterministic pattern, so results do
    not depend on the global RNG.  The Rayleigh quotient approaches ``L`` from below.
    With ``min_iters >= 0`` it stops after ``min_iters`` iterations once the estimate
    changes by less than ``tol`` (relative) in one iteration (at most ``num_iters``).
    """
    with torch.no_grad():
        dtype = _step_dtype(weight)
        w = weight.detach().to(dtype)
        numel = w.shape[1] * in_size[0] * in_size[1]
        if init is None or init.numel() != numel:
            u = torch.sin(torch.arange(numel, dtype=dtype, device=w.device) * 12.9898 + 0.5)
        else:
            u = init.detach().to(device=w.device, dtype=dtype).flatten()
        u = u.view(1, w.shape[1], in_size[0], in_size[1])
        u = u / u.norm().clamp_min(1e-30)
        L = torch.zeros((), dtype=dtype, device=w.device)
        for i in range(max(num_iters, 1)):
            v = synthesis(analysis(u, w, stride, padding), w, stride, padding, in_size)
            L_prev = L
            L = (u * v).sum()  # Rayleigh quotient <u, A*A u>, ||u|| = 1
            u = v / v.norm().clamp_min(1e-30)
            if 0 <= min_iters <= i and float((L - L_prev).abs()) <= tol * float(L.abs()):
                break
        return L.clamp_min(1e-12), u


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
) -> torch.Tensor:
    """``num_steps`` unrolled RISTA steps from ``z_init`` (None: z_0 = 0, saving one synthesis).

    Shapes: x (B, C_in, H, W), weight (C_out, C_in, k, k), beta/lam/lipschitz 0-dim
    tensors; returns z_K of shape (B, C_out, H', W').  Typed for TorchScript; use
    :func:`edl_conv2d` from Python.
    """
    in_size = [x.shape[-2], x.shape[-1]]
    beta = beta.to(x.dtype)
    lam = lam.to(x.dtype)
    lipschitz = lipschitz.to(_step_dtype(x))  # step sizes cast to x's dtype per step
    z = z_init
    for _ in range(num_steps):
        if z is None:
            r = x
        else:
            r = x - synthesis(z, weight, stride, padding, in_size)
        a = beta + (1.0 - beta) / (2.0 * r.abs().clamp_min(eps))
        if step_rule == 'safe':
            a_max = a.flatten(1).amax(dim=1).view(-1, 1, 1, 1).to(lipschitz.dtype)
        else:
            a_max = torch.ones((), device=x.device, dtype=lipschitz.dtype)
        step = rista_step_sizes(a_max, lipschitz, step_rule, step_scale).to(x.dtype)
        u = analysis(a * r, weight, stride, padding) * step
        if z is not None:
            u = z + u
        z = _shrink(u, lam * step, nonneg)
    assert z is not None, "num_steps must be >= 1"
    return z


class _RistaStep(torch.autograd.Function):
    """One fixed-step RISTA step, computed in place, with a hand-written backward.

    The same math as :func:`rista` (``a_t * r_t`` is rewritten without the reciprocal:
    ``r / (2 max(|r|, eps)) = clip(r, -eps, eps) / (2 eps)``, and soft-thresholding as
    ``u - clip(u, -c, c)``), so it needs a handful of elementwise passes instead of a
    dozen, and it saves only ``r`` for the backward instead of every intermediate::

        r = x - A*(z);  t = clip(r, +-eps) / (2 eps);  q = t + beta (r - t)   (= a * r)
        u = z + s A(q);  z' = u - clip(u, +-lam s)      (nonneg: relu(u - lam s))

    Backward, with g = dLoss/dz' and m = 1{z' != 0} (the support, read off z')::

        du = g m;  dq = s A*(du);  dr = dq (beta + (1 - beta) 1{|r| < eps} / (2 eps))
        dx = dr;  dz = du - A(dr);  dbeta = <dq, r - t>;  dlam = -s <g, sign(z')>
        dA = s dW_conv(q, du) - dW_conv(dr, z)

    ``z is None`` is the first step from z_0 = 0 (``r = x``).  The step ``s`` is a
    constant (the 'fixed' rule); double backward is not supported (use the reference
    path, ``fused=False``, for that).
    """

    @staticmethod
    def forward(ctx, x, z, weight, beta, lam, step, stride, padding, eps, nonneg):
        in_size = [x.shape[-2], x.shape[-1]]
        if z is None:
            r = x
        else:
            r = synthesis(z, weight, stride, padding, in_size)
            r = torch.sub(x, r, out=r)
        scale, q = _scaled_reweighted_residual(r, beta, eps)
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
        ctx.save_for_backward(r, z, weight, beta, step, z_next)
        ctx.conf = (stride, padding, eps)
        return z_next

    @staticmethod
    def backward(ctx, grad):
        r, z, weight, beta, step, z_next = ctx.saved_tensors
        stride, padding, eps = ctx.conf
        need_x, need_z, need_w, need_beta, need_lam = ctx.needs_input_grad[:5]
        dilation, no_padding = [1, 1], [0, 0]
        du = torch.where(z_next != 0, grad, 0.0)
        scale, q = _scaled_reweighted_residual(r, beta, eps) if need_w else (1.0, r)
        # backward of u = conv2d(q, s A): dq (it does not depend on q) and, if wanted, dA
        dq, dw, _ = torch.ops.aten.convolution_backward(
            du, q, weight * step, None, stride, padding, dilation, False, no_padding, 1,
            [True, need_w, False])
        del q
        if dw is not None:
            dw = dw.mul_(step * scale)
        dx = dz = dbeta = dlam = None
        if need_beta:  # d(a r)/dbeta = r - clip(r, +-eps) / (2 eps)
            t = r.clamp(-eps, eps)
            t = torch.add(r, t, alpha=-0.5 / eps, out=t)
            dbeta = torch.dot(dq.reshape(-1), t.reshape(-1)).reshape(beta.shape)
            del t
        if need_x or need_z or need_w:
            if _host_value(beta) == 1.0:  # vanilla DL: a = 1, dr = dq
                dr = dq
            else:
                # d(a r)/dr: beta outside the eps band, beta + (1 - beta) / (2 eps) inside it
                slope = torch.where(r.abs() < eps, beta + (1.0 - beta) * (0.5 / eps), beta)
                dr = dq.mul_(slope)
                del slope
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
        return dx, dz, dw, dbeta, dlam, None, None, None, None, None


def _host_value(t: torch.Tensor) -> Optional[float]:
    """The value of a 0-dim CPU tensor (free to read); None on an accelerator (a sync)."""
    return float(t) if t.device.type == 'cpu' else None


def _scaled_reweighted_residual(r: torch.Tensor, beta: torch.Tensor, eps: float) -> Tuple[float, torch.Tensor]:
    """``(k, q)`` with ``k q = a * r = beta r + (1 - beta) clip(r, +-eps) / (2 eps)``.

    The scalar ``k`` is folded into the (small) dictionary of the next convolution, so on
    the CPU, where beta's value can be read for free, ``q`` takes one or two elementwise
    passes instead of three, and none at all for beta = 1 (``q`` is then ``r`` itself:
    read it, never write it).  The larger of the two coefficients is factored out, so
    the remaining one is at most 1.
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
                   step_rule: str, key: Tuple = ()):
    """``torch.compile`` of :func:`rista` for one solver configuration (cached).

    Returns ``solve(x, weight, beta, lam, lipschitz, step_scale)``.  Each configuration
    (``key`` adds e.g. channel counts) gets its own code object, so the compiler's
    recompile limit, which is counted per code object, is spent per layer geometry and
    not shared by every EDL layer of a network.  The batch size is left to the
    compiler's automatic dynamic shapes (attacks shrink the batch as points fall).
    """
    full_key = (tuple(stride), tuple(padding), num_steps, eps, nonneg, step_rule) + tuple(key)
    solver = _COMPILED_SOLVERS.get(full_key)
    if solver is None:
        def solve(x, weight, beta, lam, lipschitz, step_scale):
            return rista(x, weight, beta, lam, lipschitz, stride, padding, num_steps, eps, nonneg,
                         step_rule, step_scale)
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
) -> torch.Tensor:
    """:func:`rista` for the 'fixed' step rule from z_0 = 0, through :class:`_RistaStep`."""
    step = (1.0 / lipschitz.to(_step_dtype(x))).to(x.dtype)
    beta = beta.to(x.dtype)
    lam = lam.to(x.dtype)
    z: Optional[torch.Tensor] = None
    for _ in range(num_steps):
        z = _RistaStep.apply(x, z, weight, beta, lam, step, stride, padding, eps, nonneg)
    assert z is not None
    return z


def edl_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        beta: Union[float, torch.Tensor],
        lam: Union[float, torch.Tensor],
        lipschitz: Union[float, torch.Tensor],
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        num_steps: int = 2,
        eps: float = 1e-3,
        nonneg: bool = False,
        step_rule: str = 'fixed',
        step_scale: Optional[torch.Tensor] = None,
        z_init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Functional EDL layer: ``num_steps`` unrolled RISTA steps (see the module docstring).

    Args:
        x: (B, C_in, H, W) input.
        weight: (C_out, C_in, k, k) dictionary, used as given (normalise beforehand if wanted).
        beta: weight of the l2 data term in [0, 1] (float or 0-dim tensor; gradients flow).
        lam: sparsity weight >= 0.
        lipschitz: ``L = ||A||^2`` at this input size (see :func:`operator_norm_sq`).
        z_init: start code (default 0).
    Returns:
        (B, C_out, H', W') code ``z_K``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"unknown step_rule {step_rule!r}; choose one of {STEP_RULES}")
    if step_rule == 'learnable' and step_scale is None:
        raise ValueError("step_rule='learnable' needs a step_scale tensor")
    return rista(
        x, weight, _scalar_like(beta, x), _scalar_like(lam, x), _step_dtype_scalar(lipschitz, x),
        list(_pair(stride)), list(_pair(padding)), num_steps, eps, nonneg, step_rule, step_scale, z_init)


def elastic_objective(
        x: torch.Tensor,
        z: torch.Tensor,
        weight: torch.Tensor,
        beta: Union[float, torch.Tensor],
        lam: Union[float, torch.Tensor],
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        eps: float = 0.0,
) -> torch.Tensor:
    """Per-sample elastic objective F(z) (``eps > 0``: the Huber-smoothed F_eps). Shape (B,)."""
    stride_ = list(_pair(stride))
    padding_ = list(_pair(padding))
    r = (x - synthesis(z, weight, stride_, padding_, [x.shape[-2], x.shape[-1]])).flatten(1)
    if eps > 0:
        absr = r.abs()
        l1 = torch.where(absr < eps, r * r / (2 * eps) + eps / 2, absr).sum(1)
    else:
        l1 = r.abs().sum(1)
    return beta / 2 * (r * r).sum(1) + (1 - beta) / 2 * l1 + lam * z.flatten(1).abs().sum(1)


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
        eps: floor of the residual magnitude in the reweighting.
        nonneg: non-negative soft-thresholding.
        normalize_atoms: unit-norm atoms on every forward.
        bias: add a learnable per-channel bias to the code (like a conv bias).
        power_iters: power iterations for L when no estimate exists for this input size
            (cold start); ``power_iters_warm`` when refreshing it after a weight update.
        fixed_lipschitz: use this constant for L instead of power iteration (e.g. 1.0
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
            eps: float = 1e-3,
            nonneg: bool = False,
            normalize_atoms: bool = True,
            bias: bool = False,
            power_iters: int = 30,
            power_iters_warm: int = 2,
            fixed_lipschitz: Optional[float] = None,
            fused: bool = True,
            memory_efficient: bool = False,
            compile_solver: bool = False,
    ):
        super().__init__()
        if in_chans <= 0 or out_chans <= 0:
            raise ValueError(f"EDLConv2d needs positive channel counts, got in_chans={in_chans}, out_chans={out_chans}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if step_rule not in STEP_RULES:
            raise ValueError(f"unknown step_rule {step_rule!r}; choose one of {STEP_RULES}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it floors |r| in 1/(2|r|)), got {eps}")
        k = _pair(kernel_size)
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.kernel_size = k
        self.stride = list(_pair(stride))
        self.padding = list(_pair(padding if padding is not None else ((k[0] - 1) // 2, (k[1] - 1) // 2)))
        self.num_steps = num_steps
        self.step_rule = step_rule
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
                f"step_rule={self.step_rule}, eps={self.eps}, nonneg={self.nonneg}, "
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
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return x.to(dtype), weight.to(dtype)
        return x, weight

    @torch.jit.unused
    def _compiled_solve(self, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                        lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        solve = compiled_rista(self.stride, self.padding, self.num_steps, self.eps, self.nonneg, self.step_rule,
                               key=(self.in_chans, self.out_chans, tuple(self.kernel_size)))
        return solve(x, weight, beta, lam, L, self.step_scale)

    @torch.jit.unused
    def _checkpointed_rista(self, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                            lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        if self.compile_solver:
            return torch.utils.checkpoint.checkpoint(self._compiled_solve, x, weight, beta, lam, L,
                                                     use_reentrant=False)
        return torch.utils.checkpoint.checkpoint(
            rista_fused, x, weight, beta, lam, L, self.stride, self.padding, self.num_steps, self.eps,
            self.nonneg, use_reentrant=False)

    @torch.jit.unused
    def _record_stats(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                      beta: torch.Tensor, lam: torch.Tensor) -> None:
        with torch.no_grad():
            obj = elastic_objective(x.float(), z.float(), weight.float(), beta.float(), lam.float(),
                                    self.stride, self.padding)
            self.last_objective = obj.mean()
            self.last_sparsity = (z == 0).float().mean()

    @torch.jit.unused
    def _power_iteration(
            self, weight: torch.Tensor, in_size: List[int], num_iters: int, init: Optional[torch.Tensor],
            min_iters: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return operator_norm_sq(weight, in_size, self.stride, self.padding, num_iters, init, min_iters)

    @torch.jit.unused
    def _weight_identity(self) -> List[int]:
        """(in-place version counter, storage address) of the weight: changes on every update."""
        return [int(self.weight._version), int(self.weight.data_ptr())]

    def _lipschitz(self, weight: torch.Tensor, in_size: List[int]) -> torch.Tensor:
        """L = ||A||^2 at ``in_size``, recomputed only when the weight or the size changed.

        A weight update (optimizer step, load_state_dict) triggers a warm-started refresh
        of a few power iterations; a new input size a cold start.  So L is constant across
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
                self.eps, self.nonneg, self.step_rule, self.step_scale)
        elif self.memory_efficient and torch.is_grad_enabled() and (
                self.compile_solver or (self.fused and self.step_rule == 'fixed')):
            z = self._checkpointed_rista(x, weight, beta, lam, L)
        elif self.compile_solver:
            z = self._compiled_solve(x, weight, beta, lam, L)
        elif not (self.fused and self.step_rule == 'fixed'):
            z = rista(
                x, weight, beta, lam, L, self.stride, self.padding, self.num_steps,
                self.eps, self.nonneg, self.step_rule, self.step_scale)
        else:
            z = rista_fused(x, weight, beta, lam, L, self.stride, self.padding, self.num_steps, self.eps, self.nonneg)
        if self.track_stats and not torch.jit.is_scripting():
            self._record_stats(x, z, weight, beta, lam)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1).to(z.dtype)
        return z


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
