#!/usr/bin/env python
"""``make release-gpu``: one short GPU loan -> adversarially trained, evaluated, Hub-ready
CIFAR-10-JPEG weights of ``edlnet_resnet18`` and of its conv twin.

    bash experiments/release_gpu.sh --budget-min 8 --pack $OUT   # the device machine: bootstrap, then this
    python experiments/release_gpu.py --device cuda --budget-min 8
    python experiments/release_gpu.py --device cpu --toy        # the same code path at toy size (CI, < 2 min)

Within ``--budget-min`` minutes of wall time (counted from the end of data loading):

1. **data**: CIFAR-10-JPEG (``--dataset cifar10-jpeg``, the default: the archives the bootstrap
   carries in ``.data/cifar10-jpeg/``; ``--dataset cifar10 --data-dir DIR`` for the real data) is
   decoded once into one uint8 tensor on the device; random crops (4-pixel zero padding, as
   ``timm_edl.data.train_transforms``) and flips are drawn per batch on the device from a seeded
   device generator; the first ``--val-n`` images of a fixed permutation are held out for
   validation;
2. **plan**: times a few training steps and attack passes of both models on the device and
   picks the number of epochs E so that training both for E epochs and evaluating both fits
   the budget, training getting at least ``--min-train-share`` (0.4) of it (the AutoAttack
   estimate assumes 85 % clean and 50 % robust accuracy and the
   attacks' pass counts in ``AA_PASSES``); the calibration's weight updates are undone; after the
   PGD-20 evaluation the AutoAttack size is re-checked against the measured accuracies and the
   time left;
3. **training**: ``edlnet_resnet18`` and its conv twin (``edl_layers='none'``) with the same
   recipe and seed: fast adversarial training (FGSM-RS), SGD with a cyclic learning rate (0 ->
   ``--lr-max`` at 2/5 of the run -> 0), weight decay 5e-4, the two-stage beta schedule
   (vanilla DL for the first 3/4 of the epochs, then elastic; the trainer's
   ``elastic_from_epoch``), PGD-10 validation on the held-out images after every epoch, keeping
   the best weights (a guard against catastrophic overfitting, Wong et al. 2020, sec. 5). The
   twin trains exactly the epochs the EDLNet got (the EDLNet trains first; if it has to stop
   early, so does the twin);
4. **evaluation** with the project's own :func:`timm_edl.evaluation.evaluate`, in float32:
   clean + PGD-20 on the whole test set with the gradient-masking checks (PGD ladder, large-eps
   sweep, gradients vs finite differences), then AutoAttack standard (+ PGD-20, for the
   ordering check) on the first ``--aa-n`` test points (fewer only if the time left cannot
   hold them; ``release.json`` then says how many);
5. **export**: Hub-ready folders (:func:`timm_edl.hub.export`: model.safetensors, config.json,
   a card with both evaluations) and ``release.json`` with the plan, per-epoch history, the
   numbers, images/s for training and for each attack, the device and the versions. They are
   written (and packed, ``--pack``) once after the PGD-20 evaluation and again after AutoAttack,
   so that a run killed during AutoAttack still leaves weights and numbers behind.

Why FGSM-RS (fast adversarial training, Wong, Rice and Kolter, ICLR 2020)
--------------------------------------------------------------------------
The budget is minutes, so the training method is chosen by robustness per unit of compute.
An FGSM-RS step costs one input-gradient pass plus the training forward/backward (about 5
forward-equivalents); PGD-10 AT costs ten input-gradient passes plus the same (about 23), so
FGSM-RS gets about 4.6x the epochs in the same time. Wong et al. report that FGSM with a
uniform random start and step 1.25 eps (10/255 at eps 8/255), with a cyclic learning rate and
mixed precision, trains a CIFAR-10 PreAct ResNet-18 to 45 % PGD accuracy at eps 8/255 in 6
minutes on one GPU, where "free" adversarial training took 10 hours to reach the same level
(their abstract); AutoAttack later put that fast-AT model at about 43 % (Croce & Hein 2020;
RobustBench entry Wong2020Fast), a few points under multi-step PGD-AT models of the same size
that cost several times more. Its known failure, catastrophic overfitting (PGD accuracy
collapsing to ~0 within an epoch), appears mainly with larger steps or longer schedules; the
per-epoch PGD validation with best-weight selection catches it here. GradAlign (Andriushchenko
& Flammarion 2020) prevents it but roughly triples the step's cost; TRADES and AWP start from
PGD-AT's cost and add to it (a clean forward; a second forward/backward per step), paying off
over long schedules (they are in ``recipes/`` for the accelerate trainer). The two-stage EDL
schedule (vanilla, then elastic from 3/4 of the run) is the one of the fast recipe
(``recipes/edlnet_resnet18_cifar10_fast.yaml``, elastic from epoch 30 of 40). Batch 512 and ``--lr-max 0.4`` are our choice for a large GPU
(Wong et al. used batch 128 with a peak of 0.2); they were not tuned here.

Throughput
----------
bf16 autocast on CUDA (``--amp bf16``; the EDL layers run their whole solver in the autocast
dtype, step sizes stay float32), channels_last, the data tensor on the device (no loader, no
host-to-device copies per batch), ``torch.compile`` of the model with ``--compile`` (eager is
the default and the reference; ``release.json`` records which ran; compiling happens in the
calibration's warm-up steps and counts against the budget; dynamo traced the EDL model with
graph breaks at the step-size refresh, seen with ``backend='eager'`` on a CPU, while inductor
itself has not run on it here), and no host
synchronisation inside the step: losses and accuracy counts are summed on the device and
read once per epoch; the budget check reads the host clock. (On an accelerator the EDL layers
read nothing back either, their step-size refresh included: ``tests/test_layer.py`` runs them
on the meta device; ``tests/test_release_gpu.py`` checks that nothing outside them reads a value
in the step.) Evaluation runs in float32 (TF32 convolutions on CUDA, cuDNN's default).

Everything here also runs on the CPU (``--device cpu``); ``--toy`` shrinks every size (widths
8-64, 256 training images, 64 test points, 16 AutoAttack points with APGD-CE only,
at most 2 epochs, a 5-minute budget) so that CI runs the whole path in about a minute. bf16
autocast is on for the CPU too unless ``--amp none``: that is what makes the CPU run catch dtype
mistakes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: Minimum versions the release run needs (the device machine has torch 2.11, timm, accelerate
#: 1.15, huggingface_hub 1.33, safetensors; pyautoattack travels as a wheel).
REQUIREMENTS = {'torch': '2.11', 'timm': '1.0.31', 'accelerate': '0.30', 'huggingface-hub': '0.23',
                'safetensors': '0.4', 'pyautoattack': '0.2', 'numpy': '1.21', 'pyyaml': '5.1'}

#: Cost of each AutoAttack attack per point it attacks, in input-gradient passes (standard
#: settings): APGD-CE / APGD-DLR 100 iterations (+1); APGD-T and FAB-T 9 target classes x 100;
#: FAB 100; Square 5000 forward queries (~2500 gradient-pass equivalents).  The first attack runs
#: on the clean-correct points, the others on those still robust.
AA_PASSES = {'apgd-ce': 101, 'apgd-dlr': 101, 'apgd-t': 900, 'fab': 100, 'fab-t': 900, 'square': 2500}
AA_STANDARD = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
#: Assumed for the plan, before any model is trained: 85 % clean, 50 % robust (CIFAR-10 AT models
#: reach about 80-85 % and 40-50 %); standard AutoAttack then costs ~2240 passes per point.
PLAN_CLEAN, PLAN_ROBUST = 0.85, 0.5
#: Margin on the measured AutoAttack estimate (its later attacks run on the few robust points,
#: in smaller, less efficient batches than the PGD evaluation the estimate is timed on).
AA_SAFETY = 1.5
#: Input-gradient passes per point of the other evaluation parts: clean (1) + PGD-20 (20) on the
#: whole test set; on check_n points the ladder (PGD-4, PGD-40 x 2) and the large-eps sweep (20).
PGD_PASSES = 21
CHECK_PASSES = 4 + 80 + 20


# --------------------------------------------------------------------------- arguments


def _fraction(text: str) -> float:
    return float(Fraction(text)) if '/' in text else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu')
    p.add_argument('--budget-min', type=float, default=None,
                   help='wall-clock minutes for planning + training + evaluation + export (default 8: with the '
                        'bootstrap and the data it fits the 10-minute limit of one device command; toy 5)')
    p.add_argument('--dataset', default='cifar10-jpeg', help='cifar10-jpeg (default) or cifar10')
    p.add_argument('--data-dir', default=None, help='folder with the dataset (default: .data)')
    p.add_argument('--out', default=None, help='output folder (default: runs/release-<date>-<time>)')
    p.add_argument('--toy', action='store_true', help='tiny sizes: the CI run of the same code path')
    p.add_argument('--amp', default='bf16', choices=('bf16', 'none'), help='autocast dtype of training')
    p.add_argument('--compile', action='store_true', help='torch.compile the models for training (eager otherwise)')
    p.add_argument('--no-channels-last', action='store_true', help='keep NCHW memory format')
    p.add_argument('--batch-size', type=int, default=None, help='training batch (default 512; toy 32)')
    p.add_argument('--lr-max', type=float, default=0.4, help='peak of the cyclic learning rate')
    p.add_argument('--eps', default='8/255', help='Linf radius for training and evaluation')
    p.add_argument('--alpha', default='10/255', help='FGSM-RS step (1.25 eps)')
    p.add_argument('--craft-bn', default='eval', choices=('eval', 'train'),
                   help="BatchNorm while crafting (as the trainer's craft_bn)")
    p.add_argument('--min-epochs', type=int, default=1)
    p.add_argument('--min-train-share', type=float, default=0.4,
                   help='training gets at least this share of the time left after calibration; the AutoAttack '
                        'points are cut instead when the evaluation estimate would take more')
    p.add_argument('--max-epochs', type=int, default=None, help='cap on the planned epochs (default 40; toy 2)')
    p.add_argument('--epochs', type=int, default=None, help='fix the number of epochs instead of planning it')
    p.add_argument('--val-n', type=int, default=None, help='held-out training images for validation (1000; toy 32)')
    p.add_argument('--test-n', type=int, default=None, help='test points for clean + PGD-20 (all; toy 64)')
    p.add_argument('--aa-n', type=int, default=None, help='first test points for AutoAttack (1000; toy 16)')
    p.add_argument('--eval-batch', type=int, default=None, help='evaluation batch (1000 on CUDA, 100 on CPU; toy 64)')
    p.add_argument('--aa-attacks', default=None,
                   help="AutoAttack 'custom' with these attacks (comma list) instead of 'standard' (toy: apgd-ce)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--check-env', action='store_true', help='check the installed versions (and the device), then exit')
    p.add_argument('--pack', default=None, metavar='DIR',
                   help="also pack the results for a transfer that takes few, small files (the device tool's $OUT: "
                        "at most 8 files of 16 MiB): see pack()")
    args = p.parse_args(argv)
    toy = args.toy
    defaults = dict(budget_min=5.0 if toy else 8.0, aa_attacks='apgd-ce' if toy else None,
                    batch_size=32 if toy else 512, max_epochs=2 if toy else 40,
                    val_n=32 if toy else 1000, test_n=64 if toy else None, aa_n=16 if toy else 1000,
                    eval_batch=64 if toy else (1000 if args.device.startswith('cuda') else 100))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eps_value, args.alpha_value = _fraction(args.eps), _fraction(args.alpha)
    unknown = [a for a in (args.aa_attacks or '').split(',') if a.strip() and a.strip() not in AA_PASSES]
    if unknown:
        p.error(f"--aa-attacks: unknown {unknown}; choose from {', '.join(AA_PASSES)}")
    if not 0.0 <= args.min_train_share < 1.0:
        p.error('--min-train-share must lie in [0, 1)')
    if args.budget_min <= 0 or args.batch_size < 1 or args.min_epochs < 1 or args.max_epochs < args.min_epochs:
        p.error('need --budget-min > 0, --batch-size >= 1 and 1 <= --min-epochs <= --max-epochs')
    if args.out is None:
        args.out = str(ROOT / time.strftime('runs/release-%Y%m%d-%H%M%S'))
    return args


# --------------------------------------------------------------------------- environment


def _version_tuple(text: str) -> Tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '1.0.31.dev0' -> (1, 0, 31); '2.12.0rc1' -> (2, 12, 0)."""
    import re
    parts = []
    for piece in text.split('+')[0].split('.'):
        match = re.match(r'\d+', piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts)


