"""Paired statistics of two models on the same test points.

Per-point correctness (one bool per point, in the evaluation's order) is stored in evaluation
JSONs as a hex string (:func:`pack_correct`, read back by :func:`unpack_correct`). Two models
``A`` and ``B`` on the same ``n`` points give the discordant counts (:func:`paired_counts`)

    b = #{i : A_i and not B_i},    c = #{i : B_i and not A_i},

and McNemar's exact test (:func:`mcnemar_exact`) asks whether ``b`` and ``c`` are draws of one
binomial with p = 1/2 given ``b + c``: under "both models have the same accuracy" each
discordant point is equally likely to favour either, so the two-sided p-value is

    p = min(1, 2 * P[X <= min(b, c)]),    X ~ Binomial(b + c, 1/2).

The concordant points carry no information about the difference and do not enter.

Where each point yields several correlated outcomes (an image under 75 corruptions), the
outcomes are not independent draws; :func:`sign_test` compares a per-point score (how many
of its outcomes a model gets right) instead: the points where A scores higher against those
where B does, by the same exact binomial test, ties dropped.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Sequence, Tuple, Union

import torch

__all__ = ['pack_correct', 'unpack_correct', 'paired_counts', 'mcnemar_exact', 'sign_test']

Correct = Union[torch.Tensor, Sequence[bool]]


def pack_correct(correct: Correct) -> str:
    """Per-point correctness (bool, one per evaluated point, in order) as a hex string of its
    bits, most significant first (8 points per 2 hex digits): 10,000 points in 2,500 characters."""
    bits = torch.as_tensor(correct).detach().to('cpu', torch.bool).flatten().tolist()
    bits += [False] * (-len(bits) % 8)
    return bytes(int(''.join('1' if b else '0' for b in bits[i:i + 8]), 2)
                 for i in range(0, len(bits), 8)).hex()


def unpack_correct(text: str, n: int) -> List[bool]:
    """The first ``n`` per-point results written by :func:`pack_correct`."""
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"packed per-point results must be a hex string (pack_correct), got {str(text)[:40]!r}") \
            from None
    bits = [c == '1' for byte in raw for c in f'{byte:08b}']
    if len(bits) < n:
        raise ValueError(f"packed per-point results hold {len(bits)} points, asked for {n}")
    return bits[:n]


def paired_counts(a: Correct, b: Correct) -> Tuple[int, int]:
    """``(b, c)``: the points ``a`` gets right and ``b`` wrong, and the reverse, for two (n,)
    bool vectors over the same points."""
    a = torch.as_tensor(a, dtype=torch.bool).flatten()
    b = torch.as_tensor(b, dtype=torch.bool).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired counts need results on the same points, got {a.numel()} and {b.numel()} points")
    return int((a & ~b).sum()), int((b & ~a).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p = 1/2),
    computed in exact fractions.

    >>> mcnemar_exact(0, 0), mcnemar_exact(0, 5), round(mcnemar_exact(2, 8), 4)
    (1.0, 0.0625, 0.1094)
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def sign_test(a: Sequence[float], b: Sequence[float]) -> Tuple[int, int, float]:
    """Two-sided exact sign test of paired scores ``a[i]`` vs ``b[i]``: ``(#{a > b}, #{a < b}, p)``,
    ties dropped, ``p`` as :func:`mcnemar_exact` of the two counts."""
    if len(a) != len(b):
        raise ValueError(f"the sign test needs paired scores, got {len(a)} and {len(b)}")
    more = sum(x > y for x, y in zip(a, b))
    fewer = sum(x < y for x, y in zip(a, b))
    return more, fewer, mcnemar_exact(more, fewer)
