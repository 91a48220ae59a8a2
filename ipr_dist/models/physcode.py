"""PhysCode: the physics-centric latent action code (paper Sec. 3.2, 4 and 10.1), one file.

Per time step t of a clip of T steps:
  f~ = W_f f,  u~ = W_u Pool(u),  e~ = W_e e                                (Eq. 13)
  (a_f, a_u, a_e) = g([f~; u~; e~]);  w = softmax(a) over available cues   (Eq. 14)
  h = w_f f~ + w_u u~ + w_e e~                                              (Eq. 15)
Flow is privileged: during training it is dropped with probability p (u~ = 0, gates renormalised
over {f, e}); at inference the flow gate is closed (w_u = 0). A 6-layer transformer with temporal
positions maps h_{t-T+1..t} to z_t (last token); z_t is quantised to the nearest of K EMA-updated
codes (Eq. 16); the decoder predicts f_{t+D} from (f_t, z^_t) and a temporal head predicts
f_{t+D} - f_t. Loss: Eq. 17 + the temporal head + the gate-sparsity penalty. An action is a window
of L consecutive codes whose embedding is the mean of their code vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PhysCodeConfig:
    f_dim: int = 1024
    """Appearance feature size (DINOv3 ViT-L global-pooled patch tokens: 1024)."""
    u_dim: int = 2
    """Pooled flow size: 2 x pool_grid^2 (the paper's spatial average over the flow field: grid 1)."""
    e_dim: int = 768
    """Semantic embedding size (T5 encoder: 768)."""
    d: int = 512
    """Shared width of the projections, the transformer and the codes."""
    gate_hidden: int = 256
    """Hidden width of the gating MLP g (the paper calls it small and gives no width)."""
    flow_dropout: float = 0.5
    """Probability of dropping the flow cue for a clip during training (p = 0.5)."""
    gate_sparsity: float = 1e-4
    """lambda_gate of the L1 penalty pulling gates toward the uniform prior (the paper: "mild")."""
    layers: int = 6
    heads: int = 8
    clip_len: int = 8
    """T: steps in a clip; the code is assigned from the last token."""
    codes: int = 256
    """K: codebook size."""
    ema_decay: float = 0.99
    """EMA decay of the codebook statistics (the paper says EMA; 0.99 is the VQ-VAE-2 value)."""
    dead_code_usage: float = 0.01
    """A code whose EMA usage falls below this many assignments per step is restarted on a batch latent."""
    beta: float = 0.25
    """Codebook weight of Eq. 17 (only drives the codebook when codebook_update is "loss")."""
    gamma: float = 0.25
    """Commitment weight of Eq. 17."""
    temporal_weight: float = 1.0
    """Weight of the temporal head's loss on f_{t+D} - f_t (the paper gives none)."""
    semantic_weight: float = 0.0
    """Weight of a semantic head's loss: e_t (the executed control's text embedding) predicted from the
    quantised code, so the code has to carry what was done, not only what the scene does (not in the
    paper; 0 leaves Eq. 17 as it is and builds no head)."""
    window: int = 4
    """L: codes per action."""
    codebook_update: str = "ema"
    """"ema" (the paper) or "loss" (the codebook is a parameter trained by Eq. 17's beta term)."""
    dropout: float = 0.0


def gate_weights(alpha: torch.Tensor, flow_on: torch.Tensor) -> torch.Tensor:
    """Eq. 14 with flow dropout: softmax over (f, u, e), or over (f, e) with w_u = 0 where flow is off.

    alpha: (..., 3) unnormalised gates; flow_on: (...) bool."""
    mask = torch.stack([torch.ones_like(flow_on), flow_on, torch.ones_like(flow_on)], dim=-1)
    return torch.softmax(alpha.masked_fill(~mask, float("-inf")), dim=-1)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation (Eq. 16) with an EMA-updated codebook and dead-code restarts."""

    def __init__(self, cfg: PhysCodeConfig):
        super().__init__()
        self.cfg = cfg
        init = torch.randn(cfg.codes, cfg.d) * 0.1
        if cfg.codebook_update == "loss":
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        self.register_buffer("ema_count", torch.ones(cfg.codes))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """a = argmin_k ||z - c_k||^2 for every row of z (N, d), in float32 even under bf16 autocast
        (nearby codes would tie in bfloat16)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            dist = z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(-1)
        return dist.argmin(-1)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """c_k <- EMA of the latents assigned to k; codes used less than `dead_code_usage` per step
        (in EMA terms) are restarted on random latents of this batch, so no code stays dead."""
        cfg = self.cfg
        z = z.float()
        onehot = F.one_hot(idx, cfg.codes).type_as(z)
        self.ema_count.mul_(cfg.ema_decay).add_(onehot.sum(0), alpha=1 - cfg.ema_decay)
        self.ema_sum.mul_(cfg.ema_decay).add_(onehot.t() @ z, alpha=1 - cfg.ema_decay)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + cfg.codes * 1e-5) * n  # Laplace smoothing
        self.codebook.data.copy_(self.ema_sum / count.unsqueeze(1))
        dead = self.ema_count < cfg.dead_code_usage
        if dead.any():
            picks = z[torch.randint(0, len(z), (int(dead.sum()),), device=z.device)]
            self.codebook.data[dead] = picks
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0
            self.restarts += int(dead.sum())


