"""The paper's preprocessing of human play (Sec. 9.2), on a run's recorded steps (`ipr data preprocess RUN`).

Per human episode, in order:
1. very short flicks removed: a key held (or the mouse button held down) for at most `flick_max_steps`
   steps is taken as never pressed (a click is a one-step event by design and stays);
2. pointer jitter smoothed: a pointer move smaller than `jitter` (fraction of the frame) keeps the
   previous position;
3. non-interactive segments dropped: a run of at least `static_min_steps` steps with no input and
   almost no motion (mean absolute frame difference under `static_motion`, 0-255) is a menu, a
   loading screen or the person away, and goes;
4. long idle windows thinned: in a run of at least `idle_min_steps` steps with no input (the game
   still moving), 1 step of every `idle_keep_every` is kept, and always the run's first and last.
The rows left are renumbered; each kept row's next frame is the next kept row's frame, and a dropped
row's reward goes to the kept row before it, so an episode's score (Utility's human reference) does
not change. Tags follow their steps. Timeline: `ipr record` stores one step per game frame (retro at
its native rate, HTML at 60 FPS of virtual time), so the recording is already on a fixed timeline and
no resampling is needed; the wall-clock time of each step is kept in the chunk's metadata.

A preprocessed chunk replaces its original: the new shard is committed first, then the original's
manifest and file are deleted; its metadata says it was preprocessed and with what settings, and a
second run leaves it alone (nothing changes). An interrupted run is finished by the next one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ipr_dist.data.recording import HUMAN_TAGS
from ipr_dist.data.schema import STEP_ARRAYS, ChunkMeta, decode_frames
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.errors import UserError
from ipr_dist.run_layout import COMMITTED, DATA

PP_SUFFIX = "-pp"


@dataclass
class Removed:
    steps_before: int = 0
    steps_after: int = 0
    non_interactive: int = 0
    idle_thinned: int = 0
    flicks: int = 0
    jitter: int = 0
    episodes: int = 0


@dataclass
class PreprocessReport:
    per_game: dict[str, Removed] = field(default_factory=lambda: defaultdict(Removed))
    already: int = 0  # chunks preprocessed by an earlier run
    finished: int = 0  # originals an interrupted run left behind, deleted now

    def lines(self) -> list[str]:
        out = ["| game | source | episodes | steps before | after | non-interactive dropped | idle thinned | "
               "flicks removed | pointer jitter smoothed |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for g, r in sorted(self.per_game.items()):
            out.append(f"| {g} | human | {r.episodes} | {r.steps_before} | {r.steps_after} | {r.non_interactive} | "
                       f"{r.idle_thinned} | {r.flicks} | {r.jitter} |")
        if not self.per_game:
            out.append("| - | human | 0 | 0 | 0 | 0 | 0 | 0 | 0 |")
        out.append(f"\n{self.already} chunk(s) were already preprocessed and were left as they are"
                   + (f"; {self.finished} original(s) of an interrupted run deleted" if self.finished else "") + ".")
        return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end exclusive) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def process_episode(arrays: dict[str, np.ndarray], cfg, uses_mouse: bool, removed: Removed) -> np.ndarray:
    """Clean one episode's actions in place and return the indices of the rows to keep."""
    n = len(arrays["step"])
    removed.steps_before += n
    removed.episodes += 1
    held = np.concatenate([arrays["keys"], arrays["mouse_buttons"][:, 2:3]], axis=1)  # keys and "hold"
    for j in range(held.shape[1]):
        for s, e in _runs(held[:, j] > 0):
            if e - s <= cfg.flick_max_steps:
                held[s:e, j] = 0
                removed.flicks += 1
    k = arrays["keys"].shape[1]
    arrays["keys"][:] = held[:, :k]
    arrays["mouse_buttons"][:, 2] = held[:, k]
    moved = np.zeros(n, bool)
    if uses_mouse and n:
        last = arrays["mouse"][0].copy()
        for t in range(1, n):
            if np.abs(arrays["mouse"][t] - last).max() < cfg.jitter:
                if not np.array_equal(arrays["mouse"][t], last):
                    removed.jitter += 1
                arrays["mouse"][t] = last
            else:
                last = arrays["mouse"][t].copy()
                moved[t] = True
    active = (arrays["keys"].any(axis=1) | arrays["mouse_buttons"].any(axis=1) | (arrays["scroll"] != 0) | moved)
    motion = np.abs(arrays["next_frame"].astype(np.int16) - arrays["frame"].astype(np.int16)).mean(axis=(1, 2, 3))
    keep = np.ones(n, bool)
    for s, e in _runs(~active & (motion < cfg.static_motion)):
        if e - s >= cfg.static_min_steps:
            keep[s:e] = False
            removed.non_interactive += e - s
    for s, e in _runs(~active & keep):
        if e - s >= cfg.idle_min_steps:
            thin = np.zeros(e - s, bool)
            thin[::cfg.idle_keep_every] = True
            thin[-1] = True
            keep[s:e] = thin
            removed.idle_thinned += int((~thin).sum())
    if n and not keep.any():  # an episode that is all menu: keep its last step, so it still ends
        keep[-1] = True
    removed.steps_after += int(keep.sum())
    return np.flatnonzero(keep)


