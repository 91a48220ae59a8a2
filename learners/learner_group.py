"""The GRPO learner group: M learner actors forming one torch.distributed group (gloo on CPU, NCCL
on GPUs), each holding the policy and the frozen aligned reference pi_0, either as whole replicas
(gradients all-reduced) or, with `grpo.fsdp`, sharded over the group with torch FSDP2 (one shard unit
per transformer block, so a learner holds 1/M of the weights, gradients and AdamW state).

An update takes a list of groups (one context, B candidates, their imagined returns, the
log-probabilities and version of the policy that sampled them); each learner computes Eq. 21 on its
share, gradients are averaged over the group (weighted so the result is the mean over all groups),
and every learner takes the same AdamW step, so replicas (or shards) stay one policy. Groups more
than `max_staleness` versions behind the learner are dropped and counted; a version-behind group
gets the clipped ratio (algos/grpo.py). Rank 0 exports the learner's Ray metrics and hands out
weights; sharded weights are gathered by every learner together and land on rank 0.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np
import ray
import torch

from ipr_dist.algos.grpo import grpo_loss
from ipr_dist.devices import actor_device
from ipr_dist.models.policy import sampling_logprobs
from ipr_dist.run_layout import CheckpointRef, RunLayout, as_ref


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
    noise: float = 0.0  # the floor of its std from the critic's uncertainty, weighted (grpo.advantage_noise_weight)
    game: str = ""  # the game its context comes from
    anchor: bool = False  # a game GRPO does not learn on: only the KL and entropy terms act (grpo.anchor_unlearned)


@ray.remote
class GRPOLearner:
    def __init__(self, rank: int, world: int, policy: CheckpointRef, reference: CheckpointRef, codes: int, cfg: dict,
                 resume: bool = False):
        from ipr_dist.config import GRPOConfig
        from ipr_dist.models.policy import PhysCodePolicy

        torch.manual_seed(cfg.get("seed", 0))
        self.rank, self.world = rank, world
        self.bf16 = cfg.get("bf16", True)
        self.backend = cfg.get("backend", "transformers")  # the policy servers': how weights reach them
        # The servers' sampling distribution: the ratio and the KL are taken at it.
        self.temperature, self.top_p = cfg.get("temperature", 1.0), cfg.get("top_p", 1.0)
        self.cfg = GRPOConfig(**{k: v for k, v in cfg.items()
                                 if k not in ("seed", "bf16", "backend", "temperature", "top_p")})
        self.device = actor_device()
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_learner)))
        # Sharded models are read into host memory and FSDP moves each learner's shards to its GPU, so
        # a whole 8B policy and pi_0 never sit on one GPU together.
        load = "cpu" if self.cfg.fsdp else self.device
        with policy.open() as folder:  # on an object-store run: a download on this learner's node
            self.policy = PhysCodePolicy(folder, codes, device=load)
            # Only rank 0 reads the optimizer state on resume (it hands the others their shards).
            self.state = torch.load(folder / LEARNER_STATE, map_location="cpu", weights_only=False) \
                if resume and (rank == 0 or not self.cfg.fsdp) else ({"optimizer": {}} if resume else None)
        with reference.open() as folder:
            self.reference = PhysCodePolicy(folder, codes, device=load)
        self.reference.model.requires_grad_(False).eval()
        self.optim = None  # made in setup(), after sharding: FSDP replaces the parameters
        self.sync_groups: dict = {}  # rank 0: server key -> its weight-sync group (actors/weight_sync.py)
        self.metrics = None
        if rank == 0:
            from ipr_dist.metrics.ray_metrics import make

            self.metrics = {name: make(f"ipr_grpo_{name}") for name in ("loss", "kl", "imagined_return", "version")}

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, host: str, port: int) -> None:
        """Join the torch.distributed group (blocks until all M learners joined), shard the models when
        `fsdp`, then make the optimizer and restore its state on resume."""
        if self.world > 1:
            import torch.distributed as dist

            backend = "nccl" if self.device == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)
        if self.cfg.fsdp:
            for policy in (self.policy, self.reference):
                shard(policy.model, self.device)
                policy.device = self.device  # where its inputs go: the shards' device
        self.optim = torch.optim.AdamW([p for p in self.policy.model.parameters() if p.requires_grad],
                                       lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.state is not None:
            self._load_state(self.state)
            self.state = None

    def _load_state(self, state: dict) -> None:
        if not self.cfg.fsdp:
            self.optim.load_state_dict(state["optimizer"])
            self.policy.version = state["version"]
            return
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Only rank 0 holds the full optimizer state; the others receive their shards from it.
        set_optimizer_state_dict(self.policy.model, self.optim, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        version = [state.get("version")]
        dist.broadcast_object_list(version, src=0)
        self.policy.version = version[0]

    def version(self) -> int:
        return self.policy.version

    def device_stats(self) -> dict:
        from ipr_dist.devices import device_metrics

        return device_metrics(self.device)

    def held_elements(self) -> int:
        """Policy parameter elements this learner holds in memory (its shards under FSDP)."""
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.policy.model.parameters())

    def update(self, groups: list[Group], total: int, padding: bool = False, micro_batches: int = 1) -> dict:
        """One optimizer step on this learner's share of `total` groups (all learners call it together),
        in `micro_batches` forward/backward passes whose gradients accumulate: the same step as one
        pass over the share, in a fraction of the activation memory. `padding`: the groups are another
        learner's, run with weight 0 by a learner with no share of its own, so every learner's
        collectives (all-reduce, FSDP's all-gathers) line up; every learner runs the same number of
        passes for the same reason (an empty micro-batch is a zero-weight pass too)."""
        from learners.distributed import average_gradients

        policy = self.policy
        policy.model.train()
        self.optim.zero_grad(set_to_none=False)
        out: dict = {"groups": 0 if padding else len(groups)}
        size = -(-len(groups) // micro_batches)
        chunks = [groups[i * size:(i + 1) * size] for i in range(micro_batches)]
        sums: dict[str, float] = {}
        returns_sum, returns_n = 0.0, 0  # over the learned groups: an anchor's returns are not scored
        for i, chunk in enumerate(chunks):
            if self.cfg.fsdp:  # reduce-scatter the accumulated gradients once, after the last pass
                policy.model.set_requires_gradient_sync(i == micro_batches - 1)
            # Eq. 21 is a mean over groups: each pass weighs its groups' mean by their share of this
            # learner's groups, and the learner's share by its part of the `total` (averaged over M).
            share = 0.0 if padding or not chunk else len(chunk) / len(groups)
            terms, returns = self._terms(chunk or groups[:1])
            (terms["loss"] * share * len(groups) * self.world / total).backward()
            if share:
                for k, v in terms.items():
                    value = float(v.detach())
                    sums[k] = sums.get(k, 0.0) + (value if k in COUNTED_TERMS else value * share)
                returns_sum, returns_n = returns_sum + float(returns.sum()), returns_n + returns.numel()
        out.update(sums)
        if returns_n:
            out["imagined_return"] = returns_sum / returns_n
        if not self.cfg.fsdp:  # FSDP averages gradients itself (reduce-scatter) during backward
            average_gradients(policy.model.parameters())
        norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), self.cfg.grad_clip)
        out["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optim.step()
        policy.version += 1
        out["version"] = policy.version
        if self.metrics and "loss" in out:
            for name in ("loss", "kl", "imagined_return"):
                if name in out:
                    self.metrics[name].set(out[name])
            self.metrics["version"].set(policy.version)
        return out

    def drift(self, frames: list[np.ndarray], goals: list[str]) -> np.ndarray | None:
        """First-code KL(pi || pi_0) at the sampling temperature on `frames` (N,): how far the updates moved
        the policy on those states (rank 0 answers; with FSDP every learner takes part in the forward)."""
        from ipr_dist.models.policy import first_code_kl

        self.policy.model.eval()  # `update` sets train() again
        kl = first_code_kl(self.policy, self.reference, frames, goals, self.temperature)
        return kl if self.rank == 0 else None

    def _terms(self, groups: list[Group]) -> tuple[dict, torch.Tensor]:
        """Eq. 21's terms on `groups` (with gradients on the loss) and the imagined returns of those not anchors."""
        from ipr_dist.devices import autocast

        policy = self.policy
        g, b = len(groups), len(groups[0].codes)
        batch = policy.repeat(policy.inputs([x.frame for x in groups], [x.goal for x in groups]), b)
        codes = torch.as_tensor(np.concatenate([x.codes for x in groups]), device=self.device)
        with autocast(self.device, self.bf16):
            logits = policy.code_logits(batch, codes)
            with torch.no_grad():
                ref = self.reference.code_logits(batch, codes)
        logits, ref = logits.view(g, b, *logits.shape[1:]), ref.view(g, b, *ref.shape[1:])  # (G, B, L, K)
        codes = codes.view(g, b, -1)
        old = torch.as_tensor(np.stack([x.logprobs for x in groups]), dtype=torch.float32, device=self.device)
        stale = torch.as_tensor([x.version < policy.version for x in groups], device=self.device)
        # On-policy groups get ratio exactly 1 (Eq. 21's own gradient); stale ones the clipped ratio.
        with torch.no_grad():
            own = sampling_logprobs(logits, self.temperature, self.top_p, include=codes).gather(
                -1, codes[..., None])[..., 0].sum(-1)
        old = torch.where(stale[:, None], old, own)
        returns = torch.as_tensor(np.stack([x.returns for x in groups]), dtype=torch.float32, device=self.device)
        noise = torch.as_tensor([x.noise for x in groups], dtype=torch.float32, device=self.device)
        anchor = torch.as_tensor([x.anchor for x in groups], device=self.device)
        return grpo_loss(logits, codes, returns, ref, self.cfg.beta_kl, old, self.cfg.clip, self.temperature,
                         self.top_p, entropy_coef=self.cfg.entropy_coef, std_floor=self.cfg.advantage_std_floor,
                         noise=noise if bool((noise > 0).any()) else None,
                         entropy_to_reference=self.cfg.entropy_to_reference, anchor=anchor,
                         anchor_beta=self.cfg.anchor_beta_kl), returns[~anchor]

    def weight_sync_address(self) -> tuple[str, int]:
        from actors.weight_sync import free_address

        return free_address()

    def join_weight_sync(self, key: str, host: str, port: int, timeout_s: float, world: int) -> None:
        """Rank 0: host the store of server `key`'s group (`world`: this learner and the server's
        processes) and wait until the server joins. vLLM engines join through vLLM's own NCCL
        weight-transfer engine, whose trainer side this learner then holds."""
        self.sync_groups.pop(key, None)
        if self.backend == "vllm":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

            self.sync_groups[key] = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=host, master_port=port, world_size=world))
            return
        from actors.weight_sync import PairGroup

        self.sync_groups[key] = PairGroup(host, port, 0, self.device, timeout_s)

    def weight_meta(self) -> dict:
        """What a push to a vLLM engine carries: names, wire dtypes and shapes, in order."""
        from actors.weight_sync import layout_of

        layout = layout_of(self.policy.model.state_dict())
        return {"names": [name for name, _ in layout], "dtype_names": ["bfloat16"] * len(layout),
                "shapes": [list(shape) for _, shape in layout]}

    def send_weights(self, keys: list[str]) -> dict[str, str]:
        """Broadcast the current weights to the servers `keys` over their pair groups (under FSDP every
        learner calls it: they gather the full weights together, rank 0 sends). Returns {key: why} for
        the servers that did not get them (their group is dropped; the driver has them rejoin)."""
        from actors.weight_sync import send

        state = self.weights()
        if self.rank != 0:
            return {}
        failed = {key: "not joined" for key in keys if key not in self.sync_groups}
        groups = {key: self.sync_groups[key] for key in keys if key in self.sync_groups}
        if self.backend == "vllm":
            for key, group in groups.items():
                try:
                    send_vllm(group, state)
                except Exception as exc:  # the engine died mid-push: it rejoins after Ray restarts it
                    failed[key] = f"{type(exc).__name__}: {exc}"
        else:
            failed.update(send(groups, state))
        for key in failed:
            self.sync_groups.pop(key, None)
        return failed

    def weights(self) -> dict | None:
        """The full policy state dict on rank 0 (None elsewhere); with FSDP every learner must call it."""
        if not self.cfg.fsdp:
            return self.policy.state()
        state, _ = gather_full(self.policy.model)
        return state if self.rank == 0 else None

    def save(self, layout: RunLayout, name: str, extra: dict) -> None:
        """A new committed version of the run's checkpoint `name`, written by rank 0 (the process that
        holds the weights): the policy directory, `learner_state.pt` (optimizer, version) and each of
        `extra` (file name -> object for torch.save, e.g. the driver's counters); with FSDP every
        learner takes part in gathering the weights and optimizer state."""
        weights = None
        if not self.cfg.fsdp:
            optim = self.optim.state_dict()
        else:
            weights, optim = gather_full(self.policy.model, self.optim)
            if self.rank != 0:
                return
        with layout.new_checkpoint(name, version=self.policy.version) as folder:
            self.policy.save(folder, state_dict=weights)
            torch.save({"optimizer": optim, "version": self.policy.version}, folder / LEARNER_STATE)
            for file, value in extra.items():
                torch.save(value, folder / file)


