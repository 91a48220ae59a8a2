"""The latent-conditioned world model with a critic (paper Sec. 4, 10.2 Stage 2, Eq. 18-20), one file.

  (f^_{t+D}, V(f_t, a_t)) = P([f_t; e_{a_t}])                               (Eq. 18)
P is a causal transformer over latent trajectories of H steps: token k is [f_k; e_{a_k}] projected
to d, the dynamics output at k predicts f_{k+1} (as a residual on f_k), and the value head shares
every layer but the last. Action embeddings e_a are rows of the frozen PhysCode codebook.
  L_pred  = || f^_{t+D} - f_{t+D} ||_1, teacher-forced and autoregressively unrolled   (Eq. 19)
  L_value = l_Q( V(f_t, a_t), r_t + gamma max_a' V_target(f_{t+D}, a') )             (Eq. 20)
The critic is evaluated on single-step contexts, so the max over next codes is one batched
forward over all K codes; it ranges over the codes that can be executed in the transition's game
(the `allowed` mask, from the codes its trajectories were labelled with), since the critic's value
for a code a game never showed is unconstrained by data and a max over those is pure overestimation; phase (ii) freezes everything but the critic's last layer and head, and
the target network follows the online critic by Polyak averaging.

The paper's Stage 2 predicts "future features and rewards" (Fig. 5): beside the critic, the value
branch has a reward head r^(f_k, a_k) and a continuation head c^(f_k, a_k) = P(the return goes on
after step k) (trained in phase ii with the critic, on the same transitions). An imagined return is
  R^ = sum_{k<H} gamma^k C_k r^_k + gamma^H C_H Q(f^_H, a_H),   C_k = prod_{j<k} c^_j      ("reward")
the rewards the rollout predicts, then the critic's value where the rollout stops; the earlier
definition, sum_k gamma^k Q(f^_k, a_k) ("q_sum"), adds H critic values that each already estimate a
whole discounted future. `WorldModelConfig.imagined_return` picks one (docs/world_model.md compares
how well each ranks real outcomes).

Optionally (`critic_members` E > 0) the value branch carries E member critics beside the critic: copies of
what phase (ii) trains (the last layer and the value head), each from its own random initialisation, on
the trunk's hidden states (detached, so they never move what the critic reads), trained on the critic's
own TD target and ranking loss. Where the data pinned the value down they agree; where a state or code
lies outside it (imagined states, codes a game rarely showed) their initialisations show through and they
disagree: a deep ensemble's estimate of the critic's uncertainty, given the frozen trunk.
`imagine(members=True)` also returns each member's R^ (the same rollout, each member's Q in place of the
critic's), and `member_disagreement` turns them into a per-candidate uncertainty of R^'s order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipr_dist.errors import StoreError


@dataclass
class WorldModelConfig:
    f_dim: int = 1024
    """Appearance feature size (DINOv3 ViT-L: 1024)."""
    code_dim: int = 512
    """PhysCode code vector size (d of Stage 1)."""
    d: int = 512
    layers: int = 8
    """Transformer layers; the value head shares all but the last."""
    heads: int = 8
    horizon: int = 5
    """H: steps of the latent trajectories it is trained and unrolled on."""
    gamma: float = 0.99
    target_tau: float = 0.005
    """Polyak rate of the critic's target network ("slowly updated")."""
    huber_delta: float = 1.0
    """l_Q of Eq. 20: Huber loss with this threshold."""
    dropout: float = 0.0
    imagined_return: str = "q_sum"  # checkpoints from before the choice existed used this
    """"reward": predicted rewards then the critic's value at the horizon; "q_sum": sum_k gamma^k Q."""
    critic_target: str = "max"
    """The next state's value in the TD target: "max" over the executable codes (Eq. 20), or "mean", their
    average: the value of playing on with a uniformly random code, which is how the store's random and
    calibration play went on (an expected-SARSA target, free of the max's upward bias)."""
    critic_mc_weight: float = 0.0
    """w in target = (1 - w) TD target + w G_t where the step's observed discounted return G_t is known
    (its episode ends inside the stored chunk); the TD target alone elsewhere. 0: Eq. 20 exactly."""
    critic_rank_weight: float = 0.0
    """Weight of `rank_loss` beside the TD loss in phase (ii); 0: Eq. 20 alone."""
    critic_members: int = 0
    """E: member critics of the uncertainty ensemble (0: none; the module docstring)."""