def preprocess(store: TrajectoryStore, cfg) -> PreprocessReport:
    """Preprocess every human chunk of the store not yet preprocessed; see the module docstring."""
    report = PreprocessReport()
    layout = store.layout
    paths = store.shard_paths()
    names = {p.rsplit("/", 1)[-1].removesuffix(".parquet"): p for p in paths}
    todo: dict[str, list[str]] = defaultdict(list)  # session -> its original chunks' paths, in order
    for name, path in sorted(names.items()):
        meta = store.shard_metadata(path)
        if b"ipr.human" not in meta:
            continue
        if b"ipr.preprocessed" in meta:
            report.already += 1
            continue
        if f"{name}{PP_SUFFIX}" in names:  # an interrupted run committed its replacement: finish the swap
            _delete(layout, name)
            report.finished += 1
            continue
        todo[json.loads(meta[b"ipr.human"])["session"]].append(path)
    for session, chunk_paths in todo.items():
        _preprocess_session(store, session, chunk_paths, cfg, report)
    return report


def _preprocess_session(store: TrajectoryStore, session: str, chunk_paths: list[str], cfg, report) -> None:
    from ipr_dist.games import game_info

    tables = [store.read_shard(p) for p in chunk_paths]
    metas = [t.schema.metadata for t in tables]
    chunk = json.loads(metas[0][b"ipr.chunk"])
    human = [json.loads(m[b"ipr.human"]) for m in metas]
    shape = tuple(json.loads(metas[0][b"ipr.frame_shape"]))
    try:
        uses_mouse = game_info(chunk["game"]).uses_mouse
    except UserError:  # a game no longer in the catalog: its stored pointer data decides
        uses_mouse = any(any(b) for t in tables for b in t["mouse_buttons"].to_pylist())
    removed = report.per_game[chunk["game"]]
    cols: dict[str, list] = defaultdict(list)
    for t in tables:
        for k, v in _arrays(t, shape).items():
            cols[k].append(v)
    allcols = {k: np.concatenate(v) for k, v in cols.items()}  # the session's rows, in order
    chunk_of = np.concatenate([np.full(t.num_rows, ci) for ci, t in enumerate(tables)])
    episode_ids = np.array([eid for t in tables for eid in t["episode_id"].to_pylist()])
    t_ms = np.array([x for h in human for x in h["t_ms"]])
    kept_rows = np.zeros(len(chunk_of), bool)
    step_map = {}  # (episode_id, old step) -> new step
    new_step = np.zeros(len(chunk_of), np.int32)
    for eid in dict.fromkeys(episode_ids.tolist()):
        idx = np.flatnonzero(episode_ids == eid)
        ep = {k: v[idx].copy() for k, v in allcols.items()}
        keep = process_episode(ep, cfg, uses_mouse, removed)
        for k in ("keys", "mouse", "mouse_buttons"):
            allcols[k][idx] = ep[k]
        kept = idx[keep]
        # a dropped row's reward goes to the kept row before it (or the first kept row)
        owner = np.maximum(np.searchsorted(keep, np.arange(len(idx)), side="right") - 1, 0)
        rewards = np.zeros(len(keep), np.float64)
        np.add.at(rewards, owner, allcols["reward"][idx])
        allcols["reward"][kept] = rewards.astype(np.float32)
        # the episode's end moves to its last kept row
        allcols["terminated"][kept[-1]] = allcols["terminated"][idx].any()
        allcols["truncated"][kept[-1]] = allcols["truncated"][idx].any()
        allcols["failure"][kept[-1]] = allcols["failure"][idx[-1]]
        for pos, i in enumerate(kept):
            allcols["next_frame"][i] = allcols["frame"][kept[pos + 1]] if pos + 1 < len(kept) else allcols["next_frame"][idx[-1]]
            new_step[i] = pos
            step_map[(eid, int(allcols["step"][i]))] = pos
        kept_rows[kept] = True
    settings = cfg.model_dump()
    for ci in range(len(chunk_paths)):
        sel = np.flatnonzero((chunk_of == ci) & kept_rows)
        if not len(sel):
            continue
        arrays = {k: allcols[k][sel] for k in STEP_ARRAYS if k in allcols}
        arrays["step"] = new_step[sel]
        ch = json.loads(metas[ci][b"ipr.chunk"])
        meta = ChunkMeta(ch["chunk_id"] + PP_SUFFIX, ch["episode_prefix"], ch["game"], ch["game_kind"], ch["source"],
                         tuple(ch["key_names"]))
        extra = {"ipr.human": json.dumps({**human[ci], "t_ms": t_ms[sel].tolist()}),
                 "ipr.preprocessed": json.dumps({"settings": settings, "from_chunk": ch["chunk_id"]})}
        store.write_chunk(arrays, meta, extra)
    _remap_tags(store, session, step_map)
    for path in chunk_paths:
        _delete(store.layout, path.rsplit("/", 1)[-1].removesuffix(".parquet"))


