#!/usr/bin/env python
"""edlnet_resnet18 vs its conv twin: adversarial-training and AutoAttack throughput.

The EDL model is ``timm.create_model('edlnet_resnet18', edl_cfg={'num_steps': K})`` (every
3x3 conv, stem included, is an EDLConv2d; the 1x1 shortcut convs stay plain); the twin is
``timm.create_model('edlnet_resnet18', edl_layers='none')``: the same network with plain
convolutions.  Input: random CIFAR-sized images in [0, 1] (32x32), random labels of 10
classes; Linf, eps = 8/255.

Rows (the two models are timed interleaved, median over the repeats):
  * ``PGD-10 AT step``: one step of PGD adversarial training (Madry et al.) as the trainer
    (``timm_edl.train``, objective ``pgd``, ``craft_bn='eval'``) does it: the model in
    eval mode crafts the batch with ``timm_edl.attacks.pgd_attack`` (10 steps, step size
    2.5 eps / 10, uniform random start from a generator re-seeded each call, last
    iterate), then in train mode one cross-entropy forward + backward on the adversarial
    batch and an ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)`` step.  (The trainer's
    extra no-grad clean forward for its metrics is left out.)  The SGD step changes every
    dictionary, so the first forward of the next step refreshes L in every EDL layer
    (warm-started power iteration): part of the real cost, included and reported.
  * ``AutoAttack (APGD-CE, n_iter=N)``: the first attack of AutoAttack, pyautoattack's
    ``APGDAttack`` with the settings of ``AutoAttack(version='standard', norm='Linf')``
    (loss 'ce', 1 restart, rho 0.75, 1 EOT iteration; seed 0, n_iter ``--aa-iters``),
    called directly (parameters frozen, as ``timm-edl eval`` runs it), without AutoAttack's sanity-check forwards.  (``version='custom'``
    would keep the constructor's 5 restarts.)  It runs on a batch of ``--aa-batch``
    images, on an untrained model in eval mode.  APGD attacks only the points the model classifies correctly, so the work
    depends on the labels: here each model gets its own clean predictions as labels, so
    every point starts correct and both models attack all ``--aa-batch`` images for the
    full ``n_iter`` iterations (APGD has no early stop inside a restart): 1 clean forward
    + (n_iter + 1) forward + input-gradient backward passes per call, on the same inputs
    and with the same random start for both models.  A pure throughput measure; a trained
    robust model attacked with the true labels does the same work on its correctly
    classified points.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions,
conv_transpose and matmuls; element-wise ops count zero; without its per-module
attribution, which breaks ``torch.autograd.grad`` on inputs): for the AT step on one
untimed call (PGD, backward, SGD step and the L refresh included); for APGD-CE on untimed
calls with n_iter = 1 and 2 on the same batch, extrapolated to ``--aa-iters`` (a call is
1 clean forward + (n_iter + 1) gradient passes, so its FLOPs are affine in n_iter: the
extrapolation is exact and spares a full n_iter-long call per model).

Defaults are sized for a few minutes on a 2-core CPU: AT batch 16 (the training recipes
use 128), APGD-CE on 4 images with the full 100 iterations; raise ``--batch`` /
``--aa-batch`` on faster hardware (small batches favour the conv twin: the EDL layers'
many small element-wise ops have a fixed per-call overhead).

Example::

    python benchmarks/bench_attack.py --threads 2 --json attack.json
    python benchmarks/bench_attack.py --threads 2 --batch 128 --aa-batch 32   # full-size (slow on CPU)
"""
import argparse
import contextlib
import logging
import sys
import time

import _timing as T
import timm
import torch
import torch.nn.functional as F

import timm_edl  # noqa: F401  (registers the edlnet models with timm)
from timm_edl.attacks import pgd_attack
from timm_edl.layers import edl_layers

MODEL = 'edlnet_resnet18'
EPS = 8 / 255
PGD_STEPS = 10
COLUMNS = ['K', 'pass', 'conv twin ms', 'EDL ms', 'spread twin / EDL', 'conv twin img/s', 'EDL img/s',
           'measured ratio', 'ratio of minima', 'FLOP ratio (counted)', 'measured / FLOP ratio']
