"""Utility (paper Eq. 12): the human-normalised score. 0 is the random policy, 1 the human
reference; a game without a human reference has no Utility (None), never a made-up one."""

from __future__ import annotations

EPS = 1e-8


def human_normalised_score(agent: float, random: float, human: float | None, eps: float = EPS,
                           clip: tuple[float, float] | None = None) -> float | None:
    """HNS = (score_agent - score_rand) / (score_human - score_rand + eps)  (Eq. 12), optionally
    clipped to `clip`; None when the human reference is missing."""
    if human is None:
        return None
    value = (agent - random) / (human - random + eps)
    if clip is not None:
        value = min(max(value, clip[0]), clip[1])
    return float(value)