def _arrays(table, shape) -> dict[str, np.ndarray]:
    n = table.num_rows
    out = {"frame": decode_frames(table["frame"], shape), "next_frame": decode_frames(table["next_frame"], shape),
           "keys": np.array(table["keys"].to_pylist(), np.int8).reshape(n, -1),
           "mouse": np.array(table["mouse"].to_pylist(), np.float32).reshape(n, 2),
           "mouse_buttons": np.array(table["mouse_buttons"].to_pylist(), np.int8).reshape(n, 3),
           "scroll": table["scroll"].to_numpy().astype(np.int8), "reward": table["reward"].to_numpy().astype(np.float32),
           "lives": table["lives"].fill_null(-1).to_numpy().astype(np.int32),
           "score": table["score"].fill_null(np.nan).to_numpy().astype(np.float64),
           "terminated": table["terminated"].to_numpy(zero_copy_only=False).copy(),
           "truncated": table["truncated"].to_numpy(zero_copy_only=False).copy(),
           "failure": table["failure"].to_numpy(zero_copy_only=False).copy(),
           "step": table["step"].to_numpy().astype(np.int32),
           "policy_version": table["policy_version"].to_numpy().astype(np.int64)}
    prefix = json.loads(table.schema.metadata[b"ipr.chunk"])["episode_prefix"]
    out["episode"] = np.array([int(e.rsplit("-e", 1)[1]) if e.startswith(prefix) else 0
                               for e in table["episode_id"].to_pylist()], np.int64)
    return out


def _remap_tags(store: TrajectoryStore, session: str, step_map: dict[tuple[str, int], int]) -> None:
    rel = f"{HUMAN_TAGS}/{session}.json"
    if not store.layout.is_file(rel):
        return
    doc = store.layout.read_json(rel)
    tags = []
    for t in doc.get("tags", []):
        kept = [step_map[(t["episode_id"], s)] for s in range(t["start"], t["end"] + 1) if (t["episode_id"], s) in step_map]
        if kept:
            tags.append({**t, "start": min(kept), "end": max(kept)})
    store.layout.write_json(rel, {**doc, "tags": tags})


def _delete(layout, name: str) -> None:
    layout.delete(DATA, COMMITTED, f"{name}.parquet.json")
    layout.delete(DATA, f"{name}.parquet")
