"""Adversarial attacks used for both adversarial training and robustness evaluation.

Every attack works in pixel space: inputs are images in ``[0, 1]`` and the model
normalises internally. Perturbations are kept inside the threat model

    B_p(x, eps) ∩ [0, 1]^d,    B_p(x, eps) = {x' : ||x' - x||_p <= eps},  p ∈ {inf, 2}

after every step.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only and
flow through the whole forward pass. For EDL layers this means back-propagating
through every unrolled RISTA step, i.e. the attacks here are *adaptive* attacks
(the layers are deterministic, so no EOT is needed). An attack never changes the
model's train/eval mode, its parameters, their ``requires_grad`` flags or ``.grad``.
Note that a model left in train mode still updates BatchNorm running statistics
during the attack's forward passes; call ``model.eval()`` first when that matters.

Example::

    >>> from functools import partial
    >>> attack = partial(pgd_attack, eps=8 / 255, steps=20, restarts=2, keep_best=True)
    >>> robust_acc = accuracy_under_attack(model, images, labels, attack, batch_size=256)
"""
import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'LossFn',
    'AttackFn',
    'NORMS',
    'STEP_SCHEDULES',
    'per_sample_cross_entropy',
    'input_gradient',
    'frozen_parameters',
    'pgd_attack',
    'fgsm_rs',
    'random_noise_attack',
    'NOISE_DISTRIBUTIONS',
    'accuracy_under_attack',
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits (N, num_classes), y (N,)) -> per-sample loss (N,)``; the attack maximises it."""

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attack(model, x, y) -> x_adv``, e.g. ``functools.partial(pgd_attack, eps=8/255)``."""

NORMS = ('Linf', 'L2')
STEP_SCHEDULES = ('constant', 'cosine')
NOISE_DISTRIBUTIONS = ('corners', 'uniform')

