"""Stage 3 trainer: perception-action alignment of the VLM to PhysCode (paper Sec. 10.2 Stage 3).

Examples are (frame x_t, goal g, PhysCode window c_{t:t+L}) drawn from the run's trajectories: the
window is the frozen PhysCode labels of L consecutive steps of one episode, the goal one of the texts the
agent is prompted with (the game's annotated goal, or a level's goal from `eval.goals`: Stage 4 learns
under its critic's level goal and evaluation prompts every level), drawn per example. Loss: teacher-forced
cross-entropy on the PhysCode tokens only (the prompt is context, never a target), AdamW with a small
learning rate and weight decay, in Ray Train workers (gradients averaged). Each aligned checkpoint is a
committed version of `<run>/policy/aligned/` (ipr_dist/run_layout.py): a Qwen3-VL directory with
`physcode_tokens.json` and `align_state.pt` (optimizer, step, metrics), written whole by rank 0; training
resumes from the committed one. Held-out episodes give the first-code and whole-window accuracy against
the most-frequent-code baselines, overall and of the example's game.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ipr_dist.config import Config
from ipr_dist.errors import StoreError
from ipr_dist.run_layout import ALIGNED_POLICY, BASE_POLICY, DATA, GRPO_POLICY, CheckpointRef, RunLayout
from ipr_dist.devices import autocast, device_metrics, where
from learners.distributed import already_done, average_gradients, fit, report_step, train_device, train_role
from learners.physcode import load_clips, load_model, lr_at
from learners.physcode_inspect import label_codes

ALIGN_STATE = "align_state.pt"
DEFAULT_GOAL = "Stay alive as long as you can."


@dataclass
class AlignData:
    frames: np.ndarray  # (M, H, W, 3) uint8
    goals: list[str]  # (M,)
    windows: np.ndarray  # (M, L) PhysCode indices
    heldout: np.ndarray  # (M,) bool
    human: np.ndarray | None = None  # (M,) bool: the step was recorded from a person (`ipr record`)
    games: list[str] | None = None  # (M,) the example's game (None: the goal names it)

    def weights(self, rows: np.ndarray, human_share: float) -> np.ndarray | None:
        """Sampling probabilities over `rows` giving human examples `human_share` of the draws (None:
        uniform, when the rows are all human or all not)."""
        if self.human is None:
            return None
        h = self.human[rows]
        if h.all() or not h.any():
            return None
        w = np.where(h, human_share / h.sum(), (1.0 - human_share) / (~h).sum())
        return w / w.sum()


def base_policy(cfg: Config) -> CheckpointRef:
    """The configured local checkpoint (`policy.model_path`), or the run's embedded tiny one."""
    return CheckpointRef(None, cfg.policy.model_path) if cfg.policy.model_path else \
        CheckpointRef(RunLayout.of(cfg), BASE_POLICY)


def aligned_policy(cfg: Config) -> CheckpointRef:
    return CheckpointRef(RunLayout.of(cfg), ALIGNED_POLICY)


def grpo_policy(cfg: Config) -> CheckpointRef:
    return CheckpointRef(RunLayout.of(cfg), GRPO_POLICY)


def latest_policy(cfg: Config) -> CheckpointRef:
    """The Stage 4 (GRPO) policy once it has a checkpoint, otherwise the aligned one."""
    grpo = grpo_policy(cfg)
    return grpo if grpo.exists() else aligned_policy(cfg)


def goal_of(cfg: Config, level: str = "utility") -> Callable[[str], str]:
    """The goal text the agent is prompted with on a game at `level`: `eval.goals[level]` (survival,
    curiosity), or for utility (and a level without a goal text) the game's annotated goal, a generic
    survival goal where it has none."""
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations

    if level in cfg.eval.goals and level != "utility":
        return lambda game: cfg.eval.goals[level]
    annotations = load_annotations(cfg.games.annotation_files)
    cache: dict[str, str] = {}

    def goal(game: str) -> str:
        if game not in cache:
            info = game_info(game, annotations, cfg.games.spec_files)
            cache[game] = (info.annotation.goal if info.annotation and info.annotation.goal else DEFAULT_GOAL)
        return cache[game]

    return goal


def example_goals(cfg: Config, games: list[str], seed: int) -> list[str]:
    """Alignment's goal per example: the game's annotated goal or a level's goal text, uniformly, so the
    policy has seen every prompt evaluation and Stage 4 give it (the goal does not change the target:
    the window is what was played)."""
    annotated = goal_of(cfg)
    level_goals = [text for level, text in cfg.eval.goals.items() if level != "utility"]
    pick = np.random.default_rng(seed).integers(0, 1 + len(level_goals), len(games))
    return [annotated(game) if i == 0 else level_goals[i - 1] for game, i in zip(games, pick)]