def check_environment(device: str) -> Dict[str, Any]:
    """Installed versions against :data:`REQUIREMENTS`, and the device; raises SystemExit with
    every problem at once."""
    from importlib import metadata
    versions: Dict[str, Optional[str]] = {'python': platform.python_version()}
    problems = []
    for dist, minimum in REQUIREMENTS.items():
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
            problems.append(f'{dist} is not installed (need >= {minimum})')
            continue
        if _version_tuple(versions[dist]) < _version_tuple(minimum):
            problems.append(f'{dist} {versions[dist]} is older than {minimum}')
    try:
        versions['timm-edl'] = metadata.version('timm-edl')
    except metadata.PackageNotFoundError:
        versions['timm-edl'] = None
    import torch
    info: Dict[str, Any] = {'versions': versions, 'device': device}
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            problems.append(f'--device {device}: CUDA is not available')
        else:
            index = torch.device(device).index or 0
            info.update(gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                        capability=list(torch.cuda.get_device_capability(index)),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
                        bf16_supported=torch.cuda.is_bf16_supported())
    info['cpu'] = platform.processor() or platform.machine()
    info['cpu_count'] = os.cpu_count()
    if problems:
        raise SystemExit('release: environment check failed:\n  ' + '\n  '.join(problems))
    return info


