"""RISTA, the solver of an EDL layer: the reweighting, the unrolled steps (reference, fused with a
hand-written backward, compiled), the step sizes and the elastic objective they minimise.

The math (objective, reweightings, why each step descends) is in the docstring of
:mod:`timm_edl.layers.edl`.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .dictionary import _IntPair, _pair, _step_dtype, analysis, output_padding, synthesis

__all__ = [
    'rista', 'rista_fused', 'compiled_rista', 'rista_step_sizes', 'edl_conv2d', 'elastic_objective',
    'smoothed_abs', 'reweight_coefficient', 'residual_scale', 'default_eps', 'STEP_RULES', 'INITS', 'REWEIGHTS',
]

STEP_RULES = ('fixed', 'safe', 'learnable')
INITS = ('zero', 'ista')
REWEIGHTS = ('floor', 'additive', 'scale_free')
# What a layer built before ``init`` / ``reweight`` existed computes: exports whose recorded
# options lack these keys are rebuilt with these values (see :func:`with_legacy_options`).
LEGACY_OPTIONS: Dict[str, str] = {'init': 'zero', 'reweight': 'floor'}


def _scalar_like(v: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A float or 0-dim tensor as a tensor of x's dtype and device (autograd kept)."""
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=x.dtype)
    return torch.tensor(float(v), device=x.device, dtype=x.dtype)


def _step_dtype_scalar(v: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    dtype = _step_dtype(x)
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=dtype)
    return torch.tensor(float(v), device=x.device, dtype=dtype)


def _clamp_ste(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(v, lo, hi) in the forward, identity in the backward (straight-through)."""
    return v + (v.clamp(lo, hi) - v).detach()


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
