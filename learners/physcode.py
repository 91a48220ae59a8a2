"""Stage 1 trainer: PhysCode on the run's feature shards, as Ray Train workers.

AdamW (lr 1e-4, weight decay 0.05), linear warm-up then cosine decay, gradient clipping 1.0
(paper Sec. 10.1). Rank 0 checkpoints (model, optimizer, step, config) every `checkpoint_every`
steps as a new version of `<run>/physcode/checkpoint/` (ipr_dist/run_layout.py); a rerun resumes
from the committed one. Logged to metrics.jsonl: reconstruction
loss, the copy-last baseline on the same batch, code usage and perplexity, gate weights, restarts.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
import numpy as np
import pyarrow as pa
import torch

from ipr_dist.config import Config
from ipr_dist.errors import StoreError
from ipr_dist.data.features import FEATURE_COLUMNS, cue_stats, standardise_cue
from ipr_dist.games.outcome import life_lost
from ipr_dist.models.encoders import pool_flow
from ipr_dist.models.physcode import PhysCode, PhysCodeConfig, code_usage
from ipr_dist.run_layout import DATA, FEATURES, HELD_OUT, PHYSCODE_CHECKPOINT, RunLayout

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class ClipData:
    """All feature rows of a run in memory, and the clips (last row, D) that can be built from them."""

    f: np.ndarray  # (N, f_dim)
    e: np.ndarray  # (N, e_dim)
    u: dict[int, np.ndarray]  # D -> (N, u_dim) pooled flow
    f_next: dict[int, np.ndarray]  # D -> (N, f_dim)
    clips: np.ndarray  # (M, 2): last row index, D
    heldout: np.ndarray  # (M,) bool: the clip's episode is held out
    flow_grid: tuple[int, int]
    meta: dict
    # the rows' own step columns, for the router and the world model (no rereading of shards)
    game: np.ndarray  # (N,) game id
    episode: np.ndarray  # (N,) episode id
    continues: np.ndarray  # (N,) bool: row i is the step after row i-1, in the same episode and shard
    keys: list  # (N,) multi-hot keys, in the order of key_names[game]
    key_names: dict[str, list[str]]  # game -> its key names
    shard_rows: list[int]  # rows of each feature shard, in order (row r of the arrays lies in one of them)
    mouse: np.ndarray  # (N, 2)
    mouse_buttons: np.ndarray  # (N, 3)
    scroll: np.ndarray  # (N,)
    reward: np.ndarray  # (N,)
    terminated: np.ndarray  # (N,) bool
    failure: np.ndarray  # (N,) bool
    life_lost: np.ndarray | None = None  # (N,) bool: the step lost a life (load_clips(lives=True) only)
    norm: dict | None = None  # per-cue mean/std the arrays were standardised with
    game_offsets: dict | None = None  # game -> (f mean, e mean) subtracted from PhysCode's inputs
    centre_semantics: bool = False  # subtract the game's mean semantic cue too (not only appearance)

    def standardise(self, norm: dict | None = None, per_game: str = "off") -> None:
        """Standardise every cue per dimension (statistics of the training rows unless given): the
        encoders' raw scales differ by orders of magnitude, and the VQ distances and the L2 losses of
        Eq. 17 assume comparable units. f and f_{t+D} share one set of statistics. `per_game`
        ("appearance" or "all", with statistics computed here) also records each game's mean appearance
        and semantic cue, which PhysCode's batches subtract (`batch`: f, and e too for "all"); given
        statistics bring their own."""
        rows = np.unique(self.clips[~self.heldout, 0]) if (~self.heldout).any() else np.arange(len(self.f))
        if norm is None:
            norm = {"f": cue_stats(self.f[rows]), "e": cue_stats(self.e[rows]),
                    "u": {d: cue_stats(u[rows]) for d, u in self.u.items()}}
        self.norm = norm
        self.f = standardise_cue(self.f, norm["f"])
        self.e = standardise_cue(self.e, norm["e"])
        self.f_next = {d: standardise_cue(v, norm["f"]) for d, v in self.f_next.items()}
        self.u = {d: standardise_cue(v, norm["u"][d]) for d, v in self.u.items()}
        if per_game != "off" and "game_mean" not in norm:
            norm["game_centring"] = per_game
            norm["game_mean"] = {str(g): {"f": self.f[rows[self.game[rows] == g]].mean(0),
                                          "e": self.e[rows[self.game[rows] == g]].mean(0)}
                                 for g in np.unique(self.game[rows])}
        if norm.get("game_mean"):
            self.game_offsets = {g: (m["f"], m["e"]) for g, m in norm["game_mean"].items()}
            self.centre_semantics = norm.get("game_centring") == "all"

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row game means of f and e (a game the statistics never saw: its own mean here)."""
        games = self.game[rows]
        f_off, e_off = np.zeros(rows.shape + self.f.shape[1:], np.float32), np.zeros(rows.shape + self.e.shape[1:],
                                                                                        np.float32)
        for g in np.unique(games):
            if str(g) not in self.game_offsets:
                mine = self.game == g
                self.game_offsets[str(g)] = (self.f[mine].mean(0), self.e[mine].mean(0))
            f_off[games == g], e_off[games == g] = self.game_offsets[str(g)]
        return f_off, e_off

    def batch(self, idx: np.ndarray, clip_len: int) -> tuple[torch.Tensor, ...]:
        last, delta = self.clips[idx, 0], self.clips[idx, 1]
        rows = last[:, None] - np.arange(clip_len - 1, -1, -1)[None]  # (B, T): t-T+1 .. t
        u = np.stack([self.u[int(d)][r] for r, d in zip(rows, delta)])
        f_next = np.stack([self.f_next[int(d)][t] for t, d in zip(last, delta)])
        f, e = self.f[rows], self.e[rows]
        if self.game_offsets:  # PhysCode sees each game's cues relative to that game's mean
            f_off, e_off = self._offsets(rows)
            f, f_next = f - f_off, f_next - f_off[:, -1]
            if self.centre_semantics:
                e = e - e_off
        return (torch.from_numpy(np.ascontiguousarray(f, np.float32)), torch.from_numpy(u),
                torch.from_numpy(np.ascontiguousarray(e, np.float32)),
                torch.from_numpy(np.ascontiguousarray(f_next, np.float32)))


