"""Stage 2 trainer: the world model and its critic on the run's features and PhysCode labels.

Data: segments of H+1 consecutive steps of one episode (inside one feature shard), each step
labelled with its PhysCode index by the frozen Stage 1 model; features are PhysCode's standardised
appearance features. Phase (i): Eq. 19 (teacher-forced + autoregressive L1). Phase (ii): dynamics
frozen, the critic trained with Eq. 20 against a Polyak target network, with the reward of the
configured level: survival (1 per step alive; an irreversible failure ends the return) or utility
(the game's own reward), times `reward_scale`. Then, for the paper's comparison, the same world
model conditioned on the raw controls instead of PhysCode (phase (i) only, same data and steps).

Training runs in Ray Train workers (`world_model.workers`, gradients averaged). Checkpoints:
`<run>/world_model/checkpoint.pt` (phase, step, model, target, optimizer) and `raw_keys.pt`, written
every `checkpoint_every` steps; training resumes from them. `evaluate` gives the paper's Table 1
metrics per horizon against copy-last and the raw-key model, and the critic's TD error and rank
correlation with observed returns, on held-out episodes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ipr_dist.config import Config
from ipr_dist.errors import StoreError
from ipr_dist.models.world_model import WorldModel, WorldModelConfig, check_codebook
from ipr_dist.devices import autocast, device_metrics, where
from learners.distributed import average_gradients, fit, report_step, train_device, train_role
from learners.physcode import ClipData, load_clips, load_model, lr_at
from ipr_dist.run_layout import RAW_KEYS_CHECKPOINT, WORLD_MODEL, WORLD_MODEL_CHECKPOINT, RunLayout
from learners.physcode_inspect import label_codes

CHECKPOINT_FILE = "checkpoint.pt"  # inside each version of world_model/checkpoint/ and world_model/raw_keys/
MOUSE_CELLS = 16  # the raw-key baseline sees the pointer on a 16 x 16 grid


@dataclass
class Segments:
    f: torch.Tensor  # (N, f_dim) standardised features of every row
    code: torch.Tensor  # (N,) PhysCode label (-1: none)
    raw: torch.Tensor  # (N,) index of the row's raw control in raw_table
    raw_table: torch.Tensor  # (V, a_dim) distinct raw controls: keys, pointer cell, buttons, scroll
    game: torch.Tensor  # (N,) index of the row's game
    allowed: torch.Tensor  # (games, K) bool: codes the game's training steps were labelled with
    reward: torch.Tensor  # (N,) level reward of the step, scaled
    done: torch.Tensor  # (N,) the return ends after this step
    starts: np.ndarray  # rows that start a labelled segment of H+1 steps
    heldout_rows: np.ndarray  # (N,) bool
    transitions: np.ndarray  # rows t with a label and a known f_{t+1} in the same episode
    returns: np.ndarray  # (N,) observed discounted return-to-go inside the shard (NaN where unknown)
    return_end: np.ndarray  # (N,) the row each known return ends on (its episode's last step; -1: unknown)
    next_same: np.ndarray  # (N,) bool: row r+1 is the next step of row r's episode
    game_names: tuple[str, ...] = ()  # the store's name of each game index

    def to(self, device) -> Segments:
        """The same segments with their tensors on `device` (a GPU worker's), the index arrays kept."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Segments(**moved)

    def segment(self, idx: np.ndarray, horizon: int, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(idx, device=self.f.device)[:, None] + torch.arange(horizon + 1, device=self.f.device)
        return self.f[rows], (self.raw if raw else self.code)[rows[:, :horizon]]

    def split(self, rows: np.ndarray, heldout: bool) -> np.ndarray:
        """The rows on one side of the episode split (all of them if that side is empty)."""
        side = rows[self.heldout_rows[rows] == heldout]
        return side if len(side) else rows

    def td_batch(self, t: np.ndarray, with_returns: bool = False, n: int = 1,
                 gamma: float = 0.99) -> tuple[tuple[torch.Tensor, ...], dict]:
        """Arguments (positional, keyword) of WorldModel.value_loss for transitions t: the max of Eq. 20
        ranges over the codes executable in each transition's game; `with_returns`: also their observed
        returns; n > 1: the n-step target's (G, f_boot, discount), each transition going on through its
        episode's next steps until n steps, the episode's end or the end of the stored chunk."""
        extra = (torch.as_tensor(self.returns[t], device=self.f.device),) if with_returns else ()
        t = torch.as_tensor(t, device=self.f.device)
        last = len(self.f) - 1
        nxt = torch.clamp(t + 1, max=last)
        args = (self.f[t], self.code[t], self.reward[t], self.f[nxt], self.done[t], self.allowed[self.game[t]], *extra)
        if n == 1:
            return args, {}
        same = torch.as_tensor(self.next_same, device=self.f.device)
        g, discount, end = self.reward[t].clone(), torch.full_like(self.reward[t], gamma), t.clone()
        going = ~self.done[t] & same[t]  # a transition that did not end its episode: row t + 1 is its next step
        for m in range(1, n):
            row = torch.clamp(t + m, max=last)
            going = going & (t + m <= last) & (same[row] | self.done[row])  # step t + m has its next feature
            g = g + going * discount * self.reward[row]
            discount = torch.where(going, discount * gamma, discount)
            end = torch.where(going, row, end)
            going = going & ~self.done[row]
        boot = self.f[torch.clamp(end + 1, max=last)]
        return args, {"n_step": (g, boot, discount * (~self.done[end]).float())}

    def rank_rows(self, heldout: bool = False) -> np.ndarray:
        """Training (or held-out) rows with a PhysCode label whose observed return the store shows: what the
        critic's ranking loss orders (`WorldModel.rank_loss`) and its evaluations measure."""
        return np.flatnonzero((self.heldout_rows == heldout) & (self.code.cpu().numpy() >= 0) & ~np.isnan(self.returns))

    def rank_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Arguments of WorldModel.rank_loss for `rows`: f, code, observed return, game."""
        t = torch.as_tensor(rows, device=self.f.device)
        return self.f[t], self.code[t], torch.as_tensor(self.returns[rows], device=self.f.device), self.game[t]

    def rehearsal(self, rows: int, seed: int) -> dict | None:
        """At most `rows` training steps whose observed return is known (the ranking loss's) and a quarter
        as many held-out ones, for Stage 4's online learner to keep ranking on: f, code, return, game name,
        held out. None when there are none."""
        rng = np.random.default_rng(seed)
        picked = [np.sort(rng.choice(r, min(len(r), n), replace=False))
                  for r, n in ((self.rank_rows(), rows), (self.rank_rows(heldout=True), rows // 4))]
        if rows == 0 or not len(picked[0]):
            return None
        t = np.concatenate(picked)
        game = self.game.cpu().numpy()[t]
        return {"f": self.f[torch.as_tensor(t, device=self.f.device)].cpu(), "code": self.code.cpu()[t],
                "returns": torch.as_tensor(self.returns[t]), "game": [self.game_names[g] for g in game],
                "heldout": torch.as_tensor(self.heldout_rows[t])}


def raw_controls(data: ClipData) -> tuple[np.ndarray, np.ndarray]:
    """Every step's executed control as a vector (the keys pressed, by name across games; the
    pointer's cell; buttons; scroll) and its index in the table of distinct vectors: the action
    vocabulary of the raw-key world model."""
    names = sorted({k for ks in data.key_names.values() for k in ks})
    column = {g: np.array([names.index(k) for k in ks], np.int64) for g, ks in data.key_names.items()}
    keys = np.zeros((len(data.f), len(names)), np.float32)
    for r, (g, k) in enumerate(zip(data.game, data.keys)):
        keys[r, column[g][np.flatnonzero(k)]] = 1.0
    vec = np.concatenate([keys, np.floor(data.mouse * MOUSE_CELLS) / MOUSE_CELLS,
                          data.mouse_buttons.astype(np.float32), data.scroll.astype(np.float32)[:, None]], 1)
    table, idx = np.unique(vec, axis=0, return_inverse=True)
    return table.astype(np.float32), idx.reshape(-1)


def level_rewards(data: ClipData, level: str, lives: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every row's reward at `level` and whether it ends the return: survival, 1 per step until a failure;
    utility, the game's reward until the episode ends; `lives`: a life lost ends it too (where known)."""
    if level == "survival":
        r, done = np.ones(len(data.f), np.float32), data.failure.copy()
    else:
        r, done = data.reward.copy(), data.terminated.copy()
    if lives and data.life_lost is not None:
        done |= data.life_lost
    return r, done


def build_segments(data: ClipData, labels: dict[int, int], codes: int, horizon: int, level: str, gamma: float,
                   reward_scale: float = 1.0, episodic_life: bool = False) -> Segments:
    """The world model's and the critic's data: every labelled step's reward at `level` and whether it ends the
    critic's episode (a failure, or at the utility level any end; with `episodic_life` also a life lost)."""
    n = len(data.f)
    code = np.full(n, -1, np.int64)
    for r, c in labels.items():
        code[r] = c
    same_next = np.append(data.continues[1:], False)  # row r+1 is the next step of row r's episode
    r, done = level_rewards(data, level, episodic_life)
    r = (r * reward_scale).astype(np.float32)
    labelled = code >= 0
    transitions = np.flatnonzero(labelled & (same_next | done))
    ok = np.ones(n, bool)
    for k in range(horizon):  # a segment needs H labelled, consecutive steps plus the next feature
        shifted = np.zeros(n, bool)
        shifted[: n - k] = labelled[k:] & same_next[k:] & ~done[k:]
        ok &= shifted
    starts = np.flatnonzero(ok)
    returns, return_end = returns_to_go(r, done, same_next, gamma)
    held_rows = np.zeros(n, bool)
    held_rows[data.clips[data.heldout, 0]] = True
    names, game = np.unique(data.game, return_inverse=True)
    allowed = np.zeros((len(names), codes), bool)
    for g in range(len(names)):
        seen = np.unique(code[(game == g) & labelled & ~held_rows])
        allowed[g, seen if len(seen) else slice(None)] = True  # a game seen only held out: every code
    table, raw = raw_controls(data)
    return Segments(torch.from_numpy(data.f), torch.from_numpy(code), torch.from_numpy(raw), torch.from_numpy(table),
                    torch.from_numpy(game.reshape(-1)), torch.from_numpy(allowed), torch.from_numpy(r),
                    torch.from_numpy(done), starts, held_rows, transitions, returns, return_end, same_next,
                    tuple(map(str, names)))


def returns_to_go(r: np.ndarray, done: np.ndarray, same_next: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's discounted return-to-go and the row its episode ends on, known only where the shard
    sees that end (NaN and -1 elsewhere); `same_next[r]`: row r + 1 is the next step of row r's episode."""
    n = len(r)
    returns, end = np.full(n, np.nan, np.float32), np.full(n, -1, np.int64)
    for i in range(n - 1, -1, -1):
        if done[i]:
            returns[i], end[i] = r[i], i
        elif same_next[i] and i + 1 < n and end[i + 1] >= 0:
            returns[i], end[i] = r[i] + gamma * returns[i + 1], end[i + 1]
    return returns, end


def world_model_config(cfg: Config, f_dim: int, code_dim: int) -> WorldModelConfig:
    w = cfg.world_model
    return WorldModelConfig(f_dim=f_dim, code_dim=code_dim, d=w.d, layers=w.layers, heads=w.heads,
                            horizon=w.horizon, gamma=w.gamma, target_tau=w.target_tau,
                            imagined_return=w.imagined_return, critic_target=w.critic_target,
                            critic_mc_weight=w.critic_mc_weight, critic_rank_weight=w.critic_rank_weight,
                            critic_members=w.critic_members)


def prepare(cfg: Config):
    layout = RunLayout.of(cfg)
    physcode, ckpt = load_model(layout)
    p, w = cfg.physcode, cfg.world_model
    data = load_clips(layout, physcode.cfg.clip_len, ckpt["flow_pool_grid"], p.holdout, lives=w.episodic_life)
    data.standardise(ckpt["norm"])
    labels = label_codes(physcode, data, physcode.cfg.clip_len)
    seg = build_segments(data, labels, physcode.cfg.codes, w.horizon, w.level, w.gamma, w.reward_scale,
                         w.episodic_life)
    if len(seg.starts) == 0:
        raise StoreError(f"{layout.uri}: no labelled segment of {w.horizon + 1} steps; collect longer "
                         "episodes (or lower world_model.horizon)")
    return physcode, seg


def build_models(cfg: Config, seg: Segments, codebook: torch.Tensor) -> tuple[WorldModel, WorldModel]:
    """The PhysCode-conditioned world model and the raw-key one, initialised alike on every worker."""
    torch.manual_seed(cfg.run.seed)
    model = WorldModel(world_model_config(cfg, seg.f.shape[1], codebook.shape[1]), codebook)
    # The raw-key model is a dynamics baseline only: no critic members to train
    raw = WorldModel(replace(world_model_config(cfg, seg.f.shape[1], seg.raw_table.shape[1]), critic_members=0),
                     seg.raw_table)
    return model, raw


STRUCTURE = ("f_dim", "code_dim", "d", "layers", "heads", "horizon", "critic_members")
"""The WorldModelConfig fields that decide a model's parameters: a checkpoint loads only where they agree."""


def load_checkpoint(layout: RunLayout, name: str, model: WorldModel) -> dict | None:
    """Load the committed checkpoint `name` into `model` (and its target in phase ii); returns the
    checkpoint, or None when there is none."""
    ckpt = layout.load_torch(name, CHECKPOINT_FILE)
    if ckpt is None:
        return None
    check_codebook(ckpt["model"]["codebook"], model.codebook, layout.checkpoint_display(name))
    # a field a checkpoint predates has its default (critic_members 0)
    trained = {**asdict(WorldModelConfig()), **ckpt.get("config", {})}
    changed = ", ".join(f"{k} {trained[k]} -> {getattr(model.cfg, k)}" for k in STRUCTURE
                        if trained[k] != getattr(model.cfg, k))
    if changed:
        raise StoreError(f"{layout.checkpoint_display(name)}: this world model was trained with another shape than "
                         f"the config asks for ({changed}); set those back, or retrain it from scratch by removing "
                         f"{layout.display(name)}")
    model.load_state_dict(ckpt["model"])
    if ckpt.get("target") is not None:
        model.freeze_dynamics()
        model.target.load_state_dict(ckpt["target"])
    return ckpt


def save_checkpoint(layout: RunLayout, name: str, model: WorldModel, phase: int, step: int, opt=None,
                    metrics: dict | None = None, rehearsal: dict | None = None) -> None:
    """`rehearsal`: Segments.rehearsal's rows, in the final checkpoint for Stage 4's online learner."""
    layout.save_torch(name, CHECKPOINT_FILE, {
        "model": model.state_dict(), "phase": phase, "step": step, "config": model.cfg.__dict__,
        "target": model.target.state_dict() if model.target is not None else None,
        "optimizer": opt.state_dict() if opt is not None else None, "metrics": metrics or {},
        "rehearsal": rehearsal}, phase=phase, step=step)


def _optimise(name: str, model: WorldModel, params: list, lr: float, weight_decay: float, steps: int, step: int,
              opt_state, loss_fn, save, cfg: Config, after_step=None, config: dict | None = None,
              offset: int = 0) -> None:
    """One phase: AdamW with warm-up and cosine decay, gradients averaged over the workers, clipped;
    rank 0 checkpoints every `checkpoint_every` steps and at the end, and reports its metrics to the driver."""
    import ray.train

    w = cfg.world_model
    rank = ray.train.get_context().get_world_rank()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model.train()
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, w.warmup, steps)
        with autocast(next(model.parameters()).device, cfg.ray.bf16):
            losses = loss_fn()
        opt.zero_grad()
        losses["loss"].backward()
        average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, w.grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        step += 1
        last = step == steps
        if step % 50 == 0 or last:
            metrics = {f"{name}/{k}": v.item() for k, v in losses.items()}
            metrics.update({"step": step, f"{name}/lr": opt.param_groups[0]["lr"]})
            if rank == 0 and (step % w.checkpoint_every == 0 or last):
                save(step, opt)
            report_step(config or {}, {**metrics, "progress": offset + step})  # the bar counts all three phases


def train_loop(config: dict) -> None:
    """One Ray Train worker: phase (i), phase (ii), the raw-key baseline; rank 0 evaluates at the end."""
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    w = cfg.world_model
    rank = ray.train.get_context().get_world_rank()
    device = train_device()
    physcode, seg = prepare(cfg)
    model, raw = build_models(cfg, seg, physcode.quantizer.codebook)
    layout = RunLayout.of(cfg)
    path, raw_path = WORLD_MODEL_CHECKPOINT, RAW_KEYS_CHECKPOINT
    phase, step, opt_state = 1, 0, None
    ckpt = load_checkpoint(layout, path, model)
    if ckpt is not None:
        phase, step, opt_state = ckpt["phase"], ckpt["step"], ckpt["optimizer"]
    model.to(device)
    raw.to(device)
    seg = seg.to(device)
    rng = np.random.default_rng(cfg.run.seed * 1000 + rank + 7919 * step)
    per_worker = max(1, w.batch // ray.train.get_context().get_world_size())
    train_starts = seg.split(seg.starts, heldout=False)

    def dynamics(net: WorldModel, raw_keys: bool):
        return lambda: net.dynamics_loss(*seg.segment(rng.choice(train_starts, per_worker), w.horizon, raw_keys))

    if phase == 1:
        _optimise("dynamics", model, list(model.parameters()), w.lr, w.weight_decay, w.dynamics_steps, step,
                  opt_state, dynamics(model, False), lambda s, o: save_checkpoint(layout, path, model, 1, s, o), cfg, config=config)
        phase, step, opt_state = 2, 0, None
        model.freeze_dynamics()
        if rank == 0:
            save_checkpoint(layout, path, model, 2, 0)
    trans = seg.split(seg.transitions, heldout=False)
    known = seg.rank_rows()

    def td():
        args, kwargs = seg.td_batch(rng.choice(trans, per_worker), with_returns=True, n=w.td_steps, gamma=w.gamma)
        losses = model.value_loss(*args, **kwargs)
        if w.critic_rank_weight > 0 and len(known):
            rank = model.rank_loss(*seg.rank_batch(rng.choice(known, per_worker)))
            losses = {**losses, "loss": losses["loss"] + w.critic_rank_weight * rank, "rank_loss": rank.detach()}
        return losses

    critic = [p for p in model.parameters() if p.requires_grad]
    _optimise("critic", model, critic, w.critic_lr, 0.0, w.critic_steps, step, opt_state, td,
              lambda s, o: save_checkpoint(layout, path, model, 2, s, o), cfg, after_step=model.update_target,
              config=config, offset=w.dynamics_steps)
    if w.raw_key_baseline:
        raw_step, raw_opt = 0, None
        ckpt = load_checkpoint(layout, raw_path, raw)
        if ckpt is not None:
            raw_step, raw_opt = ckpt["step"], ckpt["optimizer"]
        _optimise("raw_keys", raw, list(raw.parameters()), w.lr, w.weight_decay, w.dynamics_steps, raw_step,
                  raw_opt, dynamics(raw, True), lambda s, o: save_checkpoint(layout, raw_path, raw, 1, s, o), cfg,
                  config=config, offset=w.dynamics_steps + w.critic_steps)
    if rank == 0:  # evaluated on the CPU: small, and its statistics are numpy's
        baseline = raw.cpu() if w.raw_key_baseline else None
        metrics = {"step": w.critic_steps, **device_metrics(device),
                   **evaluate(model.cpu(), seg.to("cpu"), w.horizon, baseline, seed=cfg.run.seed)}
        rehearsal = seg.rehearsal(w.online_rank_rows, cfg.run.seed) if w.critic_rank_weight > 0 else None
        save_checkpoint(layout, path, model, 2, w.critic_steps, metrics=metrics, rehearsal=rehearsal)


def train(cfg: Config, out=sys.stdout) -> dict:
    """Phase (i), phase (ii) and the raw-key baseline in Ray Train workers, resuming from the
    checkpoints; returns the held-out evaluation (also written to world_model/report.md)."""
    from ipr_dist.runlog import save_config

    given, cfg = cfg, cfg.with_absolute_root()
    w = cfg.world_model
    physcode, seg = prepare(cfg)  # a run without PhysCode or segments fails here, nothing touched
    layout = RunLayout.of(cfg)
    ckpt = load_checkpoint(layout, WORLD_MODEL_CHECKPOINT, build_models(cfg, seg, physcode.quantizer.codebook)[0])
    if ckpt is not None:
        if ckpt["phase"] == 2 and ckpt["step"] >= w.critic_steps and ckpt["metrics"]:  # evaluated: finished
            print(f"world model already trained ({w.dynamics_steps} + {w.critic_steps} steps): "
                  f"{layout.checkpoint_display(WORLD_MODEL_CHECKPOINT)}", file=out)
            return ckpt["metrics"]
        print(f"resuming the world model at phase {ckpt['phase']}, step {ckpt['step']}", file=out)
    save_config(given)
    role = train_role("world-model", "world_model.workers x world_model.cpus_per_worker / gpus_per_worker",
                      w.workers, w.cpus_per_worker, w.gpus_per_worker, cfg.ray.train_resources)
    total = w.dynamics_steps + w.critic_steps + (w.dynamics_steps if w.raw_key_baseline else 0)
    metrics = fit(cfg, train_loop, role, "world-model", WORLD_MODEL_CHECKPOINT, CHECKPOINT_FILE, "world_model", total,
                  out)
    write_report(cfg, metrics)
    h = w.horizon
    baseline = "".join(f", {n.replace('_', '-')} {metrics[f'eval/h{h}/{n}/l1']:.4f}" for n in ("copy_last", "raw_keys")
                       if f"eval/h{h}/{n}/l1" in metrics)
    print(f"world model: {total} steps {where(metrics)}; held-out L1 at h={h}: world model "
          f"{metrics[f'eval/h{h}/world_model/l1']:.4f}{baseline}; critic TD error {metrics['eval/critic/td_error']:.4f}, "
          f"rank correlation with observed returns {_rho(metrics.get('eval/critic/spearman_vs_returns'))}; "
          f"imagined return ({w.imagined_return}) vs observed "
          f"{_rho(metrics.get(f'eval/return/{w.imagined_return}/spearman'))}; "
          f"report: {layout.display(WORLD_MODEL, 'report.md')}", file=out, flush=True)
    return metrics


def interval_text(interval: list[float] | None) -> str:
    """An action ranking's interval over held-out episodes as " [low, high]", or "" where there is none
    (world_model/report.md and Stage 4's gate line)."""
    return f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""


def _interval(metrics: dict, key: str) -> str:
    """interval_text of the interval recorded beside an action ranking (`.../action_within/<game>`)."""
    return interval_text(metrics.get(key.replace("/action_within/", "/action_within_interval/")))


def _rho(value: float | None, unmeasured: str = "not measured (too few held-out episode ends)") -> str:
    """A held-out rank correlation, or `unmeasured` where there is none (not "nan")."""
    return f"{value:.3f}" if value is not None and np.isfinite(value) else unmeasured


@torch.no_grad()
def evaluate(model: WorldModel, seg: Segments, horizon: int, raw: WorldModel | None = None,
             max_segments: int = 2048, seed: int = 0) -> dict:
    """Table 1 metrics per horizon (cosine, MSE, L1) of the world model, copy-last and (when given)
    the raw-key world model on held-out segments; the critic's TD error and Spearman correlation
    with observed discounted returns on held-out steps."""
    model.eval()
    starts = seg.split(seg.starts, heldout=True)
    if len(starts) > max_segments:  # a seeded sample of every held-out episode, not the first ones
        starts = np.sort(np.random.default_rng(seed).choice(starts, max_segments, replace=False))
    f, codes = seg.segment(starts, horizon)
    guesses = {"world_model": model.unroll(f[:, 0], codes), "copy_last": f[:, :1].expand(-1, horizon, -1)}
    if raw is not None:
        guesses["raw_keys"] = raw.eval().unroll(f[:, 0], seg.segment(starts, horizon, raw=True)[1])
    out = {"eval/segments": int(len(starts))}
    for k in range(1, horizon + 1):
        real = f[:, k]
        for name, g in guesses.items():
            g = g[:, k - 1]
            out[f"eval/h{k}/{name}/cosine"] = float(torch.nn.functional.cosine_similarity(g, real, dim=-1).mean())
            out[f"eval/h{k}/{name}/mse"] = float(((g - real) ** 2).mean())
            out[f"eval/h{k}/{name}/l1"] = float((g - real).abs().mean())
    out.update(return_ranking(model, seg, horizon, max_segments, seed))
    rows = seg.split(seg.transitions, heldout=True)
    v = model.value(seg.f[rows], seg.code[rows])
    if model.target is not None:
        out["eval/critic/td_error"] = float(model.value_loss(*seg.td_batch(rows)[0])["td_error"])  # one-step
    known = ~np.isnan(seg.returns[rows])
    if known.sum() > 2:
        from scipy.stats import spearmanr

        out["eval/critic/spearman_vs_returns"] = float(spearmanr(v.numpy()[known], seg.returns[rows][known]).statistic)
        out["eval/critic/steps"] = int(known.sum())
    if model.members is not None and model.cfg.critic_members > 1:
        # Whether the members' disagreement marks where the critic is wrong: their spread on each held-out
        # step against the critic's error on that step's observed return (where the store shows it).
        spread = model.critic_outputs(seg.f[rows], seg.code[rows], members=True)[3].std(1).numpy()
        out["eval/critic/member_spread"] = float(spread.mean())
        if known.sum() > 2:
            from scipy.stats import spearmanr

            error = np.abs(v.numpy() - seg.returns[rows])
            out["eval/critic/member_spread_vs_error"] = float(spearmanr(spread[known], error[known]).statistic)
    out.update(critic_fit(model, seg, max_segments, seed))
    return out


def within_game_spearman(values: np.ndarray, observed: np.ndarray, games: np.ndarray) -> dict:
    """Spearman's rho of `values` with `observed` within each game that has more than 2 rows and neither
    side constant: {game index: rho}."""
    from scipy.stats import spearmanr

    out = {}
    for g in np.unique(games):
        m = games == g
        if m.sum() > 2 and np.ptp(observed[m]) > 0 and np.ptp(values[m]) > 0:
            out[int(g)] = float(spearmanr(values[m], observed[m]).statistic)
    return out


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float | None:
    """Spearman's rho of x with y with z held fixed: the correlation of x's and y's ranks once each is
    rid of its linear fit on z's ranks (None: fewer than 5 rows, or a side without spread)."""
    from scipy.stats import rankdata

    if len(x) < 5:
        return None
    basis = np.stack([rankdata(z), np.ones(len(z))], 1)
    rx, ry = (r - basis @ np.linalg.lstsq(basis, r, rcond=None)[0] for r in (rankdata(x), rankdata(y)))
    if np.ptp(rx) <= 1e-9 or np.ptp(ry) <= 1e-9:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def episode_interval(x: np.ndarray, y: np.ndarray, z: np.ndarray, episodes: np.ndarray, draws: int | None = None,
                     seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of partial_spearman(x, y, z) over episodes: each draw resamples
    whole episodes (`episodes`: each row's episode, e.g. the row its return ends on) with replacement, since
    one episode's steps share its outcome and are not independent. None with fewer than 3 episodes (two
    give only three distinct draws) or when fewer than half the draws give a figure. `draws` defaults to
    the evaluation report's (ipr_dist/metrics/report.py)."""
    from ipr_dist.metrics.report import BOOTSTRAP_DRAWS

    draws = draws or BOOTSTRAP_DRAWS
    ids, rows_of = np.unique(episodes, return_inverse=True)
    if len(ids) < 3:
        return None
    members = [np.flatnonzero(rows_of == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    figures = []
    for _ in range(draws):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        rho = partial_spearman(x[rows], y[rows], z[rows])
        if rho is not None:
            figures.append(rho)
    if len(figures) < draws / 2:
        return None
    return [float(np.percentile(figures, 2.5)), float(np.percentile(figures, 97.5))]


@torch.no_grad()
def critic_fit(model: WorldModel, seg: Segments, max_rows: int = 2048, seed: int = 0) -> dict:
    """Whether the critic orders the returns it was trained on: on training steps whose discounted
    return-to-go the store shows, Spearman's rho of Q(f_t, a_t) with that return within each game
    (mean over games), and Q's mean against the returns' mean (a gap is the target's bias)."""
    rows = seg.rank_rows()
    if len(rows) < 3:
        return {}
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    v = model.value(seg.f[torch.as_tensor(rows)], seg.code[torch.as_tensor(rows)]).numpy()
    observed, games = seg.returns[rows], seg.game.numpy()[rows]
    within = list(within_game_spearman(v, observed, games).values())
    return {"eval/critic/train_steps": int(len(rows)), "eval/critic/train_value_mean": float(v.mean()),
            "eval/critic/train_return_mean": float(observed.mean()),
            **({"eval/critic/train_spearman_within_game": float(np.nanmean(within))} if within else {})}


@torch.no_grad()
def return_ranking(model: WorldModel, seg: Segments, horizon: int, max_rows: int = 2048, seed: int = 0,
                   alternatives: int = 16) -> dict:
    """How well each definition of the imagined return orders real outcomes: on held-out steps whose
    discounted return-to-go the store shows, R^ of the codes the episode went on to execute (its next H
    steps', the last one held where the episode ends sooner) against that observed return, as Spearman's
    rho over all steps and averaged within each game. Candidates compete within one context, and a
    within-game rho mostly says which states lead further; so each game also gets its ranking of actions
    (`action_within`): the executed codes' R^ less the mean R^ of `alternatives` code sequences drawn from
    the game's training play (what the state is worth to the critic), against the observed return, with
    that state value held fixed (partial_spearman), with its 95% interval over held-out episodes
    (episode_interval). GRPO's advantage is that difference (docs/grpo.md)."""
    from scipy.stats import spearmanr

    labelled = seg.code.numpy() >= 0
    rows = seg.rank_rows(heldout=True)
    if len(rows) < 3:
        return {}
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    idx = np.repeat(rows[:, None], horizon, 1)
    for k in range(1, horizon):  # step k's row while the episode goes on and is labelled, else the previous
        nxt = idx[:, k - 1] + 1
        ok = (nxt < len(labelled)) & seg.next_same[idx[:, k - 1]] & ~seg.done.numpy()[idx[:, k - 1]]
        ok[ok] &= labelled[nxt[ok]]
        idx[:, k] = np.where(ok, nxt, idx[:, k - 1])
    observed = seg.returns[rows]
    games = seg.game.numpy()[rows]
    # (N, 1 + A, H): the executed codes, then A sequences of codes drawn from the game's training rows
    train = seg.rank_rows()
    played, played_game = seg.code.numpy()[train], seg.game.numpy()[train]
    drawn = np.zeros((len(rows), alternatives, horizon), np.int64)
    rng = np.random.default_rng(seed)
    for g in np.unique(games):
        pool = played[played_game == g]
        if len(pool):  # a game with no training row keeps codes 0: its action ranking is not reported
            drawn[games == g] = rng.choice(pool, (int((games == g).sum()), alternatives, horizon))
    codes = torch.cat([seg.code[torch.as_tensor(idx)][:, None], torch.as_tensor(drawn)], 1)
    ends = seg.return_end[rows]  # the episode end each known return comes from: how much the rho rests on
    per_game = [len(np.unique(ends[games == g])) for g in np.unique(games)]
    out = {"eval/return/steps": int(len(rows)), "eval/return/episode_ends": int(len(np.unique(ends))),
           "eval/return/episode_ends_fewest_in_a_game": int(min(per_game)),
           "eval/return/action_alternatives": alternatives}  # actions were ranked (where a game has the rows)
    f = seg.f[torch.as_tensor(rows)]
    for kind in ("reward", "q_sum"):
        every = torch.cat([model.imagine(f[i:i + 256], codes[i:i + 256], horizon, kind, members=True)[1]
                           for i in range(0, len(rows), 256)]).numpy()  # (N, 1 + A, 1 + E)
        both = every[:, 0]
        advantage = every[:, 0, 0] - every[:, 1:, 0].mean(1)
        for g in set(np.unique(games)) & set(played_game):
            m = games == g
            rho = partial_spearman(advantage[m], observed[m], every[m, 1:, 0].mean(1))
            if g < len(seg.game_names) and rho is not None:
                out[f"eval/return/{kind}/action_within/{seg.game_names[g]}"] = rho
                interval = episode_interval(advantage[m], observed[m], every[m, 1:, 0].mean(1), ends[m], seed=seed)
                if interval:  # what the figure rests on: a few held-out episodes
                    out[f"eval/return/{kind}/action_within_interval/{seg.game_names[g]}"] = interval
        # the critic's R^, and with member critics the members' mean (an ensemble's estimate)
        pairs = [(kind, both[:, 0])] + ([(f"{kind}_members", both[:, 1:].mean(1))] if both.shape[1] >= 3 else [])
        for name, r_hat in pairs:
            out[f"eval/return/{name}/spearman"] = float(spearmanr(r_hat, observed).statistic)
            per_game = within_game_spearman(r_hat, observed, games)
            if per_game:
                out[f"eval/return/{name}/spearman_within_game"] = float(np.nanmean(list(per_game.values())))
            for g, rho in per_game.items():  # what `grpo.min_critic_rank` reads, game by game
                if g < len(seg.game_names) and np.isfinite(rho):
                    out[f"eval/return/{name}/spearman_within/{seg.game_names[g]}"] = float(rho)
    for g in np.unique(games):
        if g < len(seg.game_names):
            out[f"eval/return/episode_ends/{seg.game_names[g]}"] = int(len(np.unique(ends[games == g])))
    return out


def report(metrics: dict, horizon: int) -> str:
    names = [n for n in ("world_model", "copy_last", "raw_keys") if f"eval/h1/{n}/l1" in metrics]
    title = " / ".join({"world_model": "WM", "copy_last": "copy-last", "raw_keys": "raw keys"}[n] for n in names)
    lines = [f"| horizon | cosine ({title}) | MSE ({title}) | L1 ({title}) |", "| --- | --- | --- | --- |"]
    for k in range(1, horizon + 1):
        cells = [" / ".join(f"{metrics[f'eval/h{k}/{n}/{s}']:{fmt}}" for n in names)
                 for s, fmt in (("cosine", ".4f"), ("mse", ".5f"), ("l1", ".4f"))]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if "eval/return/steps" in metrics:
        ends = (f", from {metrics['eval/return/episode_ends']} episode ends, the fewest in one game "
                f"{metrics['eval/return/episode_ends_fewest_in_a_game']}" if "eval/return/episode_ends" in metrics else "")
        lines += ["", f"Imagined return vs the observed discounted return of the executed codes "
                      f"({metrics['eval/return/steps']} held-out steps{ends}), Spearman's rho:", "",
                  "| imagined return | all steps | within each game (mean) |", "| --- | --- | --- |"]
        for kind, name in (("reward", "sum gamma^k r^_k + gamma^H Q(f^_H, a_H)"), ("q_sum", "sum gamma^k Q(f^_k, a_k)"),
                           ("reward_members", "reward, the member critics' mean"),
                           ("q_sum_members", "q_sum, the member critics' mean")):
            if f"eval/return/{kind}/spearman" not in metrics and kind.endswith("_members"):
                continue
            lines.append(f"| {name} ({kind}) | {_rho(metrics.get(f'eval/return/{kind}/spearman'), '-')} | "
                         f"{_rho(metrics.get(f'eval/return/{kind}/spearman_within_game'), '-')} |")
    within = sorted(k for k in metrics if k.startswith("eval/return/q_sum/spearman_within/"))
    if within:
        lines += ["", "Within each game (q_sum; reward): " + "; ".join(
            f"{k.rsplit('/', 1)[1]} {_rho(metrics[k], '-')}; {_rho(metrics.get(k.replace('/q_sum/', '/reward/')), '-')} "
            f"({metrics.get('eval/return/episode_ends/' + k.rsplit('/', 1)[1], 0)} episode ends)" for k in within)]
    actions = sorted(k for k in metrics if k.startswith("eval/return/q_sum/action_within/"))
    if actions:  # what `grpo.min_critic_rank` reads by default
        lines += ["", "Ranking actions within each game, the state's value to the critic held fixed (q_sum; reward): "
                  + "; ".join(f"{k.rsplit('/', 1)[1]} {_rho(metrics[k], '-')}{_interval(metrics, k)}; "
                              f"{_rho(metrics.get(k.replace('/q_sum/', '/reward/')), '-')}"
                              f"{_interval(metrics, k.replace('/q_sum/', '/reward/'))}" for k in actions)
                  + (" (95% intervals over held-out episodes)" if any("/action_within_interval/" in k for k in metrics)
                     else "")]
    for key in ("eval/critic/td_error", "eval/critic/spearman_vs_returns", "eval/critic/steps",
                "eval/critic/member_spread", "eval/critic/member_spread_vs_error",
                "eval/critic/train_spearman_within_game", "eval/critic/train_value_mean",
                "eval/critic/train_return_mean", "eval/critic/train_steps", "eval/segments"):
        if key in metrics:
            lines.append(f"\n{key}: {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"\n{key}: {metrics[key]}")
    return "\n".join(lines)


def write_report(cfg: Config, metrics: dict) -> str:
    """world_model/report.md, and the held-out metrics themselves in world_model/metrics.json (Stage 4
    reads the critic's ranking per game from it: `grpo.min_critic_rank`)."""
    import json

    text = report(metrics, cfg.world_model.horizon)
    layout = RunLayout.of(cfg)
    layout.write_text(f"{WORLD_MODEL}/report.md", f"# World model: {layout.uri}\n\n{text}\n")
    layout.write_text(f"{WORLD_MODEL}/{METRICS_FILE}", json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return text


METRICS_FILE = "metrics.json"


def critic_rank_per_game(cfg: Config) -> dict[str, tuple[float | None, int, list[float] | None]] | None:
    """From Stage 2's held-out evaluation: per game with held-out observed returns, the critic's ranking
    `grpo.min_critic_rank_of` within the game (of actions, or of the imagined return itself; R^ as
    `world_model.imagined_return` defines it) against them (None where too few to measure), the episode
    ends it rests on, and the action ranking's 95% interval over held-out episodes (None where not recorded)
    (empty: no held-out step has an observed return). None for a run evaluated before that ranking was
    recorded."""
    import json

    layout = RunLayout.of(cfg)
    if not layout.is_file(f"{WORLD_MODEL}/{METRICS_FILE}"):
        return None
    metrics = json.loads(layout.read_text(f"{WORLD_MODEL}/{METRICS_FILE}"))
    kind = cfg.world_model.imagined_return
    actions = cfg.grpo.min_critic_rank_of == "action"
    ranking = "action_within" if actions else "spearman_within"
    games = {k.rsplit("/", 1)[1] for k in metrics if k.startswith("eval/return/episode_ends/")}
    if metrics.get("eval/return/steps") and (not games or (actions and "eval/return/action_alternatives" not in metrics)):
        return None  # returns were ranked, but not yet game by game, or not yet actions
    return {g: (metrics.get(f"eval/return/{kind}/{ranking}/{g}"), metrics[f"eval/return/episode_ends/{g}"],
                metrics.get(f"eval/return/{kind}/action_within_interval/{g}") if actions else None)
            for g in sorted(games)}
