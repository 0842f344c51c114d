#!/usr/bin/env python
"""edlnet_resnet20 vs its conv twin: one adversarial-training step under each speed option.

One step as ``timm-edl train`` takes it (:func:`timm_edl.train.objectives.craft` in eval
mode, then :func:`~timm_edl.train.objectives.training_loss`, backward, SGD with momentum) on
random 3 x 32 x 32 images at Linf 8/255, for ``edlnet_resnet20`` (18 EDL layers, K = 2) and
``edlnet_resnet20_conv``, timed interleaved, in every combination of:

* precision: float32, or bf16 autocast (``mixed_precision: bf16``);
* memory format: contiguous, or ``channels_last``;
* objective: FGSM-RS (``fast``), PGD-2, PGD-3.

Per row: ms per step of each network, EDL img/s, the EDL/conv time ratio, the EDL/conv ratio
of the FLOPs FlopCounterMode counts for the same step (convolutions and matmuls, forward and
backward; the EDL layers' elementwise work counts 0), and the time ratio over the FLOP ratio
(1.0: the EDL layers cost exactly their convolutions).  Two further tables, each measured in
one run: ``--compile`` times ``torch.compile(model)`` (inductor) against eager for the float32
FGSM-RS step, and ``--parallel`` the images per second of one process with ``2 x threads``
threads against two processes with ``threads`` threads each, side by side.

    python benchmarks/bench_resnet20.py --threads 1 [--batch 64] [--repeats 3] [--compile] [--parallel] \
        [--out docs/performance_resnet20.md]
    python benchmarks/bench_resnet20.py --quick      # smoke test: batch 2, one repeat, no warm-up
"""
import argparse
import contextlib
import io
import itertools
import multiprocessing as mp
import sys
import time
from pathlib import Path

import _timing as T
import timm
import torch

import timm_edl  # noqa: F401  (registers the edlnet models with timm)
from timm_edl.train.objectives import craft, training_loss

NETWORKS = ('edlnet_resnet20', 'edlnet_resnet20_conv')
OBJECTIVES = {'FGSM-RS': ('fast', 0), 'PGD-2': ('pgd', 2), 'PGD-3': ('pgd', 3)}
EPS = 8 / 255
COLUMNS = ['precision', 'memory format', 'objective', 'EDL ms/step', 'conv ms/step', 'EDL img/s',
           'time ratio', 'FLOP ratio', 'time / FLOP ratio']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--compile', action='store_true', help='also torch.compile (inductor) vs eager, float32 FGSM-RS')
    p.add_argument('--parallel', action='store_true',
                   help='also one process with 2 x threads vs two processes with threads each')
    p.add_argument('--quick', action='store_true', help='batch 2, one repeat, no warm-up (smoke test)')
    p.add_argument('--out', default=None, help='also write the tables, with this command, as a Markdown section here')
    T.add_common_args(p, repeats=3)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 1, 0
    return args


