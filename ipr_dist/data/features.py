"""Trajectory shards -> feature shards: (f_t, f_{t+D}, u_t, e_t) for every step and D in {1, 2, 4}.

One feature shard per trajectory shard (same name under `<run>/features/`, listed by
`TrajectoryStore.feature_paths`), carrying the step's action, reward and flags too, so later stages
never reread trajectories, so extraction is
incremental (only shards without features are processed) and resumable (shards are written to a
staging folder and renamed, as trajectories are). f_{t+D} and u_t need x_{t+D}: for D = 1 it is the
row's own next frame; for D > 1 it is D rows later in the same episode and shard, and the last
steps of a chunk, whose x_{t+D} lies in the next chunk, get nulls for that D.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ipr_dist.data.schema import decode_frames
from ipr_dist.games.catalog import GameInfo, describe_keys
from ipr_dist.games.actions import MOUSE_BUTTONS, POINTER_FLAGS

# Columns every feature shard has (besides f_next_D and u_D per delta); later stages check for them.
FEATURE_COLUMNS = ("game", "episode_id", "step", "chunk_id", "keys", "mouse", "mouse_buttons", "scroll", "reward",
                   "terminated", "failure", "text", "f", "e")


def cue_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of a cue (f, e or u) over rows, as PhysCode standardises them."""
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)


def standardise_cue(x: np.ndarray, stats) -> np.ndarray:
    """A cue in the units PhysCode and the world model were trained in (stats from `cue_stats`)."""
    mean, std = stats
    return ((x - mean) / std).astype(np.float32)


def action_texts(table: pa.Table, game: GameInfo, key_names: list[str],
                 tags: dict[tuple[str, int], str] | None = None) -> list[str]:
    """y_t for each row: the person's semantic tag of the step when it has one (human play, paper
    Sec. 3.2), else the executed control in words, from the game's annotations."""
    keys = table["keys"].to_pylist()
    buttons = table["mouse_buttons"].to_pylist()
    scroll = table["scroll"].to_pylist()
    where = zip(table["episode_id"].to_pylist(), table["step"].to_pylist()) if tags else [None] * len(keys)
    out = []
    for k, b, s, at in zip(keys, buttons, scroll, where):
        if tags and at in tags:
            out.append(tags[at])
            continue
        pressed = [name for name, on in zip(key_names, k) if on]
        pointer = [flag for flag, on in zip(POINTER_FLAGS, b) if on] + (["scroll"] if s else [])
        out.append(describe_keys(game, pressed, pointer))
    return out


def _vectors(x: np.ndarray | None, n: int, dim: int, valid: np.ndarray | None = None) -> pa.Array:
    """Rows of a (n, dim) float array as fixed-size lists; rows where `valid` is False are null."""
    if x is None:
        x = np.zeros((n, dim), np.float32)
        valid = np.zeros(n, bool)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).reshape(-1)), dim)
    if valid is not None and not valid.all():
        arr = pa.FixedSizeListArray.from_arrays(arr.values, dim, mask=pa.array(~valid))
    return arr


def extract_shard(table: pa.Table, frame_shape: tuple[int, ...], game: GameInfo, key_names: list[str],
                  appearance, flow, semantics, deltas: list[int], text_cache: dict | None = None,
                  tags: dict[tuple[str, int], str] | None = None) -> pa.Table:
    """Feature table of one trajectory shard (one chunk of one game)."""
    n = table.num_rows
    frames = decode_frames(table["frame"], frame_shape)
    next_frames = decode_frames(table["next_frame"], frame_shape)
    episode = np.array(table["episode_id"].to_pylist())
    done = np.logical_or(table["terminated"].to_numpy(zero_copy_only=False),
                         table["truncated"].to_numpy(zero_copy_only=False))
    # x_{t+1} is the next row's frame, except after an episode's last step and at the chunk's end,
    # where only the row's own next_frame has it: those few are encoded separately.
    own_next = np.flatnonzero(np.append(done[:-1], True))
    seq = np.concatenate([frames, next_frames[own_next]])
    f_all = appearance.encode(seq)  # appearance of every frame, computed once for every D
    next1 = np.arange(1, n + 1)
    next1[own_next] = n + np.arange(len(own_next))  # index into seq of x_{t+1}
    texts = action_texts(table, game, key_names, tags)
    cache = text_cache if text_cache is not None else {}
    missing = sorted({t for t in texts if t not in cache})
    if missing:
        for t, v in zip(missing, semantics.encode(missing)):
            cache[t] = v
    e = np.stack([cache[t] for t in texts])
    columns = {
        "game": table["game"], "episode_id": table["episode_id"], "step": table["step"],
        "chunk_id": table["chunk_id"], "keys": table["keys"], "mouse": table["mouse"],
        "mouse_buttons": table["mouse_buttons"], "scroll": table["scroll"], "reward": table["reward"],
        "terminated": table["terminated"], "failure": table["failure"],
        "text": pa.array(texts, pa.string()),
        "f": _vectors(f_all[:n], n, appearance.dim),
        "e": _vectors(e, n, semantics.dim),
    }
    for d in deltas:
        if d == 1:
            valid, target = np.ones(n, bool), next1
        else:  # x_{t+D} is frame t+D of the chunk when no episode ends in between
            valid = np.array([t + d < n and episode[t + d] == episode[t] and not done[t:t + d].any()
                              for t in range(n)], bool)
            target = np.minimum(np.arange(n) + d, n - 1)
        idx = np.flatnonzero(valid)
        u = np.zeros((n, flow.dim), np.float32)
        if len(idx):
            u[idx] = flow.encode(seq[idx], seq[target[idx]])
        columns[f"f_next_{d}"] = _vectors(f_all[target], n, appearance.dim, valid)
        columns[f"u_{d}"] = _vectors(u, n, flow.dim, valid)
    meta = {"ipr.features": json.dumps({"appearance_dim": appearance.dim, "semantic_dim": semantics.dim,
                                        "flow_grid": list(flow.grid), "deltas": list(deltas),
                                        "key_names": list(key_names), "mouse_buttons": list(MOUSE_BUTTONS)})}
    return pa.table(columns).replace_schema_metadata(meta)
