"""Adversarial-training objectives: crafting the inputs, then the training loss.

Each objective is two steps, done by the trainer in this order:

1. :func:`craft` builds the training inputs on the **unwrapped** model (under DDP,
   ``torch.autograd.grad`` on the wrapper would confuse its gradient hooks) with the
   BatchNorm mode ``craft_bn`` (see :func:`crafting_mode`).
2. :func:`training_loss` runs the **wrapped** model in train mode on those inputs and
   returns the loss to back-propagate (plus detached logits for the metrics).

Objectives (``x`` clean, ``x'`` crafted, ``f`` logits, ``p = softmax(f)``, batch mean):

* ``natural``:  CE(f(x), y)
* ``pgd``    (Madry et al. 2018):  x' = PGD-k(CE);  CE(f(x'), y)
* ``fast``   (Wong et al. 2020, FGSM-RS):  x' = one signed step of size ``fast_alpha``
  from a uniform random start;  CE(f(x'), y)
* ``trades`` (Zhang et al. 2019):  x' = PGD-k(KL(p(x) || p(x')));
  CE(f(x), y) + trades_beta * KL(p(x) || p(x'))   (p(x) not detached, as in TRADES)
* ``mart``   (Wang et al. 2020):  x' = PGD-k(CE);
  BCE(p(x'), y) + mart_beta * KL(p(x) || p(x')) * (1 - p_y(x)),
  with BCE = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')).

TRADES here starts its attack from a uniform point of the eps-ball (``pgd_attack``'s
random start) rather than TRADES's ``x + 0.001 N(0, I)``: the KL is 0 with zero gradient at
``x`` itself, so either start works; the uniform one is what ``pgd_attack`` offers.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import fgsm_rs, pgd_attack

__all__ = ['crafting_mode', 'craft', 'training_loss', 'needs_clean_forward']


@contextlib.contextmanager
def crafting_mode(model: nn.Module, craft_bn: str) -> Iterator[None]:
    """BatchNorm behaviour while adversarial examples are crafted.

    * ``'eval'`` (default, as in the TRADES and MART reference setups): BN uses its running
      statistics, so the attack sees a deterministic per-sample function and the running
      statistics are not fed with the attack's intermediate iterates.
    * ``'train'``: BN normalises with the batch statistics (as Madry-style training loops
      that never leave train mode do), but the running statistics are restored
      afterwards, so only the training forward updates them.

    The training loss is always computed in train mode.
    """
    was_training = model.training
    saved = []
    if craft_bn == 'eval':
        model.eval()
    elif craft_bn == 'train':
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    else:
        raise ValueError(f"unknown craft_bn {craft_bn!r}; use 'eval' or 'train'")
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.train(was_training)


def _kl_per_sample(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) per sample, shape (N,)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs.float(), reduction='none').sum(dim=1)


def craft(
        objective: str,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: str,
        steps: int,
        step_size: Optional[float],
        fast_alpha: Optional[float],
        craft_bn: str,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The inputs the training loss sees: ``x`` itself (natural) or adversarial examples."""
    if objective == 'natural':
        return x
    with crafting_mode(model, craft_bn):
        if objective == 'fast':
            return fgsm_rs(model, x, y, eps=eps, alpha=fast_alpha, generator=generator)
        loss_fn = None
        if objective == 'trades':
            with torch.no_grad():
                clean_probs = F.softmax(model(x).float(), dim=1)
            loss_fn = lambda logits, _y: _kl_per_sample(logits, clean_probs)  # noqa: E731
        if objective in ('pgd', 'trades', 'mart'):
            return pgd_attack(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size,
                              random_start=True, loss_fn=loss_fn, generator=generator)
    raise ValueError(f"unknown objective {objective!r}")


def needs_clean_forward(objective: str) -> bool:
    """Whether the training loss itself runs the model on the clean inputs."""
    return objective in ('natural', 'trades', 'mart')


def training_loss(
        objective: str,
        model: nn.Module,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        *,
        trades_beta: float = 6.0,
        mart_beta: float = 6.0,
) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """Loss on the (wrapped, train-mode) model; returns ``(loss, logits)`` where ``logits``
    holds detached ``'clean'`` and ``'adv'`` logits where the loss computed them."""
    if objective == 'natural':
        logits = model(x)
        return F.cross_entropy(logits.float(), y), {'clean': logits.detach(), 'adv': None}
    if objective in ('pgd', 'fast'):
        logits_adv = model(x_adv)
        return F.cross_entropy(logits_adv.float(), y), {'clean': None, 'adv': logits_adv.detach()}
    if objective == 'trades':
        logits_clean = model(x)
        logits_adv = model(x_adv)
        clean_probs = F.softmax(logits_clean.float(), dim=1)
        robust = _kl_per_sample(logits_adv, clean_probs).mean()
        loss = F.cross_entropy(logits_clean.float(), y) + trades_beta * robust
        return loss, {'clean': logits_clean.detach(), 'adv': logits_adv.detach()}
    if objective == 'mart':
        logits_clean = model(x)
        logits_adv = model(x_adv)
        adv_log_probs = F.log_softmax(logits_adv.float(), dim=1)
        adv_probs = adv_log_probs.exp()
        # strongest wrong class of the adversarial prediction
        others = adv_probs.masked_fill(F.one_hot(y, adv_probs.shape[1]).bool(), float('-inf'))
        wrong = others.argmax(dim=1)
        p_wrong = adv_probs.gather(1, wrong[:, None]).squeeze(1)
        bce = F.cross_entropy(logits_adv.float(), y) - torch.log((1.0 - p_wrong).clamp_min(1e-12)).mean()
        clean_log_probs = F.log_softmax(logits_clean.float(), dim=1)
        clean_probs = clean_log_probs.exp()
        kl = (clean_probs * (clean_log_probs - adv_log_probs)).sum(dim=1)
        p_true = clean_probs.gather(1, y[:, None]).squeeze(1)
        loss = bce + mart_beta * (kl * (1.0 - p_true)).mean()
        return loss, {'clean': logits_clean.detach(), 'adv': logits_adv.detach()}
    raise ValueError(f"unknown objective {objective!r}")
