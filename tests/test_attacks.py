"""Tests for timm_edl.attacks: agreement with torchattacks, threat-model constraints,
monotonicity in steps/restarts, no gradient masking, and gradients through EDL layers."""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from timm_edl.attacks import accuracy_under_attack, fgsm_rs, input_gradient, pgd_attack

NUM_CLASSES = 4
IMAGE_SHAPE = (3, 8, 8)
# Linf radius at which the trained model keeps an intermediate robust accuracy (~30-70 %).
MID_LINF_EPS = 0.09
MID_L2_EPS = 1.0


def make_images(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic task: noisy copies of one fixed random prototype per class."""
    prototypes = torch.rand(NUM_CLASSES, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    noise = 0.15 * torch.randn(num_samples, *IMAGE_SHAPE, generator=generator)
    images = (0.2 + 0.6 * prototypes[labels] + noise).clamp(0, 1)
    return images, labels


class TinyCNN(nn.Module):
    """Pixel-space classifier that normalises its input, like the project's models."""

    def __init__(self):
        super().__init__()
        self.register_buffer('mean', torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer('std', torch.full((1, 3, 1, 1), 0.25))
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 4 * 4, NUM_CLASSES))

    def forward(self, x):
        return self.features((x - self.mean) / self.std)


class ScaledLogits(nn.Module):
    """Multiplies a model's logits by ``scale``: same predictions, sharper or softer losses."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x):
        return self.scale * self.model(x)


def train_tiny_cnn(seed: int) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    images, labels = make_images(2048, seed=100 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(images), (128,))
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def trained_model() -> TinyCNN:
    return train_tiny_cnn(seed=0)


@pytest.fixture(scope='module')
def surrogate_model() -> TinyCNN:
    return train_tiny_cnn(seed=1)


@pytest.fixture(scope='module')
def test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_images(256, seed=7)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(dim=-1) != y


# --- agreement with torchattacks -----------------------------------------------------

@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_deterministic_pgd_matches_torchattacks(norm):
    # float64 and a power-of-two batch: torchattacks' mean loss then scales every
    # gradient by an exact power of two, so the sign and direction are bitwise equal.
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x, y = make_images(32, seed=3)
    x = x.double()
    eps, alpha, steps = (0.05, 0.01, 7) if norm == 'Linf' else (0.5, 0.1, 7)
    reference_cls = torchattacks.PGD if norm == 'Linf' else torchattacks.PGDL2
    reference = reference_cls(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = pgd_attack(model, x, y, eps=eps, norm=norm, steps=steps, step_size=alpha, random_start=False)
    assert (reference - x).abs().max() > 0.5 * alpha  # the comparison is not vacuous
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_random_start_pgd_accuracy_matches_torchattacks(trained_model, test_batch, norm):
    # torchattacks' PGDL2 divides by ||grad|| + 1e-10, which stalls on confidently
    # classified samples whose float32 gradients are tinier than that (ours does not,
    # see test_l2_step_has_full_length_for_vanishing_gradients); softened logits keep
    # the gradients of every sample well above the floor so both attacks can agree.
    model = ScaledLogits(trained_model, scale=0.1)
    x, y = test_batch
    eps = MID_LINF_EPS if norm == 'Linf' else MID_L2_EPS
    alpha = 2.5 * eps / 10
    reference_cls = torchattacks.PGD if norm == 'Linf' else torchattacks.PGDL2
    torch.manual_seed(0)
    reference = reference_cls(model, eps=eps, alpha=alpha, steps=10, random_start=True)
    reference_acc = accuracy_under_attack(model, x, y, lambda m, xb, yb: reference(xb, yb))
    our_acc = accuracy_under_attack(model, x, y, partial(pgd_attack, eps=eps, norm=norm, steps=10, generator=seeded()))
    assert 0.1 < reference_acc < 0.9, "eps should leave an intermediate robust accuracy"
    assert abs(our_acc - reference_acc) <= 0.04


# --- threat model ----------------------------------------------------------------------

ATTACKS_BY_NAME = {
    'pgd_linf': (partial(pgd_attack, eps=0.1, steps=5, generator=seeded()), 'Linf', 0.1),
    'pgd_linf_cosine_restarts': (
        partial(pgd_attack, eps=0.1, steps=5, restarts=2, step_schedule='cosine', generator=seeded()),
        'Linf', 0.1),
    'pgd_l2': (partial(pgd_attack, eps=1.0, norm='L2', steps=5, generator=seeded()), 'L2', 1.0),
    'pgd_l2_keep_best': (
        partial(pgd_attack, eps=1.0, norm='L2', steps=5, restarts=2, keep_best=True, generator=seeded()),
        'L2', 1.0),
    'fgsm_rs': (partial(fgsm_rs, eps=0.1, generator=seeded()), 'Linf', 0.1),
}


@pytest.mark.parametrize('name', list(ATTACKS_BY_NAME))
def test_perturbation_stays_in_eps_ball_and_box(trained_model, test_batch, name):
    attack, norm, eps = ATTACKS_BY_NAME[name]
    x, y = test_batch
    x_adv = attack(trained_model, x, y)
    delta = (x_adv - x).flatten(1)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == 'Linf':
        size = delta.abs().amax(dim=1)
        assert size.max() <= eps + 1e-6
    else:
        size = delta.norm(dim=1)
        assert size.max() <= eps * (1 + 1e-5)
    # The attack uses its budget (the box can only trim it for few samples).
    assert (size > 0.9 * eps).float().mean() > 0.8


@pytest.mark.parametrize('attack', [
    partial(pgd_attack, eps=0.0, norm='Linf', restarts=2, keep_best=True, generator=seeded()),
    partial(pgd_attack, eps=0.0, norm='L2', restarts=2, generator=seeded()),
    partial(pgd_attack, eps=0.0, norm='L2', step_size=0.5),
    partial(fgsm_rs, eps=0.0, generator=seeded()),
], ids=['linf', 'l2', 'l2_explicit_step', 'fgsm_rs'])
def test_zero_eps_gives_clean_images_and_accuracy(trained_model, test_batch, attack):
    x, y = test_batch
    x_adv = attack(trained_model, x, y)
    assert torch.equal(x_adv, x)
    assert accuracy_under_attack(trained_model, x, y, attack) == accuracy_under_attack(trained_model, x, y)


def test_l2_step_has_full_length_for_vanishing_gradients(trained_model, test_batch):
    # Overconfident logits make float32 input gradients tiny but non-zero; the step
    # direction must still have unit norm, or the attack is masked by underflow.
    overconfident = ScaledLogits(trained_model, scale=2.0)
    x, y = test_batch
    x = 0.25 + 0.5 * x  # away from the box, so clipping cannot shorten the step
    grad_norms = input_gradient(overconfident, x, y).flatten(1).norm(dim=1)
    tiny = (grad_norms > 0) & (grad_norms < 1e-10)
    assert tiny.sum() > 10
    x_adv = pgd_attack(overconfident, x, y, eps=1.0, norm='L2', steps=1, step_size=0.3, random_start=False)
    step_norms = (x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(step_norms[tiny], torch.full_like(step_norms[tiny], 0.3))


# --- monotonicity ----------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_more_restarts_never_raise_accuracy(trained_model, test_batch, norm):
    x, y = test_batch
    eps = MID_LINF_EPS if norm == 'Linf' else MID_L2_EPS
    attack = partial(pgd_attack, trained_model, x, y, eps=eps, norm=norm, steps=5)
    fooled_by = {r: fooled(trained_model, attack(restarts=r, generator=seeded(3)), y) for r in (1, 4)}
    # Restart 0 is the same in both runs and the worst case is kept: holds per sample.
    assert torch.all(fooled_by[4] >= fooled_by[1])
    assert fooled_by[4].sum() > fooled_by[1].sum()  # restarts help on this batch


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_more_steps_never_raise_accuracy_when_keeping_the_best_iterate(trained_model, test_batch, norm):
    x, y = test_batch
    eps = MID_LINF_EPS if norm == 'Linf' else MID_L2_EPS
    # A fixed step size makes the 3-step run a prefix of the 12-step run.
    attack = partial(pgd_attack, trained_model, x, y, eps=eps, norm=norm, step_size=eps / 4, keep_best=True)
    fooled_by = {steps: fooled(trained_model, attack(steps=steps, generator=seeded(5)), y) for steps in (3, 12)}
    assert torch.all(fooled_by[12] >= fooled_by[3])
    assert fooled_by[12].sum() > fooled_by[3].sum()


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_keep_best_returns_the_strongest_iterate(trained_model, test_batch, norm):
    x, y = test_batch
    eps = MID_LINF_EPS if norm == 'Linf' else MID_L2_EPS
    # Deterministic and a large fixed step, so the iterates oscillate; the plain run
    # with k steps then ends at iterate k of the 6-step run.
    attack = partial(pgd_attack, trained_model, x, y, eps=eps, norm=norm, step_size=eps, random_start=False)
    iterates = torch.stack([attack(steps=k) for k in range(7)])
    best = attack(steps=6, keep_best=True)
    with torch.no_grad():
        iterate_losses = torch.stack([F.cross_entropy(trained_model(it), y, reduction='none') for it in iterates])
        iterate_fooled = torch.stack([fooled(trained_model, it, y) for it in iterates])
        loss_best = F.cross_entropy(trained_model(best), y, reduction='none')
    assert torch.equal(fooled(trained_model, best, y), iterate_fooled.any(dim=0))
    never_fooled = ~iterate_fooled.any(dim=0)
    torch.testing.assert_close(loss_best[never_fooled], iterate_losses.amax(dim=0)[never_fooled])
    # The check above is not vacuous: the last iterate is not always the strongest.
    assert (iterate_fooled[:-1].any(dim=0) & ~iterate_fooled[-1]).any() or \
        (iterate_losses[:-1].amax(dim=0) > iterate_losses[-1])[never_fooled].any()


# --- strength, surrogate gradients and side effects -------------------------------------

@pytest.mark.parametrize('attack', [
    partial(pgd_attack, eps=0.5, norm='Linf'),
    partial(pgd_attack, eps=8.0, norm='L2', steps=20),
    partial(fgsm_rs, eps=0.5, generator=seeded()),
], ids=['pgd_linf', 'pgd_l2', 'fgsm_rs'])
def test_large_eps_breaks_a_trained_model(trained_model, test_batch, attack):
    x, y = test_batch
    assert accuracy_under_attack(trained_model, x, y) > 0.95
    assert accuracy_under_attack(trained_model, x, y, attack, batch_size=100) <= 0.01


def test_surrogate_gradients_transfer_but_are_weaker_than_white_box(trained_model, surrogate_model, test_batch):
    x, y = test_batch
    attack = partial(pgd_attack, trained_model, x, y, eps=0.25, steps=10)
    white_box = attack(generator=seeded())
    transfer = attack(grad_model=surrogate_model, generator=seeded())
    # Without selection, the transfer attack is the surrogate's own white-box attack.
    assert torch.equal(transfer, pgd_attack(surrogate_model, x, y, eps=0.25, steps=10, generator=seeded()))
    assert not torch.allclose(transfer, white_box)
    clean_acc = accuracy_under_attack(trained_model, x, y)
    transfer_acc = 1 - fooled(trained_model, transfer, y).float().mean().item()
    white_box_acc = 1 - fooled(trained_model, white_box, y).float().mean().item()
    assert white_box_acc < transfer_acc < clean_acc - 0.1


class RecordingModel(nn.Module):
    """Wraps a model and records whether autograd was on for each forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.grad_enabled_calls: list[bool] = []

    def forward(self, x):
        self.grad_enabled_calls.append(torch.is_grad_enabled() and x.requires_grad)
        return self.model(x)


