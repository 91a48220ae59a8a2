"""Curiosity (paper Sec. 9.3): the area under the magnitude function of the point cloud of an
episode's frame embeddings.

For a finite metric space with distances d_ij, the similarity matrix at scale t is
Z_t = exp(-t d_ij); its magnitude is |tX| = sum_i w_i with Z_t w = 1 (one Cholesky solve per scale,
Z_t is positive definite for subsets of Euclidean space). |tX| grows from 1 (t -> 0, everything one
point) to the number of distinct points (t -> inf, all points apart). The area over a fixed scale
interval grows when an episode visits more, and more spread out, states. Identical frames are one
point (a metric space has no duplicates; magnitude with repeated points is the same), which also
keeps Z_t non-singular. Checked against the Magnipy library in tests/test_metrics.py.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.spatial.distance import cdist


def _distinct(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or not len(points):
        raise ValueError(f"expected a non-empty (n, d) point cloud, got shape {points.shape}")
    return np.unique(points, axis=0)


def magnitude_function(points: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """|tX| at each scale t (t = 0 gives 1 by the one-point property)."""
    x = _distinct(points)
    d = cdist(x, x)
    ones = np.ones(len(x))
    out = np.empty(len(scales))
    for i, t in enumerate(np.asarray(scales, np.float64)):
        if t <= 0 or len(x) == 1:
            out[i] = 1.0
            continue
        z = np.exp(-t * d)
        try:
            w = cho_solve(cho_factor(z), ones)
        except LinAlgError:  # numerically singular at tiny t: the least-squares weights are the limit
            w = np.linalg.lstsq(z, ones, rcond=None)[0]
        out[i] = w.sum()
    return out


def magnitude_area(points: np.ndarray, scales: np.ndarray) -> float:
    """E = AUC(|tX|) over the given scales (trapezoid rule); scales must be increasing."""
    scales = np.asarray(scales, np.float64)
    if np.any(np.diff(scales) <= 0):
        raise ValueError("scales must be strictly increasing")
    return float(np.trapezoid(magnitude_function(points, scales), scales))


def convergence_scale(points: np.ndarray, target: float = 0.95, tol: float = 1e-3) -> float:
    """The scale where |tX| first reaches `target` x (number of distinct points), by bisection on
    log t. Used once per game, on the random policy's episodes, to fix the scale interval every
    method's areas are measured on."""
    x = _distinct(points)
    n = len(x)
    if n == 1:
        return 1.0
    goal = target * n
    d = cdist(x, x)
    lo = 1.0 / d.max()
    hi = 1.0 / d[d > 0].min()
    while magnitude_function(x, [lo])[0] >= goal:
        lo /= 2
    while magnitude_function(x, [hi])[0] < goal:
        hi *= 2
    while hi / lo > 1 + tol:
        mid = float(np.sqrt(lo * hi))
        if magnitude_function(x, [mid])[0] >= goal:
            hi = mid
        else:
            lo = mid
    return float(hi)


def subsample(n: int, cap: int) -> np.ndarray:
    """Indices of at most `cap` frames spread evenly over an episode of n frames (the Cholesky
    solve is O(cap^3) per scale, so the cap bounds the metric's cost)."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))
