"""Eq. 21 on fixed inputs, against a direct transcription of the paper's formula, with the sampling
distribution (temperature, nucleus) and the exact per-position KL written out by hand."""

import math

import pytest
import torch

from ipr_dist.algos.grpo import group_advantages, grpo_loss
from ipr_dist.models.policy import sampling_logprobs

pytestmark = pytest.mark.unit


def nucleus_by_hand(logits, temperature, top_p):
    """One position's sampling distribution, as a list: softmax at T, the most likely codes kept while
    the mass before each is under top_p, renormalised."""
    z = [x / temperature for x in logits]
    top = max(z)
    p = [math.exp(x - top) for x in z]
    total = sum(p)
    p = [x / total for x in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, before = set(), 0.0
    for i in order:
        if before < top_p:
            kept.add(i)
        before += p[i]
    mass = sum(p[i] for i in kept)
    return [p[i] / mass if i in kept else 0.0 for i in range(len(p))]


def direct_eq21(logits, codes, returns, ref_logits, beta, temperature, top_p, eps=1e-6):
    """Eq. 21 written out: advantages per group, -1/B sum_b A^(b) log pi(a^(b)) with log pi the sum over
    the sequence's codes of the sampling distribution's log-probabilities, plus beta x the sum over
    positions of the exact KL at temperature T (mean over b)."""
    total = 0.0
    groups, b, length, k = logits.shape
    for g in range(groups):
        r = returns[g].tolist()
        mean = sum(r) / b
        std = (sum((x - mean) ** 2 for x in r) / b) ** 0.5
        adv = [(x - mean) / (std + eps) for x in r]
        pg, kl = 0.0, 0.0
        for i in range(b):
            for pos in range(length):
                row = logits[g, i, pos].tolist()
                pg -= adv[i] * math.log(nucleus_by_hand(row, temperature, top_p)[int(codes[g, i, pos])]) / b
                p = nucleus_by_hand(row, temperature, 1.0)
                q = nucleus_by_hand(ref_logits[g, i, pos].tolist(), temperature, 1.0)
                kl += sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)) / b
        total += pg + beta * kl
    return total / groups


def sampled_codes(logits, temperature, top_p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = sampling_logprobs(logits, temperature, top_p).exp()
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.5, 0.6)])
def test_loss_matches_a_direct_implementation_of_eq21(temperature, top_p):
    torch.manual_seed(0)
    logits = (2 * torch.randn(3, 8, 4, 6)).requires_grad_()
    ref = 2 * torch.randn(3, 8, 4, 6)
    codes = sampled_codes(logits.detach(), temperature, top_p)
    returns = torch.randn(3, 8)
    out = grpo_loss(logits, codes, returns, ref, beta_kl=0.05, temperature=temperature, top_p=top_p)
    expected = direct_eq21(logits.detach(), codes, returns, ref, 0.05, temperature, top_p)
    assert abs(float(out["loss"].detach()) - expected) < 1e-4


def test_sampling_logprobs_is_the_nucleus_at_temperature_and_greedy_is_t1():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    for t, p in ((0.7, 0.9), (1.3, 0.5), (0.4, 0.99)):
        got = sampling_logprobs(logits, t, p).exp().tolist()
        assert all(abs(a - b) < 1e-6 for a, b in zip(got, nucleus_by_hand(logits.tolist(), t, p)))
    assert torch.allclose(sampling_logprobs(logits, 0.0, 0.5), torch.log_softmax(logits, -1))
    assert torch.isinf(sampling_logprobs(logits, 0.7, 0.5)[-1])  # outside the nucleus: never drawn


