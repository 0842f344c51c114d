"""Input-gradient sanity of an EDLNet at initialisation, beta by beta (the table behind
``tests/test_models.py::test_input_gradient_is_sane_at_every_beta``).

For ``edlnet_resnet18`` at initialisation (seed 0), float64, eval mode, the reference solver
(``fused=False``), 2 random images and the cross-entropy: the norm of the input gradient, its
ratio to the beta = 1 network's, and the relative error of the gradient against central finite
differences (h = 1e-5) along 8 random unit directions (median and max), for each beta::

    python experiments/gradient_sanity.py            # the layer's defaults (warm start, scale-free)
    python experiments/gradient_sanity.py --legacy   # the original layer (z_0 = 0, floored weights)

About 2 minutes on one CPU thread (most of it the 17 layers' first step-size estimates in float64).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import timm
import timm_edl  # noqa: F401  (registers the models)
from timm_edl.layers import LEGACY_OPTIONS, edl_layers


def rows(legacy: bool, betas=(1.0, 0.8, 0.5, 0.3, 0.0), n_dirs: int = 8, h: float = 1e-5):
    cfg = dict(fused=False, **(dict(LEGACY_OPTIONS, eps=1e-3) if legacy else {}))
    torch.manual_seed(0)
    model = timm.create_model('edlnet_resnet18', edl_cfg=cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 7])
    directions = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(n_dirs)]
    directions = [d / d.norm() for d in directions]
    reference = None
    for beta in betas:
        for _, layer in edl_layers(model):
            with torch.no_grad():
                layer.beta.fill_(beta)
        xg = x.clone().requires_grad_()
        grad, = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
        norm = grad.norm().item()
        reference = reference or norm
        errors = []
        with torch.no_grad():
            for d in directions:
                fd = (F.cross_entropy(model(x + h * d), y) - F.cross_entropy(model(x - h * d), y)).item() / (2 * h)
                analytic = (grad * d).sum().item()
                errors.append(abs(fd - analytic) / max(abs(fd), abs(analytic), 1e-12))
        yield beta, norm, norm / reference, statistics.median(errors), max(errors), bool(torch.isfinite(grad).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--legacy', action='store_true', help="the original layer: init='zero', reweight='floor', eps=1e-3")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"edlnet_resnet18 at initialisation, {'original layer' if args.legacy else 'layer defaults'}")
    print('| beta | input-gradient norm | / norm at beta = 1 | median rel. error vs FD | max | finite |')
    print('|---|---|---|---|---|---|')
    for beta, norm, ratio, med, worst, finite in rows(args.legacy):
        print(f'| {beta:g} | {norm:.3e} | {ratio:.3g} | {med:.2e} | {worst:.2e} | {finite} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