class MemberHeads(nn.Module):
    """E copies of the critic's trainable part (its last transformer layer and value head), each from its
    own random initialisation, on the trunk's hidden states: (N, k, d) -> (N, k, E)."""

    def __init__(self, layer, d: int, members: int):
        super().__init__()
        self.layers = nn.ModuleList([layer() for _ in range(members)])
        self.heads = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1)) for _ in range(members)])

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(blk(h, src_mask=mask, is_causal=True)) for blk, head in zip(self.layers, self.heads)], -1)


def member_disagreement(member_returns) -> np.ndarray:
    """Per candidate, how much the members disagree on where it stands in its group: member_returns
    (..., B, E) -> (..., B), the std over members of each member's R^ minus that member's group mean (a
    member that values every candidate higher changes no order, so its offset does not count). Zeros with
    fewer than 2 members."""
    r = np.asarray(member_returns, np.float64)
    if r.shape[-1] < 2:
        return np.zeros(r.shape[:-1])
    return (r - r.mean(-2, keepdims=True)).std(-1)


def check_codebook(trained_on: torch.Tensor, current: torch.Tensor, source: str) -> None:
    """A world model's action embeddings are rows of one codebook: weights trained on another one
    (PhysCode retrained, a different run) would score sequences of meaningless codes."""
    if trained_on.shape != current.shape or not torch.allclose(trained_on, current):
        raise StoreError(f"{source}: this world model was trained on a different action codebook "
                         f"({trained_on.shape[0]} x {trained_on.shape[1]}) than the current one ({current.shape[0]} x "
                         f"{current.shape[1]}; PhysCode retrained or another run); retrain it with "
                         "`ipr world-model train` or point to the matching checkpoint")


