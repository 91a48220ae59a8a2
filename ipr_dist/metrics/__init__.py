"""The three evaluation levels of paper Sec. 5.1 / 9.3 (Survival, Curiosity, Utility) and the
cross-method summaries of Table 2 (normalised means, average rank, Ratio@Top-3). Plain numpy/scipy,
no Ray: every function is pinned to its equation by tests/test_metrics.py."""

from ipr_dist.metrics.magnitude import convergence_scale, magnitude_area, magnitude_function
from ipr_dist.metrics.ranking import LevelSummary, rank_methods
from ipr_dist.metrics.survival import step_unit, survival_score
from ipr_dist.metrics.utility import human_normalised_score

__all__ = ["LevelSummary", "convergence_scale", "human_normalised_score", "magnitude_area", "magnitude_function",
           "rank_methods", "step_unit", "survival_score"]
