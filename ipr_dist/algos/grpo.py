"""GRPO with imagined returns (paper Sec. 10.2 Stage 4, Eq. 21).

For one context (x_t, g) the policy proposes a group of B candidate PhysCode sequences a^(b); the
world model scores each with a predicted return R^(b) (Eq. 4). Then

  A^(b) = (R^(b) - mean_b R^) / (std_b R^ + eps)                                   (advantages)
  L_GRPO = -1/B sum_b A^(b) log pi_phi(a^(b) | x_t, g) + beta_KL KL(pi_phi || pi_0)      (Eq. 21)

log pi is the log-probability of each whole PhysCode sequence (the sum over its L codes) under the
distribution the candidates were sampled from: the K code logits at the sampling temperature T, in the
top-p nucleus (ipr_dist/models/policy.py: sampling_logprobs), as TRL and veRL take the ratio at the
sampling temperature. The KL of sequences to the aligned reference pi_0 is, by the chain rule, the sum
over positions l of the KL of the next-code distributions given the prefix; the prefixes are the
group's own samples, and at each one the KL over the K codes is computed exactly from both models'
logits at temperature T:
  KL_l = sum_c pi_T(c | .) (log pi_T(c | .) - log pi_0,T(c | .)),
an unbiased estimate of the sequence KL with no sampling noise over the next code, which also covers
the codes the nucleus never lets the sampler draw (the k3 estimator on the drawn codes, used before,
missed them and was biased whenever samples were taken at T != 1 or inside a nucleus).
Samples produced by an older policy version (the learner is ahead of the server) are reweighted by
the clipped sequence ratio pi_phi / pi_old, as in PPO, so a step behind cannot move the policy further
than `clip` allows; on-policy samples have ratio 1 and the term has exactly the gradient of Eq. 21.
A group whose returns are all equal has zero advantages: it contributes no policy-gradient term and
is counted in `equal_groups`.

An optional floor on the group's std (`grpo.advantage_std_floor` s, in R^'s units; 0 gives Eq. 21's
advantages): A^(b) = (R^(b) - mean_b R^) / max(std_b R^, s). Dividing by the std gives every group unit
advantages however close its returns lie, so differences of a thousandth, the critic's noise, push the
policy as hard as real ones; below s they push it in proportion to their size (docs/grpo.md).

With the critic's member heads (`world_model.critic_members`), the floor can also follow the critic's own
uncertainty (`grpo.advantage_noise_weight` w): A^(b) = (R^(b) - mean_b R^) / max(std_b R^, s, w n), n the
root mean square over the group of the members' disagreement on each candidate's place in it
(ipr_dist/models/world_model.py: member_disagreement). Where the members do not agree on the order of the
candidates, the group's differences are no more than the critic's uncertainty and move the policy less.

An optional entropy bonus (not in Eq. 21; `grpo.entropy_coef`, 0 gives Eq. 21 exactly) subtracts
entropy_coef x sum_l H_l, with H_l = -sum_c pi_T(c | .) log pi_T(c | .) the entropy of the next-code
distribution at the sampling temperature on the group's own prefixes. Without it a small policy's
candidates collapse within a few hundred updates to one sequence (docs/grpo.md, candidate diversity),
and a group of identical candidates leaves the world model nothing to choose. The entropy is always
reported.
"""

from __future__ import annotations

import torch


