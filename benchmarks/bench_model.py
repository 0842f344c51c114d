#!/usr/bin/env python
"""edlnet_resnet18 vs its conv twin: measured time ratios next to the FLOP ratios.

The EDL model is ``timm.create_model('edlnet_resnet18', edl_cfg={'num_steps': K})`` (every
3x3 conv, stem included, is an EDLConv2d; the 1x1 shortcut convs stay plain); the twin is
``timm.create_model('edlnet_resnet18', edl_layers='none')``: the same network with plain
convolutions.  Input: random CIFAR-sized images in [0, 1] (default batch 128, 32x32).

Passes (the two models are timed interleaved, median over the repeats):
  * ``inference``: eval mode, ``torch.no_grad()``.
  * ``fwd+bwd``: train mode, cross-entropy forward + backward, no optimizer step: the
    weights do not change, so every EDL layer keeps its cached L (``--no-fwd-bwd`` skips it).
  * ``train step``: forward + backward + ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``
    step.  The step changes every dictionary, so the next forward of each EDL layer
    refreshes its L with a warm-started power iteration (at least ``power_iters_warm``
    iterations): that is part of the real training cost and is included (the script
    reports the refreshes per step, the time spent in them and their iteration counts).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions,
conv_transpose and matmuls; element-wise ops count zero): on one inference forward (with
the L of every layer already cached, so no power iteration is counted) and on one train
step (backward and the power-iteration refresh included).  The analytic forward bound
multiplies the FLOPs of every converted conv by 2K - 1.

Example::

    python benchmarks/bench_model.py --threads 2 --json model.json
    python benchmarks/bench_model.py --threads 2 --edl-cfg fused=False   # extra EDLConv2d kwargs
"""
import argparse
import sys
import time

import timm
import torch
import torch.nn.functional as F

import _timing as T
import timm_edl  # noqa: F401  (registers the edlnet models with timm)
from timm_edl.layers import edl_layers

MODEL = 'edlnet_resnet18'
COLUMNS = ['K', 'pass', 'conv twin ms', 'EDL ms', 'spread twin / EDL', 'measured ratio',
           'ratio of minima', 'FLOP ratio (counted)', 'FLOP ratio (analytic fwd)', 'measured / FLOP ratio']
FLOP_COLUMNS = ['K', 'model', 'fwd GFLOP (counted)', 'fwd GFLOP (analytic 2K-1 bound)',
                'train-step GFLOP (counted)', 'EDL layers', 'L refreshes per train step']
LAYER_COLUMNS = ['layer', 'conv', 'output', 'conv GFLOP', 'EDL GFLOP (counted)', 'ratio (counted)', '2K-1']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32, help='input height = width')
    p.add_argument('--steps', default='2', help='EDL num_steps K (edl_cfg); comma-separated for several')
    p.add_argument('--lr', type=float, default=0.01, help='SGD learning rate of the timed train step')
    p.add_argument('--no-fwd-bwd', action='store_true', help='skip the fwd+bwd (no optimizer step) pass')
    p.add_argument('--no-layer-table', action='store_true', help='do not print the per-layer FLOP table')
    p.add_argument('--quick', action='store_true',
                   help='tiny configuration (batch 2, 8x8, K=1, 1 repeat, 1 warm-up; explicit options win): a smoke test')
    T.add_common_args(p, repeats=5)
    if p.parse_known_args(argv)[0].quick:  # explicit options still override these
        p.set_defaults(batch=2, size=8, steps='1', repeats=1, warmup=1)
    return p.parse_args(argv)


