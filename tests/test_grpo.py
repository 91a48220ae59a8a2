"""Eq. 21 on fixed inputs, against a direct transcription of the paper's formula."""

import torch

from ipr_dist.algos.grpo import group_advantages, grpo_loss


def direct_eq21(logp, returns, ref_logp, beta, eps=1e-6):
    total = 0.0
    for g in range(returns.shape[0]):
        r = returns[g]
        mean = sum(r.tolist()) / len(r)
        std = (sum((x - mean) ** 2 for x in r.tolist()) / len(r)) ** 0.5
        adv = [(x - mean) / (std + eps) for x in r.tolist()]
        pg = -sum(a * lp for a, lp in zip(adv, logp[g])) / len(r)
        kl = sum(torch.exp(ref - lp) - (ref - lp) - 1 for ref, lp in zip(ref_logp[g], logp[g])) / len(r)
        total = total + pg + beta * kl
    return total / returns.shape[0]


def test_loss_matches_a_direct_implementation_of_eq21():
    torch.manual_seed(0)
    logp = (torch.randn(3, 8) - 5).requires_grad_()
    returns, ref = torch.randn(3, 8), torch.randn(3, 8) - 5
    out = grpo_loss(logp, returns, ref, beta_kl=0.05)
    assert torch.isclose(out["loss"], direct_eq21(logp, returns, ref, 0.05), atol=1e-5)
    out["loss"].backward()
    adv = group_advantages(returns)
    # d/d logp of the policy term is -A/(B G); the KL term adds beta (1 - exp(ref - logp))/(B G)
    expected = (-adv + 0.05 * (1 - torch.exp(ref - logp.detach()))) / (8 * 3)
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_equal_returns_give_no_policy_gradient_and_are_counted():
    logp = torch.zeros(2, 4, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    out = grpo_loss(logp, returns, logp.detach(), beta_kl=0.0)
    out["loss"].backward()
    assert out["equal_groups"] == 1 and torch.all(logp.grad[0] == 0) and torch.any(logp.grad[1] != 0)


def test_on_policy_samples_reduce_to_eq21_and_stale_ones_are_clipped():
    torch.manual_seed(1)
    logp = torch.randn(2, 8).requires_grad_()
    returns, ref = torch.randn(2, 8), torch.randn(2, 8)
    # With the sampling policy equal to the current one the ratio is 1: the same gradient as Eq. 21.
    (on,) = torch.autograd.grad(grpo_loss(logp, returns, ref, 0.1)["loss"], logp)
    (same,) = torch.autograd.grad(grpo_loss(logp, returns, ref, 0.1, old_logp=logp.detach())["loss"], logp)
    assert torch.allclose(on, same, atol=1e-6)
    far = grpo_loss(logp, returns, ref, 0.0, old_logp=logp.detach() - 2.0)  # ratio e^2, far outside the clip
    assert far["clip_fraction"] == 1.0
