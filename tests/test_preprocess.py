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
    # episodes, before, after, non-interactive, idle thinned, flicks, jitter
    idle_run = 201  # steps 129..329: the static segment's last step moves (its next frame is the idle's first)
    kept_idle = len(range(0, idle_run, 4)) + (1 if (idle_run - 1) % 4 else 0)
    assert cells[2:] == ["1", str(N), str(N - 79 - (idle_run - kept_idle)), "79", str(idle_run - kept_idle), "1", "35"]
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
