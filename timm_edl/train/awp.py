"""Adversarial weight perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020) for PGD-AT and TRADES.

AWP trains on the worst case of a small, layer-wise relative perturbation of the weights
as well as of the inputs.  One training step (``awp_gamma = gamma > 0``) is:

1. craft ``x'`` at the current weights ``w`` (the objective's attack, unchanged);
2. ``g_l = d loss(w; x, x', y) / d w_l`` for every perturbed weight tensor ``w_l``, with
   ``loss`` the objective's own training loss (CE on ``x'`` for PGD-AT, CE + beta KL for
   TRADES), the model in train mode and its BatchNorm running statistics restored afterwards;
3. ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` (Frobenius norms; ``v_l = 0`` where ``g_l = 0``):
   one normalised ascent step, whose size is ``gamma`` relative to each layer's norm;
4. the training loss and its gradient are computed at ``w + v``;
5. the weights are restored **exactly** (a saved copy is written back, bitwise) before the
   optimizer step, which then applies the gradient from 4 to ``w``.

Perturbed tensors: every parameter with more than one dimension that requires a gradient
(convolution kernels, EDL dictionaries, linear layers), as in the reference code; biases,
BatchNorm affine parameters and the EDL scalars (beta, lam) are not perturbed.

Step 5 differs from the reference code, which adds ``v``, steps and then subtracts ``v``
from the updated weights: the same update up to float rounding, while restoring before the
step leaves no rounding residue and keeps the momentum/weight-decay step at ``w``.

EDL layers recompute their step size ``1/L`` whenever their dictionary changes (version
counter), so the forward at ``w + v`` uses ``L(w + v)`` and the next forward at the restored
weights refreshes ``L(w)`` again (a warm-started Lanczos refresh each time).

Under DDP each process computes ``v`` from its own batch on the unwrapped model (no
communication); the gradients of step 4 are averaged by DDP as usual and every process
restores the same ``w``, so the replicas' parameters stay identical.  Their EDL step-size
caches (``L``, refreshed after each perturbation from each process's own warm start) may
differ in the last digits, as a derived cache that weights digests leave out.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .objectives import crafting_mode

__all__ = ['perturbable_parameters', 'awp_perturbation', 'WeightPerturbation', 'perturb_weights']


def perturbable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The weights AWP perturbs: trainable parameters with ``ndim > 1``, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]


def awp_perturbation(weights: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                     gamma: float) -> List[torch.Tensor]:
    """``v_l = gamma * ||w_l|| * g_l / ||g_l||`` per tensor (0 where ``g_l`` is 0 or None).

    Norms are taken in float32 (or float64 for float64 weights); ``v_l`` has ``w_l``'s dtype.
    """
    out = []
    for w, g in zip(weights, grads):
        if g is None:
            out.append(torch.zeros_like(w))
            continue
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        g32 = g.detach().to(acc)
        g_norm = torch.linalg.vector_norm(g32)
        w_norm = torch.linalg.vector_norm(w.detach().to(acc))
        # no host sync: a zero gradient gives a zero perturbation through the where()
        scale = torch.where(g_norm > 0, gamma * w_norm / g_norm.clamp_min(torch.finfo(acc).tiny), 0.0)
        out.append((g32 * scale).to(w.dtype))
    return out


class WeightPerturbation:
    """Weights moved to ``w + v`` in place; :meth:`restore` writes the saved ``w`` back bitwise."""

    def __init__(self, params: Sequence[nn.Parameter], deltas: Sequence[torch.Tensor]):
        self.params = list(params)
        self.deltas = list(deltas)
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, self.deltas):
                p.add_(v)
        self.restored = False

    def restore(self) -> None:
        if self.restored:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self.saved):
                p.copy_(w)
        self.restored = True
        self.saved = []


def perturb_weights(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                    gamma: float) -> WeightPerturbation:
    """Steps 2-3 of the module docstring: compute ``v`` for ``loss_fn(model)`` (the training
    loss, computed in train mode; BatchNorm running statistics are restored afterwards) and
    move the weights to ``w + v``.  Call ``.restore()`` on the result before the optimizer
    step.  ``.grad`` of the parameters is not touched."""
    named = perturbable_parameters(model)
    params = [p for _, p in named]
    with crafting_mode(model, 'train'):  # train-mode forward; running statistics put back
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    deltas = awp_perturbation(params, grads, gamma)
    return WeightPerturbation(params, deltas)