# --------------------------------------------------------------------------- data on the device


class DeviceData:
    """A split held as one uint8 tensor on the device; batches are cropped and flipped there."""

    def __init__(self, images, labels, device, pad: int = 4, flip: bool = True, channels_last: bool = True):
        import torch
        import torch.nn.functional as F
        self.images = images.to(device)                    # (N, C, H, W) uint8
        self.labels = labels.to(device=device, dtype=torch.long)
        self.pad, self.flip, self.channels_last = pad, flip, channels_last
        self.padded = F.pad(self.images, (pad, pad, pad, pad)) if pad else self.images
        _, c, h, w = self.images.shape
        self.shape = (c, h, w)
        self.rows = torch.arange(h, device=device)
        self.cols = torch.arange(w, device=device)

    def __len__(self) -> int:
        return len(self.labels)

    def _float(self, images):
        import torch
        x = images.float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, index, generator, augment: bool = True):
        """``(x, y)`` on the device: x float32 in [0, 1]; no host synchronisation."""
        import torch
        if not augment:
            return self._float(self.images[index]), self.labels[index]
        c, h, w = self.shape
        n, p = len(index), self.pad
        images = self.padded[index]                                         # (n, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=images.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=images.device)
        rows = (dy[:, None] + self.rows[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        images = images.gather(2, rows)
        cols = (dx[:, None] + self.cols[None]).view(n, 1, 1, w).expand(n, c, h, w)
        images = images.gather(3, cols)
        if self.flip:
            flip = torch.rand(n, generator=generator, device=images.device) < 0.5
            images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
        return self._float(images), self.labels[index]


def load_data(args, device):
    """(train DeviceData, val DeviceData, test x (CPU float), test y, DatasetInfo, n_test_total)."""
    import torch
    from timm_edl import data as D
    train = D.get_dataset(args.dataset, args.data_dir, 'train')
    if not isinstance(train, D.InMemoryImageDataset):
        raise SystemExit(f'release: {args.dataset} is not an in-memory dataset (use cifar10-jpeg or cifar10)')
    info = train.info
    images, labels = train.images, train.labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20250202))
    val_idx, train_idx = order[:args.val_n].sort().values, order[args.val_n:].sort().values
    if args.toy:
        train_idx = train_idx[:256]
    channels_last = not args.no_channels_last
    train_data = DeviceData(images[train_idx], labels[train_idx], device, channels_last=channels_last,
                            flip=info.horizontal_flip)
    val_data = DeviceData(images[val_idx], labels[val_idx], device, pad=0, flip=False,
                          channels_last=channels_last)
    n_total = len(D.get_dataset(args.dataset, args.data_dir, 'test'))
    x_test, y_test = D.load_tensors(args.dataset, args.data_dir, 'test', n_ex=args.test_n)
    return train_data, val_data, x_test, y_test, info, n_total


