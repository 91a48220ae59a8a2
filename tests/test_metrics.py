"""The evaluation metrics pinned to their equations (paper Eq. 10-12, Sec. 9.3) on hand-computed
cases, and the magnitude area checked against the Magnipy library."""

import math

import numpy as np
import pytest

from ipr_dist.metrics import (convergence_scale, human_normalised_score, magnitude_area, magnitude_function,
                              rank_methods, step_unit, survival_score)
from ipr_dist.metrics.magnitude import subsample

pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`


@pytest.mark.parametrize("l_rand, unit", [(1, 10), (9.9, 10), (37, 100), (100, 1000), (999, 1000), (4200, 10000)])
def test_step_unit_is_the_next_power_of_ten(l_rand, unit):
    # Eq. 10: H = 10^(floor(log10 L_rand) + 1)
    assert step_unit(l_rand) == unit


def test_survival_score_is_mean_length_over_the_unit():
    # Eq. 11 with L_rand = 37 -> H = 100; agent lifetimes 50, 150, 100 -> L_agent = 100 -> 1.0
    assert survival_score([50, 150, 100], step_unit(37)) == pytest.approx(1.0)
    assert survival_score([25], 100) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        step_unit(0)


def test_hns_with_random_and_human_references():
    # Eq. 12: (m - m_rnd) / (m_hum - m_rnd + eps)
    assert human_normalised_score(10.0, 10.0, 30.0) == pytest.approx(0.0)
    assert human_normalised_score(30.0, 10.0, 30.0) == pytest.approx(1.0)
    assert human_normalised_score(50.0, 10.0, 30.0) == pytest.approx(2.0)
    assert human_normalised_score(0.0, 10.0, 30.0) == pytest.approx(-0.5)
    assert human_normalised_score(50.0, 10.0, 30.0, clip=(-1.0, 1.5)) == 1.5
    # no human reference: Utility is missing, never zero
    assert human_normalised_score(50.0, 10.0, None) is None


def test_magnitude_of_two_points_and_its_area_match_the_closed_forms():
    d, big_t = 2.0, 3.0
    pts = np.array([[0.0, 0.0], [d, 0.0]])
    ts = np.linspace(0, big_t, 4001)
    # |tX| = 2 / (1 + e^{-td}) for two points at distance d
    np.testing.assert_allclose(magnitude_function(pts, ts), 2 / (1 + np.exp(-ts * d)), rtol=1e-10)
    # integral_0^T 2/(1+e^{-td}) dt = (2/d) (ln(e^{Td} + 1) - ln 2)
    exact = 2 / d * (math.log(math.exp(big_t * d) + 1) - math.log(2))
    assert magnitude_area(pts, ts) == pytest.approx(exact, rel=1e-6)


def test_equilateral_magnitude_and_duplicates():
    # n points pairwise at distance d: |tX| = n / (1 + (n - 1) e^{-td})
    tri = np.array([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]])
    ts = np.array([0.1, 1.0, 5.0])
    np.testing.assert_allclose(magnitude_function(tri, ts), 3 / (1 + 2 * np.exp(-ts)), rtol=1e-10)
    # a repeated frame is the same point of the metric space: magnitude unchanged
    np.testing.assert_allclose(magnitude_function(np.vstack([tri, tri[:1]]), ts), magnitude_function(tri, ts))
    assert magnitude_function(np.zeros((5, 3)), ts).tolist() == [1.0, 1.0, 1.0]


def test_convergence_scale_reaches_the_target_share():
    x = np.random.default_rng(0).normal(size=(30, 5))
    t = convergence_scale(x, 0.95)
    assert magnitude_function(x, [t])[0] >= 0.95 * 30
    assert magnitude_function(x, [t * 0.99])[0] < 0.95 * 30 + 1e-6


def test_magnitude_area_matches_magnipy():
    """Independent implementation: Magnipy (Limbeck et al.), the library the paper uses. Magnipy 1.0.0
    imports scipy.integrate.trapz, which scipy 1.14 renamed to trapezoid; the alias is restored here."""
    import scipy.integrate

    if not hasattr(scipy.integrate, "trapz"):
        scipy.integrate.trapz = scipy.integrate.trapezoid
    from magnipy import Magnipy

    rng = np.random.default_rng(1)
    for n, dim in ((10, 2), (40, 8), (64, 16)):
        x = rng.normal(size=(n, dim))
        ts = np.linspace(0, 2.5, 30)
        ref = Magnipy(x, ts=ts, method="cholesky", metric="euclidean")
        mag, _ = ref.get_magnitude()
        np.testing.assert_allclose(magnitude_function(x, ts), mag, rtol=1e-8)
        assert magnitude_area(x, ts) == pytest.approx(ref.MagArea(), rel=1e-8)
        assert convergence_scale(x, 0.95) == pytest.approx(Magnipy(x, target_prop=0.95).get_t_conv(), rel=1e-2)


def test_subsample_caps_frames_evenly():
    assert subsample(5, 10).tolist() == [0, 1, 2, 3, 4]
    idx = subsample(1000, 64)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 999


def test_ranks_and_top3_on_a_hand_computed_table():
    # game g1: a > b > c > d; game g2: d > c > b = a (tie shares rank 3.5); game g3: only a and b
    table = {"g1": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0},
             "g2": {"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0},
             "g3": {"a": 1.0, "b": 2.0, "c": None, "d": None}}
    summary, ranks = rank_methods(table)
    assert ranks["a"] == [1.0, 3.5, 2.0] and ranks["d"] == [4.0, 1.0]
    assert summary["a"].avg_rank == pytest.approx(6.5 / 3)
    assert summary["a"].top3 == pytest.approx(2 / 3)  # 3.5 is outside the top 3
    assert summary["c"].games == 2 and summary["c"].avg_rank == pytest.approx(2.5)
    assert summary["b"].mean == pytest.approx(2.0)


def test_frame_sampler_keeps_evenly_spaced_frames():
    from actors.eval_worker import FrameSampler

    s = FrameSampler(8)
    buffer = np.zeros(1)  # one buffer, rewritten every step, as HTML environments do
    for t in range(100):
        buffer[0] = t
        s.add(buffer)
    kept = [int(f[0]) for f in s.frames]
    assert 8 <= len(kept) < 16
    gaps = np.diff(kept)
    assert gaps.min() == gaps.max() > 0  # one stride throughout, each frame its own copy


def test_prompt_and_answer_parsing():
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.games.discrete import action_menu
    from serving.prompt_vlm import build_prompt, parse_answer

    info = game_info("Dodge-Html", load_annotations())
    names = [n for n, _ in action_menu(info)]
    assert names == ["noop", "press ArrowLeft", "press ArrowRight"]
    prompt = build_prompt(info, names, "Dodge the rocks.", ["noop"], "rocks fall fast")
    for part in ("Dodge-Html", "accelerate left", "Task and goal: Dodge the rocks.", "Recent actions: noop",
                 "rocks fall fast", '"action"'):
        assert part in prompt
    ok = parse_answer('sure {"thought": "left", "memory": "m1", "action": "press ArrowLeft"} done', names)
    assert ok.action == 1 and ok.memory == "m1"
    for bad in ("no json here", '{"action": "jump"}', '{"action": ', "[1, 2]"):
        assert parse_answer(bad, names).action is None


def test_bootstrap_interval_and_paired_difference():
    """The report's 95% intervals: a percentile bootstrap of the mean, and a paired difference over the
    episodes two methods played on the same seeds, significant only when its interval excludes 0."""
    from ipr_dist.metrics.report import bootstrap_interval, paired_difference

    values = np.arange(20, dtype=float)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 10  # the mean 9.5, its standard error ~1.3
    assert bootstrap_interval([3.0, 3.0, 3.0]) == [3.0, 3.0]
    a = {i: 10.0 + 0.1 * (i % 3) for i in range(12)}
    b = {i: 5.0 + 0.1 * (i % 2) for i in range(12)}
    d = paired_difference(a, b)
    assert d["significant"] and d["low"] > 0 and d["pairs"] == 12 and d["low"] <= d["diff"] <= d["high"]
    noise = {i: float(v) for i, v in enumerate(np.random.default_rng(0).normal(0, 1, 12))}
    assert not paired_difference(noise, {i: 0.0 for i in range(12)})["significant"]
    assert paired_difference({0: 1.0}, {0: 2.0}) is None  # fewer than 2 pairs: no interval
    assert paired_difference({0: 1.0, 1: 2.0}, {2: 1.0, 3: 2.0}) is None  # no common seed


def test_must_show_counts_read_games_above_random_and_pairs_above_the_ablation():
    """Games above random count once whatever the IPR variant or level; ablation pairs are (game, level) at
    Survival or raw score; Curiosity, non-significant and negative differences count for nothing."""
    from ipr_dist.metrics.report import must_show_counts

    def d(method, against, game, level, diff, significant=True):
        return {"method": method, "against": against, "game": game, "level": level, "diff": diff,
                "significant": significant}

    games = ["A", "B", "C", "D"]
    diffs = [d("ipr@survival", "random", "B", "survival", 0.2), d("ipr@utility", "random", "B", "score", 3.0),
             d("ipr@utility", "random", "A", "score", 5.0), d("ipr@survival", "random", "C", "curiosity", 0.1),
             d("ipr@survival", "random", "D", "survival", 0.3, significant=False),
             d("ipr@survival", "random", "D", "score", -2.0),
             d("ipr@survival", "ipr-no-wm@survival", "C", "survival", 0.1),
             d("ipr@survival", "ipr-no-wm@survival", "C", "score", 1.0),
             d("ipr@utility", "ipr-no-wm@utility", "C", "score", 1.0),
             d("ipr@utility", "ipr-random-pick@utility", "D", "survival", 0.4),
             d("ipr@survival", "ipr-no-wm@survival", "A", "curiosity", 0.2)]
    assert must_show_counts(diffs, games) == (
        "Counted at Survival or raw score: IPR above random on 2 of 4 games (A, B); above ipr-no-wm on 2 (game, "
        "level) pairs (C @survival, C @utility).")
    assert must_show_counts([], games) == ("Counted at Survival or raw score: IPR above random on 0 of 4 games; "
                                           "above ipr-no-wm on 0 (game, level) pairs.")


def test_ipr_no_grpo_proposes_with_the_aligned_policy_and_is_paired_with_ipr(tmp_path):
    """ipr-no-grpo: IPR with Stage 3's aligned policy where every other IPR method uses Stage 4's, so the
    report pairs IPR with it per game (what GRPO's updates add); before Stage 4 both are the aligned one."""
    import json

    from cluster.evaluate import IPR_PICKS, acting_policy
    from ipr_dist.config import Config
    from ipr_dist.run_layout import ALIGNED_POLICY, GRPO_POLICY, POINTER
    from learners.align import aligned_policy, grpo_policy

    cfg = Config.model_validate({"run": {"root": str(tmp_path), "name": "r"},
                                 "eval": {"methods": ["random", "ipr@survival", "ipr-no-grpo@survival"]}})

    def commit(name: str) -> None:
        (tmp_path / "r" / name / "v-1").mkdir(parents=True)
        (tmp_path / "r" / name / POINTER).write_text(json.dumps({"dir": "v-1"}))

    commit(ALIGNED_POLICY)
    assert acting_policy(cfg, "ipr") == acting_policy(cfg, "ipr-no-grpo") == aligned_policy(cfg)
    commit(GRPO_POLICY)
    assert acting_policy(cfg, "ipr") == acting_policy(cfg, "ipr-no-wm") == grpo_policy(cfg)
    assert acting_policy(cfg, "ipr-no-grpo") == aligned_policy(cfg)
    assert IPR_PICKS["ipr-no-grpo"] == IPR_PICKS["ipr"] == "world_model"  # the same agent but for its policy