def load_clips(layout: RunLayout, clip_len: int, pool_grid: int, holdout: float, lives: bool = False) -> ClipData:
    """Read every feature shard; clips are T consecutive steps of one episode inside one shard. `lives`: also
    which steps lost a life (`life_lost`, read from the trajectory shards: one more read per shard)."""
    from ipr_dist.data.store import TrajectoryStore

    store = TrajectoryStore(layout)
    paths = store.feature_paths()
    if not paths:
        raise StoreError(f"{layout.uri}: has no feature shards; run `ipr physcode train` on a run with trajectories "
                         "(it extracts features first) or `ipr collect` first")
    tables = [store.read_shard(p) for p in paths]
    meta = json.loads(tables[0].schema.metadata[b"ipr.features"])
    deltas = meta["deltas"]
    wanted = [*FEATURE_COLUMNS, *(f"{c}_{d}" for d in deltas for c in ("f_next", "u"))]
    for path, table in zip(paths, tables):
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise StoreError(f"{path}: feature shard lacks {', '.join(missing)} (written by an older ipr-dist); "
                             f"delete {layout.display(FEATURES)} and re-run `ipr physcode train` to re-extract")
    grid = tuple(meta["flow_grid"])
    t = pa.concat_tables(tables)
    n = t.num_rows
    shard = np.repeat(np.arange(len(tables)), [x.num_rows for x in tables])
    episode = np.array(t["episode_id"].to_pylist())
    step = t["step"].to_numpy()
    continues = np.zeros(n, bool)
    continues[1:] = (episode[1:] == episode[:-1]) & (step[1:] == step[:-1] + 1) & (shard[1:] == shard[:-1])
    run = np.zeros(n, int)  # length of the contiguous run ending at each row
    for i in range(n):
        run[i] = run[i - 1] + 1 if continues[i] else 1
    game = np.array(t["game"].to_pylist())
    held_episodes = held_out_split(layout, episode, game, holdout)
    u, f_next, clips, held = {}, {}, [], []
    for d in deltas:
        valid = t[f"u_{d}"].is_valid().to_numpy(zero_copy_only=False)
        u[d] = pool_flow(_dense(t[f"u_{d}"], n), grid, pool_grid)
        f_next[d] = _dense(t[f"f_next_{d}"], n)
        ok = np.flatnonzero(valid & (run >= clip_len))
        clips += [(i, d) for i in ok]
        held += [episode[i] in held_episodes for i in ok]

    def column(name: str, dtype) -> np.ndarray:
        return np.asarray(t[name].to_pylist(), dtype)

    lost = None
    if lives:
        count = np.concatenate([shard_lives(store, layout, path, tb.num_rows) for path, tb in zip(paths, tables)])
        lost = np.zeros(n, bool)
        lost[1:] = continues[1:] & life_lost(count[:-1], count[1:])

    return ClipData(
        f=_dense(t["f"], n), e=_dense(t["e"], n), u=u, f_next=f_next,
        clips=np.array(clips, np.int64).reshape(-1, 2), heldout=np.array(held, bool), flow_grid=grid, meta=meta,
        game=game, episode=episode, continues=continues, keys=t["keys"].to_pylist(),
        shard_rows=[tb.num_rows for tb in tables],
        key_names={tb["game"][0].as_py(): json.loads(tb.schema.metadata[b"ipr.features"])["key_names"]
                   for tb in tables if tb.num_rows},
        mouse=column("mouse", np.float32), mouse_buttons=column("mouse_buttons", np.int8),
        scroll=column("scroll", np.int8), reward=column("reward", np.float32),
        terminated=column("terminated", bool), failure=column("failure", bool), life_lost=lost)


