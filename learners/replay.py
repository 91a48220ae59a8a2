"""The replay buffer of recent contexts and its samples-per-insert limiter (paper Sec. 10.2 Stage 4:
"one real step followed by k = 4 imagination-only updates sampled from a replay buffer of recent
contexts").

Every real step inserts its context (frame, features, goal, game, policy version); every insert
licenses exactly k imagination-only updates, each on a context sampled from the buffer. The limiter
works like Reverb's SampleToInsertRatio: with `owed = k * inserts - samples`, an insert waits while
`owed > tolerance` (the actors ran ahead of the learner) and a sample of n waits while
`owed - n < -tolerance` (the learner ran ahead of the actors). So |samples - k * inserts| never
exceeds tolerance + n, and the cumulative ratio samples / inserts converges to k. How long each
side waited is recorded; the counters go into the GRPO checkpoint and come back on resume (the
contexts do not: a resumed buffer refills from new real steps, and its first insert is let through
even if imagined updates are still owed, which may put the ratio up to k above its bound once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import ray


@dataclass
class LimiterState:
    inserts: int = 0
    samples: int = 0
    insert_wait_s: float = 0.0
    sample_wait_s: float = 0.0


class RatioLimiter:
    """Plain bookkeeping of the 1:k ratio; the actor below does the waiting."""

    def __init__(self, k: int, tolerance: int, state: LimiterState | None = None):
        self.k, self.tolerance = k, tolerance
        self.state = state or LimiterState()

    @property
    def owed(self) -> int:
        """Imagined updates licensed by the real steps so far and not yet taken."""
        return self.k * self.state.inserts - self.state.samples

    def can_insert(self) -> bool:
        return self.owed <= self.tolerance

    def can_sample(self, n: int) -> bool:
        return self.state.inserts > 0 and self.owed - n >= -self.tolerance

    @property
    def ratio(self) -> float:
        return self.state.samples / self.state.inserts if self.state.inserts else 0.0


@dataclass
class Context:
    """What a real step leaves for imagination: enough to propose and score again later."""

    frame: np.ndarray  # (H, W, 3) uint8
    features: np.ndarray  # (f_dim,) standardised appearance features f_t
    goal: str
    game: str
    policy_version: int


@ray.remote
class ReplayBuffer:
    """Recent contexts with the ratio limiter. Async actor: a waiting call blocks only itself."""

    def __init__(self, capacity: int, k: int, tolerance: int, state: dict | None = None, seed: int = 0):
        from ipr_dist.metrics.ray_metrics import make

        self.contexts: deque[Context] = deque(maxlen=capacity)
        self.limiter = RatioLimiter(k, tolerance, LimiterState(**state) if state else None)
        self.rng = np.random.default_rng(seed)
        self.changed = asyncio.Condition()
        self.closed = False
        self.waiting_inserts = 0  # insert calls waiting for their licence now (observable by tests)
        self._gauges = {name: make(f"ipr_replay_{name}")
                        for name in ("ratio", "size", "insert_wait_seconds", "sample_wait_seconds")}

    async def insert(self, contexts: list[Context]) -> float:
        """Insert real steps' contexts one by one, each waiting for its licence; returns seconds waited."""
        waited = 0.0
        for ctx in contexts:
            start = time.perf_counter()
            async with self.changed:
                # An empty buffer (a resumed run: contexts are not checkpointed, only the counters) takes
                # an insert even when imagined updates are owed, since none can be taken without one.
                licensed = lambda: self.closed or self.limiter.can_insert() or not self.contexts  # noqa: E731
                if not licensed():
                    self.waiting_inserts += 1
                    try:
                        await self.changed.wait_for(licensed)
                    finally:
                        self.waiting_inserts -= 1
                if self.closed:
                    break
                self.contexts.append(ctx)
                self.limiter.state.inserts += 1
                self.changed.notify_all()
            waited += time.perf_counter() - start
        self.limiter.state.insert_wait_s += waited
        self._export()
        return waited

    async def sample(self, n: int, timeout_s: float = 1.0) -> list[Context] | None:
        """n contexts drawn uniformly from the buffer, once the limiter licenses n imagined updates;
        None when none came within timeout_s (the caller checks whether to stop) or on close."""
        start = time.perf_counter()
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.closed or (self.limiter.can_sample(n) and self.contexts)),
                    timeout_s)
            except TimeoutError:
                self.limiter.state.sample_wait_s += time.perf_counter() - start
                return None
            if self.closed:
                return None
            picks = self.rng.integers(0, len(self.contexts), n)
            out = [self.contexts[int(i)] for i in picks]
            self.limiter.state.samples += n
            self.changed.notify_all()
        self.limiter.state.sample_wait_s += time.perf_counter() - start
        self._export()
        return out

    async def close(self) -> None:
        """Release every waiting call (end of the run)."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    def owed(self) -> int:
        return self.limiter.owed

    def state(self) -> dict:
        """The counters that a checkpoint keeps."""
        return asdict(self.limiter.state)

    def stats(self) -> dict:
        return {**self.state(), "size": len(self.contexts), "ratio": self.limiter.ratio, "owed": self.limiter.owed,
                "k": self.limiter.k, "tolerance": self.limiter.tolerance, "waiting_inserts": self.waiting_inserts}

    def _export(self) -> None:
        s = self.limiter.state
        for name, value in (("ratio", self.limiter.ratio), ("size", len(self.contexts)),
                            ("insert_wait_seconds", s.insert_wait_s), ("sample_wait_seconds", s.sample_wait_s)):
            self._gauges[name].set(value)