def test_kl_is_exact_per_position_where_k3_on_drawn_codes_was_biased():
    """With samples drawn at T = 0.7 inside a 0.9 nucleus, the k3 estimate on the drawn codes (the old
    estimator, with log-probs at T = 1) misses the true KL of the distributions at T; the loss's KL,
    exact over the K codes at each sampled prefix, equals it (factorised distributions: the prefix
    does not change the next code's distribution)."""
    torch.manual_seed(2)
    length, k, t, top_p = 4, 16, 0.7, 0.9
    pi, pi0 = torch.randn(length, k), 2 * torch.randn(length, k)
    exact = float((torch.log_softmax(pi / t, -1).exp() * (torch.log_softmax(pi / t, -1)
                                                          - torch.log_softmax(pi0 / t, -1))).sum())
    n = 4000
    logits, ref = pi.expand(1, n, length, k), pi0.expand(1, n, length, k)
    codes = sampled_codes(logits, t, top_p, seed=3)
    out = grpo_loss(logits, codes, torch.zeros(1, n), ref, beta_kl=1.0, temperature=t, top_p=top_p)
    assert abs(float(out["kl"]) - exact) < 1e-4 * max(exact, 1.0)
    lp, lr = torch.log_softmax(pi, -1), torch.log_softmax(pi0, -1)  # the old estimator: T = 1, drawn codes only
    r = lr.gather(1, codes[0].T).T - lp.gather(1, codes[0].T).T
    k3 = float((torch.exp(r) - r - 1).sum(-1).mean())
    assert abs(k3 - exact) > 0.1 * exact


def test_equal_returns_give_no_policy_gradient_and_are_counted():
    logits = torch.zeros(2, 4, 3, 5, requires_grad=True)
    codes = torch.zeros(2, 4, 3, dtype=torch.long)
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    out = grpo_loss(logits, codes, returns, logits.detach(), beta_kl=0.0)
    out["loss"].backward()
    assert out["equal_groups"] == 1 and torch.all(logits.grad[0] == 0) and torch.any(logits.grad[1] != 0)


def test_an_anchor_group_moves_the_policy_only_back_toward_pi0():
    """`anchor` (a game GRPO does not learn on, grpo.anchor_unlearned): whatever its returns, the group gets no
    advantage, so its gradient is the KL's (and the entropy term's) alone, which points back to pi_0; the
    learned groups' terms are unchanged, and the counts leave anchors out of the equal groups."""
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(2, 4, 3, 5, generator=gen)
    drifted = (ref + 0.8 * torch.randn(2, 4, 3, 5, generator=gen)).requires_grad_()
    codes = sampled_codes(drifted.detach(), 1.0, 1.0)
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 5.0, 1.0]])
    anchor = torch.tensor([False, True])
    out = grpo_loss(drifted, codes, returns, ref, beta_kl=0.1, anchor=anchor, entropy_coef=0.05,
                    entropy_to_reference=True)
    out["loss"].backward()
    grad = drifted.grad.clone()
    drifted.grad = None
    as_tie = grpo_loss(drifted, codes, torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]), ref, beta_kl=0.1,
                       entropy_coef=0.05, entropy_to_reference=True)  # the anchor's returns made equal instead
    as_tie["loss"].backward()
    assert torch.allclose(grad, drifted.grad, atol=1e-6)
    assert out["anchored_groups"] == 1 and out["equal_groups"] == 0 and as_tie["equal_groups"] == 1
    assert out["advantage_abs"] == pytest.approx(float(group_advantages(returns[:1]).abs().mean()), rel=1e-5)
    # a small step along the anchor's own gradient brings it closer to pi_0
    only_anchor = grpo_loss(drifted[1:], codes[1:], returns[1:], ref[1:], beta_kl=0.1, anchor=anchor[1:])
    step = torch.autograd.grad(only_anchor["loss"], drifted)[0]
    closer = grpo_loss(drifted - 0.5 * step, codes, returns, ref, beta_kl=0.1, anchor=anchor)
    assert float(closer["kl"]) < float(out["kl"])
    # grpo.anchor_beta_kl weighs the anchors' KL apart from the learned groups' (0: the anchor does nothing)
    free = torch.autograd.grad(grpo_loss(drifted, codes, returns, ref, beta_kl=0.1, anchor=anchor,
                                         anchor_beta=0.0)["loss"], drifted)[0]
    assert torch.all(free[1] == 0) and torch.any(free[0] != 0)
    strong = torch.autograd.grad(grpo_loss(drifted, codes, returns, ref, beta_kl=0.1, anchor=anchor,
                                           anchor_beta=1.0)["loss"], drifted)[0]
    # the mean over 2 groups at weight 1.0 against 1 group at 0.1: 5 times the anchor's own gradient
    assert torch.allclose(strong[1], 5 * step[1], rtol=1e-4, atol=1e-7)


