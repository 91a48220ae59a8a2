"""Survival (paper Eq. 10-11): episode length until irreversible failure, in a per-game step unit
derived from the order of magnitude of the random policy's mean lifetime."""

from __future__ import annotations

import math
from collections.abc import Sequence


def step_unit(random_mean_length: float) -> int:
    """H = 10^(floor(log10 L_rand) + 1)  (Eq. 10): 37 steps -> 100, 100 -> 1000, 4200 -> 10000."""
    if not random_mean_length > 0:
        raise ValueError(f"the random policy's mean lifetime must be positive, got {random_mean_length}")
    return 10 ** (math.floor(math.log10(random_mean_length)) + 1)


def survival_score(lengths: Sequence[float], unit: int) -> float:
    """SurvivalScore = L_agent / H  (Eq. 11), L_agent the mean episode length in steps."""
    if not len(lengths):
        raise ValueError("no episodes to score")
    return float(sum(lengths) / len(lengths)) / unit
