#!/usr/bin/env python
"""What ``make release-gpu``'s time budget (``--budget-min``) buys on one H200: an ESTIMATE from
counted FLOPs and measured CPU ratios, not a measurement on the GPU.

    python benchmarks/estimate_h200.py --threads 1 --out docs/performance_h200.md

Measured here (on this machine's CPU, float32, ``--batch`` images):

* FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matmuls; element-wise ops count 0), of ``edlnet_resnet18`` (EDL, K = 2) and its conv twin
  (``edl_layers='none'``), for the two units of the release run (experiments/release_gpu.py):
  one fast-AT training step (the trainer's ``objective: fast``: FGSM-RS crafting + training
  forward/backward + SGD, the EDL layers' step-size refresh included) and one attack pass
  (forward + input-only backward in eval mode, parameters frozen: what PGD and AutoAttack
  repeat);
* the EDL / twin time ratio of the same two calls on the CPU (interleaved, median), and its
  quotient by the FLOP ratio (1: the EDL layers cost exactly their extra convolutions).

Assumed (every one a parameter, printed with the result):

* the H200's ceiling: ``--ceiling-bf16`` TFLOP/s for the bf16 training step (default 788: an
  H200's measured bf16 rate on an 8192^3 matrix product; the datasheet's dense bf16 peak is
  about 990) and ``--ceiling-fp32`` for the
  float32 evaluation, whose convolutions cuDNN runs as TF32 (default 394: the datasheet's
  dense TF32 peak, about 495, scaled by the same measured/datasheet factor 0.8);
* the fraction of that ceiling the conv twin achieves: ``--fraction`` (default 0.25; ResNet-18
  on 32x32 images has small spatial sizes, and BatchNorm/ReLU are memory-bound);
* for the EDL model two cases: (a) the same fraction as the twin (time ratio = FLOP ratio);
  (b) the FLOP ratio times the CPU quotient.  Neither covers the GPU's own risk: the RISTA
  solver's element-wise steps are memory-bound on a GPU (about 206 FLOP per byte are needed
  to be compute-bound on an H200); the first GPU run measures what is real;
* the release run's sizes: 49,000 training images per epoch + PGD-10 validation on 1,000,
  10,000 test points for clean + PGD-20, AutoAttack standard on 1,000 points at
  ``release_gpu.aa_passes_per_point`` (85 % clean, 50 % robust assumed) attack passes per
  point, the 100-point checks, and ``release_gpu.py``'s default ``--budget-min 8`` with 30 s of
  start-up.
"""
import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))
sys.path.insert(2, os.path.join(os.path.dirname(_HERE), 'experiments'))

import _timing as T
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import release_gpu as R
import timm_edl  # noqa: F401  (registers the edlnet models with timm)
from timm_edl.attacks import frozen_parameters

TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES, AA_POINTS, CHECK_POINTS = 49_000, 1_000, 10_000, 1_000, 100
BUDGET_MIN, STARTUP_S, EXPORT_S = 8.0, 30.0, 30.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=8, help='images per measured call on the CPU')
    p.add_argument('--ceiling-bf16', type=float, default=788.0, help='TFLOP/s, bf16 training')
    p.add_argument('--ceiling-fp32', type=float, default=394.0, help='TFLOP/s, float32 (TF32) evaluation')
    p.add_argument('--fraction', type=float, default=0.25, help='achieved fraction of the ceiling (conv twin)')
    p.add_argument('--out', default=None, help='write the Markdown section here')
    T.add_common_args(p, repeats=3)
    p.set_defaults(warmup=1)
    return p.parse_args(argv)


def _models(device):
    out = {}
    for name, policy in (('twin', 'none'), ('edl', 'default')):
        torch.manual_seed(0)
        out[name] = timm.create_model('edlnet_resnet18', num_classes=10, edl_layers=policy).to(device)
    return out