def test_on_policy_samples_reduce_to_eq21_and_stale_ones_are_clipped():
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 3, 5).requires_grad_()
    ref = torch.randn(2, 8, 3, 5)
    codes = sampled_codes(logits.detach(), 0.7, 0.9)
    returns = torch.randn(2, 8)
    # With the sampling policy equal to the current one the ratio is 1: the same gradient as Eq. 21.
    (on,) = torch.autograd.grad(grpo_loss(logits, codes, returns, ref, 0.1, temperature=0.7, top_p=0.9)["loss"], logits)
    sampled = sampling_logprobs(logits.detach(), 0.7, 0.9).gather(-1, codes[..., None])[..., 0].sum(-1)
    (same,) = torch.autograd.grad(grpo_loss(logits, codes, returns, ref, 0.1, old_logp=sampled, temperature=0.7,
                                            top_p=0.9)["loss"], logits)
    assert torch.allclose(on, same, atol=1e-6)
    far = grpo_loss(logits, codes, returns, ref, 0.0, old_logp=sampled - 2.0, temperature=0.7, top_p=0.9)
    assert far["clip_fraction"] == 1.0  # ratio e^2, far outside the clip
    adv = group_advantages(returns)
    assert adv.shape == returns.shape


def test_a_code_outside_the_nucleus_gets_a_finite_log_probability_and_loss():
    """A drawn code at the nucleus' edge (the server computed in bf16, or an older policy version drew it)
    may fall outside the learner's nucleus: it is counted in, so the loss stays finite and differentiable."""
    logits = torch.tensor([[[[5.0, 0.0, -1.0, -2.0]]]], requires_grad=True)  # (G=1, B=1, L=1, K=4)
    codes = torch.tensor([[[3]]])  # far outside a 0.5 nucleus, which holds code 0 alone
    assert torch.isinf(sampling_logprobs(logits.detach(), 0.7, 0.5)[0, 0, 0, 3])
    finite = sampling_logprobs(logits.detach(), 0.7, 0.5, include=codes)[0, 0, 0]
    assert torch.isfinite(finite[3]) and torch.isfinite(finite[0]) and torch.isinf(finite[1])
    assert abs(float(finite.exp().sum()) - 1.0) < 1e-6
    out = grpo_loss(logits.expand(1, 2, 1, 4), torch.tensor([[[3], [0]]]), torch.tensor([[1.0, 0.0]]),
                    logits.detach().expand(1, 2, 1, 4), 0.1, temperature=0.7, top_p=0.5)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(logits.grad).all()


def test_entropy_bonus_is_the_entropy_at_the_sampling_temperature_and_raises_it():
    """The reported entropy is sum_l H(pi_T) written out; with entropy_coef > 0 and equal returns, a
    gradient step makes the next-code distributions flatter; with 0 the loss is Eq. 21 unchanged."""
    torch.manual_seed(4)
    t = 0.7
    logits = (3 * torch.randn(1, 4, 3, 6)).requires_grad_()
    codes = sampled_codes(logits.detach(), t, 0.9)
    returns = torch.ones(1, 4)  # equal: no policy-gradient term, the bonus alone moves the logits
    p = torch.softmax(logits.detach() / t, -1)
    direct = float(-(p * p.log()).sum(-1).sum(-1).mean())
    plain = grpo_loss(logits, codes, returns, logits.detach(), 0.0, temperature=t, top_p=0.9)
    out = grpo_loss(logits, codes, returns, logits.detach(), 0.0, temperature=t, top_p=0.9, entropy_coef=0.5)
    assert abs(float(out["entropy"]) - direct) < 1e-5 and abs(float(plain["entropy"]) - direct) < 1e-5
    assert abs(float(out["loss"].detach()) - (float(plain["loss"].detach()) - 0.5 * direct)) < 1e-5
    out["loss"].backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
        q = torch.softmax(stepped / t, -1)
    assert float(-(q * q.log()).sum(-1).sum(-1).mean()) > direct