def load_examples(cfg: Config) -> tuple[AlignData, int, int]:
    """Examples, the codebook size K and the window length L, from the run's store and PhysCode."""
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.data.store import TrajectoryStore

    layout = RunLayout.of(cfg)
    physcode, ckpt = load_model(layout)
    length, codes = physcode.cfg.window, physcode.cfg.codes
    data = load_clips(layout, physcode.cfg.clip_len, ckpt["flow_pool_grid"], cfg.physcode.holdout)
    data.standardise(ckpt["norm"])
    labels = label_codes(physcode, data, physcode.cfg.clip_len)
    n = len(data.f)
    code = np.full(n, -1, np.int64)
    for r, c in labels.items():
        code[r] = c
    ok = code >= 0
    for k in range(1, length):  # L labelled steps of one episode, starting at the row
        nxt = np.zeros(n, bool)
        nxt[: n - k] = (code[k:] >= 0) & data.continues[k:]  # row r+k labelled and the step after r+k-1
        ok &= nxt
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        raise StoreError(f"{layout.uri}: no step has {length} PhysCode-labelled steps after it; collect longer episodes")
    rng = np.random.default_rng(cfg.run.seed)
    human = np.char.startswith(data.episode.astype(str), "human-")
    # Human pairs first (paper Sec. 10: alignment is trained on human (frame, PhysCode) pairs): up to the
    # configured share of the examples, then the other steps.
    budget = min(cfg.policy.align_examples, len(rows))
    from_human = rows[human[rows]]
    take_h = min(len(from_human), int(round(budget * cfg.policy.align_human_share)) if len(from_human) < len(rows)
                 else budget)
    others = rows[~human[rows]]
    chosen_h = rng.choice(from_human, take_h, replace=False) if take_h else np.zeros(0, np.int64)
    chosen_o = rng.choice(others, min(len(others), budget - take_h), replace=False) if len(others) else np.zeros(0, np.int64)
    rows = np.sort(np.concatenate([chosen_h, chosen_o]).astype(np.int64))
    held = np.zeros(n, bool)
    held[data.clips[data.heldout, 0]] = True
    # Feature shards list rows in the order of their trajectory shards: row r of the concatenation is
    # row r - offset of shard s; read only the frames needed.
    store = TrajectoryStore(layout)
    shape = store.frame_shape()
    frames = np.zeros((len(rows), *shape), np.uint8)
    offset = 0
    for path, size in zip(store.feature_paths(), data.shard_rows):
        inside = (rows >= offset) & (rows < offset + size)
        if inside.any():
            data_path = layout.path(DATA, path.rsplit("/", 1)[-1])
            table = store.read_shard(data_path, columns=["frame"])
            frames[inside] = decode_frames(table["frame"], shape)[rows[inside] - offset]
        offset += size
    games = [str(data.game[r]) for r in rows]
    windows = code[rows[:, None] + np.arange(length)]
    return AlignData(frames, example_goals(cfg, games, cfg.run.seed), windows, held[rows], human[rows], games), \
        codes, length


def ensure_base(cfg: Config, out=sys.stdout) -> CheckpointRef:
    """The base checkpoint: the configured path, or the embedded tiny Qwen3-VL built on first use."""
    from pathlib import Path

    from ipr_dist.errors import ConfigError
    from ipr_dist.models.tiny_qwen3vl import build_tiny

    base = base_policy(cfg)
    if cfg.policy.model_path:
        if not (Path(cfg.policy.model_path) / "config.json").is_file():
            raise ConfigError(f"policy.model_path: {cfg.policy.model_path} is not a Qwen3-VL checkpoint directory (no "
                              "config.json); point it at a local checkpoint, or unset it to use the embedded tiny model")
        return base
    if base.exists():
        return base
    print(f"building the embedded tiny Qwen3-VL in {base.layout.display(BASE_POLICY)}", file=out)
    with base.layout.new_checkpoint(BASE_POLICY) as folder:
        build_tiny(folder, hidden=cfg.policy.tiny_hidden, layers=cfg.policy.tiny_layers, seed=cfg.run.seed)
        if cfg.policy.frame_adapter:
            add_frame_adapter(cfg, folder)
    return base


def add_frame_adapter(cfg: Config, folder) -> None:
    """The tiny model's second visual path, its conv net copied from the run's Stage 1 appearance
    encoder when the run trained one (features.appearance: small) at the policy's frame size."""
    from actors.feature_extractor import ENCODER_FILE
    from ipr_dist.models.policy import FrameAdapter
    from ipr_dist.run_layout import APPEARANCE_ENCODER

    f = cfg.features
    encoder = RunLayout.of(cfg).load_torch(APPEARANCE_ENCODER, ENCODER_FILE) if f.appearance == "small" else None
    size = tuple(cfg.env.frame_size)
    if encoder is not None and (encoder["dim"] != f.appearance_dim or tuple(encoder["frame_size"]) != size):
        encoder = None  # another encoder's shape: the adapter starts from scratch
    FrameAdapter.add_to_checkpoint(folder, f.appearance_dim, size, encoder["state"] if encoder else None,
                                   cfg.policy.frame_adapter_cells, cfg.policy.frame_adapter_mlp)