def group_advantages(returns: torch.Tensor, eps: float = 1e-6, std_floor: float = 0.0,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """A^(b) per group: returns (G, B) -> (G, B); population std (the group is the whole set), not below
    `std_floor` nor, per group, below `noise` (G,) (the weighted member disagreement; None: no such floor)."""
    mean = returns.mean(-1, keepdim=True)
    std = returns.std(-1, unbiased=False, keepdim=True).clamp_min(std_floor)
    if noise is not None:
        std = torch.maximum(std, noise.to(std.dtype)[:, None])
    return (returns - mean) / (std + eps)


def group_noise(member_returns) -> float:
    """n of one group: the root mean square over its B candidates of the members' disagreement on each
    one's place in the group; member_returns (B, E). 0 with fewer than 2 members."""
    import numpy as np

    from ipr_dist.models.world_model import member_disagreement

    return float(np.sqrt(np.mean(member_disagreement(member_returns) ** 2)))


def grpo_loss(code_logits: torch.Tensor, codes: torch.Tensor, returns: torch.Tensor, ref_logits: torch.Tensor,
              beta_kl: float, old_logp: torch.Tensor | None = None, clip: float = 0.2, temperature: float = 1.0,
              top_p: float = 1.0, eps: float = 1e-6, equal_tol: float = 1e-8,
              entropy_coef: float = 0.0, std_floor: float = 0.0,
              noise: torch.Tensor | None = None, entropy_to_reference: bool = False,
              anchor: torch.Tensor | None = None, anchor_beta: float | None = None) -> dict[str, torch.Tensor]:
    """Eq. 21 over G groups of B candidates of L codes.

    code_logits (G, B, L, K): the policy's logits of the K codes at each position, teacher-forced on the
    candidate's codes (G, B, L), with gradients. returns (G, B): imagined returns R^. ref_logits
    (G, B, L, K): the same under pi_0 (no gradient). old_logp (G, B): sequence log-probabilities under
    the policy version that sampled them (None: on-policy). temperature, top_p: the sampling's. noise (G,):
    each group's floor from the critic's uncertainty, already weighted (None: none). entropy_to_reference:
    the bonus counts only the entropy lost against pi_0 at the same prefix, sum_l max(0, H_l(pi_0) - H_l).
    anchor (G,) bool: groups with no advantage (games GRPO does not learn on), on which only the KL and the
    entropy terms act: they hold the shared policy at pi_0 there (None: none); their KL weighs anchor_beta
    (None: beta_kl).
    """
    from ipr_dist.models.policy import sampling_logprobs

    returns = returns.detach()
    # The drawn code always counts as inside the nucleus: at its edge the server's arithmetic may differ.
    logp = sampling_logprobs(code_logits, temperature, top_p, include=codes)
    logp = logp.gather(-1, codes[..., None])[..., 0].sum(-1)
    adv = group_advantages(returns, eps, std_floor, noise)
    equal = (returns.max(-1).values - returns.min(-1).values) <= equal_tol
    anchor = torch.zeros_like(equal) if anchor is None else anchor.to(equal.device)
    adv = torch.where((equal | anchor)[:, None], torch.zeros_like(adv), adv)
    if old_logp is None:
        pg = -(adv * logp).mean(-1)  # Eq. 21, first term: -1/B sum_b A^(b) log pi(a^(b))
        ratio = torch.ones_like(logp)
    else:  # clipped importance weight for samples one version behind
        ratio = torch.exp(logp - old_logp.detach())
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean(-1)
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(code_logits.float() / t, -1)
    lr = torch.log_softmax(ref_logits.detach().float() / t, -1)
    p = lp.exp()
    kl = (p * (lp - lr)).sum(-1).sum(-1).mean(-1)  # Eq. 21, second term: sum_l KL_l, mean over b
    h = -(p * lp).sum(-1)  # H_l
    entropy = h.sum(-1).mean(-1)  # sum_l H_l, mean over b
    shortfall = torch.relu(-(lr.exp() * lr).sum(-1) - h).sum(-1).mean(-1)  # entropy lost against pi_0
    # The plain bonus with the KL term is minimised, where advantages vanish, at pi ~ pi_0^(beta/(beta+coef)):
    # flatter than pi_0. Counting only the shortfall resists collapse and leaves pi_0 itself the optimum.
    bonus = -shortfall if entropy_to_reference else entropy
    beta = beta_kl if anchor_beta is None else torch.where(anchor, anchor_beta, beta_kl)
    loss = (pg + beta * kl - entropy_coef * bonus).mean()
    return {"loss": loss, "policy_gradient": pg.mean().detach(), "kl": kl.mean().detach(),
            "entropy": entropy.mean().detach(), "entropy_shortfall": shortfall.mean().detach(),
            "advantage_abs": adv[~anchor].abs().mean().detach() if bool((~anchor).any()) else adv.new_zeros(()),
            "equal_groups": (equal & ~anchor).sum().detach(), "anchored_groups": anchor.sum().detach(),
            # groups whose floored std the critic's uncertainty outweighed: its floor changed their advantages
            "noisy_groups": ((noise > returns.std(-1, unbiased=False).clamp_min(std_floor)).sum()
                             if noise is not None else returns.new_zeros(())).detach(),
            "clip_fraction": ((ratio - 1).abs() > clip).float().mean().detach()}
