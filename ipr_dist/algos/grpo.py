"""GRPO with imagined returns (paper Sec. 10.2 Stage 4, Eq. 21).

For one context (x_t, g) the policy proposes a group of B candidate PhysCode sequences a^(b); the
world model scores each with a predicted return R^(b) (Eq. 4). Then

  A^(b) = (R^(b) - mean_b R^) / (std_b R^ + eps)                                   (advantages)
  L_GRPO = -1/B sum_b A^(b) log pi_phi(a^(b) | x_t, g) + beta_KL KL(pi_phi || pi_0)      (Eq. 21)

log pi is the log-probability of each whole sequence (the sum over its L tokens). The KL to the
aligned reference pi_0 is estimated on the group's own samples with the k3 estimator
  KL ~ E_b[ exp(log pi_0 - log pi) - (log pi_0 - log pi) - 1 ],
which is unbiased for KL(pi || pi_0) when the samples come from pi, never negative, and of low
variance (Schulman's "approximating KL" note; the estimator GRPO's authors use), whereas the plain
log-ratio can go negative on a single group. Samples produced by an older policy version (the
learner is ahead of the server) are reweighted by the clipped ratio pi_phi / pi_old, as in PPO, so
a step behind cannot move the policy further than `clip` allows; on-policy samples have ratio 1 and
the term has exactly the gradient of Eq. 21. A group whose returns are all equal has zero advantages: it
contributes no policy-gradient term and is counted in `equal_groups`.
"""

from __future__ import annotations

import torch


def group_advantages(returns: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A^(b) per group: returns (G, B) -> (G, B); population std (the group is the whole set)."""
    mean = returns.mean(-1, keepdim=True)
    std = returns.std(-1, unbiased=False, keepdim=True)
    return (returns - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, returns: torch.Tensor, ref_logp: torch.Tensor, beta_kl: float,
              old_logp: torch.Tensor | None = None, clip: float = 0.2, eps: float = 1e-6,
              equal_tol: float = 1e-8) -> dict[str, torch.Tensor]:
    """Eq. 21 over G groups of B candidates.

    logp (G, B): log pi_phi of each sequence, with gradients. returns (G, B): imagined returns R^.
    ref_logp (G, B): log pi_0 (no gradient). old_logp (G, B): log-probabilities under the policy
    version that sampled them (None: on-policy).
    """
    returns = returns.detach()
    adv = group_advantages(returns, eps)
    equal = (returns.max(-1).values - returns.min(-1).values) <= equal_tol
    adv = torch.where(equal[:, None], torch.zeros_like(adv), adv)
    if old_logp is None:
        pg = -(adv * logp).mean(-1)  # Eq. 21, first term: -1/B sum_b A^(b) log pi(a^(b))
        ratio = torch.ones_like(logp)
    else:  # clipped importance weight for samples one version behind
        ratio = torch.exp(logp - old_logp.detach())
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean(-1)
    log_r = ref_logp.detach() - logp
    kl = (torch.exp(log_r) - log_r - 1).mean(-1)  # k3 estimate of KL(pi_phi || pi_0), Eq. 21 second term
    loss = (pg + beta_kl * kl).mean()
    return {"loss": loss, "policy_gradient": pg.mean().detach(), "kl": kl.mean().detach(),
            "advantage_abs": adv.abs().mean().detach(), "equal_groups": equal.sum().detach(),
            "clip_fraction": ((ratio - 1).abs() > clip).float().mean().detach()}