def test_entropy_to_reference_counts_only_the_entropy_lost_against_pi0():
    """With `entropy_to_reference` the bonus is sum_l max(0, H_l(pi_0) - H_l) written out: where returns are
    equal pi_0 itself is the optimum (no gradient at pi = pi_0, while the plain bonus with the KL term
    pulls it flatter), a sharper policy is pushed back toward pi_0's entropy, a flatter one gets no bonus."""
    torch.manual_seed(5)
    t, beta = 0.7, 0.04
    ref = 3 * torch.randn(1, 4, 3, 6)
    codes = sampled_codes(ref, t, 0.9)
    returns = torch.ones(1, 4)  # equal: no policy-gradient term

    def step(logits, to_reference):
        logits = logits.clone().requires_grad_()
        out = grpo_loss(logits, codes, returns, ref, beta, temperature=t, top_p=0.9, entropy_coef=0.05,
                        entropy_to_reference=to_reference)
        out["loss"].backward()
        return out, logits.grad

    def entropy(logits):
        p = torch.softmax(logits / t, -1)
        return -(p * p.log()).sum(-1)  # (G, B, L)

    out, grad = step(ref, True)
    assert float(out["entropy_shortfall"]) == 0 and float(grad.abs().max()) < 1e-7
    _, plain = step(ref, False)
    assert float(entropy(ref - 0.5 * plain).mean()) > float(entropy(ref).mean())  # the plain bonus flattens pi_0
    sharp = 2 * ref
    out, grad = step(sharp, True)
    direct = float((entropy(ref) - entropy(sharp)).clamp_min(0).sum(-1).mean())
    assert direct > 0 and abs(float(out["entropy_shortfall"]) - direct) < 1e-5
    assert float(entropy(sharp - 0.5 * grad).mean()) > float(entropy(sharp).mean())
    flat = (ref / 4).requires_grad_()
    grpo_loss(flat, codes, returns, ref, beta, temperature=t, top_p=0.9)["loss"].backward()  # the KL alone
    out, grad = step(flat.detach(), True)
    assert float(out["entropy_shortfall"]) == 0 and torch.allclose(grad, flat.grad)


def test_std_floor_keeps_wide_groups_and_shrinks_near_ties_in_proportion():
    """Above the floor the advantages are Eq. 21's; below it they scale with the returns' spread, so a
    group differing by a thousandth no longer gets unit advantages."""
    wide = torch.tensor([[4.0, 4.5, 5.0, 3.0]])
    assert torch.allclose(group_advantages(wide, std_floor=0.05), group_advantages(wide))
    tie = torch.tensor([[4.408, 4.409, 4.410, 4.409]])
    assert group_advantages(tie).abs().max() > 1.0
    floored = group_advantages(tie, std_floor=0.05)
    direct = (tie - tie.mean()) / 0.05
    assert torch.allclose(floored, direct, atol=1e-4)
    logits = torch.randn(1, 4, 1, 6, requires_grad=True)
    codes = torch.tensor([[[0], [1], [2], [3]]])
    plain = grpo_loss(logits, codes, tie, logits.detach(), 0.0)["advantage_abs"]
    small = grpo_loss(logits, codes, tie, logits.detach(), 0.0, std_floor=0.05)["advantage_abs"]
    assert small < 0.05 * plain


def test_the_critics_uncertainty_floors_a_groups_std_and_counts_the_groups_it_outweighed():
    """A = (R^ - mean) / max(std, s, n) per group, n the group's weighted member disagreement: a group
    the members agree on keeps Eq. 21's advantages, one whose spread is within their disagreement gets
    advantages in proportion to how far its returns lie apart, measured in that noise."""
    from ipr_dist.algos.grpo import group_noise

    returns = torch.tensor([[4.0, 4.5, 5.0, 3.0], [4.40, 4.41, 4.42, 4.40]])
    noise = torch.tensor([0.01, 0.2])
    adv = group_advantages(returns, noise=noise)
    assert torch.allclose(adv[0], group_advantages(returns[:1])[0])
    assert torch.allclose(adv[1], (returns[1] - returns[1].mean()) / 0.2, atol=1e-4)
    logits = torch.randn(2, 4, 1, 6, requires_grad=True)
    codes = torch.tensor([[[0], [1], [2], [3]]] * 2)
    assert grpo_loss(logits, codes, returns, logits.detach(), 0.0, noise=noise)["noisy_groups"] == 1
    assert grpo_loss(logits, codes, returns, logits.detach(), 0.0)["noisy_groups"] == 0
    # where the fixed floor already lies above the noise, the noise changes nothing and is not counted
    assert grpo_loss(logits, codes, returns, logits.detach(), 0.0, std_floor=0.5, noise=noise)["noisy_groups"] == 0
    # n: the root mean square over the group of the members' disagreement on each candidate's place
    members = torch.tensor([[1.0, 1.2], [2.0, 2.0], [3.0, 3.4]]).numpy()  # (B = 3, E = 2)
    centred = members - members.mean(0)
    per_candidate = centred.std(1)
    assert math.isclose(group_noise(members), float((per_candidate ** 2).mean() ** 0.5), rel_tol=1e-6)
    assert group_noise(members + [0.0, 7.0]) == pytest.approx(group_noise(members))  # a member's offset: no noise
    assert group_noise(members[:, :1]) == 0.0