def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Default attack loss: cross-entropy per sample, ``(N, C), (N,) -> (N,)``."""
    return F.cross_entropy(logits, y, reduction='none')


def input_gradient(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        loss_fn: Optional[LossFn] = None,
) -> torch.Tensor:
    """Gradient of the summed per-sample loss with respect to the input.

    Computes ``g_i = ∂ loss_fn(model(x), y)_i / ∂ x_i`` for every sample ``i`` (the
    losses are summed, so a sample's gradient does not depend on the batch size).
    This is the gradient every attack in this module follows; it is exposed so that
    it can be compared with zero-order estimates when checking for gradient masking.

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, num_classes)``.
        x: input images ``(N, C, H, W)``.
        y: integer labels ``(N,)``.
        loss_fn: per-sample loss, cross-entropy by default.

    Returns:
        Detached gradient of the same shape as ``x``.
    """
    loss_fn = per_sample_cross_entropy if loss_fn is None else loss_fn
    _, grad = _loss_and_gradient(model, x, y, loss_fn)
    return grad


def pgd_attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: str = 'Linf',
        steps: int = 10,
        step_size: Optional[float] = None,
        random_start: bool = True,
        restarts: int = 1,
        step_schedule: str = 'constant',
        loss_fn: Optional[LossFn] = None,
        grad_model: Optional[nn.Module] = None,
        keep_best: bool = False,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Untargeted projected gradient ascent (Madry et al., 2018) in pixel space.

    Each restart starts from ``x_0 = Π(x + δ_0)`` (``δ_0 = 0`` without random start)
    and iterates, for ``t = 0 .. steps - 1``,

        Linf:  x_{t+1} = Π(x_t + α_t · sign(g_t))
        L2:    x_{t+1} = Π(x_t + α_t · g_t / ||g_t||_2)

    with ``g_t = ∇_x loss_fn(grad_model(x_t), y)`` and ``Π`` the projection onto the
    eps-ball around ``x`` followed by clipping to ``[0, 1]`` (Linf: clamp of ``x_t - x``
    to ``[-eps, eps]``; L2: per-sample rescale of ``x_t - x`` to norm at most ``eps``).
    Clipping to the box only shrinks ``|x_t - x|`` entrywise, so the result lies in
    both sets. The step size is ``α_t = step_size`` ('constant') or
    ``α_t = step_size · (1 + cos(π t / steps)) / 2`` ('cosine').

    Random start: Linf ``δ_0 ~ U[-eps, eps]^d``; L2 ``δ_0 = eps · u · n / ||n||_2`` with
    ``n ~ N(0, I)`` and ``u ~ U[0, 1]``, drawn per sample.

    Selecting the worst case: with ``restarts > 1`` (or ``keep_best=True``) the
    candidates of each sample are compared by ``model`` (not ``grad_model``) and the
    one kept is a misclassified candidate if there is one, else the one with the
    highest loss. Candidates are each restart's final iterate, or with ``keep_best``
    every iterate ``x_0 .. x_steps`` of every restart. Because restart ``r`` draws the
    same random start whatever the number of restarts (given the same ``generator``
    state), adding restarts, or steps with ``keep_best`` and a fixed ``step_size``,
    can only lower the accuracy. Without selection the last iterate is returned, as
    in standard PGD adversarial training.

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, num_classes)``.
        x: clean images ``(N, C, H, W)`` in ``[0, 1]``.
        y: integer labels ``(N,)``.
        eps: radius of the threat model (``>= 0``, in ``[0, 1]`` pixel units).
        norm: 'Linf' or 'L2'.
        steps: number of gradient steps (``>= 0``).
        step_size: ``α``; ``2.5 · eps / steps`` by default.
        random_start: start each restart from a random point of the eps-ball.
        restarts: number of independent restarts (needs ``random_start``).
        step_schedule: 'constant' or 'cosine' decay of the step size.
        loss_fn: per-sample loss ``(logits, y) -> (N,)`` to maximise; cross-entropy by
            default. TRADES, for example, passes the KL divergence to the clean logits.
        grad_model: take gradients through this model instead of ``model`` (transfer
            or surrogate attacks); the worst-case selection still uses ``model``.
        keep_best: also consider every intermediate iterate when selecting (as
            robustness evaluations do); costs one extra forward pass per restart, or
            one per step when ``grad_model`` is given.
        generator: random generator for the random start, for reproducible attacks.

    Returns:
        Detached adversarial images, same shape, dtype and device as ``x``.
    """
    _check_images_and_labels(x, y)
    _check_threat_model(eps, norm)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if restarts > 1 and not random_start:
        raise ValueError(
            f"restarts={restarts} without random_start would repeat the same deterministic "
            f"attack; set random_start=True or restarts=1")
    if step_schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step_schedule {step_schedule!r}; choose one of {STEP_SCHEDULES}")
    if step_size is None:
        step_size = 2.5 * eps / steps if steps > 0 else 0.0
    elif not step_size >= 0:  # also rejects NaN
        raise ValueError(f"step_size must be >= 0, got {step_size}")

    loss_fn = per_sample_cross_entropy if loss_fn is None else loss_fn
    grad_model = model if grad_model is None else grad_model
    x = x.detach()
    y = y.detach()
    worst_case = _WorstCase(model, y, loss_fn) if (restarts > 1 or keep_best) else None
    # Iterates of `model` come with their logits for free; a surrogate's do not.
    reuse_logits = grad_model is model

    for _ in range(restarts):
        if random_start:
            x_adv = _project(x + _random_perturbation(x, eps, norm, generator), x, eps, norm)
        else:
            x_adv = x.clone()
        for step in range(steps):
            logits, grad = _loss_and_gradient(grad_model, x_adv, y, loss_fn)
            if keep_best:
                worst_case.update(x_adv, logits if reuse_logits else None)
            alpha = _scheduled_step_size(step_size, step, steps, step_schedule)
            x_adv = _project(x_adv + alpha * _ascent_direction(grad, norm), x, eps, norm)
        if worst_case is not None:
            worst_case.update(x_adv)

    return x_adv if worst_case is None else worst_case.x