def shard_lives(store, layout: RunLayout, feature_path: str, rows: int) -> np.ndarray:
    """The lives column (-1 where a game has none) of the trajectory shard a feature shard was extracted from
    (feature shards do not carry it)."""
    name = feature_path.rsplit("/", 1)[-1]
    lives = store.read_shard(layout.path(DATA, name), columns=["lives"])["lives"].to_pylist()
    if len(lives) != rows:
        raise StoreError(f"{layout.display(FEATURES)}/{name}: {rows} rows, but its trajectory shard has {len(lives)}; "
                         f"delete {layout.display(FEATURES)} and re-run `ipr physcode train` to re-extract")
    return np.asarray([-1 if x is None else x for x in lives], np.int64)


def _dense(column, n: int) -> np.ndarray:
    """A nullable fixed-size-list column as a dense (n, dim) array with zeros where null."""
    arr = column.combine_chunks()
    dim = arr.type.list_size
    values = np.asarray(arr.values, np.float32).reshape(-1, dim)
    out = np.zeros((n, dim), np.float32)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    out[valid] = values[valid] if len(values) == n else values[: valid.sum()]
    return out


def _episode_hash(episode: str) -> float:
    return int(hashlib.blake2b(episode.encode(), digest_size=4).hexdigest(), 16) / 2**32


def _steps_per_episode(episode: np.ndarray, game: np.ndarray) -> dict[str, dict[str, int]]:
    """game -> episode -> its rows."""
    by_game: dict[str, dict[str, int]] = {}
    for (e, g), n in Counter(zip(episode.tolist(), game.tolist())).items():
        by_game.setdefault(g, {})[e] = n
    return by_game