def test_grpo_learns_only_on_the_games_whose_critic_ranks_held_out_outcomes(tmp_path):
    """`grpo.min_critic_rank`: from Stage 2's world_model/metrics.json, the games whose held-out ranking of
    actions by observed returns (`min_critic_rank_of: action`, or of the imagined returns: `return`) lies
    above the threshold, over enough episode ends; a game not measured is not learned on; a run without the
    file, or evaluated before it ranked actions, is told how to make it."""
    import io
    import json

    from ipr_dist.config import Config
    from ipr_dist.errors import StoreError
    from learners.grpo import games_to_learn

    cfg = Config.model_validate({"run": {"root": str(tmp_path), "name": "r"}, "grpo": {"min_critic_rank": 0.0}})
    with pytest.raises(StoreError, match="ipr world-model eval"):
        games_to_learn(cfg)
    folder = tmp_path / "r" / "world_model"
    folder.mkdir(parents=True)
    metrics = {"eval/return/episode_ends/A": 5, "eval/return/episode_ends/B": 7, "eval/return/episode_ends/C": 1,
               "eval/return/q_sum/spearman_within/A": 0.12, "eval/return/q_sum/spearman_within/B": -0.2,
               "eval/return/reward/spearman_within/B": 0.5}
    ranked = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"min_critic_rank_of": "return"})})
    (folder / "metrics.json").write_text(json.dumps({**metrics, "eval/return/steps": 40}))
    with pytest.raises(StoreError, match="ipr world-model eval"):  # evaluated before it ranked actions
        games_to_learn(cfg)
    assert games_to_learn(ranked) == {"A"}
    # Ranking actions: B orders them, A only its states
    actions = {"eval/return/q_sum/action_within/A": -0.02, "eval/return/q_sum/action_within/B": 0.3,
               "eval/return/q_sum/action_within_interval/B": [0.05, 0.52], "eval/return/action_alternatives": 16}
    (folder / "metrics.json").write_text(json.dumps({**metrics, **actions, "eval/return/steps": 40}))
    out = io.StringIO()
    assert games_to_learn(cfg, out) == {"B"} and "ranking of actions" in out.getvalue()
    assert "A -0.020 (5 episode ends)" in out.getvalue() and "C not measured" in out.getvalue()
    assert "B +0.300 [+0.050, +0.520] (7 episode ends)" in out.getvalue() and "95% intervals" in out.getvalue()
    cfg = ranked
    (folder / "metrics.json").write_text(json.dumps(metrics))
    out = io.StringIO()
    assert games_to_learn(cfg, out) == {"A"}  # B ranks backwards, C could not be measured
    assert "A +0.120 (5 episode ends)" in out.getvalue() and "C not measured" in out.getvalue()
    assert games_to_learn(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"min_critic_rank": -0.5})})) == {"A", "B"}
    assert games_to_learn(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"min_critic_rank": None})})) is None
    out = io.StringIO()  # A's rho rests on 5 episode ends: too few when 6 are asked for
    few = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"min_critic_rank_episodes": 6})})
    assert games_to_learn(few, out) == set() and "A +0.120 (5 episode ends, too few)" in out.getvalue()
    (folder / "metrics.json").write_text(json.dumps({"eval/return/steps": 40}))  # evaluated before per-game rho
    with pytest.raises(StoreError, match="ipr world-model eval"):
        games_to_learn(cfg)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    reward = cfg.model_copy(update={"world_model": cfg.world_model.model_copy(update={"imagined_return": "reward"})})
    assert games_to_learn(reward) == {"B"}  # the rho of the run's own definition of R^