def send_vllm(group, state: dict[str, torch.Tensor]) -> None:
    """Learner rank 0's side of vLLM's NCCL weight transfer: the state dict's floating-point entries,
    in `weight_meta`'s order, in bfloat16 on this learner's GPU, packed by vLLM."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine

    from actors.weight_sync import layout_of

    tensors = ((name, state[name].to("cuda", torch.bfloat16)) for name, _ in layout_of(state))
    NCCLWeightTransferEngine.trainer_send_weights(iterator=tensors,
                                                  trainer_args=NCCLTrainerSendWeightsArgs(group=group, packed=True))


def gather_full(model: torch.nn.Module, optim=None) -> tuple[dict, dict | None]:
    """The full state dict of an FSDP-sharded model (and of its optimizer), on the CPU of every
    rank; every rank of the group must call it (the shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    return weights, (get_optimizer_state_dict(model, optim, options=full) if optim is not None else None)


def shard(model: torch.nn.Module, device: str) -> None:
    """FSDP2 over the learner group: every transformer block (the model's `_no_split_modules`: decoder
    layers and vision blocks) is one unit, the rest (embeddings, LM head, merger) the root unit. On
    GPUs the units compute in bfloat16 and reduce gradients in float32; parameters stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device == "cuda" \
        else MixedPrecisionPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)


LEARNER_STATE = "learner_state.pt"
ROLE = "GRPO learners"  # their placement role (actors/placement.py)
SYNC_TIMEOUT_S = 300.0  # a weight-sync collective that waits longer than this fails (its peer died)
MEAN_TERMS = ("loss", "kl", "entropy", "entropy_shortfall", "policy_gradient", "imagined_return", "advantage_abs",
              "clip_fraction")
COUNTED_TERMS = ("equal_groups", "noisy_groups", "anchored_groups")  # summed over the learners' groups, not averaged


class LearnerGroup:
    """Driver-side handle: creates the M learners, splits updates over them, reads rank 0."""

    def __init__(self, cfg, policy: CheckpointRef | str, reference: CheckpointRef | str, codes: int, resume: bool,
                 placement=None):
        from actors.placement import wait

        g = cfg.grpo
        options = {"num_cpus": g.cpus_per_learner, "num_gpus": g.gpus_per_learner,
                   "resources": dict(g.learner_resources)}
        payload = {**g.model_dump(), "seed": cfg.run.seed, "bf16": cfg.ray.bf16, "backend": cfg.policy.backend,
                   "temperature": cfg.policy.temperature, "top_p": cfg.policy.top_p}
        # `placement` (actors/placement.py): learner r goes into bundle r of the learners' group.
        self.actors = [GRPOLearner.options(**options, **(placement.options(ROLE, r) if placement else {})).remote(
            r, g.learners, as_ref(policy), as_ref(reference), codes, payload, resume) for r in range(g.learners)]
        self.fsdp = g.fsdp
        self.micro_batch = g.micro_batch
        self.meta = None  # names, dtypes and shapes of a push (vLLM engines need them announced)
        self.timeout_s = cfg.ray.placement_timeout_s
        host, port = wait([self.actors[0].address.remote()], self.timeout_s, ROLE)[0]
        wait([a.setup.remote(host, port) for a in self.actors], self.timeout_s, f"{ROLE} (joining their group)")
        self.version = ray.get(self.actors[0].version.remote())

    def update(self, groups: list[Group]) -> dict:
        m = len(self.actors)
        shares = [groups[r::m] for r in range(m)]
        # Every learner runs the same number of forward/backward passes (their collectives line up).
        passes = -(-max(len(s) for s in shares) // self.micro_batch) if self.micro_batch else 1
        # Fewer groups than learners: an idle learner runs the first group with weight 0, since every
        # learner must take part in the collectives of an update.
        results = ray.get([a.update.remote(s or groups[:1], len(groups), not s, passes)
                           for a, s in zip(self.actors, shares)])
        self.version = results[0]["version"]
        shared = [r for r in results if "loss" in r]  # learners that had groups: their terms, by group count
        weights = [r["groups"] for r in shared]
        # imagined_return is absent from a learner whose groups were all anchors
        merged = {k: float(np.average([r[k] for r in shared if k in r],
                                      weights=[w for r, w in zip(shared, weights) if k in r]))
                  for k in MEAN_TERMS if any(k in r for r in shared)}
        merged.update(version=self.version, groups=len(groups), grad_norm=results[0]["grad_norm"],
                      **{k: sum(r[k] for r in shared) for k in COUNTED_TERMS})
        return merged

    @property
    def _holders(self) -> list:
        """The learners that take part in gathering weights: all when sharded, else rank 0."""
        return self.actors if self.fsdp else self.actors[:1]

    def weights_ref(self):
        """A reference to the full state dict (rank 0's answer); sharded learners all gather it."""
        refs = [a.weights.remote() for a in self._holders]
        return refs[0]  # the other learners answer None once they have sent their shards

    def join(self, key: str, server) -> None:
        """Make the weight-sync pair group of learner rank 0 and `server` (both sides wait for the other)."""
        from actors.placement import wait

        host, port = ray.get(self.actors[0].weight_sync_address.remote())
        world = ray.get(server.weight_sync_world.remote())
        wait([self.actors[0].join_weight_sync.remote(key, host, port, SYNC_TIMEOUT_S, world),
              server.join_weight_sync.remote(host, port, SYNC_TIMEOUT_S)], self.timeout_s,
             f"weight-sync group with policy server {key}")

    def push(self, servers: dict, version: int) -> dict[str, str]:
        """Broadcast the current weights to `servers` ({key: handle}) with `version`; a server not in its
        group (new, or restarted by Ray since it joined) joins first. Returns {key: why} for the servers
        that did not get them (e.g. killed during the push: they rejoin at the next push)."""
        joined = ray.get([s.weight_sync_joined.remote() for s in servers.values()])
        for (key, server), ok in zip(servers.items(), joined):
            if not ok:
                self.join(key, server)
        if self.meta is None:
            self.meta = ray.get(self.actors[0].weight_meta.remote())
        sends = [a.send_weights.remote(list(servers)) for a in self._holders]
        receives = {key: s.receive_weights.remote(version, self.meta) for key, s in servers.items()}
        failed = dict(ray.get(sends[0]))
        ray.get(sends[1:])
        for key, ref in receives.items():
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                failed.setdefault(key, str(exc).splitlines()[0])
        return failed

    def drift(self, frames: list[np.ndarray], goals: list[str]) -> np.ndarray:
        """Rank 0's `GRPOLearner.drift` on `frames`."""
        return ray.get([a.drift.remote(frames, goals) for a in self._holders])[0]

    def save(self, layout: RunLayout, name: str, extra: dict | None = None) -> None:
        ray.get([a.save.remote(layout, name, extra or {}) for a in self._holders])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
