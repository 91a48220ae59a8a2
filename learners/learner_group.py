"""The GRPO learner group: M learner actors forming one torch.distributed group (gloo on CPU, NCCL
on GPUs), each holding a replica of the policy and of the frozen aligned reference pi_0.

An update takes a list of groups (one context, B candidates, their imagined returns, the
log-probabilities and version of the policy that sampled them); each learner computes Eq. 21 on its
share, gradients are averaged over the group (weighted so the result is the mean over all groups),
and every replica takes the same AdamW step, so replicas stay identical. Groups more than
`max_staleness` versions behind the learner are dropped and counted; a version-behind group gets
the clipped ratio (algos/grpo.py). Rank 0 exports the learner's Ray metrics and hands out weights.
FSDP for an 8B policy on GPUs is not wired here: replicas are whole models (see docs/cluster.md).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np
import ray
import torch

from ipr_dist.algos.grpo import grpo_loss


@dataclass
class Group:
    """One context's candidates, as the learner needs them."""

    frame: np.ndarray  # (H, W, 3) uint8
    goal: str
    codes: np.ndarray  # (B, L)
    returns: np.ndarray  # (B,) imagined returns R^
    logprobs: np.ndarray  # (B,) log pi_old of each sequence, from the policy server
    version: int  # policy version that sampled the candidates
    imagined: bool  # an imagination-only update (context from the replay) or the real step's group


@ray.remote
class GRPOLearner:
    def __init__(self, rank: int, world: int, policy_path: str, reference_path: str, codes: int, cfg: dict,
                 state_path: str | None = None):
        from ipr_dist.config import GRPOConfig
        from ipr_dist.models.policy import PhysCodePolicy

        torch.manual_seed(cfg.get("seed", 0))
        self.rank, self.world = rank, world
        self.cfg = GRPOConfig(**{k: v for k, v in cfg.items() if k != "seed"})
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_learner)))
        self.policy = PhysCodePolicy(policy_path, codes, device=self.device)
        self.reference = PhysCodePolicy(reference_path, codes, device=self.device)
        self.reference.model.requires_grad_(False).eval()
        self.optim = torch.optim.AdamW([p for p in self.policy.model.parameters() if p.requires_grad],
                                       lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state_path:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            self.optim.load_state_dict(state["optimizer"])
            self.policy.version = state["version"]
        self.metrics = None
        if rank == 0:
            from ray.util import metrics

            self.metrics = {name: metrics.Gauge(f"ipr_grpo_{name}", text) for name, text in {
                "loss": "GRPO loss (Eq. 21)", "kl": "k3 estimate of KL(pi || pi_0)",
                "imagined_return": "mean imagined return of the candidates of the last update",
                "version": "policy version of the learner", "staleness": "mean version lag of the last update's groups"}.items()}

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> None:
        """Join the torch.distributed group (blocks until all M learners joined)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        backend = "nccl" if self.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)

    def version(self) -> int:
        return self.policy.version

    def update(self, groups: list[Group], total: int) -> dict:
        """One optimizer step on this learner's share of `total` groups (all learners call it together)."""
        from learners.distributed import average_gradients

        policy = self.policy
        policy.model.train()
        self.optim.zero_grad(set_to_none=False)
        out = {"groups": len(groups)}
        if groups:
            g, b = len(groups), len(groups[0].codes)
            batch = policy.inputs([x.frame for x in groups], [x.goal for x in groups])
            batch = policy.repeat(batch, b)
            codes = torch.as_tensor(np.concatenate([x.codes for x in groups]), device=self.device)
            logp = policy.sequence_logprobs(batch, codes).sum(-1).view(g, b)
            with torch.no_grad():
                ref = self.reference.sequence_logprobs(batch, codes).sum(-1).view(g, b)
            old = torch.as_tensor(np.stack([x.logprobs for x in groups]), dtype=logp.dtype, device=self.device)
            stale = torch.as_tensor([x.version < policy.version for x in groups], device=self.device)
            # On-policy groups get ratio exactly 1 (Eq. 21's own gradient); stale ones the clipped ratio.
            old = torch.where(stale[:, None], old, logp.detach())
            returns = torch.as_tensor(np.stack([x.returns for x in groups]), dtype=logp.dtype, device=self.device)
            terms = grpo_loss(logp, returns, ref, self.cfg.beta_kl, old, self.cfg.clip)
            # Weighted so that averaging over M learners gives the mean over all `total` groups.
            (terms["loss"] * (g * self.world / total)).backward()
            out.update({k: float(v.detach()) for k, v in terms.items()})
            out["imagined_return"] = float(returns.mean())
        else:  # a learner with no share still takes part in the all-reduce with zero gradients
            for p in policy.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        average_gradients(policy.model.parameters())
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.model.parameters(), self.cfg.grad_clip))
        self.optim.step()
        policy.version += 1
        out["version"] = policy.version
        if self.metrics and groups:
            for name in ("loss", "kl", "imagined_return"):
                self.metrics[name].set(out[name])
            self.metrics["version"].set(policy.version)
        return out

    def weights(self) -> dict:
        return self.policy.state()

    def save(self, path: str) -> None:
        """Rank 0: the policy directory and `learner_state.pt` (optimizer, version) inside it."""
        self.policy.save(path)
        torch.save({"optimizer": self.optim.state_dict(), "version": self.policy.version},
                   os.path.join(path, LEARNER_STATE))


LEARNER_STATE = "learner_state.pt"
MEAN_TERMS = ("loss", "kl", "policy_gradient", "imagined_return", "advantage_abs", "clip_fraction")


class LearnerGroup:
    """Driver-side handle: creates the M learners, splits updates over them, reads rank 0."""

    def __init__(self, cfg, policy_path: str, reference_path: str, codes: int, resume: bool):
        g = cfg.grpo
        state = os.path.join(policy_path, LEARNER_STATE) if resume else None
        options = {"num_cpus": g.cpus_per_learner, "num_gpus": g.gpus_per_learner}
        payload = {**g.model_dump(), "seed": cfg.run.seed}
        self.actors = [GRPOLearner.options(**options).remote(r, g.learners, policy_path, reference_path, codes,
                                                             payload, state) for r in range(g.learners)]
        host, port = ray.get(self.actors[0].address.remote())
        ray.get([a.join.remote(host, port) for a in self.actors])
        self.version = ray.get(self.actors[0].version.remote())

    def update(self, groups: list[Group]) -> dict:
        m = len(self.actors)
        shares = [groups[r::m] for r in range(m)]
        results = ray.get([a.update.remote(s, len(groups)) for a, s in zip(self.actors, shares)])
        self.version = results[0]["version"]
        shared = [r for r in results if "loss" in r]  # learners that had groups: report their mean terms
        merged = {k: float(np.mean([r[k] for r in shared])) for k in MEAN_TERMS}
        merged.update(version=self.version, groups=len(groups), grad_norm=results[0]["grad_norm"],
                      equal_groups=sum(r["equal_groups"] for r in shared))
        return merged

    def weights_ref(self):
        return self.actors[0].weights.remote()

    def save(self, path: str) -> None:
        ray.get(self.actors[0].save.remote(path))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
