"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): PREDICT and CERTIFY, on tensors.

The smoothed classifier of a base classifier ``f`` (here: ``argmax`` of a model's logits) is

    g(x) = argmax_c P[f(x + delta) = c],    delta ~ N(0, sigma^2 I).

If the top class ``cA`` has probability ``pA >= pA_lower > 1/2``, then ``g`` predicts ``cA``
everywhere on the L2 ball of radius ``R = sigma * Phi^-1(pA_lower)`` around ``x`` (Cohen et
al., Theorem 1 with ``pB = 1 - pA_lower``).  :func:`certify` estimates ``cA`` from ``n0``
noisy samples, then lower-bounds ``pA`` from ``n`` fresh samples with the one-sided
Clopper-Pearson bound at level ``1 - alpha``, and abstains when ``pA_lower <= 1/2``.
:func:`predict` is Cohen's PREDICT: the top two counts of ``n`` samples and a two-sided
binomial test of ``p = 1/2`` between them; it abstains unless the p-value is ``<= alpha``.

Noise is added to the model's own input: images ``x`` in [0, 1] pixels (the models normalise
internally), ``x + delta`` not clipped to [0, 1] (as Cohen et al.).  Each point draws its noise
from its own ``torch.Generator`` seeded from ``(seed, index of the point)``, in blocks of
:data:`NOISE_BLOCK` samples whatever the batch size, so a point's certificate does not depend
on which other points are certified with it, nor on the batch size (on one device type: the
CPU and CUDA generators give different streams).
"""
import hashlib
import math
from statistics import NormalDist
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['ABSTAIN', 'NOISE_BLOCK', 'RADII', 'log_binomial_upper_tail', 'clopper_pearson_lower',
           'binomial_test_half', 'point_generator', 'noise_counts', 'certify', 'predict', 'certified_accuracy']

ABSTAIN = -1         # the prediction of a point the smoothed classifier abstains on
NOISE_BLOCK = 64     # noise is drawn in blocks of this many samples (the stream is independent of the batch size)
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)  # L2 radii of the certified-accuracy table (Cohen et al.'s Table 1 style)


# ----------------------------------------------------------------------------- binomial statistics

def _log_binomial_terms(k: int, n: int) -> torch.Tensor:
    """``i`` and ``log C(n, i)`` for ``i = k..n``, float64 (``lgamma``), shape (2, n - k + 1)."""
    i = torch.arange(k, n + 1, dtype=torch.float64)
    return torch.stack([i, math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)])


def _log_tail(terms: torch.Tensor, n: int, p: float) -> float:
    i, log_choose = terms
    return float(torch.logsumexp(log_choose + i * math.log(p) + (n - i) * math.log1p(-p), 0))


def log_binomial_upper_tail(k: int, n: int, p: float) -> float:
    """``log P[Bin(n, p) >= k]``, summed exactly in log space (float64, ``lgamma``); any ``n``.

    ``log C(n, i) + i log p + (n - i) log(1 - p)`` for ``i = k..n``, then a log-sum-exp.
    """
    if k <= 0:
        return 0.0
    if k > n or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    return _log_tail(_log_binomial_terms(k, n), n, p)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` lower confidence bound on a binomial proportion from ``k`` of ``n``.

    The exact (Clopper-Pearson) bound: the ``p`` with ``P[Bin(n, p) >= k] = alpha`` (the tail
    grows with ``p``), found by bisection on ``p`` in (0, 1) down to adjacent float64 values;
    0 for ``k = 0``, ``alpha^(1/n)`` for ``k = n``.  It equals the ``alpha`` quantile of
    ``Beta(k, n - k + 1)``.
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    if k == n:  # P[Bin(n, p) >= n] = p^n
        return alpha ** (1.0 / n)
    target, terms = math.log(alpha), _log_binomial_terms(k, n)
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return lo
        if _log_tail(terms, n, mid) < target:
            lo = mid
        else:
            hi = mid


def binomial_test_half(k: int, m: int) -> float:
    """Two-sided p-value of ``k`` successes in ``m`` trials under ``p = 1/2`` (scipy's ``binomtest``).

    By symmetry: ``min(1, 2 P[Bin(m, 1/2) >= max(k, m - k)])``, and 1 for ``k = m / 2``.
    """
    k, m = int(k), int(m)
    if m == 0 or 2 * k == m:
        return 1.0
    return min(1.0, 2.0 * math.exp(log_binomial_upper_tail(max(k, m - k), m, 0.5)))


# ----------------------------------------------------------------------------- noisy samples

def point_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The noise generator of point ``index``: seeded from sha256 of ``(seed, index)``."""
    digest = hashlib.sha256(f"timm-edl-smoothing:{int(seed)}:{int(index)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1))


class _NoiseStream:
    """Standard normal samples of one point's shape, drawn in blocks of :data:`NOISE_BLOCK`,
    handed out ``m`` at a time: the same samples for any sequence of ``m``."""

    def __init__(self, generator: torch.Generator, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.generator, self.shape, self.dtype, self.device = generator, tuple(shape), dtype, device
        self.left = torch.empty((0, *self.shape), dtype=dtype, device=device)

    def take(self, m: int) -> torch.Tensor:
        parts, have = [self.left], len(self.left)
        while have < m:
            block = torch.randn((NOISE_BLOCK, *self.shape), generator=self.generator, dtype=self.dtype,
                                device=self.device)
            parts.append(block)
            have += NOISE_BLOCK
        noise = torch.cat(parts) if len(parts) > 1 else self.left
        self.left = noise[m:]
        return noise[:m]


@torch.no_grad()
def noise_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, stream: _NoiseStream,
                 batch: int) -> torch.Tensor:
    """How often ``f(x + sigma * noise)`` is each class over ``num`` samples of ``stream``.

    ``x``: one point, shape (C, H, W) (any shape the model takes without its batch dimension).
    Returns (num_classes,) int64 counts on the CPU.
    """
    counts: Optional[torch.Tensor] = None
    done = 0
    while done < num:
        m = min(batch, num - done)
        logits = model(x.unsqueeze(0) + sigma * stream.take(m))
        c = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).cpu()
        counts = c if counts is None else counts + c
        done += m
    return counts


# ----------------------------------------------------------------------------- CERTIFY and PREDICT

def _device_of(model: nn.Module, device: Optional[torch.device]) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def _certify_point(model: nn.Module, x: torch.Tensor, label: int, index: int, *, sigma: float, n0: int, n: int,
                   alpha: float, batch: int, seed: int, device: torch.device) -> Dict[str, Any]:
    stream = _NoiseStream(point_generator(seed, index, device), x.shape, x.dtype, device)
    c_a = int(noise_counts(model, x, sigma, n0, stream, batch).argmax())  # selection (ties: lowest class)
    count = int(noise_counts(model, x, sigma, n, stream, batch)[c_a])     # estimation, fresh samples
    p_lower = clopper_pearson_lower(count, n, alpha)
    certified = p_lower > 0.5
    prediction = c_a if certified else ABSTAIN
    return {'index': int(index), 'label': int(label), 'prediction': prediction, 'count': count,
            'pA_lower': p_lower, 'radius': sigma * NormalDist().inv_cdf(p_lower) if certified else None,
            'correct': prediction == int(label)}


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, batch: int = 1000, seed: int = 0, indices: Optional[Sequence[int]] = None,
            device: Optional[torch.device] = None, progress=None) -> List[Dict[str, Any]]:
    """Cohen et al.'s CERTIFY on each point of ``(x, y)`` (x: (N, C, H, W) in [0, 1], y: (N,)).

    Per point: ``cA`` = the most frequent class of ``f`` over ``n0`` noisy samples; ``count`` =
    how often ``f`` gives ``cA`` over ``n`` fresh samples; ``pA_lower`` =
    :func:`clopper_pearson_lower` ``(count, n, alpha)``; if ``pA_lower > 1/2`` the prediction is
    ``cA`` with L2 radius ``sigma * Phi^-1(pA_lower)``, else :data:`ABSTAIN` (radius None).
    ``batch``: noisy samples per forward pass.  ``indices``: each point's index in the
    data set, which seeds its noise (default ``0..N-1``).  ``progress``: called with 1 after
    each point.  With probability at least ``1 - alpha`` (per point) a returned radius is
    certified for the smoothed classifier.

    Returns one record per point: ``index``, ``label``, ``prediction``, ``count``,
    ``pA_lower``, ``radius``, ``correct`` (prediction == label; False when abstaining).
    """
    device = _device_of(model, device)
    indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(x) or len(y) != len(x):
        raise ValueError(f"need one label and one index per point, got {len(x)} points, {len(y)} labels, "
                         f"{len(indices)} indices")
    model = model.eval()
    records = []
    for i in range(len(x)):
        records.append(_certify_point(model, x[i].to(device), int(y[i]), indices[i], sigma=sigma, n0=n0, n=n,
                                      alpha=alpha, batch=batch, seed=seed, device=device))
        if progress is not None:
            progress(1)
    return records