class PhysCode(nn.Module):
    def __init__(self, cfg: PhysCodeConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.proj_f = nn.Linear(cfg.f_dim, d)  # W_f
        self.proj_u = nn.Linear(cfg.u_dim, d)  # W_u
        self.proj_e = nn.Linear(cfg.e_dim, d)  # W_e
        self.gate = nn.Sequential(nn.Linear(3 * d, cfg.gate_hidden), nn.GELU(), nn.Linear(cfg.gate_hidden, 3))  # g
        self.time_pos = nn.Parameter(torch.zeros(cfg.clip_len, d))
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)  # E_psi
        self.norm = nn.LayerNorm(d)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = nn.Sequential(nn.Linear(cfg.f_dim + d, 2 * d), nn.GELU(), nn.Linear(2 * d, cfg.f_dim))  # D_psi
        self.temporal_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.f_dim))
        self.semantic_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.e_dim)) \
            if cfg.semantic_weight > 0 else None

    # --- fusion and encoding ---------------------------------------------------------------------
    def fuse(self, f: torch.Tensor, u: torch.Tensor | None, e: torch.Tensor, flow_on: torch.Tensor):
        """Eq. 13-15 for every step: f (B,T,f_dim), u (B,T,u_dim) or None, e (B,T,e_dim),
        flow_on (B,) bool. Returns h (B,T,d) and the gates w (B,T,3)."""
        ft, et = self.proj_f(f), self.proj_e(e)
        ut = self.proj_u(u) if u is not None else torch.zeros_like(ft)
        on = flow_on[:, None].expand(ft.shape[:2])
        ut = ut * on[..., None]  # a dropped cue is replaced by zero
        w = gate_weights(self.gate(torch.cat([ft, ut, et], dim=-1)), on)
        h = w[..., 0:1] * ft + w[..., 1:2] * ut + w[..., 2:3] * et
        return h, w

    def encode(self, f, u, e, flow_on):
        """z_t from the fused clip (last token) and the gates."""
        h, w = self.fuse(f, u, e, flow_on)
        x = self.encoder(h + self.time_pos[-h.shape[1]:])
        return self.norm(x[:, -1]), w

    @torch.no_grad()
    def codes_for(self, f, e, u=None) -> torch.Tensor:
        """Code index of each clip's last step. Without flow (inference) the flow gate is closed."""
        flow_on = torch.full((f.shape[0],), u is not None, dtype=torch.bool, device=f.device)
        z, _ = self.encode(f, u, e, flow_on)
        return self.quantizer.assign(z)

    def action_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """An action <c_1..c_L> (..., L) embedded as the mean of its code vectors (..., d)."""
        return self.quantizer.codebook[codes].mean(-2)

    # --- training --------------------------------------------------------------------------------
    def forward(self, f, u, e, f_next, flow_on: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for a batch of clips: f, u, e (B,T,.) and the target f_{t+D} (B,f_dim) of the last
        step. In training mode flow is dropped per clip with probability p unless flow_on is given."""
        cfg = self.cfg
        B = f.shape[0]
        if flow_on is None:
            flow_on = (torch.rand(B, device=f.device) >= cfg.flow_dropout) if self.training else \
                torch.ones(B, dtype=torch.bool, device=f.device)
        z, w = self.encode(f, u, e, flow_on)
        idx = self.quantizer.assign(z.detach())
        zq = self.quantizer.codebook[idx]
        z_st = z + (zq - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        f_t = f[:, -1]
        f_hat = f_t + self.decoder(torch.cat([f_t, z_st], dim=-1))
        recon = F.mse_loss(f_hat, f_next)  # ||f^_{t+D} - f_{t+D}||^2       (Eq. 17, first term)
        codebook = F.mse_loss(zq, z.detach())  # beta ||sg[z] - z^||^2       (Eq. 17, second term)
        commit = F.mse_loss(z, zq.detach())  # gamma ||z - sg[z^]||^2        (Eq. 17, third term)
        temporal = F.mse_loss(self.temporal_head(z_st), f_next - f_t)  # head predicting delta f
        semantic = F.mse_loss(self.semantic_head(z_st), e[:, -1]) if self.semantic_head is not None \
            else z.new_zeros(())  # the executed control's text, from the code alone
        avail = torch.stack([torch.ones_like(flow_on), flow_on, torch.ones_like(flow_on)], -1).float()
        prior = avail / avail.sum(-1, keepdim=True)  # uniform over the cues present
        gate_pen = ((w - prior[:, None]).abs() * avail[:, None]).sum(-1).mean()  # L1 to the prior
        loss = recon + cfg.beta * codebook + cfg.gamma * commit + cfg.temporal_weight * temporal \
            + cfg.semantic_weight * semantic + cfg.gate_sparsity * gate_pen
        if self.training and cfg.codebook_update == "ema":
            self.quantizer.ema_update(z.detach(), idx)
        with torch.no_grad():
            copy_last = F.mse_loss(f_t, f_next)
        return {"loss": loss, "recon": recon, "codebook": codebook, "commit": commit, "temporal": temporal,
                "semantic": semantic, "gate_penalty": gate_pen, "copy_last": copy_last, "codes": idx,
                "gates": w.detach(), "flow_on": flow_on}


def code_usage(codes: torch.Tensor, k: int) -> tuple[float, float]:
    """Fraction of the K codes used and the perplexity exp(H) of the code distribution."""
    counts = torch.bincount(codes.reshape(-1), minlength=k).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())