def held_out_episodes(episode: np.ndarray, game: np.ndarray, share: float) -> set[str]:
    """Episodes held out for evaluation, stratified by game: each game holds out `share` of its episodes
    (rounded; at least one in a game with two or more, so held-out metrics cover every game), the lowest
    hashes of their ids first. Drawn episode by episode (hash below `share`), five clean clones (E24-E28)
    held out 2-6 of Airstriker's 42-56 episodes, and the GRPO gate, which reads the critic's ranking from
    the held-out episode ends, left games out for too few of them; counted, every clone holds out the
    same. What a game holds out leaves at least half of its steps for training: an episode that does not
    fit is passed over for the next hash (on a smoke collection of one long and one 4-step episode the
    long one was held out, and PhysCode trained on 4 clips)."""
    held: set[str] = set()
    for steps in _steps_per_episode(episode, game).values():
        if share <= 0 or len(steps) < 2:
            continue
        wanted = max(1, math.floor(share * len(steps) + 0.5))
        room, size = sum(steps.values()) / 2, 0
        for e in sorted(steps, key=lambda e: (_episode_hash(e), e)):
            if wanted == 0:
                break
            if size + steps[e] <= room:
                held.add(e)
                size += steps[e]
                wanted -= 1
    return held


def _drawn_held_out(episode: np.ndarray, game: np.ndarray, share: float) -> set[str]:
    """The split of runs whose PhysCode trained before splits were recorded (HELD_OUT): every episode
    hashing below `share`, kept shortest first while they fit in half the game's steps, and in a game
    with two or more where none did, the lowest-hash one that fits."""
    held: set[str] = set()
    for steps in _steps_per_episode(episode, game).values():
        room = sum(steps.values()) / 2
        chosen, size = set(), 0
        for e in sorted((e for e in steps if _episode_hash(e) < share), key=lambda e: (steps[e], e)):
            if size + steps[e] <= room:
                chosen.add(e)
                size += steps[e]
        fitting = [e for e in steps if steps[e] <= room]
        if not chosen and share > 0 and len(steps) >= 2 and fitting:
            chosen = {min(fitting, key=_episode_hash)}
        held |= chosen
    return held


