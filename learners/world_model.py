"""Stage 2 trainer: the world model and its critic on the run's features and PhysCode labels.

Data: segments of H+1 consecutive steps of one episode (inside one feature shard), each step
labelled with its PhysCode index by the frozen Stage 1 model; features are PhysCode's standardised
appearance features. Phase (i): Eq. 19 (teacher-forced + autoregressive L1). Phase (ii): dynamics
frozen, the critic trained with Eq. 20 against a Polyak target network, with the reward of the
configured level: survival (1 per step alive; an irreversible failure ends the return) or utility
(the game's own reward). Checkpoint: `<run>/world_model/checkpoint.pt` (phase, step, model, target).
`evaluate` gives the paper's Table 1 metrics per horizon against copy-last, and the critic's TD error
and rank correlation with observed returns, on held-out episodes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipr_dist.config import Config
from ipr_dist.errors import StoreError
from ipr_dist.models.world_model import WorldModel, WorldModelConfig
from learners.physcode import ClipData, load_clips, load_model
from learners.physcode_inspect import label_codes

WORLD_MODEL_DIR = "world_model"


@dataclass
class Segments:
    f: torch.Tensor  # (N, f_dim) standardised features of every row
    code: torch.Tensor  # (N,) PhysCode label (-1: none)
    reward: torch.Tensor  # (N,) level reward of the step
    done: torch.Tensor  # (N,) the return ends after this step
    starts: np.ndarray  # rows that start a labelled segment of H+1 steps
    heldout_rows: np.ndarray  # (N,) bool
    transitions: np.ndarray  # rows t with a label and a known f_{t+1} in the same episode
    returns: np.ndarray  # (N,) observed discounted return-to-go inside the shard (NaN where unknown)

    def segment(self, idx: np.ndarray, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(idx)[:, None] + torch.arange(horizon + 1)
        return self.f[rows], self.code[rows[:, :horizon]]


def build_segments(data: ClipData, labels: dict[int, int], horizon: int, level: str, gamma: float) -> Segments:
    n = len(data.f)
    code = np.full(n, -1, np.int64)
    for r, c in labels.items():
        code[r] = c
    same_next = np.append(data.continues[1:], False)  # row r+1 is the next step of row r's episode
    if level == "survival":
        r = np.ones(n, np.float32)
        done = data.failure.copy()
    else:
        r = data.reward.copy()
        done = data.terminated.copy()
    labelled = code >= 0
    transitions = np.flatnonzero(labelled & (same_next | done))
    ok = np.ones(n, bool)
    for k in range(horizon):  # a segment needs H labelled, consecutive steps plus the next feature
        shifted = np.zeros(n, bool)
        shifted[: n - k] = labelled[k:] & same_next[k:] & ~done[k:]
        ok &= shifted
    starts = np.flatnonzero(ok)
    returns = np.full(n, np.nan, np.float32)
    for i in range(n - 1, -1, -1):  # discounted return-to-go, known only where the shard sees the end
        if done[i]:
            returns[i] = r[i]
        elif same_next[i] and not np.isnan(returns[i + 1]):
            returns[i] = r[i] + gamma * returns[i + 1]
    held_rows = np.zeros(n, bool)
    held_rows[data.clips[data.heldout, 0]] = True
    return Segments(torch.from_numpy(data.f), torch.from_numpy(code), torch.from_numpy(r), torch.from_numpy(done),
                    starts, held_rows, transitions, returns)


def world_model_config(cfg: Config, f_dim: int, code_dim: int) -> WorldModelConfig:
    w = cfg.world_model
    return WorldModelConfig(f_dim=f_dim, code_dim=code_dim, d=w.d, layers=w.layers, heads=w.heads,
                            horizon=w.horizon, gamma=w.gamma, target_tau=w.target_tau)


def prepare(cfg: Config):
    physcode, ckpt = load_model(cfg.run_dir)
    p = cfg.physcode
    data = load_clips(cfg.run_dir, physcode.cfg.clip_len, ckpt["flow_pool_grid"], p.holdout)
    data.standardise(ckpt["norm"])
    labels = label_codes(physcode, data, physcode.cfg.clip_len)
    seg = build_segments(data, labels, cfg.world_model.horizon, cfg.world_model.level, cfg.world_model.gamma)
    if len(seg.starts) == 0:
        raise StoreError(f"{cfg.run_dir}: no labelled segment of {cfg.world_model.horizon + 1} steps; collect longer "
                         "episodes (or lower world_model.horizon)")
    return physcode, seg


def train(cfg: Config, out=sys.stdout) -> dict:
    """Phase (i) then phase (ii); resumes from the checkpoint; returns the held-out evaluation."""
    from ipr_dist.runlog import save_config

    given, cfg = cfg, cfg.with_absolute_root()
    w = cfg.world_model
    physcode, seg = prepare(cfg)  # a run without PhysCode or segments fails here, nothing touched
    save_config(given)
    torch.manual_seed(cfg.run.seed)
    model = WorldModel(world_model_config(cfg, seg.f.shape[1], physcode.cfg.d), physcode.quantizer.codebook)
    path = Path(cfg.run_dir) / WORLD_MODEL_DIR / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    phase, step = 1, 0
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        phase, step = ckpt["phase"], ckpt["step"]
        if phase == 2:
            model.freeze_dynamics()
            model.target.load_state_dict(ckpt["target"])
        print(f"resuming the world model at phase {phase}, step {step}", file=out)
    rng = np.random.default_rng(cfg.run.seed + step)
    train_starts = seg.starts[~seg.heldout_rows[seg.starts]] if (~seg.heldout_rows[seg.starts]).any() else seg.starts
    start = time.perf_counter()
    if phase == 1:
        opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=w.weight_decay)
        model.train()
        while step < w.dynamics_steps:
            f, codes = seg.segment(rng.choice(train_starts, w.batch), w.horizon)
            losses = model.dynamics_loss(f, codes)
            opt.zero_grad()
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), w.grad_clip)
            opt.step()
            step += 1
            if step % 100 == 0 or step == w.dynamics_steps:
                print(f"  dynamics step {step}: L1 teacher {losses['teacher_l1'].item():.4f} "
                      f"autoregressive {losses['autoregressive_l1'].item():.4f}", file=out, flush=True)
        _save(path, model, 2, 0)
        phase, step = 2, 0
        model.freeze_dynamics()
    critic = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(critic, lr=w.critic_lr, weight_decay=0.0)
    trans = seg.transitions[~seg.heldout_rows[seg.transitions]]
    model.train()
    while step < w.critic_steps:
        t = torch.as_tensor(rng.choice(trans, w.batch))
        nxt = torch.clamp(t + 1, max=len(seg.f) - 1)
        losses = model.value_loss(seg.f[t], seg.code[t], seg.reward[t], seg.f[nxt], seg.done[t])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        model.update_target()
        step += 1
        if step % 100 == 0 or step == w.critic_steps:
            print(f"  critic step {step}: TD error {losses['td_error'].item():.4f} value {losses['value'].item():.3f}",
                  file=out, flush=True)
    metrics = evaluate(model, seg, w.horizon)
    metrics["charts/train_seconds"] = time.perf_counter() - start
    _save(path, model, 2, step, metrics)
    return metrics


def _save(path: Path, model: WorldModel, phase: int, step: int, metrics: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "phase": phase, "step": step, "config": model.cfg.__dict__,
                "target": model.target.state_dict() if model.target is not None else None,
                "metrics": metrics or {}}, tmp)
    tmp.replace(path)


@torch.no_grad()
def evaluate(model: WorldModel, seg: Segments, horizon: int, max_segments: int = 2048) -> dict:
    """Table 1 metrics per horizon (cosine, MSE, L1) against copy-last on held-out segments, and the
    critic's TD error and Spearman correlation with observed discounted returns on held-out steps."""
    model.eval()
    starts = seg.starts[seg.heldout_rows[seg.starts]]
    if len(starts) == 0:
        starts = seg.starts
    starts = starts[:max_segments]
    f, codes = seg.segment(starts, horizon)
    pred = model.unroll(f[:, 0], codes)
    out = {"eval/segments": int(len(starts))}
    for k in range(1, horizon + 1):
        real, guess, copy = f[:, k], pred[:, k - 1], f[:, 0]
        for name, g in (("world_model", guess), ("copy_last", copy)):
            out[f"eval/h{k}/{name}/cosine"] = float(torch.nn.functional.cosine_similarity(g, real, dim=-1).mean())
            out[f"eval/h{k}/{name}/mse"] = float(((g - real) ** 2).mean())
            out[f"eval/h{k}/{name}/l1"] = float((g - real).abs().mean())
    rows = seg.transitions[seg.heldout_rows[seg.transitions]]
    if len(rows) == 0:
        rows = seg.transitions
    t = torch.as_tensor(rows)
    v = model.value(seg.f[t], seg.code[t])
    if model.target is not None:
        nxt = torch.clamp(t + 1, max=len(seg.f) - 1)
        out["eval/critic/td_error"] = float(model.value_loss(seg.f[t], seg.code[t], seg.reward[t], seg.f[nxt],
                                                             seg.done[t])["td_error"])
    known = ~np.isnan(seg.returns[rows])
    if known.sum() > 2:
        from scipy.stats import spearmanr

        out["eval/critic/spearman_vs_returns"] = float(spearmanr(v.numpy()[known], seg.returns[rows][known]).statistic)
        out["eval/critic/steps"] = int(known.sum())
    return out


def report(metrics: dict, horizon: int) -> str:
    lines = ["| horizon | cosine (WM / copy-last) | MSE (WM / copy-last) | L1 (WM / copy-last) |",
             "| --- | --- | --- | --- |"]
    for k in range(1, horizon + 1):
        m = {s: [metrics[f"eval/h{k}/{n}/{s}"] for n in ("world_model", "copy_last")] for s in ("cosine", "mse", "l1")}
        lines.append(f"| {k} | {m['cosine'][0]:.4f} / {m['cosine'][1]:.4f} | {m['mse'][0]:.5f} / {m['mse'][1]:.5f} | "
                     f"{m['l1'][0]:.4f} / {m['l1'][1]:.4f} |")
    for key in ("eval/critic/td_error", "eval/critic/spearman_vs_returns", "eval/critic/steps", "eval/segments"):
        if key in metrics:
            lines.append(f"\n{key}: {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"\n{key}: {metrics[key]}")
    return "\n".join(lines)