def make_step(name: str, x: torch.Tensor, y: torch.Tensor, objective: str, steps: int, amp: bool,
              channels_last: bool, compile_model: bool = False):
    """One training step of ``name`` on ``(x, y)`` as a zero-argument callable."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if compile_model else model

    def step():
        autocast = torch.autocast('cpu', dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with autocast:
            x_adv = craft(objective, net, x, y, eps=EPS, norm='Linf', steps=steps, step_size=2.5 * EPS / max(steps, 1),
                          fast_alpha=1.25 * EPS, craft_bn='eval')
            loss, _ = training_loss(objective, net, x, x_adv, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def settings_table(args, x, y):
    rows, raw = [], {}
    for amp, cl, obj in itertools.product((False, True), (False, True), OBJECTIVES):
        objective, steps = OBJECTIVES[obj]
        fns = {n: make_step(n, x, y, objective, steps, amp, cl) for n in NETWORKS}
        for fn in fns.values():  # counted in the steady state: the first step also estimates every L from cold
            fn()
        flops = {n: T.count_flops(fn) for n, fn in fns.items()}
        times = T.time_interleaved(fns, args.repeats, args.warmup, args.threads)
        edl, conv = (times[n]['median_s'] for n in NETWORKS)
        ratio, flop_ratio = edl / conv, flops[NETWORKS[0]] / flops[NETWORKS[1]]
        key = ('bf16' if amp else 'float32', 'channels_last' if cl else 'contiguous', obj)
        rows.append([*key, T.fmt_ms(edl), T.fmt_ms(conv), f'{args.batch / edl:.0f}', f'{ratio:.2f}',
                     f'{flop_ratio:.2f}', f'{ratio / flop_ratio:.2f}'])
        raw[' / '.join(key)] = {'times': times, 'flops': flops}
        print(' | '.join(map(str, rows[-1])), flush=True)
    return rows, raw


def compile_table(args, x, y):
    fns = {}
    for n in NETWORKS:
        fns[f'{n} eager'] = make_step(n, x, y, 'fast', 0, False, False)
        fns[f'{n} compiled'] = make_step(n, x, y, 'fast', 0, False, False, compile_model=True)
    started = {}
    for name, fn in fns.items():  # the first call compiles: timed apart
        t = time.perf_counter()
        fn()
        started[name] = time.perf_counter() - t
    times = T.time_interleaved(fns, args.repeats, args.warmup, args.threads)
    rows = []
    for n in NETWORKS:
        eager, compiled = times[f'{n} eager']['median_s'], times[f'{n} compiled']['median_s']
        rows.append([n, T.fmt_ms(eager), T.fmt_ms(compiled), f'{compiled / eager:.2f}',
                     f"{started[f'{n} compiled']:.0f} s"])
    return rows, {'times': times, 'first_call_s': started}


def _worker(name, batch, threads, repeats, queue):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    step = make_step(name, x, y, 'fast', 0, False, False)
    step()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    queue.put(sorted(ts)[len(ts) // 2])


def _processes(name, batch, threads, repeats, count):
    """Median step seconds of ``count`` processes running side by side."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(name, batch, threads, repeats, queue)) for _ in range(count)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def parallel_table(args):
    rows = []
    for n in NETWORKS:
        one = _processes(n, args.batch, 2 * args.threads, args.repeats, 1)
        two = _processes(n, args.batch, args.threads, args.repeats, 2)
        one_ips = args.batch / one[0]
        two_ips = sum(args.batch / s for s in two)
        rows.append([n, f'{one_ips:.0f}', f'{two_ips:.0f}', f'{two_ips / one_ips:.2f}'])
    return rows


TITLE = 'edlnet_resnet20 vs its conv twin: one adversarial-training step under each speed option'


def markdown_section(command: str, printed: str) -> str:
    """The section ``--out`` writes: the command, then what it printed (rows printed while
    measuring, which the tables repeat, left out)."""
    keep = [line for line in printed.splitlines() if not line.startswith(('float32 | ', 'bf16 | '))]
    return f"## {TITLE}\n\n```\n{command}\n```\n\n" + '\n'.join(keep).strip() + '\n'


def run(args):
    if args.out:
        printed = io.StringIO()
        with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
            payload = _run(args)
        shown = [a for i, a in enumerate(sys.argv[1:]) if a != '--out' and (i == 0 or sys.argv[i] != '--out')]
        command = ' '.join(['python benchmarks/bench_resnet20.py'] + shown)
        Path(args.out).write_text(markdown_section(command, printed.getvalue()))
        return payload
    return _run(args)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)


def _run(args):
    info = T.machine_info(args.threads, args.device, args.note)
    print(T.header_line(info))
    started = time.time()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    rows, raw = settings_table(args, x, y)
    print(f'\nOne AT step, batch {args.batch}, {args.threads} thread(s), edlnet_resnet20 (EDL) vs '
          f'edlnet_resnet20_conv (conv):\n')
    print(T.markdown_table(COLUMNS, rows))
    payload = {'rows': [dict(zip(COLUMNS, r)) for r in rows], 'raw': raw, 'batch': args.batch}
    if args.compile:
        crows, craw = compile_table(args, x, y)
        cols = ['network', 'eager ms/step', 'compiled ms/step', 'compiled / eager', 'first call (compiling)']
        print(f'\ntorch.compile (inductor) vs eager, float32 FGSM-RS step, batch {args.batch}, {args.threads} thread(s):\n')
        print(T.markdown_table(cols, crows))
        payload['compile'] = {'rows': [dict(zip(cols, r)) for r in crows], 'raw': craw}
    if args.parallel:
        prows = parallel_table(args)
        cols = ['network', f'1 process x {2 * args.threads} threads img/s', f'2 processes x {args.threads} img/s',
                'throughput ratio']
        print(f'\nFGSM-RS float32 step, batch {args.batch}: one job with all threads vs two jobs side by side:\n')
        print(T.markdown_table(cols, prows))
        payload['parallel'] = [dict(zip(cols, r)) for r in prows]
    return T.finish(info, time.time() - started, args.json, payload)


main = T.script_main(run, parse_args)

if __name__ == '__main__':
    sys.exit(main())
