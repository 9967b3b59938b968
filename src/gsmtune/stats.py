"""Confidence intervals and tests for accuracies (pure: no torch)."""

from __future__ import annotations

import math


def wilson_ci(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval: unlike the normal approximation it stays inside [0, 1] at 0% or 100%."""
    if total == 0:  # no data: every accuracy is possible, not a certain 0%
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no rounding noise at 0% or 100%
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return (lo, hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (b: only A right, c: only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: a table of many paired tests keeps its family-wise error rate at the level
    each adjusted p is read against (some pair of 20 tests gets p < 0.05 by chance alone; its adjusted p does not)."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_bootstrap_ci(a: list[bool], b: list[bool], n_boot: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of accuracy(b) - accuracy(a), resampling problems (pairs stay together)."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError("paired bootstrap needs the same problems in both runs")
    if not a:
        return (0.0, 0.0)
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