def predict(model: nn.Module, x: torch.Tensor, *, sigma: float, n: int = 100_000, alpha: float = 0.001,
            batch: int = 1000, seed: int = 0, indices: Optional[Sequence[int]] = None,
            device: Optional[torch.device] = None) -> torch.Tensor:
    """Cohen et al.'s PREDICT on each point of ``x``: (N,) int64 classes, :data:`ABSTAIN` where
    the top two counts ``nA, nB`` of ``n`` noisy samples fail the binomial test
    (:func:`binomial_test_half` ``(nA, nA + nB) > alpha``).  The probability of returning a
    class other than ``g(x)`` is at most ``alpha``.  Noise is seeded as in :func:`certify`."""
    device = _device_of(model, device)
    indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
    model = model.eval()
    out = torch.full((len(x),), ABSTAIN, dtype=torch.int64)
    for i in range(len(x)):
        stream = _NoiseStream(point_generator(seed, indices[i], device), x[i].shape, x.dtype, device)
        counts = noise_counts(model, x[i].to(device), sigma, n, stream, batch)
        top = torch.topk(counts, min(2, len(counts)))
        n_a = int(top.values[0])
        n_b = int(top.values[1]) if len(counts) > 1 else 0
        if binomial_test_half(n_a, n_a + n_b) <= alpha:
            out[i] = int(top.indices[0])
    return out


def certified_accuracy(records: Sequence[Dict[str, Any]], radii: Sequence[float] = RADII) -> Dict[str, Any]:
    """Certified accuracy at each radius: the fraction of all points that are predicted correctly
    with a radius ``>= r`` (at ``r = 0``: the smoothed classifier's accuracy, abstentions count
    as errors), plus the abstention rate.

    Returns ``{'radii': [{'radius', 'accuracy', 'n_certified'}], 'abstention_rate', 'n_abstained', 'n'}``.
    """
    n = len(records)
    if n == 0:
        raise ValueError("no certified points")
    rows = []
    for r in radii:
        k = sum(1 for p in records if p['correct'] and p['radius'] is not None and p['radius'] >= r)
        rows.append({'radius': float(r), 'accuracy': k / n, 'n_certified': k})
    abstained = sum(1 for p in records if p['prediction'] == ABSTAIN)
    return {'radii': rows, 'abstention_rate': abstained / n, 'n_abstained': abstained, 'n': n}
