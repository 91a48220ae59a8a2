"""Eq. 21 on fixed inputs, against a direct transcription of the paper's formula."""

import torch

from ipr_dist.algos.grpo import group_advantages, grpo_loss


def direct_eq21(code_logp, returns, ref_code_logp, beta, eps=1e-6):
    """Eq. 21 written out: advantages per group, -1/B sum_b A^(b) log pi(a^(b)) with log pi the sum
    over the sequence's codes, plus beta x the KL estimate (sum over positions of k3, mean over b)."""
    total = 0.0
    groups, b, length = code_logp.shape
    for g in range(groups):
        r = returns[g].tolist()
        mean = sum(r) / b
        std = (sum((x - mean) ** 2 for x in r) / b) ** 0.5
        adv = [(x - mean) / (std + eps) for x in r]
        pg = -sum(adv[i] * sum(code_logp[g, i, l] for l in range(length)) for i in range(b)) / b
        kl = sum(torch.exp(ref_code_logp[g, i, l] - code_logp[g, i, l]) - (ref_code_logp[g, i, l] - code_logp[g, i, l]) - 1
                 for i in range(b) for l in range(length)) / b
        total = total + pg + beta * kl
    return total / groups


def test_loss_matches_a_direct_implementation_of_eq21():
    torch.manual_seed(0)
    code_logp = (torch.randn(3, 8, 4) - 2).requires_grad_()
    returns, ref = torch.randn(3, 8), torch.randn(3, 8, 4) - 2
    out = grpo_loss(code_logp, returns, ref, beta_kl=0.05)
    assert torch.isclose(out["loss"], direct_eq21(code_logp, returns, ref, 0.05), atol=1e-5)
    out["loss"].backward()
    adv = group_advantages(returns)
    # d/d log pi(c_l) of the policy term is -A/(B G) at every code; the KL term adds
    # beta (1 - exp(ref_l - logp_l)) / (B G)
    expected = (-adv[..., None] + 0.05 * (1 - torch.exp(ref - code_logp.detach()))) / (8 * 3)
    assert torch.allclose(code_logp.grad, expected, atol=1e-6)


def test_kl_estimate_is_unbiased_per_code_and_tame_where_the_sequence_one_explodes():
    """Sum over codes of k3 estimates KL(pi || pi_0) of sequences without the exponential variance of
    k3 on whole sequences: checked against the exact KL of two factorised distributions."""
    torch.manual_seed(2)
    length, k = 4, 16
    pi, pi0 = torch.randn(length, k).log_softmax(-1), (2 * torch.randn(length, k)).log_softmax(-1)
    exact = float((pi.exp() * (pi - pi0)).sum())
    samples = torch.distributions.Categorical(logits=pi).sample((20000,))  # (N, L) codes drawn from pi
    code_logp, ref = pi.gather(1, samples.T).T, pi0.gather(1, samples.T).T
    per_code = grpo_loss(code_logp[None], torch.zeros(1, len(samples)), ref[None], beta_kl=1.0)["kl"]
    r = (ref - code_logp).sum(-1)
    whole = torch.exp(r) - r - 1
    assert abs(float(per_code) - exact) < 0.05 * exact
    assert float((torch.exp(ref - code_logp) - (ref - code_logp) - 1).sum(-1).std()) < float(whole.std()) / 5


def test_equal_returns_give_no_policy_gradient_and_are_counted():
    logp = torch.zeros(2, 4, 3, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    out = grpo_loss(logp, returns, logp.detach(), beta_kl=0.0)
    out["loss"].backward()
    assert out["equal_groups"] == 1 and torch.all(logp.grad[0] == 0) and torch.any(logp.grad[1] != 0)


def test_on_policy_samples_reduce_to_eq21_and_stale_ones_are_clipped():
    torch.manual_seed(1)
    logp = torch.randn(2, 8, 3).requires_grad_()
    returns, ref = torch.randn(2, 8), torch.randn(2, 8, 3)
    # With the sampling policy equal to the current one the ratio is 1: the same gradient as Eq. 21.
    (on,) = torch.autograd.grad(grpo_loss(logp, returns, ref, 0.1)["loss"], logp)
    sampled = logp.detach().sum(-1)
    (same,) = torch.autograd.grad(grpo_loss(logp, returns, ref, 0.1, old_logp=sampled)["loss"], logp)
    assert torch.allclose(on, same, atol=1e-6)
    far = grpo_loss(logp, returns, ref, 0.0, old_logp=sampled - 2.0)  # ratio e^2, far outside the clip
    assert far["clip_fraction"] == 1.0
