"""The default policy server: PhysCodePolicy (transformers) in a Ray actor, batched across
environments. Concurrent `propose` calls that arrive within `window_ms` are answered by one
`generate` over all their frames; weights arrive from the learner as a state dict with a version,
and every proposal carries the version that produced it.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from actors.batching import WindowBatcher
from ipr_dist.devices import actor_device
from ipr_dist.models.policy import PhysCodePolicy, Proposals
from ipr_dist.run_layout import CheckpointRef


@ray.remote
class TransformersPolicyServer:
    def __init__(self, policy: CheckpointRef | str, codes: int, length: int, window_ms: float = 5.0,
                 max_batch: int = 16, seed: int = 0):
        from ipr_dist.run_layout import as_ref

        device = actor_device()
        with as_ref(policy).open() as folder:  # a restarted server reads the committed checkpoint again
            self.policy = PhysCodePolicy(folder, codes, device=device)
        self.length = length
        self.calls = 0
        self.sync = None  # the weight-sync group with learner rank 0 (actors/weight_sync.py), once joined
        torch.manual_seed(seed)
        self.batcher = WindowBatcher(self._answer, window_ms / 1000.0, max_batch)

    async def propose(self, frames, goals: list[str], candidates: int, temperature: float = 0.7,
                      top_p: float = 0.9, distinct_first: bool = False) -> Proposals:
        """B candidate PhysCode sequences per (frame, goal), their log-probabilities and the version
        (`distinct_first`: the B sequences start with B different codes; PhysCodePolicy.propose)."""
        frames = [np.asarray(f, np.uint8) for f in frames]
        if len(frames) != len(goals) or not frames:
            raise ValueError(f"need one goal per frame and at least one frame, got {len(frames)} and {len(goals)}")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        return await self.batcher.submit((frames, list(goals), candidates, temperature, top_p, bool(distinct_first)))

    def _answer(self, batch: list) -> list:
        out: list = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, *setting) in enumerate(batch):  # one generate per sampling setting: usually one
            groups.setdefault(tuple(setting), []).append(i)
        for (b, t, p, d), idx in groups.items():
            try:
                frames = [f for i in idx for f in batch[i][0]]
                goals = [g for i in idx for g in batch[i][1]]
                props = self.policy.propose(frames, goals, b, self.length, t, p, distinct_first=d)
                self.calls += 1
                start = 0
                for i in idx:
                    n = len(batch[i][0])
                    out[i] = Proposals(props.codes[start:start + n], props.logprobs[start:start + n], props.version)
                    start += n
            except Exception as exc:  # this group fails alone
                for i in idx:
                    out[i] = exc
        return out

    def update_weights(self, state: dict, version: int) -> int:
        """The object-store path: a whole state dict."""
        self.policy.update_weights(state, version)
        return version

    def join_weight_sync(self, host: str, port: int, timeout_s: float) -> None:
        """Join learner rank 0's pair group for this server (blocks until both sides are in)."""
        from actors.weight_sync import PairGroup

        self.sync = None
        self.sync = PairGroup(host, port, 1, self.policy.device, timeout_s)

    def weight_sync_joined(self) -> bool:
        return self.sync is not None

    def weight_sync_world(self) -> int:
        return 2  # learner rank 0 and this server

    def receive_weights(self, version: int, meta: dict | None = None) -> int:
        """Receive the learner's broadcast into the model, then serve it as `version` (`meta`, what
        vLLM engines need announced, is known here from the model itself)."""
        from actors.weight_sync import receive

        if self.sync is None:  # e.g. restarted by Ray since it joined: the driver has it rejoin
            raise RuntimeError("this policy server has not joined the weight-sync group")
        try:
            receive(self.sync, self.policy.model)
        except Exception:
            self.sync = None
            raise
        self.policy.version = version
        return version

    def version(self) -> int:
        return self.policy.version

    def weights(self) -> dict:
        """The served state dict (on the CPU), to compare with the learner's."""
        return self.policy.state()

    def pid(self) -> int:
        import os

        return os.getpid()

    def stats(self) -> dict:
        from ipr_dist.devices import device_metrics

        return {"batches": self.batcher.batches, "generate_calls": self.calls, "version": self.policy.version,
                "device": self.policy.device, "codes": self.policy.codes, **device_metrics(self.policy.device)}
