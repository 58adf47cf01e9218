"""The package's statistics, pure functions over arrays: ranks and AUC, the one seeded stratified split,
and the interval of a rate.

Everything that turns numbers into a claim (a probe's held-out AUC, a judge's agreement, a toxic
rate's error bar) uses these, so each statistic is computed one way.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties; NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def stratified_shuffle(keys: Sequence[Hashable], seed: int) -> dict[Hashable, np.ndarray]:
    """Indices of each group of equal key, each group shuffled; groups drawn in sorted key order
    from one generator seeded with ``seed``, so the result depends only on the keys and the seed."""
    keys = list(keys)
    rng = np.random.default_rng(seed)
    groups = {}
    for key in sorted(set(keys)):
        idx = np.flatnonzero(np.fromiter((k == key for k in keys), dtype=bool, count=len(keys)))
        rng.shuffle(idx)
        groups[key] = idx
    return groups


def stratified_split(keys: Sequence[Hashable], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted indices: ``round(n * test_fraction)`` (at least one when the fraction is
    positive) of every group of equal key held out, the same for the same keys and seed."""
    train, test = [], []
    for idx in stratified_shuffle(keys, seed).values():
        n_test = max(1, int(round(len(idx) * test_fraction))) if test_fraction > 0 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate: small-sample honest error bars."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 and n the bound equals the rate in exact arithmetic; rounding must not leave the rate outside
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


# ---------------------------------------------------------------------------- paired comparisons


def paired_bootstrap(
    before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean(after - before), low, high)``: the paired difference of two arms measured on the same items,
    with a percentile bootstrap interval over the items (``n_boot`` resamples, seeded). Items whose value is
    missing (NaN) in either arm are left out of both."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arms differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = (b - a)[keep]
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(low), float(high)


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int, float]:
    """``(gained, lost, p)`` for paired binary outcomes: ``gained`` items false before and true after, ``lost``
    the reverse, and the exact two-sided McNemar p-value (a binomial test of the discordant pairs at 1/2)."""
    if len(before) != len(after):
        raise ValueError(f"paired arms differ in length: {len(before)} vs {len(after)}")
    gained = sum(1 for x, y in zip(before, after, strict=True) if not x and y)
    lost = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    n = gained + lost
    if n == 0:
        return gained, lost, 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return gained, lost, min(1.0, 2 * tail)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    rx, ry = average_ranks(np.asarray(x)), average_ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_pairs(
    statistic, x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(statistic(x, y), low, high)``: a statistic of paired items and its percentile bootstrap interval over the
    items (resamples where it is undefined, NaN, are left out)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = [statistic(a[i], b[i]) for i in rng.integers(0, a.size, size=(n_boot, a.size))]
    draws = np.asarray([d for d in draws if d == d])
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail]) if draws.size else (float("nan"), float("nan"))
    return float(statistic(a, b)), float(low), float(high)


def bootstrap_spearman(
    x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(rho, low, high)``: Spearman's rho and its percentile bootstrap interval over the (x, y) pairs."""
    return bootstrap_pairs(spearman, x, y, n_boot, seed, level)