def window_loss(policy, examples: AlignData, idx: np.ndarray) -> torch.Tensor:
    """Teacher-forced cross-entropy of examples `idx`'s PhysCode windows given their frames and goals: on the
    PhysCode tokens only, the prompt is never a target."""
    batch = policy.inputs(list(examples.frames[idx]), [examples.goals[i] for i in idx])
    return -policy.sequence_logprobs(batch, torch.as_tensor(examples.windows[idx], device=policy.device)).mean()


def train_loop(config: dict) -> None:
    """One Ray Train worker: teacher-forced cross-entropy on the PhysCode tokens of each window, on the
    worker's device, the policy either replicated (gradients averaged) or sharded (`policy.align_fsdp`)."""
    import ray.train

    from ipr_dist.models.policy import PhysCodePolicy

    cfg = Config.model_validate(config["cfg"])
    p = cfg.policy
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = train_device()
    examples, codes, length = load_examples(cfg)
    layout = RunLayout.of(cfg)
    torch.manual_seed(cfg.run.seed)
    aligned = aligned_policy(cfg)
    resume = aligned.exists()
    with (aligned if resume else base_policy(cfg)).open() as folder:
        # A sharded policy is read into host memory; FSDP moves each worker's shards to its GPU.
        policy = PhysCodePolicy(folder, codes, device="cpu" if p.align_fsdp else str(device))
        state = torch.load(folder / ALIGN_STATE, map_location="cpu", weights_only=False) if resume else None
    if p.align_fsdp:
        from learners.learner_group import shard

        shard(policy.model, device.type)
        policy.device = str(device)
    params = [q for q in policy.model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.align_lr, weight_decay=p.align_weight_decay)
    step = 0
    if resume:
        load_optimizer(policy, opt, state["optimizer"], p.align_fsdp)
        step = state["step"]
    train = np.flatnonzero(~examples.heldout) if (~examples.heldout).any() else np.arange(len(examples.windows))
    rng = np.random.default_rng(cfg.run.seed * 1000 + rank + 7919 * step)
    per_worker = max(1, p.align_batch // world)
    weights = examples.weights(train, p.align_human_share)
    policy.model.train()
    while step < p.align_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p.align_lr, p.align_warmup, p.align_steps)
        with autocast(device, cfg.ray.bf16):
            loss = window_loss(policy, examples, rng.choice(train, per_worker, p=weights))
        opt.zero_grad()
        loss.backward()
        if not p.align_fsdp:  # FSDP averages gradients itself (reduce-scatter) during backward
            average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if hasattr(norm, "full_tensor"):
            norm.full_tensor()
        opt.step()
        step += 1
        last = step == p.align_steps
        if step % 25 == 0 or last:
            metrics = {"step": step, "align/loss": loss.item(), "align/lr": opt.param_groups[0]["lr"]}
            if step % p.checkpoint_every == 0 or last:
                # Under FSDP every worker takes part in the evaluation's forwards and in gathering the weights.
                if last and (rank == 0 or p.align_fsdp):
                    metrics.update(evaluate(policy, examples, length, seed=cfg.run.seed))
                    metrics.update(device_metrics(device))
                if rank == 0 or p.align_fsdp:
                    save(layout, policy, opt, step, metrics, p.align_fsdp, rank)
            report_step(config, metrics)
    if p.align_steps == 0 and (rank == 0 or p.align_fsdp):  # no alignment asked for: the base with its tokens
        save(layout, policy, opt, 0, evaluate(policy, examples, length, seed=cfg.run.seed), p.align_fsdp, rank)


def load_optimizer(policy, opt, state: dict, sharded: bool) -> None:
    """AdamW state from a checkpoint: whole, or (sharded) each worker taking its shards of the full state."""
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy.model, opt, state, options=StateDictOptions(full_state_dict=True))


def save(layout: RunLayout, policy, opt, step: int, metrics: dict, sharded: bool = False, rank: int = 0) -> None:
    """The policy and the optimizer state as one new version of `<run>/policy/aligned/`, written by rank 0;
    sharded weights and optimizer state are first gathered by every worker together."""
    weights, optim = None, opt.state_dict() if not sharded else None
    if sharded:
        from learners.learner_group import gather_full

        weights, optim = gather_full(policy.model, opt)
        if rank != 0:
            return
    with layout.new_checkpoint(ALIGNED_POLICY, step=step) as folder:
        policy.save(folder, state_dict=weights)
        torch.save({"optimizer": optim, "step": step, "metrics": metrics}, folder / ALIGN_STATE)