def _step_fn(model, x, y):
    from timm_edl.train.model import param_groups
    from timm_edl.train.objectives import craft, training_loss
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def step():
        gen.manual_seed(0)
        x_adv = craft('fast', model, x, y, eps=8 / 255, norm='Linf', steps=1, step_size=None, fast_alpha=10 / 255,
                      craft_bn='eval', generator=gen)
        loss, _ = training_loss('fast', model.train(), x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _grad_fn(model, x, y):
    def attack_pass():
        model.eval()
        with frozen_parameters(model):
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
    return attack_pass


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a device value on the host (``item``, ``float()``, ``bool()``:
    ``aten._local_scalar_dense``): each one is a synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == 'aten._local_scalar_dense':
            self.count += 1
        return func(*args, **(kwargs or {}))


def run(args):
    device = T.setup_torch(args.threads, 'cpu')
    info = T.machine_info(args.threads, 'cpu', args.note)
    B = args.batch
    torch.manual_seed(1)
    x, y = torch.rand(B, 3, 32, 32), torch.randint(0, 10, (B,))
    models = _models(device)
    with torch.no_grad():
        for m in models.values():
            m.eval()(x)  # every EDL layer computes L at this size
    calls = {'step': {n: _step_fn(m, x, y) for n, m in models.items()},
             'pass': {n: _grad_fn(m, x, y) for n, m in models.items()}}
    started = time.perf_counter()
    flops, timings = {}, {}
    for unit, fns in calls.items():
        flops[unit] = {n: T.count_flops(fn) / B for n, fn in fns.items()}
        timings[unit] = T.time_interleaved(fns, args.repeats, args.warmup, args.threads)
    host_reads = {}
    for name, fn in calls['step'].items():  # after earlier steps: the weights changed, L is refreshed
        with _HostReads() as reads:
            fn()
        host_reads[name] = reads.count
    measured = {u: {'flop_ratio': flops[u]['edl'] / flops[u]['twin'],
                    'time_ratio': timings[u]['edl']['median_s'] / timings[u]['twin']['median_s']}
                for u in calls}
    for m in measured.values():
        m['quotient'] = m['time_ratio'] / m['flop_ratio']

    # ---- the estimate
    aa_passes = R.aa_passes_per_point(R.AA_STANDARD, R.PLAN_CLEAN, R.PLAN_ROBUST)
    cases = {}
    for case, fraction in (('a', args.fraction), ('b', args.fraction), ('a_half', args.fraction / 2),
                           ('b_half', args.fraction / 2)):
        rate_train = args.ceiling_bf16 * 1e12 * fraction
        rate_eval = args.ceiling_fp32 * 1e12 * fraction
        out = {}
        for name in ('twin', 'edl'):
            slow = {u: 1.0 if (name == 'twin' or case[0] == 'a') else measured[u]['quotient'] for u in calls}
            step_img = flops['step'][name] * slow['step'] / rate_train      # seconds per training image
            pass_img = flops['pass'][name] * slow['pass'] / rate_eval       # seconds per attack pass and image
            epoch = TRAIN_IMAGES * step_img + VAL_IMAGES * 11 * pass_img
            pgd_full = TEST_IMAGES * R.PGD_PASSES * pass_img
            checks = CHECK_POINTS * R.CHECK_PASSES * pass_img
            aa_point = aa_passes * pass_img
            out[name] = {'train_images_per_s': 1 / step_img, 'epoch_s': epoch, 'epochs_per_min': 60 / epoch,
                         'attack_passes_per_s': 1 / pass_img, 'pgd20_full_test_s': pgd_full,
                         'aa_points_per_min': 60 / aa_point, 'aa_1000_s': AA_POINTS * aa_point,
                         'eval_s': pgd_full + checks + AA_POINTS * aa_point}
        # release_gpu.py's plan: the evaluation gets its estimate but at most 60 % of the time
        # (--min-train-share 0.4); AutoAttack then gets what the training and PGD parts leave
        left = BUDGET_MIN * 60 - STARTUP_S - EXPORT_S
        reserve = min(sum(out[n]['eval_s'] + (R.AA_SAFETY - 1) * out[n]['aa_1000_s'] for n in ('edl', 'twin')),
                      0.6 * left)
        epochs = max(1, int((0.95 * left - reserve) // (out['edl']['epoch_s'] + out['twin']['epoch_s'])))
        rest = (left - epochs * (out['edl']['epoch_s'] + out['twin']['epoch_s'])
                - sum(out[n]['eval_s'] - out[n]['aa_1000_s'] for n in ('edl', 'twin')))
        # release_gpu sizes AutoAttack with a margin (AA_SAFETY) on its estimate
        per_point = R.AA_SAFETY * (out['edl']['aa_1000_s'] + out['twin']['aa_1000_s']) / AA_POINTS
        out['epochs_in_budget'] = epochs
        out['aa_points_in_budget'] = max(0, min(AA_POINTS, int(rest / per_point)))
        cases[case] = out
    return {'info': info, 'batch': B, 'flops_per_image': flops, 'host_reads_per_step': host_reads,
            'timings': timings, 'measured': measured,
            'assumed': {'ceiling_bf16_tflops': args.ceiling_bf16, 'ceiling_fp32_tflops': args.ceiling_fp32,
                        'fraction': args.fraction, 'aa_passes_per_point': aa_passes, 'budget_min': BUDGET_MIN,
                        'startup_s': STARTUP_S, 'export_s': EXPORT_S},
            'estimate': cases, 'wall_s': time.perf_counter() - started}


def _span(a, b, key) -> str:
    lo, hi = sorted((a[key], b[key]))
    return f'{lo}' if lo == hi else f'{lo}-{hi}'


def markdown(r, argv) -> str:
    f, m, a = r['flops_per_image'], r['measured'], r['assumed']
    lines = [
        "## What `make release-gpu`'s time budget buys on an H200 (an estimate, not a measurement)",
        '',
        'Written by `python benchmarks/estimate_h200.py ' + ' '.join(argv) + '` into '
        '`docs/performance_h200.md`; `benchmarks/run_all.py` appends that file here, so `make bench` keeps it. '
        'The FLOPs and the CPU ratios are measured by that command; every H200 number below is '
        'derived from them with the stated assumptions and has not been measured on a GPU.',
        '',
        T.header_line(r['info']),
        '',
        f"Measured (CPU, float32, batch {r['batch']}; EDL = `edlnet_resnet18` with K = 2, twin = "
        "`edl_layers='none'`):",
        '',
        '| unit | twin GFLOP / image | EDL GFLOP / image | FLOP ratio | CPU time ratio (median) | quotient |',
        '|---|---|---|---|---|---|',
    ]
    labels = {'step': 'fast-AT step (FGSM-RS craft + train fwd/bwd + SGD)',
              'pass': 'attack pass (fwd + input-only bwd, eval)'}
    for u, label in labels.items():
        lines.append(f"| {label} | {f[u]['twin'] / 1e9:.2f} | {f[u]['edl'] / 1e9:.2f} | "
                     f"{m[u]['flop_ratio']:.2f} | {m[u]['time_ratio']:.2f} | {m[u]['quotient']:.2f} |")
    lines += [
        '',
        f"Assumed: ceiling {a['ceiling_bf16_tflops']:.0f} TFLOP/s for bf16 training (an H200's measured "
        f"bf16 rate on an 8192^3 matmul; datasheet dense peak ~990) and "
        f"{a['ceiling_fp32_tflops']:.0f} TFLOP/s for the float32 evaluation (TF32 convolutions; datasheet "
        f"dense TF32 ~495 x 0.8); the conv twin achieves **{100 * a['fraction']:.0f} %** of it (assumed, "
        f"not measured); EDL (a) at the same fraction, (b) slower by the CPU quotient. AutoAttack standard: "
        f"{a['aa_passes_per_point']:.0f} attack passes per point (85 % clean / 50 % robust assumed; "
        f"`release_gpu.AA_PASSES`). Budget {a['budget_min']:g} min minus {a['startup_s']:.0f} s start-up and "
        f"{a['export_s']:.0f} s exports; an epoch = 49,000 training images + PGD-10 validation on 1,000; "
        f"evaluation = clean + PGD-20 on 10,000 + checks on 100 + AutoAttack on 1,000.",
        '',
        f"Host reads per fast-AT step, counted on this CPU: twin {r['host_reads_per_step']['twin']}, EDL "
        f"{r['host_reads_per_step']['edl']}, all of them CPU-only reads of the EDL layers (free there: beta's "
        "value in the fused step, the adaptive stop of the step-size refresh); on an accelerator the layer "
        "reads none (`tests/test_layer.py::test_accelerator_path_never_reads_a_value_back_to_the_host` runs "
        "forward, backward and the refresh on the meta device, where any host read raises).",
        '',
        '| estimate | twin | EDL (a) | EDL (b) |',
        '|---|---|---|---|',
    ]
    ea, eb = r['estimate']['a'], r['estimate']['b']
    rows = [('fast-AT training, images/s', 'train_images_per_s', '{:,.0f}'),
            ('seconds per epoch (incl. validation)', 'epoch_s', '{:.1f}'),
            ('epochs of fast AT per minute', 'epochs_per_min', '{:.1f}'),
            ('attack passes per second (float32)', 'attack_passes_per_s', '{:,.0f}'),
            ('PGD-20 on the 10,000 test points, s', 'pgd20_full_test_s', '{:.1f}'),
            ('AutoAttack standard, points per minute', 'aa_points_per_min', '{:,.0f}'),
            ('AutoAttack on 1,000 points, s', 'aa_1000_s', '{:.0f}'),
            ('whole evaluation, s', 'eval_s', '{:.0f}')]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(ea['twin'][key])} | {fmt.format(ea['edl'][key])} | "
                     f"{fmt.format(eb['edl'][key])} |")
    lines += [
        '',
        f"In {a['budget_min']:g} minutes of budget, `make release-gpu` would train both models for about "
        f"**{_span(ea, eb, 'epochs_in_budget')} epochs** of fast AT each (the twin takes the "
        f"EDLNet's epochs) and run AutoAttack on {_span(ea, eb, 'aa_points_in_budget')} of the 1,000 points asked "
        "(`release_gpu.py` plans the real numbers from its own timings: the evaluation gets its estimate "
        "but at most 60 % of the time, then AutoAttack is cut to what is left, sized with a 1.5x margin). At half the assumed "
        f"fraction ({50 * a['fraction']:.1f} %) every rate halves: "
        f"{_span(r['estimate']['a_half'], r['estimate']['b_half'], 'epochs_in_budget')} epochs, "
        f"AutoAttack on {_span(r['estimate']['a_half'], r['estimate']['b_half'], 'aa_points_in_budget')} points."
        + " The largest unknowns: the fraction itself, and the EDL layers on a GPU (memory-bound "
        "element-wise steps).",
        '',
        f"wall time: {r['wall_s']:.0f} s; {T.finish_info(r['info'])}",
        '',
    ]
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = run(args)
    shown = [a for i, a in enumerate(argv) if a != '--out' and (i == 0 or argv[i - 1] != '--out')]
    text = markdown(result, shown)
    print(text)
    if args.out:
        with open(args.out, 'w') as fh:
            fh.write(text)
    T.write_json(args.json, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
