"""`ipr data preprocess` on a recording with a scripted interactive stretch, a menu-like static segment,
a long idle window and pointer jitter: exactly those are dropped, thinned or smoothed, the idle window
keeps its first and last frames, the score is unchanged, tags follow their steps, and a second run
changes nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ipr_dist.config import load_config
from ipr_dist.data.recording import HUMAN_TAGS, load_tags
from ipr_dist.data.schema import ChunkMeta, decode_frames
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.games import game_info

from .conftest import run_ipr

pytestmark = pytest.mark.unit
GAME = "Cannon-Html"  # a pointer game: jitter smoothing applies
N, CHUNK = 400, 100
STATIC = range(50, 130)  # a menu: the same frame, no input
IDLE = range(130, 330)  # the game moves, the person does nothing
SESSION = "s0000001"


def frame(t: int, rng) -> np.ndarray:
    """A frame whose first pixel names its step (the static segment repeats one frame)."""
    f = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    f[0, 0, :2] = (t // 256, t % 256)
    return f


def recording(rng):
    info = game_info(GAME)
    k = len(info.keys)
    frames = []
    menu = frame(STATIC.start, rng)
    for t in range(N + 1):
        frames.append(menu if t in STATIC else frame(t, rng))
    keys = np.zeros((N, k), np.int8)
    buttons = np.zeros((N, 3), np.int8)
    buttons[10:31, 2] = 1  # the button held 21 steps: a real press
    buttons[40, 2] = 1  # held one step: a flick
    buttons[360, 0] = 1  # a click (one step by nature): stays
    mouse = np.full((N, 2), 0.5, np.float32)
    base = 0.5
    for t in range(330, N):
        base += 0.1 if t in (330, 350, 370) else 0.0
        mouse[t] = base + 0.003 * (t % 2)  # jitter around a pointer that moves three times
    reward = np.zeros(N, np.float32)
    reward[100] = 1.0  # scored while in the "menu" (dropped): the point must survive
    reward[200] = 2.0  # scored in the idle window
    arrays = {"frame": np.stack(frames[:-1]), "next_frame": np.stack(frames[1:]), "keys": keys, "mouse": mouse,
              "mouse_buttons": buttons, "scroll": np.zeros(N, np.int8), "reward": reward,
              "lives": np.full(N, -1, np.int32), "score": np.full(N, np.nan), "terminated": np.zeros(N, bool),
              "truncated": np.arange(N) == N - 1, "failure": np.zeros(N, bool), "episode": np.zeros(N, np.int64),
              "step": np.arange(N, dtype=np.int32), "policy_version": np.full(N, -1, np.int64)}
    return arrays, info


@pytest.fixture
def recorded(tmp_path):
    cfg = load_config("configs/smoke.yaml", [f"run.root={tmp_path}"])
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = TrajectoryStore(str(run))
    store.open_for_writing()
    arrays, info = recording(np.random.default_rng(0))
    for c in range(N // CHUNK):
        part = {k: v[c * CHUNK:(c + 1) * CHUNK] for k, v in arrays.items()}
        meta = ChunkMeta(f"human-{SESSION}-c{c:05d}", f"human-{SESSION}", GAME, "html", "human", info.keys)
        extra = {"ipr.human": json.dumps({"player": "p1", "session": SESSION, "t_ms": list(range(c * CHUNK, (c + 1) * CHUNK))})}
        store.write_chunk(part, meta, extra)
    store.layout.write_json(f"{HUMAN_TAGS}/{SESSION}.json", {"session": SESSION, "game": GAME, "player": "p1", "tags": [
        {"episode_id": f"human-{SESSION}-e0", "start": 140, "end": 160, "text": "watch the ball fly"},
        {"episode_id": f"human-{SESSION}-e0", "start": 60, "end": 70, "text": "in the menu"}]})
    return run, store, arrays


def _stored(store):
    """The stored episode in order, its frames, next frames and each row's original step (the recorder's
    step times, which this recording set to the step index)."""
    t = store.dataset().to_table().sort_by("step")
    origin = np.concatenate([json.loads(store.shard_metadata(p)[b"ipr.human"])["t_ms"] for p in store.shard_paths()])
    return t, decode_frames(t["frame"], store.frame_shape()), decode_frames(t["next_frame"], store.frame_shape()), origin


def test_preprocessing_drops_thins_and_smooths_exactly_what_was_scripted(recorded):
    run, store, arrays = recorded
    proc = run_ipr("data", "preprocess", str(run))
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {GAME} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # episodes, before, resampled, after, non-interactive, idle thinned, flicks, jitter
    idle_run = 201  # steps 129..329: the static segment's last step moves (its next frame is the idle's first)
    kept_idle = len(range(0, idle_run, 4)) + (1 if (idle_run - 1) % 4 else 0)
    assert cells[2:] == ["1", str(N), "-", str(N - 79 - (idle_run - kept_idle)), "79", str(idle_run - kept_idle), "1",
                         "35"]  # frame-locked: not resampled
    assert (run / "data" / "preprocess_report.md").is_file()

    t, frames, next_frames, origin = _stored(store)
    assert not set(origin) & set(range(50, 129)), "the static segment was not dropped"
    idle_kept = [o for o in origin if 129 <= o <= 329]
    assert idle_kept[0] == 129 and idle_kept[-1] == 329 and len(idle_kept) == kept_idle  # first and last kept
    assert list(t["step"].to_pylist()) == list(range(t.num_rows))
    assert np.array_equal(next_frames[:-1], frames[1:]), "a kept step's next frame is not the next kept step's frame"
    assert float(np.sum(t["reward"].to_numpy())) == pytest.approx(float(arrays["reward"].sum()))
    assert t["truncated"].to_pylist()[-1] and sum(t["truncated"].to_pylist()) == 1
    buttons = np.array(t["mouse_buttons"].to_pylist())
    assert buttons[:, 2].sum() == 21 and origin[buttons[:, 2] == 1].min() == 10  # the press stays, the flick goes
    assert buttons[:, 0].sum() == 1 and origin[buttons[:, 0] == 1][0] == 360  # the click stays
    mouse = np.array(t["mouse"].to_pylist())
    assert len(np.unique(np.round(mouse[origin >= 330, 0], 4))) == 3  # three pointer positions, no jitter
    tags = load_tags(store)
    assert {text for text in tags.values()} == {"watch the ball fly"}, "a tag on dropped steps must go"
    tagged = sorted(origin[s] for (_, s) in tags)
    assert tagged[0] >= 140 and tagged[-1] <= 160 and len(tagged) == len([o for o in idle_kept if 140 <= o <= 160])

    before = {p: open(p, "rb").read() for p in store.shard_paths()}
    proc = run_ipr("data", "preprocess", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "4 chunk(s) were already preprocessed" in proc.stdout
    assert {p: open(p, "rb").read() for p in store.shard_paths()} == before, "the second run changed the store"


def test_a_wall_timed_recording_is_resampled_to_60_hz(tmp_path):
    """A real-time game's recording (steps as far apart as the page's requests were: 4 to 50 ms) goes
    onto a fixed 60 Hz timeline: one row per 1/60 s, the frames chained, every reward and every key
    press kept on the row of its interval, intervals with no step repeat the picture, the episode's end
    on the last row, and a tag follows its step."""
    from ipr_dist.data.preprocess import resample_episode

    rng = np.random.default_rng(1)
    n = 60
    gaps = rng.choice([4, 8, 33, 50], size=n - 1)
    t_ms = np.concatenate([[1000], 1000 + np.cumsum(gaps)])
    info = game_info("Bounce-Html")
    frames = [frame(t, rng) for t in range(n + 1)]
    keys = np.zeros((n, len(info.keys)), np.int8)
    keys[[5, 17, 40], 0] = 1  # one-step presses
    reward = np.zeros(n, np.float32)
    reward[[3, 4, 30]] = 1.0
    ep = {"frame": np.stack(frames[:-1]), "next_frame": np.stack(frames[1:]), "keys": keys,
          "mouse": np.full((n, 2), 0.5, np.float32), "mouse_buttons": np.zeros((n, 3), np.int8),
          "scroll": np.zeros(n, np.int8), "reward": reward, "lives": np.full(n, 3, np.int32),
          "score": np.cumsum(reward).astype(np.float64), "terminated": np.arange(n) == n - 1,
          "truncated": np.zeros(n, bool), "failure": np.zeros(n, bool), "episode": np.zeros(n, np.int64),
          "step": np.arange(n, dtype=np.int32), "policy_version": np.full(n, -1, np.int64)}
    rows, ticks, cover = resample_episode(ep, t_ms, 60.0)
    k = len(ticks)
    assert k == int(np.ceil((t_ms[-1] - t_ms[0]) / (1000 / 60))) + 1
    assert np.all(np.abs(np.diff(ticks[:-1]) - 1000 / 60) <= 1) and 0 < ticks[-1] - ticks[-2] <= 17
    assert np.array_equal(rows["next_frame"][:-1], rows["frame"][1:]), "the rows' frames do not chain"
    assert np.array_equal(rows["frame"][0], ep["frame"][0]) and np.array_equal(rows["next_frame"][-1], ep["next_frame"][-1])
    assert rows["reward"].sum() == reward.sum() and rows["score"][-1] == ep["score"][-1]
    assert rows["terminated"].tolist() == [False] * (k - 1) + [True]
    empty = np.setdiff1d(np.arange(k), cover)
    pressed, press_rows = set(np.flatnonzero(rows["keys"][:, 0]).tolist()), {int(cover[j]) for j in (5, 17, 40)}
    # every press is on its interval's row; a row with no step of its own still holds the key of the step
    # before it (the key stayed down until the next request)
    assert press_rows <= pressed and pressed - press_rows <= set(empty.tolist())
    assert len(empty) > 0 and all(np.array_equal(rows["frame"][r], rows["next_frame"][r]) for r in empty)
    assert rows["reward"][empty].sum() == 0

    # the same recording through `ipr data preprocess`, as a real-time desktop game's chunk says it is
    cfg = load_config("configs/smoke.yaml", [f"run.root={tmp_path}", "preprocess.static_min_steps=1000",
                                             "preprocess.idle_min_steps=1000", "preprocess.flick_max_steps=0"])
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = TrajectoryStore(str(run))
    store.open_for_writing()
    meta = ChunkMeta(f"human-{SESSION}-c00000", f"human-{SESSION}", "Bounce-Html", "html", "human", info.keys)
    store.write_chunk(ep, meta, {"ipr.human": json.dumps({"player": "p1", "session": SESSION, "t_ms": t_ms.tolist(),
                                                            "timeline": "wall"})})
    store.layout.write_json(f"{HUMAN_TAGS}/{SESSION}.json", {"session": SESSION, "game": "Bounce-Html", "player": "p1",
                                                              "tags": [{"episode_id": f"human-{SESSION}-e0", "start": 40,
                                                                        "end": 40, "text": "press"}]})
    proc = run_ipr("data", "preprocess", str(run))
    assert proc.returncode == 0, proc.stderr
    assert f"| Bounce-Html | human | 1 | {n} | {n} -> {k} | {k} |" in proc.stdout
    t = store.dataset().to_table().sort_by("step")
    stored_ms = np.concatenate([json.loads(store.shard_metadata(p)[b"ipr.human"])["t_ms"] for p in store.shard_paths()])
    assert t.num_rows == k and np.array_equal(stored_ms, ticks)
    assert list(load_tags(store)) == [(f"human-{SESSION}-e0", int(cover[40]))]


def test_a_static_stretch_with_a_key_held_throughout_is_non_interactive():
    """Input entropy 0 on a still picture: a key held down through a loading screen is no more play than
    no key at all; the same stretch with the key tapped on and off is play, and stays."""
    from ipr_dist.config import PreprocessConfig
    from ipr_dist.data.preprocess import Removed, process_episode

    rng = np.random.default_rng(2)
    n, k = 100, 2
    moving = [frame(t, rng) for t in range(21)]
    still = moving[-1]
    frames = np.stack(moving + [still] * (n - 20))

    def episode(keys):
        return {"frame": frames[:-1].copy(), "next_frame": frames[1:].copy(), "keys": keys,
                "mouse": np.full((n, 2), 0.5, np.float32), "mouse_buttons": np.zeros((n, 3), np.int8),
                "scroll": np.zeros(n, np.int8), "step": np.arange(n, dtype=np.int32)}

    held = np.zeros((n, k), np.int8)
    held[10:, 0] = 1  # pressed while the game moves, then held through the still picture
    removed = Removed()
    keep = process_episode(episode(held), PreprocessConfig(), False, removed)
    assert removed.non_interactive == 80 and keep.tolist() == list(range(20))
    tapping = held.copy()
    tapping[20::10, 0] = 0  # released for a step every 10 steps: the input changes
    removed = Removed()
    keep = process_episode(episode(tapping), PreprocessConfig(), False, removed)
    assert removed.non_interactive == 0 and len(keep) == n
