"""Which candidate the agent executes (`serving.agent.pick_candidate`, config `policy.pick_prior_weight`)."""

import numpy as np
import pytest

from ipr_dist.config import Config
from serving.agent import pick, pick_candidate

pytestmark = pytest.mark.unit


def test_without_a_prior_weight_the_highest_imagined_return_is_executed():
    scores = np.array([4.41, 4.40, 4.43, 2.9])
    assert pick_candidate(scores, np.array([-0.2, -3.0, -9.0, -1.0]), 0.0) == 2


def test_the_pick_is_the_mode_of_the_policy_tilted_by_the_scores():
    """argmax R^ + beta log pi is the mode of pi * exp(R^ / beta), computed here directly."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.normal(4.0, rng.choice([0.005, 0.5]), 8)
        logits = rng.normal(0, 3, 8)
        logprobs = logits - np.log(np.exp(logits).sum())
        beta = rng.choice([0.01, 0.05, 1.0])
        tilted = np.exp(logprobs) * np.exp((scores - scores.max()) / beta)
        assert pick_candidate(scores, logprobs, beta) == int(np.argmax(tilted / tilted.sum()))


def test_near_ties_go_to_the_policy_and_a_clearly_lower_return_is_still_pruned():
    """Scores that tie within the critic's noise (a few thousandths) follow the policy; a candidate the
    world model rates clearly lower is not executed however likely the policy finds it."""
    logprobs = np.array([-0.2, -4.5, -8.0, -6.0])
    assert pick_candidate(np.array([4.408, 4.409, 4.410, 4.40]), logprobs, 0.02) == 0
    assert pick_candidate(np.array([3.10, 4.40, 4.41, 4.39]), logprobs, 0.02) == 1


def test_a_negative_prior_weight_is_refused():
    with pytest.raises(ValueError, match="pick_prior_weight"):
        Config.model_validate({"policy": {"pick_prior_weight": -0.1}})


def test_the_critics_uncertainty_lowers_a_candidate_by_kappa_times_the_members_disagreement():
    """argmax R^ - kappa u + beta log pi: a candidate whose lead the members do not agree on loses it;
    without the weight (or without members) the pick is unchanged."""
    from serving.agent import split_scores

    # columns: the critic's R^, then 3 members'; candidate 1 leads but the members disagree on it
    answer = np.array([[4.40, 4.40, 4.41, 4.39], [4.50, 4.10, 4.90, 4.50], [4.45, 4.44, 4.46, 4.45]])
    scores, u = split_scores(answer)
    assert np.allclose(scores, [4.40, 4.50, 4.45]) and u.argmax() == 1
    logprobs = np.log([0.3, 0.3, 0.4])
    assert pick_candidate(scores, logprobs, 0.0) == 1
    assert pick_candidate(scores, logprobs, 0.0, u, 0.0) == 1
    assert pick_candidate(scores, logprobs, 0.0, u, 1.0) == 2
    assert not split_scores(answer[:, :2])[1].any()  # one member: no disagreement
    # `pick`: the same on a scorer's answer, with the config's weights
    lcb = Config.model_validate({"policy": {"pick_uncertainty_weight": 1.0}, "world_model": {"critic_members": 3}})
    assert pick(answer, logprobs, lcb.policy) == 2 and pick(answer, logprobs, Config().policy) == 1


def test_uncertainty_weights_need_member_heads():
    with pytest.raises(ValueError, match="critic_members >= 2"):
        Config.model_validate({"policy": {"pick_uncertainty_weight": 1.0}})
    with pytest.raises(ValueError, match="grpo.advantage_noise_weight.*critic_members >= 2"):
        Config.model_validate({"grpo": {"advantage_noise_weight": 1.0}, "world_model": {"critic_members": 1}})
    Config.model_validate({"grpo": {"advantage_noise_weight": 1.0}, "world_model": {"critic_members": 5}})
