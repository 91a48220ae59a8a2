"""The world-model scorer: a Ray actor that scores candidate PhysCode sequences by imagination.

Requests from many environments arrive concurrently; the actor gathers those that come within
`window_ms` (up to `max_batch` environments) and answers them with one batched `imagine` call, so
B candidates x N environments cost one forward per imagined step. It runs on a GPU when given one
(`num_gpus` in the actor options) and on the CPU otherwise, and reloads its weights when the
run's checkpoint pointer names a new version (checked at most every `reload_check_s`). Given the run's PhysCode codebook, it refuses weights trained on another
one: at start with a clear error, on a later reload by keeping the weights it has and reporting why
in `stats()`. A bad request (wrong feature size, codes outside the codebook, nothing to score) fails
alone with a clear message; the other requests of its batch are still answered.

Given the run's appearance encoder settings, it also computes f_t of raw frames on its own device
(`features`), so Stage 4 and the served agent never run DINOv3 (or the small encoder) in the driver.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import ray
import torch

from actors.batching import WindowBatcher
from ipr_dist.models.world_model import WorldModel, WorldModelConfig, check_codebook
from ipr_dist.run_layout import CheckpointRef


def _version(checkpoint: CheckpointRef | str):
    """What identifies the weights now on storage: the pointer's version, or a local file's mtime."""
    if isinstance(checkpoint, CheckpointRef):
        pointer = checkpoint.layout.checkpoint(checkpoint.name)
        return pointer and pointer["dir"]
    return os.path.getmtime(checkpoint) if os.path.isfile(checkpoint) else None


def run_settings(w) -> dict:
    """The run's choices of how a trained world model is used, not what it was trained as: how an
    imagined return is formed and the critic's TD target (for the online learner). They follow the
    run's config, so a change needs no retraining."""
    return {"imagined_return": w.imagined_return, "critic_target": w.critic_target}


def load_world_model(checkpoint: CheckpointRef | str | dict, device: str, codebook: np.ndarray | None = None,
                     settings: dict | None = None) -> WorldModel:
    """A world model from a run's committed checkpoint, a checkpoint file or an already loaded checkpoint;
    `settings` (run_settings) replace the checkpoint's."""
    from learners.world_model import CHECKPOINT_FILE

    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    elif isinstance(checkpoint, CheckpointRef):
        data = checkpoint.layout.read_checkpoint_file(checkpoint.name, CHECKPOINT_FILE)
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    else:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt["model"]
    if codebook is not None:
        check_codebook(state["codebook"], torch.tensor(np.asarray(codebook), dtype=state["codebook"].dtype),
                       "the given checkpoint" if isinstance(checkpoint, dict) else str(checkpoint))
    model = WorldModel(WorldModelConfig(**{**ckpt["config"], **(settings or {})}), state["codebook"])
    model.load_state_dict(state)
    return model.to(device).eval()


@ray.remote
class WorldModelScorer:
    def __init__(self, checkpoint: CheckpointRef | str, codebook: np.ndarray | None = None, window_ms: float = 5.0,
                 max_batch: int = 64, reload_check_s: float = 5.0, appearance=None, f_norm: dict | None = None,
                 settings: dict | None = None, reference: CheckpointRef | str | None = None):
        """`reference`: a second checkpoint, never reloaded, that `score_reference` scores with (Stage 4 gives
        Stage 2's, so the policy's predicted return can be followed under one fixed critic while the online
        versions come and go); it is loaded on the first such call."""
        from actors.feature_extractor import make_appearance
        from ipr_dist.devices import actor_device

        self.checkpoint = checkpoint
        self.reload_check_s, self.checked = reload_check_s, time.monotonic()
        self.codebook = codebook
        self.settings = settings
        self.reload_error: str | None = None
        self.reference, self.reference_model = reference, None
        self.device = actor_device()
        self._load()
        # appearance: (FeaturesConfig, RunLayout) of the run, so f_t is computed here, on this device
        self.appearance = make_appearance(*appearance, self.device) if appearance is not None else None
        self.f_norm = f_norm
        self.batcher = WindowBatcher(self._answer, window_ms / 1000.0, max_batch)

    def _load(self) -> None:
        version = _version(self.checkpoint)
        self.model = load_world_model(self.checkpoint, self.device, self.codebook, self.settings)
        self.version, self.reload_error = version, None

    def _maybe_reload(self) -> None:
        if time.monotonic() - self.checked < self.reload_check_s:
            return
        self.checked = time.monotonic()
        version = _version(self.checkpoint)
        if version is not None and version != self.version:
            try:
                self._load()
            except Exception as exc:  # keep serving the weights we have; say why the new ones were refused
                self.version, self.reload_error = version, str(exc)

    def _check(self, f: np.ndarray, codes: np.ndarray) -> None:
        cfg = self.model.cfg
        if f.ndim != 1 or f.shape[0] != cfg.f_dim:
            raise ValueError(f"features must be one {cfg.f_dim}-d vector per environment, got shape {f.shape}")
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"candidates must be a non-empty (B, L) array of codes, got shape {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.model.codes:
            raise ValueError(f"codes must lie in 0..{self.model.codes - 1} (this world model's codebook)")

    def features(self, frames: np.ndarray) -> np.ndarray:
        """f_t as the world model knows it: appearance features (N, f_dim) of frames (N, H, W, 3) uint8,
        standardised like PhysCode's."""
        from ipr_dist.data.features import standardise_cue

        if self.appearance is None:
            raise RuntimeError("this scorer was started without the run's appearance encoder")
        # A copy: frames from Ray's object store are read-only, which torch would warn about.
        return standardise_cue(self.appearance.encode(np.array(frames, np.uint8)), self.f_norm)

    async def score(self, f: np.ndarray, codes: np.ndarray, members: bool = False) -> np.ndarray:
        """Predicted returns (B,) of B candidate code sequences (B, L) from feature f (f_dim,); with
        `members`, (B, 1 + E): the critic's R^, then each of its E member heads' (E = 0 without them)."""
        f, codes = np.asarray(f, np.float32), np.asarray(codes, np.int64)
        self._check(f, codes)
        returns = await self.batcher.submit((f, codes))
        return returns if members else returns[:, 0]

    def score_reference(self, f: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """`score` with the reference checkpoint's world model (unbatched: for occasional probes)."""
        if self.reference is None:
            raise RuntimeError("this scorer was started without a reference world model")
        f, codes = np.asarray(f, np.float32), np.asarray(codes, np.int64)
        self._check(f, codes)
        if self.reference_model is None:
            self.reference_model = load_world_model(self.reference, self.device, self.codebook, self.settings)
        _, returns = self.reference_model.imagine(torch.tensor(f[None], device=self.device),
                                                  torch.tensor(codes[None], device=self.device))
        return returns[0].cpu().numpy()

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
                _, returns = self.model.imagine(f, codes, members=True)  # (N, B, 1 + E)
                for i, r in zip(idx, returns.cpu().numpy()):
                    out[i] = r
            except Exception as exc:  # this group fails; the others are still answered
                for i in idx:
                    out[i] = exc
        return out

    def stats(self) -> dict:
        from ipr_dist.devices import device_metrics

        return {"batches": self.batcher.batches, "device": self.device, "codes": self.model.codes, **device_metrics(self.device),
                "f_dim": self.model.cfg.f_dim, "members": self.model.cfg.critic_members, "reload_error": self.reload_error}