def held_out_split(layout: RunLayout, episode: np.ndarray, game: np.ndarray, share: float) -> set[str]:
    """The run's held-out episodes: those `record_held_out` wrote before PhysCode first trained, so every
    stage and every later reading holds out the same ones whatever the store gained since (Stage 4's agent
    episodes count as training ones); a run that has none splits its rows here (`_drawn_held_out` for a run
    trained before splits were recorded, as it trained)."""
    if share <= 0:
        return set()
    if layout.is_file(HELD_OUT):
        try:
            return set(layout.read_json(HELD_OUT)["episodes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{layout.display(HELD_OUT)}: unreadable ({exc!r}); it lists the episodes every stage "
                             f"holds out: restore it, or delete {layout.display(PHYSCODE_CHECKPOINT)} and it to "
                             "train from PhysCode on with a new split") from None
    if layout.checkpoint(PHYSCODE_CHECKPOINT) is not None:
        return _drawn_held_out(episode, game, share)
    return held_out_episodes(episode, game, share)


def record_held_out(layout: RunLayout, share: float, out=sys.stdout) -> None:
    """Before PhysCode first trains: hold out each game's share of the episodes with features
    (`held_out_episodes`) and write them to HELD_OUT, saying how many per game. Nothing when the run has
    its split already, or trained before splits were recorded."""
    from ipr_dist.data.store import TrajectoryStore

    if share <= 0 or layout.is_file(HELD_OUT) or layout.checkpoint(PHYSCODE_CHECKPOINT) is not None:
        return
    store = TrajectoryStore(layout)
    paths = store.feature_paths()
    if not paths:  # load_clips says what to do
        return
    t = pa.concat_tables([store.read_shard(p, columns=["episode_id", "game"]) for p in paths])
    episode, game = np.array(t["episode_id"].to_pylist()), np.array(t["game"].to_pylist())
    held = held_out_episodes(episode, game, share)
    layout.write_json(HELD_OUT, {"share": share, "episodes": sorted(held)})
    games = _steps_per_episode(episode, game)
    print("held out for evaluation by every stage: " + ", ".join(
        f"{g} {len(held & eps.keys())} of {len(eps)} episodes" for g, eps in sorted(games.items()))
        + f" ({layout.display(HELD_OUT)})", file=out, flush=True)


def model_config(cfg: Config, data: ClipData) -> PhysCodeConfig:
    p = cfg.physcode
    return PhysCodeConfig(
        f_dim=data.f.shape[1], u_dim=next(iter(data.u.values())).shape[1], e_dim=data.e.shape[1], d=p.d,
        flow_dropout=p.flow_dropout, gate_sparsity=p.gate_sparsity, layers=p.layers, heads=p.heads,
        clip_len=p.clip_len, codes=p.codes, ema_decay=p.ema_decay, beta=p.beta, gamma=p.gamma,
        temporal_weight=p.temporal_weight, semantic_weight=p.semantic_weight, window=p.window)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to `base`, then cosine decay to zero at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: PhysCode, data: ClipData, clip_len: int, max_clips: int = 4096, seed: int = 0) -> dict:
    """On held-out clips: future-feature error against copy-last, code usage, and how often the codes
    assigned with the flow gate closed (inference) agree with the flow-on codes (training)."""
    idx = np.flatnonzero(data.heldout)
    if len(idx) == 0:
        idx = np.arange(len(data.clips))
    rng = np.random.default_rng(seed)
    idx = rng.choice(idx, min(max_clips, len(idx)), replace=False)
    model.eval()
    device = next(model.parameters()).device
    f, u, e, fn = (x.to(device) for x in data.batch(idx, clip_len))
    out = model(f, u, e, fn, flow_on=torch.ones(len(idx), dtype=torch.bool))
    closed = model.codes_for(f, e)  # w_u = 0
    usage, ppl = code_usage(out["codes"], model.cfg.codes)
    gates = out["gates"][:, -1].mean(0)
    return {"eval/recon_mse": float(out["recon"]), "eval/copy_last_mse": float(out["copy_last"]),
            "eval/recon_vs_copy_last": float(out["recon"] / out["copy_last"]),
            "eval/code_usage": usage, "eval/perplexity": ppl,
            "eval/flow_off_agreement": float((closed == out["codes"]).float().mean()),
            "eval/gate_f": float(gates[0]), "eval/gate_u": float(gates[1]), "eval/gate_e": float(gates[2]),
            "eval/clips": int(len(idx))}


def save_checkpoint(layout: RunLayout, model: PhysCode, opt, step: int, metrics: dict, norm: dict) -> None:
    layout.save_torch(PHYSCODE_CHECKPOINT, CHECKPOINT_FILE, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": model.cfg.__dict__,
        "metrics": metrics, "norm": norm["stats"], "flow_pool_grid": norm["flow_pool_grid"]}, step=step)