def fgsm_rs(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        alpha: Optional[float] = None,
        loss_fn: Optional[LossFn] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """FGSM with a random start ("fast adversarial training", Wong et al., 2020), Linf.

        δ_0 ~ U[-eps, eps]^d,    x_adv = Π(Π(x + δ_0) + α · sign(∇_x loss(model(x_0), y)))

    with ``Π`` the projection onto the Linf eps-ball around ``x`` and ``[0, 1]``. This is
    one step of :func:`pgd_attack` with ``step_size=alpha`` and a random start.

    Args:
        model, x, y, loss_fn, generator: as for :func:`pgd_attack`.
        eps: Linf radius (``>= 0``).
        alpha: step size, ``1.25 · eps`` by default (the value Wong et al. recommend).

    Returns:
        Detached adversarial images, same shape as ``x``.
    """
    alpha = 1.25 * eps if alpha is None else alpha
    return pgd_attack(
        model, x, y, eps=eps, norm='Linf', steps=1, step_size=alpha,
        random_start=True, loss_fn=loss_fn, generator=generator)


@torch.no_grad()
def random_noise_attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: str = 'Linf',
        draws: int = 10,
        distribution: str = 'corners',
        loss_fn: Optional[LossFn] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random noise in the threat model: the baseline every robustness claim must beat.

    Draws ``draws`` random perturbations per point and returns, per point, the worst one
    (a misclassified draw if there is one, else the highest loss), so that a point counts
    as robust only if it is classified correctly under *every* draw. No gradient is used:
    this is what a model's accuracy under noise looks like, not an attack on it. A model
    whose accuracy under a gradient attack is *above* its accuracy under random noise has
    gradients that mislead the attack (gradient masking).

    Distributions (``distribution``):

    * ``'corners'``: Linf ``δ = eps · s`` with independent random signs ``s ∈ {-1, 1}^d``
      (random corners of the ball, the largest random Linf perturbations); L2: a uniformly
      random direction at radius exactly ``eps``.
    * ``'uniform'``: the random start of :func:`pgd_attack` (Linf ``δ ~ U[-eps, eps]^d``;
      L2 a random direction at a radius ``~ U[0, eps]``).

    Every draw is projected onto the ball and clipped to ``[0, 1]``.

    Args:
        model, x, y, loss_fn: as for :func:`pgd_attack`.
        eps: radius (``>= 0``, pixel units); norm: 'Linf' or 'L2'.
        draws: number of random perturbations per point (``>= 1``).
        distribution: 'corners' or 'uniform'.
        generator: random generator, for reproducible draws.

    Returns:
        Detached perturbed images, same shape as ``x``.
    """
    _check_images_and_labels(x, y)
    _check_threat_model(eps, norm)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if distribution not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"unknown noise distribution {distribution!r}; choose one of {NOISE_DISTRIBUTIONS}")
    loss_fn = per_sample_cross_entropy if loss_fn is None else loss_fn
    x, y = x.detach(), y.detach()
    worst_case = _WorstCase(model, y, loss_fn)
    device = x.device if generator is None else generator.device
    for _ in range(draws):
        if distribution == 'uniform':
            delta = _random_perturbation(x, eps, norm, generator)
        elif norm == 'Linf':
            signs = torch.randint(0, 2, x.shape, generator=generator, device=device).to(x.dtype)
            delta = ((2 * signs - 1) * eps).to(x.device)
        else:
            direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            delta = (eps * _unit_l2(direction)).to(x.device)
        worst_case.update(_project(x + delta, x, eps, norm))
    return worst_case.x


@torch.no_grad()
def accuracy_under_attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        attack: Optional[AttackFn] = None,
        *,
        batch_size: Optional[int] = None,
) -> float:
    """Fraction of samples that ``model`` classifies correctly after ``attack``.

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, num_classes)``.
        x: clean images ``(N, C, H, W)`` in ``[0, 1]``.
        y: integer labels ``(N,)``.
        attack: ``attack(model, x, y) -> x_adv``, e.g.
            ``functools.partial(pgd_attack, eps=8/255)``; ``None`` gives clean accuracy.
        batch_size: attack and evaluate in chunks of this size (all at once by default).

    Returns:
        Accuracy in ``[0, 1]``.
    """
    _check_images_and_labels(x, y)
    if len(x) == 0:
        raise ValueError("accuracy_under_attack needs at least one sample, got an empty batch")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_correct = 0
    for x_batch, y_batch in zip(x.split(batch_size or len(x)), y.split(batch_size or len(y))):
        if attack is not None:
            with torch.enable_grad():
                x_batch = attack(model, x_batch, y_batch)
        num_correct += (model(x_batch).argmax(dim=-1) == y_batch).sum().item()
    return num_correct / len(x)


class _WorstCase:
    """Per-sample strongest candidate so far: misclassified first, then highest loss."""

    def __init__(self, model: nn.Module, y: torch.Tensor, loss_fn: LossFn):
        self.model = model
        self.y = y
        self.loss_fn = loss_fn
        self.x: Optional[torch.Tensor] = None
        self.fooled: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None

    def update(self, x_candidate: torch.Tensor, logits: Optional[torch.Tensor] = None):
        """Keep ``x_candidate`` where it beats the current worst case; ``logits`` are
        ``model(x_candidate)`` if already computed."""
        with torch.no_grad():
            if logits is None:
                logits = self.model(x_candidate)
            logits = logits.detach()
            fooled = logits.argmax(dim=-1) != self.y
            loss = _checked_loss(self.loss_fn, logits, self.y)
        x_candidate = x_candidate.detach()
        if self.x is None:
            self.x, self.fooled, self.loss = x_candidate.clone(), fooled, loss
            return
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x = torch.where(_expand_like(better, x_candidate), x_candidate, self.x)
        self.fooled = self.fooled | fooled
        self.loss = torch.where(better, loss, self.loss)


@contextlib.contextmanager
def frozen_parameters(*models: Optional[nn.Module]) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter of ``models`` inside the block, then
    restore the flags exactly.

    An input gradient does not need parameter gradients, but a backward that is written
    by hand (the fused EDL step) decides what to compute from ``requires_grad`` alone and
    would compute the dictionary's gradient too (about 1.5x the work of an input-only
    backward).  Attacks and evaluations run under this context.
    """
    frozen = [p for m in models if m is not None for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _loss_and_gradient(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(logits, d sum(loss) / d x)``; the gradient w.r.t. the input only, so
    nothing accumulates in the parameters' ``.grad`` (they are frozen meanwhile, so no
    backward computes their gradients)."""
    # enable_grad: attacks are often called from evaluation loops under no_grad.
    with torch.enable_grad(), frozen_parameters(model):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = _checked_loss(loss_fn, logits, y)
        grad, = torch.autograd.grad(loss.sum(), x)
    return logits.detach(), grad.detach()


def _checked_loss(loss_fn: LossFn, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(logits, y)
    if loss.shape != (len(y),):
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({len(y)},), got {tuple(loss.shape)}; "
            f"use reduction='none'")
    return loss


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit ``norm``: ``sign(g)`` (Linf) or ``g / ||g||_2`` (L2)."""
    if norm == 'Linf':
        return grad.sign()
    return _unit_l2(grad)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projects ``x_adv`` onto ``B_norm(x, eps)``, then clips it to ``[0, 1]``."""
    delta = x_adv - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    else:
        delta_norm = _per_sample_l2(delta)
        scale = torch.where(delta_norm > eps, eps / delta_norm.clamp_min(eps), 1.0)
        delta = delta * _expand_like(scale, delta)
    return (x + delta).clamp(0.0, 1.0).detach()


def _random_perturbation(
        x: torch.Tensor,
        eps: float,
        norm: str,
        generator: Optional[torch.Generator],
) -> torch.Tensor:
    """A random point of the eps-ball around 0, shape of ``x`` (see :func:`pgd_attack`)."""
    # Draw on the generator's device so a CPU generator also serves CUDA inputs.
    device = x.device if generator is None else generator.device
    if norm == 'Linf':
        noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
        return ((2 * noise - 1) * eps).to(x.device)
    direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    radius = eps * torch.rand(len(x), generator=generator, device=device, dtype=x.dtype)
    return (_unit_l2(direction) * _expand_like(radius, direction)).to(x.device)


def _scheduled_step_size(step_size: float, step: int, steps: int, schedule: str) -> float:
    if schedule == 'cosine':
        return step_size * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return step_size


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1)


def _unit_l2(t: torch.Tensor) -> torch.Tensor:
    """``t_i / ||t_i||_2`` per sample, and 0 where ``t_i = 0``.

    Dividing by the largest entry first keeps the norm from underflowing: the input
    gradients of confidently classified samples can be as small as 1e-20 in float32,
    and flooring their norm instead would shrink the step (a form of gradient masking).
    """
    largest = t.flatten(1).abs().amax(dim=1)
    t = t / _expand_like(torch.where(largest > 0, largest, 1.0), t)
    t_norm = _per_sample_l2(t)
    return t / _expand_like(torch.where(t_norm > 0, t_norm, 1.0), t)


def _expand_like(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,) -> (N, 1, ..., 1)`` broadcastable against ``like``."""
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


def _check_threat_model(eps: float, norm: str):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (in [0, 1] pixel units), got {eps!r}")


def _check_images_and_labels(x: torch.Tensor, y: torch.Tensor):
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point tensor of images (N, C, H, W), got "
            f"{type(x).__name__}{tuple(x.shape) if torch.is_tensor(x) else ''}")
    if not torch.is_tensor(y) or y.shape != (len(x),) or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"y must be an integer tensor of labels with shape ({len(x)},), got "
            f"{y.dtype if torch.is_tensor(y) else type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values; attacks need finite images in [0, 1]")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"x must lie in [0, 1] pixel space, got values in [{x.min().item():.4g}, {x.max().item():.4g}]; "
            f"pass un-normalised images and let the model normalise its input")
