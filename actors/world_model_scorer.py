"""The world-model scorer: a Ray actor that scores candidate PhysCode sequences by imagination.

Requests from many environments arrive concurrently; the actor gathers those that come within
`window_ms` (up to `max_batch` environments) and answers them with one batched `imagine` call, so
B candidates x N environments cost one forward per imagined step. It runs on a GPU when given one
(`num_gpus` in the actor options) and on the CPU otherwise, and reloads its weights when the
checkpoint file changes. Given the run's PhysCode codebook, it refuses weights trained on another
one: at start with a clear error, on a later reload by keeping the weights it has and reporting why
in `stats()`. A bad request (wrong feature size, codes outside the codebook, nothing to score) fails
alone with a clear message; the other requests of its batch are still answered.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray
import torch

from actors.batching import WindowBatcher
from ipr_dist.models.world_model import WorldModel, WorldModelConfig, check_codebook


def load_world_model(checkpoint: str, device: str, codebook: np.ndarray | None = None) -> WorldModel:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt["model"]
    if codebook is not None:
        check_codebook(state["codebook"], torch.tensor(np.asarray(codebook), dtype=state["codebook"].dtype), checkpoint)
    model = WorldModel(WorldModelConfig(**ckpt["config"]), state["codebook"])
    model.load_state_dict(state)
    return model.to(device).eval()


@ray.remote
class WorldModelScorer:
    def __init__(self, checkpoint: str, codebook: np.ndarray | None = None, window_ms: float = 5.0,
                 max_batch: int = 64):
        self.checkpoint = checkpoint
        self.codebook = codebook
        self.reload_error: str | None = None
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self._load()
        self.batcher = WindowBatcher(self._answer, window_ms / 1000.0, max_batch)

    def _load(self) -> None:
        mtime = os.path.getmtime(self.checkpoint)
        self.model = load_world_model(self.checkpoint, self.device, self.codebook)
        self.mtime, self.reload_error = mtime, None

    def _maybe_reload(self) -> None:
        if Path(self.checkpoint).is_file() and os.path.getmtime(self.checkpoint) != self.mtime:
            try:
                self._load()
            except Exception as exc:  # keep serving the weights we have; say why the new ones were refused
                self.mtime, self.reload_error = os.path.getmtime(self.checkpoint), str(exc)

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
        return await self.batcher.submit((f, codes))

    def _answer(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> list:
        self._maybe_reload()
        out: list = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, (_, codes) in enumerate(batch):  # one imagine call per candidate shape (B, L): usually one
            groups.setdefault(codes.shape, []).append(i)
        for idx in groups.values():
            try:
                f = torch.from_numpy(np.stack([batch[i][0] for i in idx])).to(self.device)
                codes = torch.from_numpy(np.stack([batch[i][1] for i in idx])).to(self.device)
                _, returns = self.model.imagine(f, codes)
                for i, r in zip(idx, returns.cpu().numpy()):
                    out[i] = r
            except Exception as exc:  # this group fails; the others are still answered
                for i in idx:
                    out[i] = exc
        return out

    def stats(self) -> dict:
        return {"batches": self.batcher.batches, "device": self.device, "codes": self.model.codes,
                "f_dim": self.model.cfg.f_dim, "reload_error": self.reload_error}
