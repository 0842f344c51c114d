#!/usr/bin/env python
"""Which architecture the zoo can afford: PGD-3 adversarial-training throughput on a CPU.

One PGD-AT step as the zoo's recipes run it (``recipes/edlnet_resnet8_in_*_pgd.yaml``:
batch 128, 3 PGD steps of ``timm_edl.attacks.pgd_attack`` in eval mode, then one training
forward + backward + SGD step), for four networks on Fashion-MNIST-sized (1 x 28 x 28) and
CIFAR-sized (3 x 32 x 32) random images:

* ``resnet20 cifar-stem, all EDL``: He et al.'s CIFAR ResNet-20 (3 stages x 3 basic blocks,
  16/32/64 channels, 3x3 stride-1 stem), every 3x3 conv an EDL layer (the natural candidate:
  ``edlnet_resnet18`` with ``layers=[3, 3, 3], channels=[16, 32, 64], stem_width=16``);
* ``resnet20 cifar-stem, EDL blocks``: the same with a plain stem conv;
* ``edlnet_resnet8_in`` (the zoo's choice): 3 stages x 1 block, 7x7 stride-2 stem + max-pool,
  EDL layers in the blocks;
* its conv twin (``edl_layers='none'``).

Printed: milliseconds per step, images per second, and each network's time over the chosen
one's, all measured in one interleaved run.  An epoch of the zoo's data takes
``n_train / (img/s)`` seconds (60,000 Fashion-MNIST or 50,000 CIFAR-10-JPEG images).

    python benchmarks/bench_zoo_arch.py --threads 1 [--batch 128] [--repeats 3] [--json zoo_arch.json]
    python benchmarks/bench_zoo_arch.py --quick       # smoke test: batch 2, one repeat
"""
import argparse
import sys
import time

import _timing as T
import timm
import torch
import torch.nn.functional as F

import timm_edl  # noqa: F401  (registers the edlnet models with timm)
from timm_edl.layers import edl_layers
from timm_edl.attacks import pgd_attack

CHOSEN = 'edlnet_resnet8_in, EDL blocks (zoo)'
NETWORKS = {
    'resnet20 cifar-stem, all EDL': ('edlnet_resnet18', dict(layers=[3, 3, 3], channels=[16, 32, 64], stem_width=16)),
    'resnet20 cifar-stem, EDL blocks': ('edlnet_resnet18', dict(layers=[3, 3, 3], channels=[16, 32, 64], stem_width=16,
                                                                edl_layers='blocks')),
    CHOSEN: ('edlnet_resnet8_in', {}),
    'edlnet_resnet8_in, conv twin': ('edlnet_resnet8_in', dict(edl_layers='none')),
}
INPUTS = {'1x28x28 (Fashion-MNIST), eps 0.1': ((1, 28, 28), 0.1), '3x32x32 (CIFAR-10-JPEG), eps 8/255': ((3, 32, 32), 8 / 255)}
COLUMNS = ['input', 'network', 'parameters', 'EDL layers', 'ms per step', 'img/s', 'time / zoo choice']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--quick', action='store_true',
                   help='batch 2, one repeat, no warm-up, 2 power iterations for L (smoke test)')
    T.add_common_args(p, repeats=3)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 1, 0
    return args


def at_step(model, opt, x, y, eps):
    def step():
        model.eval()
        x_adv = pgd_attack(model, x, y, eps=eps, steps=3, step_size=2.5 * eps / 3)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_adv), y).backward()
        opt.step()
    return step


def run(args):
    info = T.machine_info(args.threads, args.device, args.note)
    print(T.header_line(info))
    started = time.time()
    gen = torch.Generator().manual_seed(0)
    rows, raw = [], {}
    for input_name, (shape, eps) in INPUTS.items():
        x = torch.rand(args.batch, *shape, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        fns, meta = {}, {}
        for name, (arch, kwargs) in NETWORKS.items():
            extra = dict(edl_cfg=dict(power_iters=2)) if args.quick else {}  # smoke test: a cheap first L
            model = timm.create_model(arch, num_classes=10, in_chans=shape[0], **kwargs, **extra)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            fns[name] = at_step(model, opt, x, y, eps)
            meta[name] = (sum(p.numel() for p in model.parameters()), len(edl_layers(model)))
        times = T.time_interleaved(fns, args.repeats, args.warmup, args.threads)
        chosen = times[CHOSEN]['median_s']
        for name, t in times.items():
            rows.append([input_name, name, f'{meta[name][0]:,}', meta[name][1], T.fmt_ms(t['median_s']),
                         f"{args.batch / t['median_s']:.0f}", f"{t['median_s'] / chosen:.2f}"])
        raw[input_name] = times
    print(f'\nPGD-3 AT step, batch {args.batch}, {args.threads} thread(s):\n')
    print(T.markdown_table(COLUMNS, rows))
    return T.finish(info, time.time() - started, args.json, {'rows': [dict(zip(COLUMNS, r)) for r in rows],
                                                            'times': raw, 'batch': args.batch})


main = T.script_main(run, parse_args)

if __name__ == '__main__':
    sys.exit(main())
