"""The paper's preprocessing of human play (Sec. 9.2), on a run's recorded steps (`ipr data preprocess RUN`).

Per human episode, in order:
0. a recording taken on the wall clock (a real-time desktop game: the game did not wait for the page,
   so steps are as far apart as the page's requests were; its chunks say `timeline: wall`) is
   resampled to a fixed `resample_hz` (60 Hz) timeline on its steps' wall times: each new row covers
   one 1/60 s interval and is the transition from the frame seen at the interval's start to the one
   seen at its end; the steps inside it are merged (rewards summed, a key or button pressed in any of
   them pressed, the pointer where the last left it, an episode end kept), and an interval with no
   step repeats the last frame with the keys still held and no reward;
1. very short flicks removed: a key held (or the mouse button held down) for at most `flick_max_steps`
   steps is taken as never pressed (a click is a one-step event by design and stays);
2. pointer jitter smoothed: a pointer move smaller than `jitter` (fraction of the frame) keeps the
   previous position;
3. non-interactive segments dropped: a run of at least `static_min_steps` steps whose input does not
   change (input entropy 0: nothing pressed, or the same keys held throughout) and that shows almost
   no motion (mean absolute frame difference under `static_motion`, 0-255) is a menu, a loading
   screen or the person away, and goes;
4. long idle windows thinned: in a run of at least `idle_min_steps` steps with no input (the game
   still moving), 1 step of every `idle_keep_every` is kept, and always the run's first and last.
The rows left are renumbered; each kept row's next frame is the next kept row's frame, and a dropped
row's reward goes to the kept row before it, so an episode's score (Utility's human reference) does
not change. Tags follow their steps. Frame-locked recordings (`timeline: frames`: retro at its native
rate, HTML at 60 FPS of virtual time, frame-stepped desktop games) are already on a fixed timeline and
are not resampled; the wall-clock time of each step is kept in the chunk's metadata either way.

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
    resampled_from: int = 0  # steps of wall-timed episodes before resampling
    resampled_to: int = 0  # their rows on the fixed timeline


@dataclass
class PreprocessReport:
    per_game: dict[str, Removed] = field(default_factory=lambda: defaultdict(Removed))
    already: int = 0  # chunks preprocessed by an earlier run
    finished: int = 0  # originals an interrupted run left behind, deleted now

    def lines(self) -> list[str]:
        out = ["| game | source | episodes | steps before | resampled (wall-timed steps -> rows) | after | "
               "non-interactive dropped | idle thinned | flicks removed | pointer jitter smoothed |",
               "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for g, r in sorted(self.per_game.items()):
            resampled = f"{r.resampled_from} -> {r.resampled_to}" if r.resampled_from else "-"
            out.append(f"| {g} | human | {r.episodes} | {r.steps_before} | {resampled} | {r.steps_after} | "
                       f"{r.non_interactive} | {r.idle_thinned} | {r.flicks} | {r.jitter} |")
        if not self.per_game:
            out.append("| - | human | 0 | 0 | - | 0 | 0 | 0 | 0 | 0 |")
        out.append(f"\n{self.already} chunk(s) were already preprocessed and were left as they are"
                   + (f"; {self.finished} original(s) of an interrupted run deleted" if self.finished else "") + ".")
        return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end exclusive) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def resample_episode(ep: dict[str, np.ndarray], t_ms: np.ndarray, hz: float) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One wall-timed episode on a fixed `hz` timeline: (its rows, their times in ms, the new row of
    each old step). Row 0 is the first step; row k covers the steps with times in (g_{k-1}, g_k],
    g_k = t_0 + k / hz; a last row covers what is left after the last whole interval."""
    period = 1000.0 / hz
    t = t_ms.astype(np.float64) - float(t_ms[0])
    ticks = np.arange(int(np.floor(t[-1] / period)) + 1) * period
    if ticks[-1] < t[-1]:
        ticks = np.append(ticks, t[-1])
    last = np.searchsorted(t, ticks, side="right") - 1  # the last step at or before each tick
    cover = np.searchsorted(ticks, t, side="left")  # the row each step falls in
    k = len(ticks)
    out = {name: np.empty((k, *v.shape[1:]), v.dtype) for name, v in ep.items()}
    for row in range(k):
        steps = np.flatnonzero(cover == row)
        src = int(last[row])
        if len(steps):  # the steps of this interval, merged
            out["frame"][row] = ep["frame"][steps[0]] if row == 0 else ep["next_frame"][int(last[row - 1])]
            out["keys"][row] = ep["keys"][steps].max(axis=0)
            out["mouse_buttons"][row] = ep["mouse_buttons"][steps].max(axis=0)
            nonzero = ep["scroll"][steps][ep["scroll"][steps] != 0]
            out["scroll"][row] = nonzero[-1] if len(nonzero) else 0
            out["reward"][row] = ep["reward"][steps].sum()
            for flag in ("terminated", "truncated", "failure"):
                out[flag][row] = ep[flag][steps].any()
        else:  # no step in this interval: the picture stays, the held keys stay held, nothing happens
            out["frame"][row] = ep["next_frame"][src]
            out["keys"][row] = ep["keys"][src]
            out["mouse_buttons"][row] = ep["mouse_buttons"][src] * np.array([0, 0, 1], np.int8)
            out["scroll"][row] = 0
            out["reward"][row] = 0.0
            for flag in ("terminated", "truncated", "failure"):
                out[flag][row] = False
        for name in ("next_frame", "mouse", "lives", "score", "episode", "policy_version"):
            out[name][row] = ep[name][src]
    out["step"] = np.arange(k, dtype=ep["step"].dtype)
    return out, np.round(ticks + float(t_ms[0])).astype(np.int64), cover


