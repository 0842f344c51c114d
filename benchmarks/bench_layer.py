#!/usr/bin/env python
"""One EDLConv2d vs the nn.Conv2d it replaces: measured time ratio next to the FLOP ratio.

Both layers have the same geometry (C -> C channels, 3x3 kernel, stride 1, padding 1, no
bias); the EDL layer uses the EDLNet defaults (``timm_edl.convert.EDL_DEFAULTS``, plus any
``--edl-cfg KEY=VALUE``) with ``num_steps = K``.  With z_0 = 0 it runs 2K - 1
conv-equivalents in the forward (one analysis conv, then K - 1 times a synthesis
conv_transpose2d and an analysis conv), so 2K - 1 is the FLOP lower bound of the forward
time ratio.

Passes:
  * ``fwd``: eval mode, ``torch.no_grad()``.
  * ``fwd+bwd``: train mode, backward from a fixed random output gradient, parameter
    gradients only (the input does not require grad); no optimizer step.
  * ``fwd+bwd (input grad)`` (``--input-grad``): the input requires grad as well, as when
    an attack differentiates w.r.t. the image.

The layer's step size 1/L comes from a power iteration that is cached until the weight
changes.  It is computed before timing; no timed pass changes the weight, so no power
iteration runs while timing (the script counts the calls and reports the count).

Example::

    python benchmarks/bench_layer.py --threads 2 --json layer.json
    python benchmarks/bench_layer.py --threads 2 --edl-cfg fused=False   # extra EDLConv2d kwargs
"""
import argparse
import sys
import time

import torch
import torch.nn as nn

import _timing as T
from timm_edl.convert import EDL_DEFAULTS
from timm_edl.layers import EDLConv2d

COLUMNS = ['K', 'pass', 'conv ms', 'EDL ms', 'spread conv / EDL', 'measured ratio',
           'ratio of minima', 'FLOP ratio (counted)', '2K-1', 'measured / FLOP ratio']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--channels', type=int, default=64)
    p.add_argument('--size', type=int, default=32, help='input height = width')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--steps', default='1,2,3,4', help='comma-separated K values (num_steps)')
    p.add_argument('--input-grad', action='store_true',
                   help='also time fwd+bwd with an input that requires grad (adversarial training / attacks)')
    p.add_argument('--quick', action='store_true',
                   help='tiny configuration (8 channels, 8x8, batch 2, K=1,2, 1 repeat, 1 warm-up; explicit options win): '
                        'a smoke test')
    T.add_common_args(p, repeats=10)
    if p.parse_known_args(argv)[0].quick:  # explicit options still override these
        p.set_defaults(channels=8, size=8, batch=2, steps='1,2', repeats=1, warmup=1)
    return p.parse_args(argv)


def _pass_fns(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mode: str):
    """A zero-argument callable running one pass of ``layer`` (and the mode it needs)."""
    if mode == 'fwd':
        def fn():
            with torch.no_grad():
                return layer(x)
        return fn, False
    x_in = x.detach().clone().requires_grad_(mode == 'fwd+bwd (input grad)')

    def fn():
        layer.zero_grad(set_to_none=True)
        x_in.grad = None
        layer(x_in).backward(grad_out)
    return fn, True