# --------------------------------------------------------------------------- models and the step


MODELS = (('edlnet', 'default'), ('conv_twin', 'none'))


def build_model(edl_layers: str, info, toy: bool, device, channels_last: bool, seed: int):
    import timm
    import torch
    import timm_edl  # noqa: F401  (registers edlnet_*)
    torch.manual_seed(seed)  # the same initial weights for the same seed
    kwargs: Dict[str, Any] = dict(num_classes=info.num_classes, in_chans=info.in_chans,
                                  input_mean=tuple(info.mean), input_std=tuple(info.std), edl_layers=edl_layers)
    if toy:
        kwargs['widths'] = (8, 16, 32, 64)
    model = timm.create_model('edlnet_resnet18', **kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast_context(device, amp: str) -> Callable[[], Any]:
    import torch
    if amp == 'bf16':
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def fgsm_rs_step(model, raw, optimizer, x, y, *, eps: float, alpha: float, generator, autocast,
                 craft_bn: str = 'eval'):
    """One fast-AT step (FGSM with a uniform random start, Wong et al. 2020); returns device
    tensors ``(loss, number correct on the adversarial batch)`` without synchronising.

    ``model`` is what is called (eager or compiled), ``raw`` the module whose modes and
    parameters are switched.  Written out here rather than through ``timm_edl.attacks.fgsm_rs``,
    whose input checks (finite, in [0, 1]) read values on the host.
    """
    import torch
    import torch.nn.functional as F
    from timm_edl.attacks import frozen_parameters
    from timm_edl.train.objectives import crafting_mode
    delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2 * eps).sub_(eps)
    x0 = (x + delta).clamp_(0.0, 1.0).requires_grad_(True)
    with crafting_mode(raw, craft_bn), frozen_parameters(raw):
        with autocast():
            logits = model(x0)
        loss = F.cross_entropy(logits.float(), y)
        grad, = torch.autograd.grad(loss, x0)
    x_adv = torch.minimum(torch.maximum(x0.detach() + alpha * grad.sign(), x - eps), x + eps).clamp_(0.0, 1.0)
    raw.train()
    with autocast():
        logits = model(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def make_optimizer(raw, lr: float):
    import torch
    from timm_edl.train.trainer import param_groups
    return torch.optim.SGD(param_groups(raw, 5e-4), lr=lr, momentum=0.9, nesterov=True)


def cyclic_lr(progress: float, lr_max: float) -> float:
    """Wong et al.'s cyclic schedule: linear 0 -> lr_max over the first 2/5, then -> 0."""
    peak = 0.4
    if progress <= peak:
        return lr_max * progress / peak
    return lr_max * max(0.0, (1.0 - progress) / (1.0 - peak))


def _sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def input_gradient_seconds(raw, data: DeviceData, batch: int, device, reps: int) -> float:
    """Seconds per image of one float32 input-gradient pass (eval mode, parameters frozen):
    the unit of the evaluation's cost."""
    import torch
    import torch.nn.functional as F
    from timm_edl.attacks import frozen_parameters
    index = torch.arange(min(batch, len(data)), device=device)
    x, y = data.batch(index, None, augment=False)
    was = raw.training
    raw.eval()
    times = []
    with frozen_parameters(raw):
        for i in range(reps + 1):
            _sync(device)
            t = time.perf_counter()
            xi = x.clone().requires_grad_(True)
            loss = F.cross_entropy(raw(xi).float(), y)
            torch.autograd.grad(loss, xi)
            _sync(device)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t)
    raw.train(was)
    return min(times) / len(index)


