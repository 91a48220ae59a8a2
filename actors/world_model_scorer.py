"""The world-model scorer: a Ray actor that scores candidate PhysCode sequences by imagination.

Requests from many environments arrive concurrently; the actor gathers those that come within
`window_ms` (up to `max_batch` environments) and answers them with one batched `imagine` call, so
B candidates x N environments cost one forward per imagined step. It runs on a GPU when given one
(`num_gpus` in the actor options) and on the CPU otherwise, and reloads its weights when the
checkpoint file changes. A bad request (wrong feature size, codes outside the codebook, nothing to
score) fails alone with a clear message; the other requests of its batch are still answered.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from ipr_dist.models.world_model import WorldModel, WorldModelConfig


def load_world_model(checkpoint: str, device: str) -> WorldModel:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt["model"]
    model = WorldModel(WorldModelConfig(**ckpt["config"]), state["codebook"])
    model.load_state_dict(state)
    return model.to(device).eval()


@ray.remote
class WorldModelScorer:
    def __init__(self, checkpoint: str, window_ms: float = 5.0, max_batch: int = 64):
        self.checkpoint = checkpoint
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self._load()
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0

    def _load(self) -> None:
        self.model = load_world_model(self.checkpoint, self.device)
        self.mtime = os.path.getmtime(self.checkpoint)

    def _maybe_reload(self) -> None:
        if Path(self.checkpoint).is_file() and os.path.getmtime(self.checkpoint) != self.mtime:
            self._load()

    def _check(self, f: np.ndarray, codes: np.ndarray) -> None:
        cfg = self.model.cfg
        if f.ndim != 1 or f.shape[0] != cfg.f_dim:
            raise ValueError(f"features must be one {cfg.f_dim}-d vector per environment, got shape {f.shape}")
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"candidates must be a non-empty (B, L) array of codes, got shape {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.model.codes:
            raise ValueError(f"codes must lie in 0..{self.model.codes - 1} (this world model's codebook)")

    async def score(self, f: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Predicted returns (B,) of B candidate code sequences (B, L) from feature f (f_dim,)."""
        f, codes = np.asarray(f, np.float32), np.asarray(codes, np.int64)
        self._check(f, codes)
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._serve())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((f, codes, done))
        return await done

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self._answer(batch)

    def _answer(self, batch) -> None:
        self._maybe_reload()
        self.batches += 1
        groups: dict[tuple, list] = {}
        for item in batch:  # one imagine call per candidate shape (B, L): usually all requests alike
            groups.setdefault(item[1].shape, []).append(item)
        for items in groups.values():
            try:
                f = torch.from_numpy(np.stack([i[0] for i in items])).to(self.device)
                codes = torch.from_numpy(np.stack([i[1] for i in items])).to(self.device)
                _, returns = self.model.imagine(f, codes)
                for (_, _, fut), r in zip(items, returns.cpu().numpy()):
                    fut.set_result(r)
            except Exception as exc:  # answer every request of the group, never leave one waiting
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)

    def stats(self) -> dict:
        return {"batches": self.batches, "device": self.device, "codes": self.model.codes,
                "f_dim": self.model.cfg.f_dim}
