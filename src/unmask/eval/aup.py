"""Accuracy under parallelism (AUP): one number for a decoder's accuracy against its tokens per forward.

d3LLM (Hao AI Lab 2025/2026, ``AUP_leaderboard/aup_utils.py``) scores a curve of points ``(rho_i, y_i)``, ``rho``
the tokens per forward (generated tokens over network calls, > 0) and ``y`` the accuracy in percent, against
``y_max``, the best accuracy of every method compared on the task:

* the points sorted by ``rho`` (ties keep their order); ``y_1`` is the accuracy of the least parallel one;
* points below ``y_1 - 5`` (``offset``) are dropped: a decoder that loses more than 5 points has left the curve;
* ``AUP = rho_1 y_1 + sum_i (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2``: the first point's
  rectangle, then the trapezoids of the weighted accuracy, with ``W(y) = min(exp(-alpha (1 - y / y_max)), 1)``,
  ``alpha = 3``: a point 10 % below the best counts 0.74 of its accuracy.

The reference asserts that the most parallel point is within ``offset`` of ``y_1``; here such a point is dropped
like any other below the threshold (the same number wherever the reference gives one).
"""

from __future__ import annotations

import math

ALPHA = 3.0  # the weight's penalty for accuracy below the best
OFFSET = 5.0  # accuracy points below the least parallel point's at which a point leaves the curve


def aup_weight(y: float, y_max: float, alpha: float = ALPHA) -> float:
    """``W(y) = min(exp(-alpha (1 - y / y_max)), 1)``."""
    return min(math.exp(-alpha * (1 - y / y_max)), 1.0)


def aup_points(rho: list[float], y: list[float], offset: float = OFFSET) -> list[tuple[float, float]]:
    """The points of the curve that count: sorted by ``rho``, those at or above ``y_1 - offset``."""
    if len(rho) != len(y) or not rho:
        raise ValueError("AUP needs as many accuracies as tokens-per-forward values, at least one")
    if any(not r > 0 for r in rho):
        raise ValueError("tokens per forward must be positive")
    if any(not 0 <= a <= 100 for a in y):
        raise ValueError("accuracies are percentages in [0, 100]")
    points = sorted(zip(rho, y), key=lambda p: p[0])
    floor = points[0][1] - offset
    return [(r, a) for r, a in points if a >= floor]


def aup(rho: list[float], y: list[float], y_max: float, alpha: float = ALPHA, offset: float = OFFSET) -> float:
    """The AUP (module docstring) of the points ``(rho_i, y_i)`` (tokens per forward, accuracy in percent) against
    the best accuracy ``y_max`` of all the methods compared."""
    if not 0 < y_max <= 100:
        raise ValueError("y_max is the best accuracy in percent, in (0, 100]")
    points = aup_points(rho, y, offset)
    total = points[0][0] * points[0][1]
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        total += 0.5 * (r1 - r0) * (a1 * aup_weight(a1, y_max, alpha) + a0 * aup_weight(a0, y_max, alpha))
    return total
