"""Table 2's summaries across methods: per level, the mean of the per-game normalised scores, the
average rank over games (1 = best, ties share their mean rank) and Ratio@Top-3 (share of games
where the method ranks within the top 3); overall, the mean rank over every (game, level) cell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class LevelSummary:
    mean: float | None  # mean normalised score over the games the method has a value on
    avg_rank: float | None
    top3: float | None  # Ratio@Top-3 in [0, 1]
    games: int  # games with a value


def game_ranks(values: dict[str, float | None]) -> dict[str, float]:
    """Rank of each method on one game (higher value = better = rank 1); methods without a value
    (None) are left out."""
    present = {m: v for m, v in values.items() if v is not None and np.isfinite(v)}
    if not present:
        return {}
    ranks = rankdata([-v for v in present.values()], method="average")
    return dict(zip(present, map(float, ranks)))


def rank_methods(table: dict[str, dict[str, float | None]], top: int = 3) -> tuple[dict[str, LevelSummary],
                                                                                   dict[str, list[float]]]:
    """`table[game][method]` = normalised score (None: missing). Returns the per-method summary of
    this level and each method's list of per-game ranks (for the overall rank)."""
    methods = sorted({m for row in table.values() for m in row})
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    scores: dict[str, list[float]] = {m: [] for m in methods}
    for row in table.values():
        for m, r in game_ranks(row).items():
            ranks[m].append(r)
            scores[m].append(float(row[m]))
    out = {}
    for m in methods:
        n = len(ranks[m])
        out[m] = LevelSummary(mean=float(np.mean(scores[m])) if n else None,
                              avg_rank=float(np.mean(ranks[m])) if n else None,
                              top3=float(np.mean(np.array(ranks[m]) <= top)) if n else None, games=n)
    return out, ranks
