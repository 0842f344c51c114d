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
    a working ``torch.compile`` (a C++ compiler on CPU, Triton on GPU).  ``torch.compile``
    of a whole model runs :func:`rista` in the graph (the compiler fuses its elementwise
    work) and the step-size cache outside it: one graph break per layer, and no recompile
    when the weights change.

Caveat of ``init='zero', reweight='floor'`` (the original layer): a layer whose beta
reaches 0 sees, in its first step, only ``clip(x, -eps, eps) / (2 eps)``, i.e. ``sign(x)``
where ``|x| > eps``: piecewise constant, with a vanishing input gradient, so gradient
attacks overstate its robustness.  ``timm-edl eval``'s gradient checks flag such models.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from timm.layers import register_notrace_module

from .dictionary import _IntPair, _pair, analysis, normalize_atoms, operator_norm_sq, output_padding, synthesis
from .rista import (
    INITS, LEGACY_OPTIONS, REWEIGHTS, STEP_RULES, _check_solver_options, _clamp_ste, compiled_rista, default_eps,
    edl_conv2d, elastic_objective, reweight_coefficient, residual_scale, rista, rista_fused, rista_step_sizes,
)

__all__ = ['EDLConv2d', 'edl_layers', 'edl_layer_stats', 'set_beta_mode', 'with_legacy_options']


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
        device, dtype: where and in which dtype parameters and buffers are created (as ``nn.Conv2d``).

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
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
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

        self.weight = nn.Parameter(torch.empty(out_chans, in_chans, k[0], k[1], **dd))
        self.bias = nn.Parameter(torch.zeros(out_chans, **dd)) if bias else None
        beta_t = torch.tensor(float(beta), **dd)
        if beta_learnable:
            self.beta = nn.Parameter(beta_t)
        else:
            self.register_buffer('beta', beta_t)
        lam_t = torch.tensor(float(lam), **dd)
        if lam_learnable:
            self.lam = nn.Parameter(lam_t)
        else:
            self.register_buffer('lam', lam_t)
        self.step_scale = nn.Parameter(torch.ones((), **dd)) if step_rule == 'learnable' else None
        # L and the input size it was computed at are saved with the weights, so a loaded
        # model reproduces the step sizes it was trained with; the power-iteration vector
        # (as large as one input) is only a warm start and is not saved.
        self.register_buffer('lipschitz', torch.zeros((), **dd))
        self.register_buffer('lipschitz_size', torch.tensor([-1, -1], dtype=torch.long, device=device))
        self.register_buffer('power_vector', torch.zeros(0, **dd), persistent=False)
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
        def value(t: torch.Tensor) -> str:
            return f"{t.item():.3g}" if t.device.type != 'meta' else '?'
        return (f"{self.in_chans}, {self.out_chans}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_steps={self.num_steps}, beta={value(self.beta)}, "
                f"beta_learnable={isinstance(self.beta, nn.Parameter)}, lam={value(self.lam)}, "
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
    def lipschitz_is_current(self) -> bool:
        """Whether the cached ``L`` was computed for the weights as they are now (the next
        forward at that input size reuses it rather than refreshing it)."""
        return self._cache_key[0] > 0 and self._cache_key[2:] == self._weight_identity()

    @torch.jit.unused
    def _weight_identity(self) -> List[int]:
        """(in-place version counter, storage address) of the weight: changes on every update."""
        return [int(self.weight._version), int(self.weight.data_ptr())]

    @torch.jit.unused
    @torch.compiler.disable
    def _lipschitz_eager(self, weight: torch.Tensor, in_size: List[int]) -> torch.Tensor:
        """:meth:`_lipschitz`, always run eagerly: under ``torch.compile`` the cache check reads
        the weight's version counter and storage address, which a compiled graph would guard on
        (a recompile per layer and per update); run outside the graph it costs one graph break
        per layer and no recompile."""
        return self._lipschitz(weight, in_size)

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
        if torch.jit.is_scripting():
            L = self._lipschitz(weight, in_size)
            reference = True
        else:
            # compiled: the step-size cache outside the graph, and the reference solver, whose
            # elementwise work the compiler fuses itself
            reference = torch.compiler.is_compiling()
            L = self._lipschitz_eager(weight, in_size) if reference else self._lipschitz(weight, in_size)
        beta = self.beta_value()
        lam = self.lam_value()
        if reference:
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