def _layer_step(blk: nn.TransformerEncoderLayer, x: torch.Tensor, cache: list) -> torch.Tensor:
    """One new position x (N, 1, d) through a pre-norm encoder layer whose earlier positions' keys and values
    are in `cache` (this position's are appended): the layer's output at the last position of the whole
    sequence under a causal mask, dropout included."""
    attn = blk.self_attn
    q, k, v = F.linear(blk.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    cache.append((k, v))
    n, d, heads = x.shape[0], x.shape[-1], attn.num_heads

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.view(n, -1, heads, d // heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(q), split(torch.cat([c[0] for c in cache], 1)),
                                       split(torch.cat([c[1] for c in cache], 1)),
                                       dropout_p=attn.dropout if blk.training else 0.0)
    x = x + blk.dropout1(attn.out_proj(o.transpose(1, 2).reshape(n, 1, d)))
    return x + blk.dropout2(blk.linear2(blk.dropout(blk.activation(blk.linear1(blk.norm2(x))))))


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig, codebook: torch.Tensor):
        super().__init__()
        if codebook.shape[1] != cfg.code_dim:
            raise ValueError(f"codebook vectors are {codebook.shape[1]}-d but the world model expects {cfg.code_dim}")
        self.cfg = cfg
        self.register_buffer("codebook", codebook.detach().clone())  # frozen PhysCode action embeddings
        d = cfg.d
        self.embed = nn.Linear(cfg.f_dim + cfg.code_dim, d)
        self.pos = nn.Parameter(torch.zeros(cfg.horizon, d))

        def layer():
            return nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True,
                                              norm_first=True)

        self.trunk = nn.ModuleList([layer() for _ in range(cfg.layers - 1)])  # shared
        self.dyn_last, self.val_last = layer(), layer()
        self.dyn_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.f_dim))
        # The dynamics predict a residual on f_k; starting it at zero starts the model at copy-last,
        # so training can only move it away from that baseline where the data say so.
        nn.init.zeros_(self.dyn_head[-1].weight)
        nn.init.zeros_(self.dyn_head[-1].bias)
        self.val_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        self.rew_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        self.cont_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))  # logit of P(the return goes on)
        self.members = MemberHeads(layer, d, cfg.critic_members) if cfg.critic_members else None
        self.target: WorldModel | None = None  # critic target network (phase ii); not a submodule

    @property
    def codes(self) -> int:
        return self.codebook.shape[0]

    def _trunk(self, f: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """f (N, k, f_dim), codes (N, k) -> shared hidden states (N, k, d), causal in time."""
        k = f.shape[1]
        x = self.embed(torch.cat([f, self.codebook[codes]], dim=-1)) + self.pos[:k]
        mask = nn.Transformer.generate_square_subsequent_mask(k, device=f.device)
        for blk in self.trunk:
            x = blk(x, src_mask=mask, is_causal=True)
        return x, mask

    def forward(self, f: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 18 for every position: f^_{k+1} (N, k, f_dim) and V(f_k, a_k | context) (N, k)."""
        h, mask = self._trunk(f, codes)
        return self._dynamics(f, h, mask), self._value(h, mask)

    def _dynamics(self, f, h, mask) -> torch.Tensor:
        return f + self.dyn_head(self.dyn_last(h, src_mask=mask, is_causal=True))

    def _value(self, h, mask) -> torch.Tensor:
        return self.val_head(self.val_last(h, src_mask=mask, is_causal=True)).squeeze(-1)

    def predict(self, f: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The dynamics half of Eq. 18 alone (the critic's last layer is not run)."""
        return self._dynamics(f, *self._trunk(f, codes))

    # --- dynamics (phase i) ---------------------------------------------------------------------
    def dynamics_loss(self, f: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 19 on real segments f (N, H+1, f_dim) with codes (N, H): teacher-forced one-step
        predictions, and an autoregressive unroll that feeds its own predictions back."""
        H = codes.shape[1]
        pred = self.predict(f[:, :H], codes)
        teacher = F.l1_loss(pred, f[:, 1:H + 1])
        roll = self.unroll(f[:, 0], codes)
        autoreg = F.l1_loss(roll, f[:, 1:H + 1])
        return {"loss": teacher + autoreg, "teacher_l1": teacher, "autoregressive_l1": autoreg}

    def unroll(self, f0: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Imagined features f^_1..f^_H (N, H, f_dim) from f0 (N, f_dim) under codes (N, H), every trajectory
        of the batch at once: step k runs only its new position through the layers, attending to the keys and
        values the earlier steps left in each layer's cache. The attention is causal, so this is what
        `predict` on the whole growing context gives at its last position (tested), at H positions' cost
        instead of H (H + 1) / 2."""
        caches: list[list] = [[] for _ in range(len(self.trunk) + 1)]
        f, feats = f0, []
        for k in range(codes.shape[1]):
            x = self.embed(torch.cat([f, self.codebook[codes[:, k]]], dim=-1))[:, None] + self.pos[k]
            for blk, cache in zip([*self.trunk, self.dyn_last], caches):
                x = _layer_step(blk, x, cache)
            f = f + self.dyn_head(x)[:, 0]
            feats.append(f)
        return torch.stack(feats, 1)

    # --- critic (phase ii) ----------------------------------------------------------------------
    def value(self, f: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """V(f, a) on a single-step context: f (N, f_dim), codes (N,) -> (N,); the dynamics' last layer
        is not run."""
        return self._value(*self._trunk(f[:, None], codes[:, None]))[:, 0]

    def critic_outputs(self, f: torch.Tensor, codes: torch.Tensor, members: bool = False) -> tuple:
        """On single-step contexts f (N, f_dim), codes (N,): Q(f, a), the predicted reward r^(f, a) and
        the continuation logit, each (N,), from one pass of the value branch; with `members`, the member
        heads' values (N, E) too (E = 0 without an ensemble)."""
        h, mask = self._trunk(f[:, None], codes[:, None])
        hv = self.val_last(h, src_mask=mask, is_causal=True)[:, 0]
        out = self.val_head(hv)[:, 0], self.rew_head(hv)[:, 0], self.cont_head(hv)[:, 0]
        if not members:
            return out
        return *out, (self.members(h.detach(), mask)[:, 0] if self.members is not None else hv.new_zeros(len(hv), 0))

    def next_values(self, f: torch.Tensor, allowed: torch.Tensor, net: WorldModel | None = None) -> torch.Tensor:
        """V(f, a') for the codes a' that `allowed` (N, K) marks in each row: (N, K), 0 where not allowed.
        One batched forward over the marked (row, code) pairs only: a game executes 11-22 of 64 codes in the
        local run, so this is 3-6 x fewer single-step forwards than every code of every row."""
        net = net or self
        rows, codes = allowed.nonzero(as_tuple=True)
        out = f.new_zeros(allowed.shape)
        out[rows, codes] = net.value(f[rows], codes).to(out.dtype)
        return out

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .cpu() move the critic's target too (it lives outside the module tree).
        super()._apply(fn, recurse)
        if getattr(self, "target", None) is not None:
            self.target._apply(fn, recurse)
        return self

    VALUE_BRANCH = ("val_last", "val_head", "rew_head", "cont_head", "members")
    """The critic's own modules: its last layer, its head, the reward and continuation heads, the members."""

    def value_branch(self) -> list[nn.Parameter]:
        return [p for name in self.VALUE_BRANCH if getattr(self, name) is not None
                for p in getattr(self, name).parameters()]

    def freeze_dynamics(self) -> list[nn.Parameter]:
        """Phase (ii): only the value branch (`VALUE_BRANCH`) stays trainable; returns its parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        critic = self.value_branch()
        for p in critic:
            p.requires_grad_(True)
        # Kept outside the module tree, so it is not in self.parameters() nor trained by the optimizer.
        object.__setattr__(self, "target", copy.deepcopy(self).requires_grad_(False))
        return critic

    def value_loss(self, f: torch.Tensor, codes: torch.Tensor, reward: torch.Tensor, f_next: torch.Tensor,
                   done: torch.Tensor, allowed: torch.Tensor | None = None,
                   returns: torch.Tensor | None = None,
                   n_step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Eq. 20: Huber(V(f_t, a_t), r_t + gamma (1 - done) max_a' V_target(f_{t+D}, a')), the max (or,
        with critic_target "mean", the average) over the codes a' that `allowed` (N, K) marks for each
        transition (all K when None); plus the reward head's Huber loss on r_t and the continuation
        head's cross-entropy on 1 - done. `returns` (N,): observed discounted returns (NaN where
        unknown), mixed into the target with weight critic_mc_weight where known. `n_step` = (G, f_boot,
        discount): an n-step target G + discount V_target(f_boot) instead (G the discounted rewards of
        the next m <= n steps, discount gamma^m, 0 where the episode ended within them); the reward and
        continuation heads still learn the one step."""
        if self.target is None:
            raise RuntimeError("call freeze_dynamics() before training the critic (phase ii)")
        with torch.no_grad():
            g, f_boot, discount = n_step if n_step is not None else (reward, f_next,
                                                                     self.cfg.gamma * (1.0 - done.float()))
            if allowed is None:
                allowed = torch.ones(len(f_boot), self.codes, dtype=torch.bool, device=f_boot.device)
            next_all = self.next_values(f_boot, allowed, self.target)
            if self.cfg.critic_target == "mean":
                next_v = next_all.sum(1) / allowed.sum(1).clamp(min=1)
            else:
                next_v = next_all.masked_fill(~allowed, float("-inf")).max(dim=1).values
            target = g + discount * next_v
            w = self.cfg.critic_mc_weight
            if returns is not None and w > 0:
                known = ~torch.isnan(returns)
                target = torch.where(known, (1 - w) * target + w * returns.nan_to_num(), target)
        v, r_hat, cont, member_v = self.critic_outputs(f, codes, members=True)
        td = F.huber_loss(v, target, delta=self.cfg.huber_delta)
        reward_loss = F.huber_loss(r_hat, reward, delta=self.cfg.huber_delta)
        cont_loss = F.binary_cross_entropy_with_logits(cont, 1.0 - done.float())
        out = {"loss": td + reward_loss + cont_loss, "td_error": (v - target).abs().mean().detach(),
               "value": v.detach().mean(), "reward_error": (r_hat - reward).abs().mean().detach(),
               "continue_bce": cont_loss.detach()}
        if member_v.shape[1]:  # each member regresses the critic's own target
            members = F.huber_loss(member_v, target[:, None].expand_as(member_v), delta=self.cfg.huber_delta)
            out["loss"] = out["loss"] + members
            out["member_td_error"] = (member_v - target[:, None]).abs().mean().detach()
            out["member_spread"] = member_v.detach().std(1).mean() if member_v.shape[1] > 1 else member_v.new_zeros(())
        return out

    def rank_loss(self, f: torch.Tensor, codes: torch.Tensor, returns: torch.Tensor,
                  games: torch.Tensor) -> torch.Tensor:
        """A within-game pairwise ranking loss on steps whose observed discounted return is known: the mean
        of softplus(V_j - V_i) over every ordered pair (i, j) of one game with G_i > G_j (a logistic loss on
        their order). Candidates compete within one game, and a shift of V changes no order, so this
        leaves the values' scale to the TD target. With member critics, plus the same loss for each of them.
        Zero (with a gradient of zeros) where no pair qualifies."""
        v, _, _, member_v = self.critic_outputs(f, codes, members=True)
        better = (returns[:, None] > returns[None, :]) & (games[:, None] == games[None, :])
        if not better.any():
            return (v.sum() + member_v.sum()) * 0.0
        loss = F.softplus(v[None, :] - v[:, None])[better].mean()
        for m in member_v.unbind(1):  # the members learn the same order, beside the critic
            loss = loss + F.softplus(m[None, :] - m[:, None])[better].mean()
        return loss

    @torch.no_grad()
    def update_target(self) -> None:
        """theta^- <- (1 - tau) theta^- + tau theta, for the critic's parameters."""
        tau = self.cfg.target_tau
        for tp, p in zip(self.target.parameters(), self.parameters()):
            tp.mul_(1 - tau).add_(p, alpha=tau)

    # --- imagination ----------------------------------------------------------------------------
    @torch.no_grad()
    def imagine(self, f: torch.Tensor, code_sequences: torch.Tensor, horizon: int | None = None,
                imagined_return: str | None = None, members: bool = False):
        """Roll out candidates (Eq. 4): f (N, f_dim), code_sequences (N, B, L) -> predicted features
        (N, B, H, f_dim) and the predicted return R^ (N, B) of `imagined_return` (the config's by default;
        the module docstring defines both); with `members`, R^ is (N, B, 1 + E): the critic's, then each
        member's on the same rollout (E = 0 without an ensemble). Step k uses code min(k, L-1) of its sequence (a sequence
        shorter than H holds its last code). All N x B candidates advance together: one forward per
        imagined step, then one pass of the value branch over every imagined state."""
        if f.ndim != 2 or code_sequences.ndim != 3 or len(f) != len(code_sequences):
            raise ValueError("imagine expects f (N, f_dim) and code_sequences (N, B, L) with the same N")
        if len(f) == 0 or code_sequences.shape[1] == 0:
            raise ValueError("imagine got an empty batch: no environment or no candidate to score")
        if f.shape[1] != self.cfg.f_dim:
            raise ValueError(f"features are {f.shape[1]}-d but the world model was trained on {self.cfg.f_dim}-d")
        if int(code_sequences.max()) >= self.codes or int(code_sequences.min()) < 0:
            raise ValueError(f"codes must lie in 0..{self.codes - 1}: this world model's codebook has {self.codes}")
        kind = imagined_return or self.cfg.imagined_return
        if kind not in ("reward", "q_sum"):
            raise ValueError(f"imagined_return must be 'reward' or 'q_sum', not {kind!r}")
        n, b, L = code_sequences.shape
        H = horizon or self.cfg.horizon
        steps = torch.clamp(torch.arange(H + 1, device=f.device), max=L - 1)
        codes = code_sequences[:, :, steps].reshape(n * b, H + 1)  # a_0 .. a_H
        f0 = f[:, None].expand(n, b, f.shape[1]).reshape(n * b, -1)
        feats = self.unroll(f0, codes[:, :H])  # f^_1..f^_H
        states = torch.cat([f0[:, None], feats], 1)  # f_0, f^_1 .. f^_H: the state each action is taken in
        q, r_hat, cont, member_q = self.critic_outputs(states.reshape(n * b * (H + 1), -1), codes.reshape(-1),
                                                       members=True)
        q, r_hat, cont = (x.view(n * b, H + 1) for x in (q, r_hat, cont))
        # The critic's Q and each member's side by side: (n b, H + 1, 1 + E)
        q = torch.cat([q[..., None], member_q.view(n * b, H + 1, member_q.shape[-1])], -1) if members else q[..., None]
        discount = self.cfg.gamma ** torch.arange(H + 1, device=f.device, dtype=q.dtype)[:, None]
        if kind == "q_sum":
            ret = (q[:, :H] * discount[:H]).sum(1)
        else:
            alive = torch.cumprod(torch.cat([torch.ones_like(cont[:, :1]), torch.sigmoid(cont[:, :H])], 1), 1)
            ret = ((alive[:, :H] * r_hat[:, :H])[..., None] * discount[:H]).sum(1) + discount[H] * alive[:, H, None] * q[:, H]
        ret = ret.view(n, b, -1)
        return feats.view(n, b, H, -1), (ret if members else ret[..., 0])