def _make(device, dtype, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(MODEL, **kwargs).to(device=device, dtype=dtype)


def _pass_fns(model, x, y, lr):
    """One callable per pass for ``model``; the optimizer belongs to the model."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def inference():
        model.eval()
        with torch.no_grad():
            return model(x)

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return {'inference': inference, 'fwd+bwd': fwd_bwd, 'train step': train_step}


def _conv_geometry(model):
    geo = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            geo[name] = (f'{m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]} '
                         f's{m.stride[0]}')
    return geo


def _output_sizes(model, x):
    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(name, f'{out.shape[-2]}x{out.shape[-1]}')))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def run(args) -> dict:
    device = T.setup_torch(args.threads, args.device)
    dtype = T.DTYPES[args.dtype]
    steps = T.parse_int_list(args.steps)
    info = T.machine_info(args.threads, args.device, args.note)
    B, S = args.batch, args.size
    extra = T.parse_edl_cfg(args.edl_cfg)
    passes = ['inference'] + ([] if args.no_fwd_bwd else ['fwd+bwd']) + ['train step']

    print(f'# {MODEL} (EDL) vs its conv twin (edl_layers=\'none\'): batch {B}, {S}x{S}, {args.dtype}\n')
    print(T.header_line(info) + '\n')
    print(f'Timing: {args.warmup} warm-up + {args.repeats} timed calls per '
          f'candidate, twin and EDL interleaved (one call per sample, perf_counter, device synced), '
          f'median reported; spread = IQR / median.')
    print('Power iteration: every EDL layer computes and caches L before timing.  inference and fwd+bwd '
          'do not change the weights (no power iteration while timing them); the train step\'s SGD '
          'update does, so each train step includes one warm-started L refresh per EDL layer '
          '(counted and timed below; iterations per refresh counted on the FLOP-counting step).\n')

    started = time.perf_counter()
    torch.manual_seed(1234)
    x = torch.rand(B, 3, S, S, device=device, dtype=dtype)
    y = torch.randint(0, 10, (B,), device=device)

    twin = _make(device, dtype, edl_layers='none')
    geometry = _conv_geometry(twin)
    out_sizes = _output_sizes(twin, x)
    twin_fns = _pass_fns(twin, x, y, args.lr)
    compiled = bool(extra.get('compile_solver'))
    if compiled:
        print('compile_solver=True: the EDL layers run compiled solvers, everything else in the EDL model stays '
              'eager.  Two baselines: the eager twin (the layers both models share are treated alike: the main '
              'rows) and torch.compile(twin) (BatchNorm, ReLU and residual adds fused too: the rows marked '
              '"vs compiled twin").  FLOPs are counted on the eager paths; compilation happens in the warm-up '
              'calls.\n')
    twin_compiled_fns = _pass_fns(torch.compile(twin), x, y, args.lr) if compiled else None
    twin_fwd_by_module = T.flops_by_module(twin_fns['inference'])
    twin_fwd = twin_fwd_by_module['Global']

    rows, flop_rows, layer_rows, results = [], [], [], []
    for K in steps:
        model = _make(device, dtype, edl_cfg={**extra, 'num_steps': K})
        layers = edl_layers(model)
        layer_names = [n for n, _ in layers]
        if K == steps[0] and layers:
            settings = T.layer_settings(layers[0][1])
            print(f'K={K}: EDL layer settings (EDLNet defaults' + (f' + {extra}' if extra else '') + f'): {settings}')
        prefix = type(model).__name__ + '.'
        with torch.no_grad():
            model.eval()(x)  # every EDL layer computes and caches L at this input size
        edl_fns = _pass_fns(model, x, y, args.lr)
        with T.eager_solvers([m for _, m in layers]):
            edl_fwd_by_module = T.flops_by_module(edl_fns['inference'])
        edl_fwd = edl_fwd_by_module['Global']
        analytic_fwd = twin_fwd + sum((2 * K - 2) * twin_fwd_by_module[prefix + n] for n in layer_names)

        per_pass = {}
        for mode in passes:
            probe = T.PowerIterationProbe([m for _, m in layers])
            mark = {}
            candidates = {'twin': twin_fns[mode], 'edl': edl_fns[mode]}
            if compiled:
                candidates['twin_compiled'] = twin_compiled_fns[mode]
            timings = T.time_interleaved(candidates,
                                         args.repeats, args.warmup, args.threads,
                                         after_warmup=lambda: mark.update(probe.snapshot()))
            refreshes = (probe.calls - mark['calls']) / args.repeats  # timed calls only
            refresh_s = (probe.seconds - mark['seconds']) / args.repeats
            if mode == 'inference':
                flops = {'twin': twin_fwd, 'edl': edl_fwd}
            else:
                probe.count_iterations = True  # on the (untimed) FLOP-counting call
                with T.eager_solvers([m for _, m in layers]):
                    flops = {'twin': T.count_flops(twin_fns[mode]), 'edl': T.count_flops(edl_fns[mode])}
            probe.restore()
            if mode == 'train step':
                loss = edl_fns[mode]().item()
                if loss != loss:
                    print(f'warning: the EDL model\'s loss became NaN during the timed train steps (K={K})')
            ratio = timings['edl']['median_s'] / timings['twin']['median_s']
            min_ratio = timings['edl']['min_s'] / timings['twin']['min_s']
            flop_ratio = flops['edl'] / flops['twin']
            analytic = f'{analytic_fwd / twin_fwd:.2f}' if mode == 'inference' else '-'
            rows.append([K, mode + (' (L refresh incl.)' if mode == 'train step' else ''),
                         T.fmt_ms(timings['twin']['median_s']), T.fmt_ms(timings['edl']['median_s']),
                         f"{T.fmt_spread(timings['twin'])} / {T.fmt_spread(timings['edl'])}",
                         f'{ratio:.2f}', f'{min_ratio:.2f}', f'{flop_ratio:.2f}', analytic,
                         f'{ratio / flop_ratio:.2f}'])
            if compiled:
                ratio_c = timings['edl']['median_s'] / timings['twin_compiled']['median_s']
                min_ratio_c = timings['edl']['min_s'] / timings['twin_compiled']['min_s']
                rows.append([K, mode + ' vs compiled twin', T.fmt_ms(timings['twin_compiled']['median_s']),
                             T.fmt_ms(timings['edl']['median_s']),
                             f"{T.fmt_spread(timings['twin_compiled'])} / {T.fmt_spread(timings['edl'])}",
                             f'{ratio_c:.2f}', f'{min_ratio_c:.2f}', f'{flop_ratio:.2f}', analytic,
                             f'{ratio_c / flop_ratio:.2f}'])
            per_pass[mode] = {
                'twin': timings['twin'], 'edl': timings['edl'], 'measured_ratio': ratio, 'min_ratio': min_ratio,
                'flops_twin': flops['twin'], 'flops_edl': flops['edl'], 'flop_ratio_counted': flop_ratio,
                'measured_over_flop_ratio': ratio / flop_ratio,
                'power_iterations_per_call': refreshes,
                'power_iteration_seconds_per_call': refresh_s,
                'power_iteration_iters_per_refresh': list(probe.iterations),
            }
            if compiled:
                per_pass[mode].update(twin_compiled=timings['twin_compiled'], measured_ratio_vs_compiled_twin=ratio_c,
                                      measured_over_flop_ratio_vs_compiled_twin=ratio_c / flop_ratio)
            msg = f'K={K} {mode}: power-iteration runs (L refreshes) per timed call of the EDL model: {refreshes:g}'
            if refreshes:
                msg += (f', {1e3 * refresh_s:.1f} ms per call in them '
                        f"({100 * refresh_s / timings['edl']['median_s']:.1f}% of the EDL median)")
            print(msg, flush=True)

        train = per_pass['train step']
        iters = train['power_iteration_iters_per_refresh']
        iters_text = (f", {min(iters)}-{max(iters)} iterations each (mean {sum(iters) / len(iters):.1f})"
                      if iters else '')
        flop_rows.append([K, 'conv twin', f'{twin_fwd / 1e9:.2f}', f'{twin_fwd / 1e9:.2f}',
                          f"{train['flops_twin'] / 1e9:.2f}", 0, 0])
        flop_rows.append([K, 'EDL', f'{edl_fwd / 1e9:.2f}', f'{analytic_fwd / 1e9:.2f}',
                          f"{train['flops_edl'] / 1e9:.2f}", len(layers),
                          f"{train['power_iterations_per_call']:g}{iters_text}"])
        flop_rows.append([K, 'ratio EDL / twin', f'{edl_fwd / twin_fwd:.2f}', f'{analytic_fwd / twin_fwd:.2f}',
                          f"{train['flops_edl'] / train['flops_twin']:.2f}", '', ''])
        if not args.no_layer_table:
            for n in layer_names:
                c = twin_fwd_by_module[prefix + n]
                e = edl_fwd_by_module[prefix + n]
                layer_rows.append([f'{n} (K={K})' if len(steps) > 1 else n, geometry[n], out_sizes[n],
                                   f'{c / 1e9:.3f}', f'{e / 1e9:.3f}', f'{e / c:.2f}', 2 * K - 1])
        results.append({
            'K': K, 'edl_layers': layer_names, 'flops_fwd_twin': twin_fwd, 'flops_fwd_edl': edl_fwd,
            'flops_fwd_edl_analytic': analytic_fwd, 'passes': per_pass,
            'flops_fwd_per_layer': {n: {'conv': twin_fwd_by_module[prefix + n], 'edl': edl_fwd_by_module[prefix + n]}
                                    for n in layer_names},
        })
        del model, edl_fns
    elapsed = time.perf_counter() - started

    print()
    print(T.markdown_table(COLUMNS, rows))
    print()
    print('measured ratio = EDL median / twin median; ratio of minima = EDL fastest call / twin fastest '
          'call (less sensitive to interference on a shared machine); FLOP ratio (counted) = FlopCounterMode on that pass '
          '(forward; or forward + backward, plus the power-iteration refresh in the train step); '
          'measured / FLOP ratio > 1: the EDL model is slower than its FLOPs alone predict.')
    print()
    print(T.markdown_table(FLOP_COLUMNS, flop_rows))
    if layer_rows:
        print()
        print('Per-layer forward FLOPs (the 1x1 shortcut convs and the fc layer are plain in both models):\n')
        print(T.markdown_table(LAYER_COLUMNS, layer_rows))
    return T.finish(info, elapsed, args.json, {'benchmark': 'bench_model', 'model': MODEL, 'config': vars(args),
                                               'edl_cfg_extra': extra,
                                               'results': results})


main = T.script_main(run, parse_args)


if __name__ == '__main__':
    sys.exit(main())
