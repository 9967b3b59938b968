"""Confidence intervals and tests for accuracies (pure: no torch)."""

from __future__ import annotations

import math


def wilson_ci(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval: unlike the normal approximation it stays inside [0, 1] at 0% or 100%."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no rounding noise at 0% or 100%
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return (lo, hi)
