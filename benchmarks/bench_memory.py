#!/usr/bin/env python
"""Training memory of edlnet_resnet18 vs its conv twin: the activations kept for backward.

What is measured: the bytes of every distinct tensor storage that autograd saves for the
backward during one train-mode forward (``torch.autograd.graph.saved_tensors_hooks``) at
the given batch.  That is the part of training memory that grows with the batch and that
the EDL layer's implementation decides; it is exact and does not depend on the allocator
or on other processes (unlike a peak-RSS reading on a shared CPU).  Parameters, gradients
and optimizer state are the same order for both models and are reported separately.

Implementations compared (same math, same gradients; tests/test_layer.py checks that):
  * ``reference``: ``fused=False``, autograd through every elementwise op of RISTA;
  * ``fused``: the default, one in-place step with a hand-written backward that saves
    one residual per step;
  * ``memory_efficient``: ``memory_efficient=True``, the layer keeps only its input and
    recomputes the solver in the backward (activation checkpointing).

Example::

    python benchmarks/bench_memory.py --batch 128 --steps 2,3 --json memory.json
"""
import argparse
import sys
from typing import Dict, Tuple

import torch

import timm

import _timing
import timm_edl  # noqa: F401

VARIANTS = {
    'reference': dict(fused=False),
    'fused': dict(),
    'memory_efficient': dict(memory_efficient=True),
}


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one forward of ``model``."""
    storages: Dict[Tuple[int, torch.device], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        storages[key] = max(storages.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='edlnet_resnet18')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--steps', default='2,3', help='comma-separated K values (num_steps)')
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--json', metavar='PATH', default=None)
    p.add_argument('--note', default='')
    p.add_argument('--quick', action='store_true', help='batch 2, 16x16, K=2 (smoke test)')
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps = 2, 16, '2'
    steps = _timing.parse_int_list(args.steps)
    info = _timing.machine_info(args.threads, 'cpu', args.note)
    _timing.setup_torch(args.threads, 'cpu')
    print(_timing.header_line(info))
    print(f'\n{args.model}, batch {args.batch}, {args.size}x{args.size}, float32, train mode: '
          f'activation memory saved for backward (MiB)\n')

    x = torch.rand(args.batch, 3, args.size, args.size)
    twin = timm.create_model(args.model, edl_layers='none').train()
    twin_bytes = saved_activation_bytes(twin, x)
    param_bytes = sum(q.numel() * q.element_size() for q in twin.parameters())
    del twin
    rows, results = [], []
    for k in steps:
        for name, cfg in VARIANTS.items():
            model = timm.create_model(args.model, edl_cfg=dict(num_steps=k, power_iters=5, **cfg)).train()
            model_bytes = saved_activation_bytes(model, x)
            del model
            ratio = model_bytes / twin_bytes
            rows.append([k, name, f'{twin_bytes / 2**20:.0f}', f'{model_bytes / 2**20:.0f}', f'{ratio:.2f}'])
            results.append(dict(num_steps=k, implementation=name, twin_bytes=twin_bytes,
                                edl_bytes=model_bytes, ratio=ratio))
    print(_timing.markdown_table(
        ['K', 'EDL implementation', 'conv twin MiB', 'EDL MiB', 'EDL / twin'], rows))
    print(f'\nparameters (either model, float32): {param_bytes / 2**20:.0f} MiB; '
          f'{_timing.finish_info(info)}')
    _timing.write_json(args.json, dict(machine=info, model=args.model, batch=args.batch,
                                       size=args.size, results=results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