def process_episode(arrays: dict[str, np.ndarray], cfg, uses_mouse: bool, removed: Removed) -> np.ndarray:
    """Clean one episode's actions in place and return the indices of the rows to keep."""
    n = len(arrays["step"])
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
    # input that changes: a key or the held button going down or up, a click, a right click, a scroll, a
    # pointer move; where it does not, the input's entropy over the stretch is 0 (nothing pressed, or the
    # same keys held throughout, as on a loading screen)
    changed = arrays["mouse_buttons"][:, :2].any(axis=1) | (arrays["scroll"] != 0) | moved
    changed[1:] |= (held[1:] != held[:-1]).any(axis=1)
    motion = np.abs(arrays["next_frame"].astype(np.int16) - arrays["frame"].astype(np.int16)).mean(axis=(1, 2, 3))
    keep = np.ones(n, bool)
    for s, e in _runs(~changed & (motion < cfg.static_motion)):
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
    removed.steps_before += len(chunk_of)
    resampled: dict[tuple[str, int], int] = {}  # (episode_id, recorded step) -> its row on the fixed timeline
    if human[0].get("timeline", "frames") == "wall":
        allcols, chunk_of, episode_ids, t_ms = _resample_session(allcols, chunk_of, episode_ids, t_ms, cfg.resample_hz,
                                                                 removed, resampled)
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
        extra = {"ipr.human": json.dumps({**human[ci], "t_ms": t_ms[sel].tolist(),
                                          **({"resampled_hz": cfg.resample_hz} if resampled else {})}),
                 "ipr.preprocessed": json.dumps({"settings": settings, "from_chunk": ch["chunk_id"]})}
        store.write_chunk(arrays, meta, extra)
    if resampled:  # tags name recorded steps: through their resampled rows to the kept rows
        step_map = {key: step_map[(key[0], row)] for key, row in resampled.items() if (key[0], row) in step_map}
    _remap_tags(store, session, step_map)
    for path in chunk_paths:
        _delete(store.layout, path.rsplit("/", 1)[-1].removesuffix(".parquet"))


def _resample_session(allcols, chunk_of, episode_ids, t_ms, hz, removed: Removed, resampled: dict):
    """Every episode of a wall-timed session on the fixed timeline; a row belongs to the chunk of the
    last step it covers (or repeats)."""
    parts, chunks, eids, times = [], [], [], []
    for eid in dict.fromkeys(episode_ids.tolist()):
        idx = np.flatnonzero(episode_ids == eid)
        rows, ticks, cover = resample_episode({k: v[idx] for k, v in allcols.items()}, t_ms[idx], hz)
        src = np.minimum(np.searchsorted(cover, np.arange(len(ticks)), side="right") - 1, len(idx) - 1)
        parts.append(rows)
        chunks.append(chunk_of[idx][np.maximum(src, 0)])
        eids.extend([eid] * len(ticks))
        times.append(ticks)
        removed.resampled_from += len(idx)
        removed.resampled_to += len(ticks)
        for old_step, row in zip(allcols["step"][idx].tolist(), cover.tolist()):
            resampled[(eid, int(old_step))] = int(row)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in allcols}
    return merged, np.concatenate(chunks), np.array(eids), np.concatenate(times)


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