DETAIL_COLUMNS = ['K', 'pass', 'images per call', 'conv twin GFLOP per call', 'EDL GFLOP per call',
                  'L refreshes per EDL call', 'APGD points attacked (twin / EDL)',
                  'APGD points fooled (twin / EDL)']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=16,
                   help='batch of the PGD-10 AT step (the recipes train with 128; 16 keeps the default '
                        'run short on a CPU)')
    p.add_argument('--size', type=int, default=32, help='input height = width')
    p.add_argument('--steps', default='2', help='EDL num_steps K (edl_cfg); comma-separated for several')
    p.add_argument('--lr', type=float, default=0.01, help='SGD learning rate of the AT step')
    p.add_argument('--aa-batch', type=int, default=4, help='images per APGD-CE call')
    p.add_argument('--aa-iters', type=int, default=100, help='APGD-CE iterations (AutoAttack uses 100)')
    p.add_argument('--aa-repeats', type=int, default=2, help='timed APGD-CE calls per model')
    p.add_argument('--aa-warmup', type=int, default=0,
                   help='untimed APGD-CE calls per model before timing (the short FLOP-counting '
                        'runs on the same batch already run first)')
    p.add_argument('--no-at', action='store_true', help='skip the PGD-10 AT step row')
    p.add_argument('--no-aa', action='store_true', help='skip the AutoAttack row')
    p.add_argument('--quick', action='store_true',
                   help='tiny configuration (batch 2, 8x8, K=1, aa-batch 2, aa-iters 2, 1 repeat, 1 warm-up; '
                        'explicit options win): a smoke test')
    T.add_common_args(p, repeats=3)
    p.set_defaults(warmup=1)
    if p.parse_known_args(argv)[0].quick:  # explicit options still override these
        p.set_defaults(batch=2, size=8, steps='1', aa_batch=2, aa_iters=2, repeats=1, aa_repeats=1, warmup=1)
    args = p.parse_args(argv)
    for name in ('batch', 'size', 'aa_batch', 'aa_iters', 'aa_repeats'):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.aa_warmup < 0 or args.warmup < 0:
        raise SystemExit('--warmup / --aa-warmup must be >= 0')
    if args.no_at and args.no_aa:
        raise SystemExit('--no-at and --no-aa leave nothing to run')
    return args


def _eager(layers):
    """Count FLOPs on the eager path: layers built with ``compile_solver=True`` (where this
    version has it) hide their convolutions inside compiled kernels from the counter."""
    eager = getattr(T, 'eager_solvers', None)
    return eager([m for _, m in layers]) if eager is not None else contextlib.nullcontext()