def load_model(layout: RunLayout) -> tuple[PhysCode, dict]:
    ckpt = layout.load_torch(PHYSCODE_CHECKPOINT, CHECKPOINT_FILE)
    if ckpt is None:
        raise StoreError(f"{layout.uri}: no PhysCode checkpoint ({layout.display(PHYSCODE_CHECKPOINT)}); "
                         "run `ipr physcode train` first")
    model = PhysCode(PhysCodeConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def train_loop(config: dict) -> None:
    """One Ray Train worker: load the clips, train, checkpoint (rank 0), report metrics."""
    import ray.train
    import ray.train.torch

    from ipr_dist.devices import autocast, device_metrics
    from learners.distributed import report_step, train_device

    cfg = Config.model_validate(config["cfg"])
    p = cfg.physcode
    device = train_device()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    layout = RunLayout.of(cfg)
    data = load_clips(layout, p.clip_len, p.flow_pool_grid, p.holdout)
    data.standardise(per_game=p.centre_per_game)
    train_idx = np.flatnonzero(~data.heldout) if (~data.heldout).any() else np.arange(len(data.clips))
    model = PhysCode(model_config(cfg, data))
    step = 0
    ckpt = layout.load_torch(PHYSCODE_CHECKPOINT, CHECKPOINT_FILE)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])  # the state follows the parameters' device
        step = ckpt["step"]
    model = ray.train.torch.prepare_model(model) if world > 1 else model
    core: PhysCode = model.module if hasattr(model, "module") else model
    rng = np.random.default_rng(cfg.run.seed * 1000 + rank + step)
    per_worker = max(1, p.batch // world)
    start, window = time.perf_counter(), []
    while step < p.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p.lr, p.warmup, p.steps)
        core.train()
        f, u, e, fn = (x.to(device, non_blocking=True) for x in data.batch(rng.choice(train_idx, per_worker), p.clip_len))
        with autocast(device, cfg.ray.bf16):
            out = model(f, u, e, fn)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        step += 1
        window.append(out["codes"])
        last = step == p.steps
        if step % 50 == 0 or last:
            usage, ppl = code_usage(torch.cat(window), p.codes)
            window = []
            gates = out["gates"][:, -1].mean(0)
            metrics = {"step": step, "losses/total": out["loss"].item(), "losses/recon": out["recon"].item(),
                       "losses/copy_last": out["copy_last"].item(), "losses/commit": out["commit"].item(),
                       "losses/temporal": out["temporal"].item(),
                       "losses/semantic": out["semantic"].item(), "codes/usage": usage, "codes/perplexity": ppl,
                       "codes/restarts": int(core.quantizer.restarts), "gates/f": float(gates[0]),
                       "gates/u": float(gates[1]), "gates/e": float(gates[2]),
                       "charts/steps_per_s": step / (time.perf_counter() - start), "charts/lr": opt.param_groups[0]["lr"]}
            if rank == 0 and (step % p.checkpoint_every == 0 or last):
                if last:
                    metrics.update(evaluate(core, data, p.clip_len, seed=cfg.run.seed))
                    metrics.update(device_metrics(device))
                    metrics["system/workers"] = world  # data-parallel workers that trained it
                save_checkpoint(layout, core, opt, step, metrics,
                                {"stats": data.norm, "flow_pool_grid": p.flow_pool_grid})
            report_step(config, metrics)


def train(cfg: Config, out=sys.stdout) -> dict:
    """Extract features (what is missing), then train PhysCode with Ray Train; returns final metrics."""
    from actors.feature_extractor import check_model_paths, extract_features
    from ipr_dist.data.store import open_store
    from ipr_dist.runlog import save_config
    from ipr_dist.devices import where
    from learners.distributed import already_done, fit, train_role

    given, cfg = cfg, cfg.with_absolute_root()
    check_model_paths(cfg.features)  # bad input fails here, before anything in the run is touched
    layout = RunLayout.of(cfg)
    open_store(layout)
    save_config(given)  # the run directory keeps the config its stages ran with (as the user wrote it)
    extract_features(cfg, out)
    record_held_out(layout, cfg.physcode.holdout, out)
    done = already_done(layout, PHYSCODE_CHECKPOINT, CHECKPOINT_FILE, cfg.physcode.steps, "PhysCode already trained",
                        "resuming PhysCode", out)
    if done is not None:
        return done
    p = cfg.physcode
    role = train_role("PhysCode", "physcode.workers x physcode.cpus_per_worker / gpus_per_worker", p.workers,
                      p.cpus_per_worker, p.gpus_per_worker, cfg.ray.train_resources)
    m = fit(cfg, train_loop, role, "physcode", PHYSCODE_CHECKPOINT, CHECKPOINT_FILE, "physcode", p.steps, out)
    print(f"PhysCode: {m['step']} steps {where(m)}; held-out future-feature MSE {m['eval/recon_mse']:.4f} vs copy-last "
          f"{m['eval/copy_last_mse']:.4f} (ratio {m['eval/recon_vs_copy_last']:.3f}); {m['eval/code_usage']:.0%} of "
          f"{p.codes} codes used, perplexity {m['eval/perplexity']:.1f}", file=out, flush=True)
    return m
