"""GRPO with imagined returns (paper Sec. 10.2 Stage 4, Eq. 21).

For one context (x_t, g) the policy proposes a group of B candidate PhysCode sequences a^(b); the
world model scores each with a predicted return R^(b) (Eq. 4). Then

  A^(b) = (R^(b) - mean_b R^) / (std_b R^ + eps)                                   (advantages)
  L_GRPO = -1/B sum_b A^(b) log pi_phi(a^(b) | x_t, g) + beta_KL KL(pi_phi || pi_0)      (Eq. 21)

log pi is the log-probability of each whole PhysCode sequence (the sum over its L codes). The KL of
sequences to the aligned reference pi_0 is, by the chain rule, the sum over positions l of the KL of
the next-code distributions given the prefix; each is estimated on the group's own samples with the
k3 estimator
  KL_l ~ E_b[ exp(r_l) - r_l - 1 ],   r_l = log pi_0(c_l | .) - log pi_phi(c_l | .),
which is unbiased when the samples come from pi, never negative, and of low variance (Schulman's
"approximating KL" note; the per-token estimator of GRPO's authors). Applied to whole sequences
instead, k3 takes exp of the sum of L log-ratios, and its variance grows exponentially with the
drift: on the local run it jumped to hundreds of nats on a few groups while the median was 3-5.
Samples produced by an older policy version (the learner is ahead of the server) are reweighted by
the clipped sequence ratio pi_phi / pi_old, as in PPO, so a step behind cannot move the policy further
than `clip` allows; on-policy samples have ratio 1 and the term has exactly the gradient of Eq. 21.
A group whose returns are all equal has zero advantages: it contributes no policy-gradient term and
is counted in `equal_groups`.
"""

from __future__ import annotations

import torch


def group_advantages(returns: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A^(b) per group: returns (G, B) -> (G, B); population std (the group is the whole set)."""
    mean = returns.mean(-1, keepdim=True)
    std = returns.std(-1, unbiased=False, keepdim=True)
    return (returns - mean) / (std + eps)


def grpo_loss(code_logp: torch.Tensor, returns: torch.Tensor, ref_code_logp: torch.Tensor, beta_kl: float,
              old_logp: torch.Tensor | None = None, clip: float = 0.2, eps: float = 1e-6,
              equal_tol: float = 1e-8) -> dict[str, torch.Tensor]:
    """Eq. 21 over G groups of B candidates of L codes.

    code_logp (G, B, L): log pi_phi of each code given the prompt and the codes before it, with
    gradients. returns (G, B): imagined returns R^. ref_code_logp (G, B, L): the same under pi_0 (no
    gradient). old_logp (G, B): sequence log-probabilities under the policy version that sampled
    them (None: on-policy).
    """
    returns = returns.detach()
    logp = code_logp.sum(-1)  # log pi(a^(b)): the whole sequence
    adv = group_advantages(returns, eps)
    equal = (returns.max(-1).values - returns.min(-1).values) <= equal_tol
    adv = torch.where(equal[:, None], torch.zeros_like(adv), adv)
    if old_logp is None:
        pg = -(adv * logp).mean(-1)  # Eq. 21, first term: -1/B sum_b A^(b) log pi(a^(b))
        ratio = torch.ones_like(logp)
    else:  # clipped importance weight for samples one version behind
        ratio = torch.exp(logp - old_logp.detach())
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean(-1)
    log_r = ref_code_logp.detach() - code_logp
    kl = (torch.exp(log_r) - log_r - 1).sum(-1).mean(-1)  # Eq. 21, second term: sum_l k3 of KL_l, mean over b
    loss = (pg + beta_kl * kl).mean()
    return {"loss": loss, "policy_gradient": pg.mean().detach(), "kl": kl.mean().detach(),
            "advantage_abs": adv.abs().mean().detach(), "equal_groups": equal.sum().detach(),
            "clip_fraction": ((ratio - 1).abs() > clip).float().mean().detach()}