def _make(device, dtype, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(MODEL, **kwargs).to(device=device, dtype=dtype)


def _at_step_fn(model, x, y, lr):
    """One PGD-10 adversarial-training step of ``model`` (the optimizer belongs to the model)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator()  # a CPU generator, as the trainer's (draws on CPU serve CUDA inputs too)
    state = {}

    def at_step():
        gen.manual_seed(0)  # the same random start for both models and every call
        model.eval()  # craft_bn='eval': BN uses its running statistics while crafting
        x_adv = pgd_attack(model, x, y, eps=EPS, norm='Linf', steps=PGD_STEPS, step_size=None,
                           random_start=True, generator=gen)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_adv).float(), y)
        loss.backward()
        opt.step()
        state['loss'] = loss.detach()
        return loss

    return at_step, state


def _apgd_fn(model, x, n_iter, device, dtype):
    """One APGD-CE call on ``x`` with the model's own clean predictions as labels."""
    from pyautoattack.autopgd_base import APGDAttack

    from timm_edl.attacks import frozen_parameters

    model.eval()

    def predict(inp):  # APGD casts its inputs to float32
        return model(inp.to(dtype)).float()

    with torch.no_grad():
        y = predict(x).argmax(1)
    attack = APGDAttack(predict, n_iter=n_iter, norm='Linf', n_restarts=1, eps=EPS, seed=0, loss='ce',
                        device=device, logger=logging.getLogger('bench_attack.apgd'))
    state = {}

    def apgd():
        # as `timm-edl eval` runs it: parameters frozen, so backward passes compute input
        # gradients only (timm_edl.attacks.frozen_parameters)
        with frozen_parameters(model):
            x_adv = attack.perturb(x, y)
        state['x_adv'] = x_adv
        return x_adv

    def counts():
        """(points attacked: clean prediction == label, points whose adversarial prediction differs)."""
        with torch.no_grad():
            attacked = int((predict(x).argmax(1) == y).sum())
            return attacked, int((predict(state['x_adv']).argmax(1) != y).sum())

    return apgd, counts


def apgd_flops(model, x, n_iter, device, dtype) -> int:
    """Counted FLOPs of one APGD-CE call with ``n_iter`` iterations, from counted runs with 1 and 2.

    A call is one clean forward plus n_iter + 1 forward + input-gradient passes on the
    attacked points (here all of them); everything else APGD does (step-size checkpoints,
    projections) is element-wise and counts zero.  So the count is affine in n_iter:
    F(n) = F(1) + (n - 1) (F(2) - F(1)), exact, and costs 5 passes instead of n_iter + 2.
    """
    f1 = T.count_flops(_apgd_fn(model, x, 1, device, dtype)[0])
    f2 = T.count_flops(_apgd_fn(model, x, 2, device, dtype)[0])
    return f1 + (n_iter - 1) * (f2 - f1)


def _row(K, name, timings, flops, images):
    ratio = timings['edl']['median_s'] / timings['twin']['median_s']
    min_ratio = timings['edl']['min_s'] / timings['twin']['min_s']
    flop_ratio = flops['edl'] / flops['twin']
    ips = {k: images / timings[k]['median_s'] for k in ('twin', 'edl')}
    row = [K, name, T.fmt_ms(timings['twin']['median_s']), T.fmt_ms(timings['edl']['median_s']),
           f"{T.fmt_spread(timings['twin'])} / {T.fmt_spread(timings['edl'])}",
           f"{ips['twin']:.3g}", f"{ips['edl']:.3g}",
           f'{ratio:.2f}', f'{min_ratio:.2f}', f'{flop_ratio:.2f}', f'{ratio / flop_ratio:.2f}']
    result = {'twin': timings['twin'], 'edl': timings['edl'], 'images_per_call': images,
              'images_per_s_twin': ips['twin'], 'images_per_s_edl': ips['edl'],
              'measured_ratio': ratio, 'min_ratio': min_ratio,
              'flops_twin': flops['twin'], 'flops_edl': flops['edl'], 'flop_ratio_counted': flop_ratio,
              'measured_over_flop_ratio': ratio / flop_ratio}
    return row, result


def run(args) -> dict:
    device = T.setup_torch(args.threads, args.device)
    dtype = T.DTYPES[args.dtype]
    steps = T.parse_int_list(args.steps)
    info = T.machine_info(args.threads, args.device, args.note)
    B, S, A = args.batch, args.size, args.aa_batch
    extra = T.parse_edl_cfg(args.edl_cfg)
    aa_name = f'AutoAttack (APGD-CE, n_iter={args.aa_iters})'

    print(f'# {MODEL} (EDL) vs its conv twin (edl_layers=\'none\'): adversarial training and AutoAttack '
          f'throughput, {S}x{S}, {args.dtype}, Linf eps 8/255\n')
    print(T.header_line(info) + '\n')
    if not args.no_at:
        print(f'PGD-10 AT step: batch {B}' + (' (the recipes train with 128)' if B != 128 else '')
              + f'; {args.warmup} warm-up + {args.repeats} timed calls per model; '
              f'10 PGD steps (eval mode, timm_edl.attacks.pgd_attack, step 2.5 eps / 10, random start) + one '
              f'train-mode forward + backward + SGD step (lr {args.lr}) on the adversarial batch.')
    if not args.no_aa:
        print(f'{aa_name}: pyautoattack APGDAttack (loss ce, 1 restart, seed 0) on {A} images per call, '
              f'untrained models in eval mode, each labelled with its own clean predictions so that every '
              f'point is attacked for all {args.aa_iters} iterations (APGD only attacks correctly '
              f'classified points); FLOPs counted on runs with n_iter = 1 and 2 and extrapolated (exact: '
              f'affine in n_iter); those short runs also warm up; then {args.aa_warmup} '
              f'warm-up + {args.aa_repeats} timed calls per model.')
    print('Timing: twin and EDL interleaved (one call per sample, perf_counter, device synced), median '
          'reported; spread = IQR / median; img/s = images per call / median.  Every EDL layer computes '
          'and caches L before timing.\n')

    started = time.perf_counter()
    torch.manual_seed(1234)
    x = torch.rand(B, 3, S, S, device=device, dtype=dtype)
    y = torch.randint(0, 10, (B,), device=device)
    x_aa = torch.rand(A, 3, S, S, device=device, dtype=dtype)

    rows, detail_rows, results = [], [], []
    for K in steps:
        per_pass = {}
        if not args.no_at:
            twin = _make(device, dtype, edl_layers='none')
            model = _make(device, dtype, edl_cfg={**extra, 'num_steps': K})
            layers = edl_layers(model)
            if K == steps[0] and layers:
                settings = T.layer_settings(layers[0][1])
                print(f'K={K}: EDL layer settings (EDLNet defaults' + (f' + {extra}' if extra else '')
                      + f'): {settings}')
            with torch.no_grad():
                model.eval()(x)  # every EDL layer computes and caches L at this input size
            twin_fn, _ = _at_step_fn(twin, x, y, args.lr)
            edl_fn, edl_state = _at_step_fn(model, x, y, args.lr)
            probe = T.PowerIterationProbe([m for _, m in layers])
            mark = {}
            timings = T.time_interleaved({'twin': twin_fn, 'edl': edl_fn}, args.repeats, args.warmup, args.threads,
                                         after_warmup=lambda mark=mark, probe=probe: mark.update(probe.snapshot()))
            refreshes = (probe.calls - mark['calls']) / args.repeats
            refresh_s = (probe.seconds - mark['seconds']) / args.repeats
            probe.count_iterations = True  # on the (untimed) FLOP-counting call
            with _eager(layers):
                flops = {'twin': T.count_flops(twin_fn), 'edl': T.count_flops(edl_fn)}
            probe.restore()
            if not torch.isfinite(edl_state['loss']):
                print(f'warning: the EDL model\'s loss is not finite after the AT steps (K={K})')
            row, res = _row(K, 'PGD-10 AT step (L refresh incl.)', timings, flops, B)
            res.update({'power_iterations_per_call': refreshes, 'power_iteration_seconds_per_call': refresh_s,
                        'power_iteration_iters_per_refresh': list(probe.iterations)})
            rows.append(row)
            per_pass['at_step'] = res
            iters = res['power_iteration_iters_per_refresh']
            span = f'{min(iters)}-{max(iters)}' if iters and min(iters) != max(iters) else (iters or [''])[0]
            iters_text = f' ({span} iterations each)' if iters else ''
            detail_rows.append([K, 'PGD-10 AT step', B, f"{flops['twin'] / 1e9:.2f}", f"{flops['edl'] / 1e9:.2f}",
                                f'{refreshes:g}{iters_text}', '-', '-'])
            msg = (f'K={K} PGD-10 AT step: L refreshes per timed call of the EDL model: {refreshes:g}'
                   + (f', {1e3 * refresh_s:.1f} ms per call in them '
                      f"({100 * refresh_s / timings['edl']['median_s']:.1f}% of the EDL median)" if refreshes else ''))
            print(msg, flush=True)
            del twin, model, twin_fn, edl_fn

        if not args.no_aa:
            twin = _make(device, dtype, edl_layers='none')
            model = _make(device, dtype, edl_cfg={**extra, 'num_steps': K})
            layers = edl_layers(model)
            with torch.no_grad():
                model.eval()(x_aa)  # L cached before timing
            probe = T.PowerIterationProbe([m for _, m in layers])
            # FLOPs first: the short counted runs (same batch, same shapes) also warm both models up
            with _eager(layers):
                flops = {'twin': apgd_flops(twin, x_aa, args.aa_iters, device, dtype),
                         'edl': apgd_flops(model, x_aa, args.aa_iters, device, dtype)}
            twin_fn, twin_counts = _apgd_fn(twin, x_aa, args.aa_iters, device, dtype)
            edl_fn, edl_counts = _apgd_fn(model, x_aa, args.aa_iters, device, dtype)
            mark = {}
            timings = T.time_interleaved({'twin': twin_fn, 'edl': edl_fn}, args.aa_repeats, args.aa_warmup,
                                         args.threads,
                                         after_warmup=lambda mark=mark, probe=probe: mark.update(probe.snapshot()))
            refreshes = (probe.calls - mark['calls']) / args.aa_repeats
            probe.restore()
            (twin_attacked, twin_fooled), (edl_attacked, edl_fooled) = twin_counts(), edl_counts()
            row, res = _row(K, aa_name, timings, flops, A)
            res.update({'n_iter': args.aa_iters, 'power_iterations_per_call': refreshes,
                        'points_attacked_twin': twin_attacked, 'points_attacked_edl': edl_attacked,
                        'points_fooled_twin': twin_fooled, 'points_fooled_edl': edl_fooled})
            rows.append(row)
            per_pass['apgd_ce'] = res
            detail_rows.append([K, aa_name, A, f"{flops['twin'] / 1e9:.2f}", f"{flops['edl'] / 1e9:.2f}",
                                f'{refreshes:g}', f'{twin_attacked} / {edl_attacked}',
                                f'{twin_fooled} / {edl_fooled}'])
            print(f'K={K} {aa_name}: points attacked per call (of {A}): twin {twin_attacked}, EDL {edl_attacked}; '
                  f'L refreshes per timed call of the EDL model: {refreshes:g}', flush=True)
            del twin, model, twin_fn, edl_fn
        results.append({'K': K, 'passes': per_pass})
    elapsed = time.perf_counter() - started

    print()
    print(T.markdown_table(COLUMNS, rows))
    print()
    print('measured ratio = EDL median / twin median; ratio of minima = EDL fastest call / twin fastest call '
          '(less sensitive to interference on a shared machine); FLOP ratio (counted) = FlopCounterMode on one '
          'call of that pass; measured / FLOP ratio > 1: the EDL model is slower than its FLOPs alone predict.')
    print()
    print(T.markdown_table(DETAIL_COLUMNS, detail_rows))
    return T.finish(info, elapsed, args.json, {'benchmark': 'bench_attack', 'model': MODEL, 'config': vars(args),
                                               'edl_cfg_extra': extra, 'eps': EPS, 'pgd_steps': PGD_STEPS,
                                               'results': results})


main = T.script_main(run, parse_args)


if __name__ == '__main__':
    sys.exit(main())