def test_surrogate_attack_only_evaluates_the_target(trained_model, surrogate_model, test_batch):
    x, y = test_batch
    target, surrogate = RecordingModel(trained_model), RecordingModel(surrogate_model)
    pgd_attack(target, x, y, eps=0.1, steps=3, restarts=2, keep_best=True, grad_model=surrogate, generator=seeded())
    assert len(target.grad_enabled_calls) == 2 * (3 + 1) and not any(target.grad_enabled_calls)
    assert len(surrogate.grad_enabled_calls) == 2 * 3 and all(surrogate.grad_enabled_calls)


@pytest.mark.parametrize('training', [False, True])
def test_attack_leaves_model_untouched(trained_model, test_batch, training):
    model = copy.deepcopy(trained_model).train(training).requires_grad_(True)
    first_conv, second_conv = model.features[0], model.features[2]
    first_conv.weight.requires_grad_(False)
    second_conv.weight.grad = torch.full_like(second_conv.weight, 0.5)
    state_before = copy.deepcopy(model.state_dict())
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    x, y = test_batch

    pgd_attack(model, x, y, eps=0.1, norm='L2', restarts=2, keep_best=True, generator=seeded())
    fgsm_rs(model, x, y, eps=0.1, generator=seeded())
    with torch.no_grad():  # attacks must still get gradients inside evaluation loops
        x_adv = pgd_attack(model, x, y, eps=0.1, steps=3, generator=seeded())
    assert torch.equal(x_adv, pgd_attack(model, x, y, eps=0.1, steps=3, generator=seeded()))

    assert all(module.training == training for module in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad_before
    for name, value in model.state_dict().items():
        assert torch.equal(value, state_before[name]), name
    assert torch.equal(second_conv.weight.grad, torch.full_like(second_conv.weight, 0.5))
    assert all(p.grad is None for p in model.parameters() if p is not second_conv.weight)


def test_generator_makes_random_start_reproducible(trained_model, test_batch):
    x, y = test_batch
    attack = partial(pgd_attack, trained_model, x, y, eps=0.1, norm='L2', steps=2)
    assert torch.equal(attack(generator=seeded(1)), attack(generator=seeded(1)))
    assert not torch.equal(attack(generator=seeded(1)), attack(generator=seeded(2)))


def test_cosine_schedule_halves_the_middle_step(trained_model, test_batch):
    x, y = test_batch
    eps, alpha = 0.1, 0.02
    ours = pgd_attack(trained_model, x, y, eps=eps, steps=2, step_size=alpha,
                      random_start=False, step_schedule='cosine')
    # alpha_t = alpha * (1 + cos(pi * t / 2)) / 2: alpha, then alpha / 2.
    x_1 = (x + alpha * input_gradient(trained_model, x, y).sign()).clamp(0, 1)
    x_2 = (x_1 + alpha / 2 * input_gradient(trained_model, x_1, y).sign()).clamp(0, 1)
    torch.testing.assert_close(ours, x_2, rtol=0, atol=1e-6)


def test_custom_loss_fn_is_maximised(trained_model, test_batch):
    # TRADES-style KL divergence to the clean prediction (softened logits, as in training).
    model = ScaledLogits(trained_model, scale=0.1)
    x, y = test_batch
    with torch.no_grad():
        clean_probs = model(x).softmax(dim=-1)

    def kl_to_clean(logits, _):
        return F.kl_div(logits.log_softmax(dim=-1), clean_probs, reduction='none').sum(dim=-1)

    attack = partial(pgd_attack, model, x, y, eps=0.05, loss_fn=kl_to_clean)
    with torch.no_grad():
        kl_at_random_start = kl_to_clean(model(attack(steps=0, generator=seeded())), y)
        kl_after_attack = kl_to_clean(model(attack(steps=10, generator=seeded())), y)
    assert kl_after_attack.mean() > 10 * kl_at_random_start.mean()
    assert (kl_after_attack > kl_at_random_start).float().mean() > 0.95


# --- argument validation -----------------------------------------------------------------

@pytest.mark.parametrize('change, message', [
    (dict(norm='L1'), 'unknown norm'),
    (dict(eps=-0.1), 'eps must be'),
    (dict(eps=float('nan')), 'eps must be'),
    (dict(steps=-1), 'steps must be'),
    (dict(restarts=0), 'restarts must be'),
    (dict(restarts=3, random_start=False), 'random_start'),
    (dict(step_schedule='linear'), 'unknown step_schedule'),
    (dict(step_size=-1.0), 'step_size must be'),
    (dict(x_scale=float('nan')), 'NaN or infinite'),
    (dict(x_scale=2.0), r'\[0, 1\] pixel space'),
    (dict(x_shift=-0.5), r'\[0, 1\] pixel space'),
    (dict(y_dtype=torch.float32), 'integer tensor of labels'),
    (dict(y_length=3), 'integer tensor of labels'),
    (dict(loss_fn=lambda logits, y: F.cross_entropy(logits, y)), 'one loss per sample'),
])
def test_invalid_arguments_raise_clear_errors(trained_model, change, message):
    x, y = make_images(8, seed=11)
    x = x * change.pop('x_scale', 1.0) + change.pop('x_shift', 0.0)
    y = y[:change.pop('y_length', len(y))].to(change.pop('y_dtype', torch.long))
    kwargs = dict(eps=0.1, steps=2) | change
    with pytest.raises(ValueError, match=message):
        pgd_attack(trained_model, x, y, **kwargs)


def test_accuracy_under_attack_rejects_bad_batches(trained_model):
    x, y = make_images(8, seed=11)
    with pytest.raises(ValueError, match='batch_size'):
        accuracy_under_attack(trained_model, x, y, batch_size=0)
    with pytest.raises(ValueError, match='at least one sample'):
        accuracy_under_attack(trained_model, x[:0], y[:0])


# --- adaptive attack through EDL layers ----------------------------------------------------

def test_input_gradient_through_edl_layers_matches_finite_differences():
    from timm_edl.layers import EDLConv2d

    torch.manual_seed(0)
    # beta < 1 turns on the reweighting; 3 unrolled steps with lam > 0 exercise the thresholding.
    model = nn.Sequential(
        EDLConv2d(3, 6, 3, num_steps=3, beta=0.5, lam=0.05),
        nn.ReLU(),
        EDLConv2d(6, 8, 3, stride=2, num_steps=3, beta=0.7, lam=0.05),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, NUM_CLASSES),
    ).double().eval()
    x, y = make_images(4, seed=13)
    x = x.double()
    grad = input_gradient(model, x, y)
    assert grad.abs().sum() > 0

    direction = torch.randn(x.shape, generator=seeded(0), dtype=torch.float64)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    autograd_derivative = (grad * direction).flatten(1).sum(dim=1)

    # The network is only piecewise smooth (thresholding, the |r| floor, ReLU): a
    # central difference whose interval straddles a kink is off, so a sample passes
    # when one of several step sizes agrees. A gradient that skips unrolled steps
    # (detach, no_grad) is wrong at every step size.
    agrees = torch.zeros(len(x), dtype=torch.bool)
    for h in (1e-6, 1e-7, 1e-8):
        with torch.no_grad():
            loss_plus = F.cross_entropy(model(x + h * direction), y, reduction='none')
            loss_minus = F.cross_entropy(model(x - h * direction), y, reduction='none')
        finite_difference = (loss_plus - loss_minus) / (2 * h)
        agrees |= torch.isclose(autograd_derivative, finite_difference, rtol=1e-5, atol=1e-9)
    assert agrees.all(), (autograd_derivative, finite_difference)


def test_attacks_freeze_parameters_while_crafting_and_restore_them():
    """The input gradient needs no parameter gradient: a hand-written backward (the fused
    EDL step) decides from requires_grad alone, so attacks freeze the parameters while
    they differentiate, and restore every flag afterwards (frozen ones stay frozen)."""
    from timm_edl.attacks import input_gradient, pgd_attack
    from timm_edl.layers import EDLConv2d
    torch.manual_seed(0)
    model = nn.Sequential(EDLConv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model[2].bias.requires_grad_(False)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m.weight.requires_grad))
    before = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(2, 3, 6, 6), torch.tensor([0, 2])
    g = input_gradient(model, x, y)
    pgd_attack(model, x, y, eps=0.1, steps=2)
    assert seen and not any(seen)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    # the same gradient as plain autograd with the parameters trainable
    xr = x.clone().requires_grad_(True)
    ref, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction='sum'), xr)
    assert torch.allclose(g, ref, atol=1e-6)