def run(args) -> dict:
    device = T.setup_torch(args.threads, args.device)
    dtype = T.DTYPES[args.dtype]
    steps = T.parse_int_list(args.steps)
    info = T.machine_info(args.threads, args.device, args.note)
    C, S, B = args.channels, args.size, args.batch
    modes = ['fwd', 'fwd+bwd'] + (['fwd+bwd (input grad)'] if args.input_grad else [])

    print(f'# EDLConv2d vs nn.Conv2d: {C} -> {C} channels, 3x3, stride 1, padding 1, '
          f'input {B}x{C}x{S}x{S}, {args.dtype}\n')
    print(T.header_line(info) + '\n')
    extra = T.parse_edl_cfg(args.edl_cfg)
    cfg = {**{k: v for k, v in EDL_DEFAULTS.items() if k != 'num_steps'}, **extra}
    probe_layer = EDLConv2d(C, C, 3, stride=1, padding=1, **{**cfg, 'num_steps': steps[0]})
    settings = {k: v for k, v in T.layer_settings(probe_layer).items() if k != 'num_steps'}
    del probe_layer
    print('EDL layer settings (EDLNet defaults' + (f' + {extra}' if extra else '') + f'): {settings}')
    print(f'Timing: {args.warmup} warm-up + {args.repeats} timed calls per '
          f'candidate, conv and EDL interleaved (one call per sample, perf_counter, device synced), '
          f'median reported; spread = IQR / median.')
    print('Power iteration: L is computed (and cached) before timing; the timed passes do not change '
          'the weight, so it stays cached (calls during timing are counted below).\n')

    started = time.perf_counter()
    rows, results = [], []
    x = torch.randn(B, C, S, S, device=device, dtype=dtype)
    grad_out = torch.randn(B, C, S, S, device=device, dtype=dtype)
    conv = nn.Conv2d(C, C, 3, stride=1, padding=1, bias=False).to(device=device, dtype=dtype)
    compiled = bool(cfg.get('compile_solver'))
    if compiled:  # a fair baseline: the conv goes through torch.compile too
        print('compile_solver=True: the conv is timed through torch.compile as well; FLOPs are counted '
              'on the eager paths (same convolutions); compilation happens in the warm-up calls.\n')
    conv_timed = torch.compile(conv) if compiled else conv
    for K in steps:
        torch.manual_seed(K)
        edl = EDLConv2d(C, C, 3, stride=1, padding=1, **{**cfg, 'num_steps': K}).to(device=device, dtype=dtype)
        with torch.no_grad():
            edl(x)  # computes and caches L for this input size (power iteration)
        probe = T.PowerIterationProbe([edl])
        for mode in modes:
            pair, eager = {}, {}
            for name, layer, timed in (('conv', conv, conv_timed), ('edl', edl, edl)):
                fn, train = _pass_fns(timed, x, grad_out, mode)
                eager[name] = _pass_fns(layer, x, grad_out, mode)[0]
                layer.train(train)
                pair[name] = fn
            timings = T.time_interleaved(pair, args.repeats, args.warmup, args.threads)
            with T.eager_solvers([edl]):
                flops = {name: T.count_flops(fn) for name, fn in eager.items()}
            t_conv, t_edl = timings['conv']['median_s'], timings['edl']['median_s']
            ratio = t_edl / t_conv
            min_ratio = timings['edl']['min_s'] / timings['conv']['min_s']
            flop_ratio = flops['edl'] / flops['conv']
            rows.append([K, mode, T.fmt_ms(t_conv), T.fmt_ms(t_edl),
                         f"{T.fmt_spread(timings['conv'])} / {T.fmt_spread(timings['edl'])}",
                         f'{ratio:.2f}', f'{min_ratio:.2f}', f'{flop_ratio:.2f}', 2 * K - 1,
                         f'{ratio / flop_ratio:.2f}'])
            results.append({
                'K': K, 'pass': mode, 'conv': timings['conv'], 'edl': timings['edl'],
                'measured_ratio': ratio, 'min_ratio': min_ratio, 'flops_conv': flops['conv'], 'flops_edl': flops['edl'],
                'flop_ratio_counted': flop_ratio, 'flop_ratio_bound': 2 * K - 1,
                'measured_over_flop_ratio': ratio / flop_ratio,
            })
        probe.restore()
        for r in results:
            if r['K'] == K:
                r['power_iterations_during_timing'] = probe.calls
        print(f'K={K}: power-iteration calls during timing and FLOP counting: {probe.calls}', flush=True)
    elapsed = time.perf_counter() - started

    print()
    print(T.markdown_table(COLUMNS, rows))
    print()
    print('measured ratio = EDL median / conv median; ratio of minima = EDL fastest call / conv fastest '
          'call (less sensitive to interference on a shared machine); FLOP ratio (counted) = torch.utils.flop_counter '
          '(conv + conv_transpose, backward included, element-wise ops not counted); '
          '2K-1 = forward conv-equivalents of the EDL layer (z_0 = 0); measured / FLOP ratio > 1: the '
          'EDL layer is slower than its FLOPs alone predict.')
    print('fwd+bwd counted ratio: the plain conv with an input that needs no grad skips grad-input in its '
          'backward; the EDL layer computes grad-input of every conv (even the first, since beta is '
          'learnable), hence 3(2K-1)/2 rather than 2K-1.')
    return T.finish(info, elapsed, args.json, {'benchmark': 'bench_layer', 'config': vars(args), 'edl_cfg': cfg,
                                               'edl_settings': settings,
                                               'results': results})


main = T.script_main(run, parse_args)


if __name__ == '__main__':
    sys.exit(main())