def calibrate(name: str, model, raw, data: DeviceData, args, device, autocast, generator) -> Dict[str, Any]:
    """Seconds per training step and per input-gradient image; the weights, the BatchNorm
    statistics and the EDL step sizes are put back afterwards (the optimizer is thrown away)."""
    import torch
    snapshot = copy.deepcopy(raw.state_dict())
    optimizer = make_optimizer(raw, 0.0)
    warmup, reps = (1, 2) if args.toy else (3, 6)
    times = []
    index = torch.arange(args.batch_size, device=device)
    x, y = data.batch(index, generator)
    for i in range(warmup + reps):
        _sync(device)
        t = time.perf_counter()
        fgsm_rs_step(model, raw, optimizer, x, y, eps=args.eps_value, alpha=args.alpha_value, generator=generator,
                     autocast=autocast, craft_bn=args.craft_bn)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    raw.load_state_dict(snapshot)
    step = sorted(times)[len(times) // 2]
    grad = input_gradient_seconds(raw, data, args.eval_batch, device, reps=1 if args.toy else 3)
    return {'model': name, 'step_seconds': step, 'train_images_per_s': args.batch_size / step,
            'input_grad_seconds_per_image': grad, 'input_grad_images_per_s': 1.0 / grad,
            'warmup_steps': warmup, 'timed_steps': reps}


def aa_attacks(args) -> Tuple[str, ...]:
    if args.aa_attacks:
        return tuple(a.strip() for a in args.aa_attacks.split(',') if a.strip())
    return AA_STANDARD


def aa_passes_per_point(attacks, clean: float, robust: float) -> float:
    """Expected input-gradient passes per point of AutoAttack (+ its PGD-20) for a model with
    these clean and robust accuracies."""
    first, rest = AA_PASSES[attacks[0]], sum(AA_PASSES[a] for a in attacks[1:])
    return clean * first + robust * rest + 21


def eval_seconds_estimate(cal: Dict[str, Any], n_test: int, aa_n: int, check_n: int, attacks) -> float:
    g = cal['input_grad_seconds_per_image']
    return g * (n_test * PGD_PASSES + check_n * CHECK_PASSES
                + AA_SAFETY * aa_n * aa_passes_per_point(attacks, PLAN_CLEAN, PLAN_ROBUST))


def validate(raw, data: DeviceData, args, device, autocast) -> Dict[str, float]:
    """Clean and PGD-10 (step 2.5 eps / 10, one restart) accuracy on the held-out images."""
    import torch
    from functools import partial
    from timm_edl.attacks import accuracy_under_attack, frozen_parameters, pgd_attack
    x, y = data.batch(torch.arange(len(data), device=device), None, augment=False)
    generator = torch.Generator(device=device).manual_seed(args.seed + 3)
    attack = partial(pgd_attack, eps=args.eps_value, steps=10, random_start=True, generator=generator)
    was = raw.training
    raw.eval()
    with frozen_parameters(raw), autocast():
        clean = accuracy_under_attack(raw, x, y, None, batch_size=args.eval_batch)
        robust = accuracy_under_attack(raw, x, y, attack, batch_size=args.eval_batch)
    raw.train(was)
    return {'val_clean': clean, 'val_pgd10': robust}


def train_model(name: str, model, raw, data: DeviceData, val: DeviceData, args, device, autocast, *,
                planned_epochs: int, max_epochs: int, deadline: float, log) -> Dict[str, Any]:
    """Fast AT for ``planned_epochs`` (the LR schedule's length), stopping after ``max_epochs``
    or when the next epoch would pass ``deadline`` (host clock); keeps the best validation
    weights (PGD-10) and loads them at the end."""
    import torch
    from timm_edl.layers.edl import edl_layers, set_beta_mode
    has_edl = bool(edl_layers(raw))
    elastic_from = max(1, int(0.75 * planned_epochs)) if planned_epochs > 1 else planned_epochs
    optimizer = make_optimizer(raw, 0.0)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    n, bs = len(data), args.batch_size
    steps = n // bs
    history: List[Dict[str, Any]] = []
    best: Optional[Tuple[float, int, Dict[str, torch.Tensor]]] = None
    train_seconds, images = 0.0, 0
    stopped = None
    for epoch in range(planned_epochs):
        if epoch >= max_epochs:
            stopped = f'stopped after {max_epochs} epochs (as the EDLNet)'
            break
        per_epoch = (train_seconds / epoch) if epoch else 0.0
        if epoch and time.perf_counter() + per_epoch > deadline:
            stopped = f'budget: stopped after {epoch} of {planned_epochs} planned epochs'
            break
        stage = None
        if has_edl:
            stage = 'vanilla' if epoch < elastic_from else 'elastic'
            set_beta_mode(raw, stage)
        raw.train()
        perm = torch.randperm(n, generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        _sync(device)
        t0 = time.perf_counter()
        done_steps = 0
        for b in range(steps):
            lr = cyclic_lr((epoch * steps + b + 1) / (planned_epochs * steps), args.lr_max)
            for group in optimizer.param_groups:
                group['lr'] = lr
            x, y = data.batch(perm[b * bs:(b + 1) * bs], generator)
            loss, hits = fgsm_rs_step(model, raw, optimizer, x, y, eps=args.eps_value, alpha=args.alpha_value,
                                      generator=generator, autocast=autocast, craft_bn=args.craft_bn)
            loss_sum += loss
            correct += hits
            done_steps += 1
            if time.perf_counter() > deadline + 0.1 * max(per_epoch, 1.0):  # far behind plan: stop mid-epoch
                stopped = f'budget: stopped in epoch {epoch + 1} after {b + 1} of {steps} steps'
                break
        _sync(device)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images += done_steps * bs
        row = {'epoch': epoch + 1, 'stage': stage or 'none', 'lr_end': lr, 'train_seconds': round(seconds, 3),
               'train_images_per_s': round(done_steps * bs / seconds, 1),
               'train_loss': float(loss_sum) / max(done_steps, 1),
               'train_fgsm_acc': float(correct) / max(done_steps * bs, 1)}
        t1 = time.perf_counter()
        row.update(validate(raw, val, args, device, autocast))
        row['val_seconds'] = round(time.perf_counter() - t1, 3)
        if has_edl:
            betas = [float(layer.beta.detach().clamp(0, 1)) for _, layer in edl_layers(raw)]
            row['beta_mean'] = sum(betas) / len(betas)
        history.append(row)
        log(f"[{name}] epoch {epoch + 1}/{planned_epochs} [{row['stage']}] loss {row['train_loss']:.3f} "
            f"FGSM-acc {100 * row['train_fgsm_acc']:.1f}% | val clean {100 * row['val_clean']:.1f}% "
            f"PGD-10 {100 * row['val_pgd10']:.1f}% | {seconds:.1f}s ({row['train_images_per_s']:.0f} img/s)")
        if best is None or row['val_pgd10'] > best[0]:
            best = (row['val_pgd10'], epoch + 1, {k: v.detach().clone() for k, v in raw.state_dict().items()})
        if stopped:
            break
    if best is not None:
        raw.load_state_dict(best[2])
    if has_edl:
        set_beta_mode(raw, 'frozen')
    return {'epochs_done': len(history), 'planned_epochs': planned_epochs, 'elastic_from_epoch': elastic_from
            if has_edl else None, 'best_epoch': best[1] if best else None, 'stopped': stopped,
            'train_seconds': round(train_seconds, 3), 'train_images': images,
            'train_images_per_s': round(images / train_seconds, 1) if train_seconds else None,
            'steps_per_epoch': steps, 'batch_size': bs, 'history': history}


# --------------------------------------------------------------------------- evaluation and export


def evaluate_model(name: str, raw, x, y, info, n_total: int, args, device, *, autoattack: bool,
                   footnote: str, log) -> Dict[str, Any]:
    """The project's evaluation in float32: clean + PGD-20 + the gradient-masking checks on
    (x, y), or (``autoattack``) AutoAttack standard + PGD-20 (for the ordering check) on them."""
    from timm_edl.evaluation import EvalConfig, evaluate
    raw = raw.float().eval()
    small = dict(check_n=16, grad_points=2, grad_dirs=4) if args.toy else {}
    common = dict(threat_model='Linf', eps=args.eps, pgd_steps=20, batch_size=args.eval_batch, seed=args.seed,
                  device=str(device), progress=False)
    if autoattack:
        custom = list(aa_attacks(args)) if args.aa_attacks else None
        config = EvalConfig(attacks=('autoattack', 'pgd'), checks=False, aa_attacks=custom, **common)
    else:
        config = EvalConfig(attacks=('pgd',), checks=True, **small, **common)
    return evaluate(raw, x, y, config, dataset=info, split='test', n_total=n_total,
                    model_source={'spec': f'release_gpu:{name}', 'architecture': 'edlnet_resnet18'},
                    log=lambda msg: log(f'[{name}] {msg}'),
                    info={'name': f'edlnet_resnet18 ({name})', 'footnote': footnote})


def autoattack_seconds_per_point(report: Dict[str, Any], attacks) -> float:
    """AutoAttack's expected cost per point from a clean + PGD-20 report: the measured seconds
    per PGD step and image times :func:`aa_passes_per_point`, with the PGD-20 accuracy standing
    for the points the later attacks still see (an upper bound: AutoAttack breaks at least as
    many)."""
    per_pass = report['timings']['pgd'] / (report['n_ex'] * 20)
    return per_pass * aa_passes_per_point(attacks, report['clean_acc'], report['pgd_acc'])


def _rates(report: Optional[Dict[str, Any]], key: str) -> Optional[float]:
    if not report or key not in report.get('timings', {}) or not report['timings'][key]:
        return None
    return round(report['n_ex'] / report['timings'][key], 2)


def summarise(report: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if report is None:
        return None
    return {'n_ex': report['n_ex'], 'clean_acc': report['clean_acc'], 'pgd20_acc': report['pgd_acc'],
            'autoattack_acc': report['autoattack_acc'], 'failed_checks': report['failed_checks'],
            'checks': {c['name']: c['status'] for c in report['checks']},
            'timings': report['timings'], 'pgd20_images_per_s': _rates(report, 'pgd'),
            'autoattack_points_per_s': _rates(report, 'autoattack'),
            'clean_images_per_s': _rates(report, 'clean'), 'weights_digest': report['weights_digest']}


def export(name: str, raw, reports: List[Dict[str, Any]], out: Path, info, tag: str) -> Path:
    from timm_edl import hub
    folder = out / 'export' / name
    import torch
    model = copy.deepcopy(raw).cpu().float().eval().to(memory_format=torch.contiguous_format)
    hub.export(model, folder, eval_results=reports, overwrite=True, label_names=list(info.class_names),
               model_name=f'edlnet_resnet18.{tag}' + ('' if name == 'edlnet' else '_conv_twin'))
    return folder


PACK_PART_BYTES = 15 * 2**20


def pack(out: Path, dest: Path, weights_of: str = 'edlnet') -> List[Path]:
    """Pack a release folder into few files of at most 15 MiB (what the device tool brings back:
    8 files of 16 MiB, 64 MiB in all): ``release-results.tar.gz`` (everything except weights:
    release.json, log, evaluation reports, the exports' config.json and card) and the
    ``weights_of`` export's model.safetensors cut into ``<name>-model.safetensors.part-NN``
    (45 MB for edlnet_resnet18: 3 parts).  Rebuild with ``cat <name>-model.safetensors.part-* >
    model.safetensors`` and check it against ``weights_sha256`` in its config.json.  The twin's
    weights stay behind (both would pass 64 MiB); its numbers are in release.json."""
    import tarfile
    dest.mkdir(parents=True, exist_ok=True)
    written = [dest / 'release-results.tar.gz']
    with tarfile.open(written[0], 'w:gz') as tar:
        tar.add(out, arcname=out.name, filter=lambda info: None if info.name.endswith('.safetensors') else info)
    weights = out / 'export' / weights_of / 'model.safetensors'
    with open(weights, 'rb') as f:
        for k, chunk in enumerate(iter(lambda: f.read(PACK_PART_BYTES), b'')):
            part = dest / f'{weights_of}-model.safetensors.part-{k:02d}'
            part.write_bytes(chunk)
            written.append(part)
    return written


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    env = check_environment(args.device)
    if args.check_env:
        print(json.dumps(env, indent=2))
        return 0
    import torch
    from timm_edl.runtime import keep_freed_memory
    keep_freed_memory()
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f'release: {out} is not empty; pass another --out')
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / 'log.txt', 'a')

    def log(message: str) -> None:
        line = f'[release {time.strftime("%H:%M:%S")}] {message}'
        print(line, flush=True)
        log_file.write(line + '\n')
        log_file.flush()

    started = time.perf_counter()
    train_data, val_data, x_test, y_test, info, n_total = load_data(args, device)
    data_seconds = time.perf_counter() - started
    t_budget0 = time.perf_counter()
    budget_s = 60.0 * args.budget_min
    end = t_budget0 + budget_s
    channels_last = not args.no_channels_last
    autocast = autocast_context(device, args.amp)
    log(f"{info.display_name}: {len(train_data)} training images on {device} (uint8, "
        f"{train_data.images.numel() / 2**20:.1f} MiB), {len(val_data)} held out, {len(x_test)} test points; "
        f"data ready in {data_seconds:.1f}s; budget {args.budget_min:g} min; amp {args.amp}; "
        f"compile {args.compile}; channels_last {channels_last}")

    models: Dict[str, Dict[str, Any]] = {}
    for name, policy in MODELS:
        raw = build_model(policy, info, args.toy, device, channels_last, args.seed)
        model = torch.compile(raw) if args.compile else raw
        models[name] = {'raw': raw, 'model': model}

    # ---- plan
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    calibration = {name: calibrate(name, m['model'], m['raw'], train_data, args, device, autocast, gen)
                   for name, m in models.items()}
    for c in calibration.values():
        log(f"[plan] {c['model']}: {c['step_seconds'] * 1e3:.1f} ms per FGSM-RS step of {args.batch_size} "
            f"({c['train_images_per_s']:.0f} img/s); {c['input_grad_images_per_s']:.0f} img/s per float32 "
            f"input-gradient pass")
    steps = len(train_data) // args.batch_size
    check_n = 16 if args.toy else 100
    epoch_s = {n: c['step_seconds'] * steps + c['input_grad_seconds_per_image'] * len(val_data) * 11
               for n, c in calibration.items()}
    eval_s = {n: eval_seconds_estimate(c, len(x_test), args.aa_n, check_n, aa_attacks(args))
              for n, c in calibration.items()}
    export_s = 5.0 if args.toy else 15.0
    left = end - time.perf_counter() - 2 * export_s
    # the evaluation gets its estimate, but at most (1 - --min-train-share) of the time: beyond
    # that the AutoAttack points are cut after the PGD evaluation, not the training
    eval_reserve = min(sum(eval_s.values()), (1.0 - args.min_train_share) * left)
    fit = int((0.95 * left - eval_reserve) // sum(epoch_s.values()))
    epochs = args.epochs or max(args.min_epochs, min(args.max_epochs, fit))
    plan = {'budget_s': budget_s, 'seconds_left_after_calibration': round(left, 1),
            'epoch_seconds_estimate': {k: round(v, 2) for k, v in epoch_s.items()},
            'eval_seconds_estimate': {k: round(v, 1) for k, v in eval_s.items()},
            'eval_seconds_reserved': round(eval_reserve, 1), 'epochs_that_fit': fit, 'epochs': epochs,
            'fixed_by_flag': args.epochs is not None,
            'aa_passes_per_point_assumed': aa_passes_per_point(aa_attacks(args), PLAN_CLEAN, PLAN_ROBUST),
            'aa_attacks': list(aa_attacks(args)), 'export_seconds_reserved': export_s}
    log(f"[plan] {epochs} epochs each (fit: {fit}); estimated epoch {epoch_s['edlnet']:.1f}s EDL / "
        f"{epoch_s['conv_twin']:.1f}s twin, evaluation {eval_s['edlnet']:.0f}s EDL / {eval_s['conv_twin']:.0f}s twin")

    # ---- train: the EDLNet first; the twin gets the epochs the EDLNet got
    eval_total = eval_reserve + 2 * export_s
    results: Dict[str, Dict[str, Any]] = {}
    max_epochs = epochs
    for name, m in models.items():
        deadline = end - eval_total - (epoch_s['conv_twin'] * max_epochs if name == 'edlnet' else 0.0)
        results[name] = train_model(name, m['model'], m['raw'], train_data, val_data, args, device, autocast,
                                    planned_epochs=epochs, max_epochs=max_epochs, deadline=deadline, log=log)
        max_epochs = results[name]['epochs_done']

    # ---- evaluate (clean + PGD-20 on the full test set for both first, then AutoAttack)
    tag = f"{info.name.replace('-', '_')}_fgsm_rs"
    footnote = (f"Fast adversarial training (FGSM-RS, Linf eps {args.eps}, step {args.alpha}), "
                f"{results['edlnet']['epochs_done']} epochs in a {args.budget_min:g}-minute budget on "
                f"{env.get('gpu') or env['cpu']} (experiments/release_gpu.py"
                f"{', toy size' if args.toy else ''}).")
    reports: Dict[str, Dict[str, Any]] = {}
    for name, m in models.items():
        reports[name] = {'full': evaluate_model(name, m['raw'], x_test, y_test, info, n_total, args, device,
                                                autoattack=False, footnote=footnote, log=log), 'aa': None}
    summary: Dict[str, Any] = {
        'schema': 'timm-edl-release/1', 'command': ' '.join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
        'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'environment': env,
        'settings': {k: v for k, v in vars(args).items() if k not in ('eps_value', 'alpha_value')},
        'dataset': {'name': info.name, 'display_name': info.display_name, 'lossy': info.lossy,
                    'train': len(train_data), 'val_held_out': len(val_data), 'test': len(x_test),
                    'test_total': n_total},
        'data_seconds': round(data_seconds, 2), 'calibration': calibration, 'plan': plan, 'models': {},
    }

    def write_results(stage: str) -> None:
        """Exports, evaluation JSONs, release.json and (``--pack``) the packed files, as they stand:
        written once after the PGD evaluation and again after AutoAttack, so that a run killed
        during AutoAttack (past the device command's limit) still leaves weights and numbers."""
        for name, m in models.items():
            evaluated = [r for r in (reports[name]['full'], reports[name]['aa']) if r is not None]
            folder = export(name, m['raw'], evaluated, out, info, tag)
            summary['models'][name] = {
                **results[name], 'export': str(folder),
                'eval_full': summarise(reports[name]['full']), 'eval_autoattack': summarise(reports[name]['aa']),
            }
            for key, report in (('full', reports[name]['full']), ('autoattack', reports[name]['aa'])):
                if report is not None:
                    (out / f'eval_{name}_{key}.json').write_text(json.dumps(report, indent=2, default=str))
        total = time.perf_counter() - t_budget0
        summary.update(stage=stage, seconds_total=round(total, 1), within_budget=total <= budget_s)
        (out / 'release.json').write_text(json.dumps(summary, indent=2, default=str))
        if args.pack:
            for path in pack(out, Path(args.pack)):
                log(f'packed {path} ({path.stat().st_size / 2**20:.1f} MiB)')

    summary['autoattack_n'] = 0
    write_results('pgd evaluated; AutoAttack pending')
    left = end - time.perf_counter() - export_s
    per_point = AA_SAFETY * sum(autoattack_seconds_per_point(r['full'], aa_attacks(args)) for r in reports.values())
    aa_n = min(args.aa_n, len(x_test), max(0, int(left / per_point)) if per_point > 0 else args.aa_n)
    if aa_n < args.aa_n:
        log(f'[eval] AutoAttack on the first {aa_n} points (of {args.aa_n} asked): the {left:.0f}s left hold no '
            f'more at an estimated {per_point:.2f}s per point for both models')
    summary['autoattack_n'] = aa_n
    summary['autoattack_seconds_per_point_estimate'] = round(per_point, 4)
    for name, m in models.items():
        if aa_n > 0:
            reports[name]['aa'] = evaluate_model(name, m['raw'], x_test[:aa_n], y_test[:aa_n], info, n_total, args,
                                                 device, autoattack=True, footnote=footnote, log=log)
    write_results('done')

    rows = [('clean (full test set)', 'eval_full', 'clean_acc'), ('PGD-20 (full test set)', 'eval_full', 'pgd20_acc'),
            (f'AutoAttack (first {aa_n})', 'eval_autoattack', 'autoattack_acc')]
    log(f"{info.display_name}, Linf eps {args.eps}; {results['edlnet']['epochs_done']} epochs of FGSM-RS each")
    log('| accuracy | EDLNet | conv twin |')
    log('|---|---|---|')
    for label, part, key in rows:
        cells = []
        for name in ('edlnet', 'conv_twin'):
            value = (summary['models'][name][part] or {}).get(key)
            cells.append('-' if value is None else f'{100 * value:.2f} %')
        log(f'| {label} | {cells[0]} | {cells[1]} |')
    for name in ('edlnet', 'conv_twin'):
        failed = sorted(set((summary['models'][name]['eval_full'] or {}).get('failed_checks', []))
                        | set((summary['models'][name]['eval_autoattack'] or {}).get('failed_checks', [])))
        log(f"[{name}] checks: {'FAILED ' + ', '.join(failed) if failed else 'passed'}; training "
            f"{summary['models'][name]['train_images_per_s']} img/s")
    log(f"wrote {out / 'release.json'} and {out / 'export'}; {summary['seconds_total']:.0f}s of the "
        f"{budget_s:.0f}s budget")
    log_file.close()
    return 0

if __name__ == '__main__':
    sys.exit(main())