@torch.no_grad()
def evaluate(policy, examples: AlignData, length: int, max_examples: int = 512, seed: int = 0) -> dict:
    """Held-out first-code accuracy (teacher-forced argmax over the PhysCode tokens) and whole-window
    accuracy (greedy constrained decoding) on a seeded sample of the held-out steps, against two
    baselines from the training steps: always answering the most frequent code / window, and the
    most frequent of the example's own game."""
    policy.model.eval()
    held = evaluate_sample(examples, max_examples, seed)
    train = np.flatnonzero(~examples.heldout)
    train = train if len(train) else np.arange(len(examples.windows))
    games = np.array(examples.games if examples.games is not None else examples.goals)
    first_mode, window_mode = _modes(examples.windows[train])
    per_game = {g: _modes(examples.windows[train[games[train] == g]]) for g in set(games[train])}
    first_hits = window_hits = 0
    for chunk in np.array_split(held, max(1, len(held) // 64)):
        frames, goals_chunk = list(examples.frames[chunk]), [examples.goals[i] for i in chunk]
        batch = policy.inputs(frames, goals_chunk)
        logits = policy.teacher_forced_logits(batch, torch.as_tensor(examples.windows[chunk], device=policy.device))
        first = logits[:, 0, policy.token_ids.to(logits.device)].argmax(-1).cpu().numpy()
        first_hits += int((first == examples.windows[chunk, 0]).sum())
        greedy = policy.propose(frames, goals_chunk, 1, length, temperature=0.0).codes[:, 0]
        window_hits += int((greedy == examples.windows[chunk]).all(1).sum())
    target = examples.windows[held]
    game_first, game_window = (np.array(m) for m in zip(*(per_game.get(g, (first_mode, window_mode))
                                                           for g in games[held])))
    policy.model.train()
    return {"eval/first_code_accuracy": first_hits / len(held),
            "eval/first_code_baseline": float((target[:, 0] == first_mode).mean()),
            "eval/first_code_game_baseline": float((target[:, 0] == game_first).mean()),
            "eval/window_accuracy": window_hits / len(held),
            "eval/window_baseline": float((target == np.array(window_mode)).all(1).mean()),
            "eval/window_game_baseline": float((target == game_window).all(1).mean()),
            "eval/examples": int(len(held))}


def evaluate_sample(examples: AlignData, max_examples: int = 512, seed: int = 0) -> np.ndarray:
    """The held-out examples `evaluate` scores: a seeded sample of every held-out episode, not the
    first ones (a few episodes of one game)."""
    held = np.flatnonzero(examples.heldout)
    if len(held) == 0:
        held = np.arange(len(examples.windows))
    return np.sort(np.random.default_rng(seed).choice(held, min(max_examples, len(held)), replace=False))


def _modes(windows: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """The most frequent first code and the most frequent whole window."""
    return (Counter(windows[:, 0].tolist()).most_common(1)[0][0],
            Counter(map(tuple, windows.tolist())).most_common(1)[0][0])


def train(cfg: Config, out=sys.stdout) -> dict:
    """Build or check the base VLM, then align it with Ray Train; returns the held-out evaluation."""
    from ipr_dist.runlog import save_config

    given, cfg = cfg, cfg.with_absolute_root()
    layout = RunLayout.of(cfg)
    load_model(layout)  # a run without PhysCode fails here, nothing touched
    ensure_base(cfg, out)
    save_config(given)
    done = already_done(layout, ALIGNED_POLICY, ALIGN_STATE, cfg.policy.align_steps, "policy already aligned",
                        "resuming alignment", out)
    if done is not None:
        return done
    p = cfg.policy
    role = train_role("alignment", "policy.workers x policy.align_cpus_per_worker / align_gpus_per_worker",
                      p.workers, p.align_cpus_per_worker, p.align_gpus_per_worker, cfg.ray.train_resources)
    m = fit(cfg, train_loop, role, "align", ALIGNED_POLICY, ALIGN_STATE, "policy", p.align_steps, out)
    print(f"alignment: {p.align_steps} steps {where(m)}; held-out first code {m['eval/first_code_accuracy']:.3f} vs "
          f"most frequent {m['eval/first_code_baseline']:.3f} overall / {m['eval/first_code_game_baseline']:.3f} per game; "
          f"whole window {m['eval/window_accuracy']:.3f} vs {m['eval/window_baseline']:.3f} / "
          f"{m['eval/window_game_baseline']:.3f}", file=out, flush=True)
    return m
