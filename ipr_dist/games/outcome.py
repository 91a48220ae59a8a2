"""A step's reward and episode end for games read through score / lives / game-over variables (HTML
and desktop games): the reward is the score's change, losing a life is a failure when
`env.failure_on` says so, and an episode ends on game over or failure, or is truncated at its cap."""

from __future__ import annotations

from typing import Any


def life_lost(last_lives, lives):
    """Whether a step lost a life: the game counts lives (-1 where it has none) and the count fell. Numbers
    or numpy arrays (element-wise)."""
    return (last_lives >= 0) & (lives >= 0) & (lives < last_lives)


def step_outcome(info: dict[str, Any], last_score: float, last_lives: int, failure_on: str, t: int,
                 max_episode_steps: int) -> tuple[float, bool, bool]:
    """(reward, terminated, truncated) of a step whose variables are `info` (its `failure` is updated)."""
    lost = bool(life_lost(last_lives, info["lives"]))
    info["failure"] = bool(info["failure"] or (failure_on == "life_lost" and lost))
    terminated = bool(info["game_over"] or info["failure"])
    return float(info["score"] - last_score), terminated, not terminated and t >= max_episode_steps
