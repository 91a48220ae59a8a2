"""`ipr record`: a person plays through the web page (driven here by Playwright in real Chromium,
clicking and pressing keys as a person would), tags a segment and stops; the store then holds the
human steps with the keys that were pressed and the tag on the right steps. An HTML game runs in the
person's page itself, and its recording replays frame for frame in the fleet's env. A server killed
mid-session leaves only whole chunks."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from ipr_dist.config import load_config
from ipr_dist.data.recording import load_tags
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.games.browser import find_browser
from ipr_dist.games.html_env import CHROMIUM_FLAGS

from .conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one call to the recording server; a refused connection raises OSError."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok(port: int, path: str, body) -> dict:
    """The answer of a call that must succeed."""
    status, answer = api(port, path, body)
    assert status == 200, answer
    return answer


def _run_cfg(tmp_path, *sets):
    cfg = load_config("configs/smoke.yaml", [f"run.root={tmp_path}", "env.frame_size=[64, 64]", *sets])
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, run


class Server:
    """The recording app under uvicorn in a thread of this process."""

    def __init__(self, cfg, games):
        import uvicorn

        from serving.record_app import build_record_app

        self.app = build_record_app(cfg, games, TOKEN, "tester")
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the recording server to start")

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.app.state.shutdown()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=find_browser(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _wait_step(page, at_least: int) -> int:
    def step():
        text = page.inner_text("#status")
        return int(text.split()[1]) if text.startswith("step ") and int(text.split()[1]) >= at_least else 0

    return wait_for(step, lambda: f"step {at_least} (the page shows {page.inner_text('#status')!r})", every_s=0.02)


@pytest.mark.parametrize("game, key, game_key", [("Bounce-Html", "ArrowLeft", "ArrowLeft"),
                                                  ("Airstriker-Genesis", "ArrowRight", "RIGHT")])
def test_a_person_plays_tags_and_stops_through_the_page(tmp_path, browser, game, key, game_key):
    cfg, run = _run_cfg(tmp_path)
    server = Server(cfg, [game])
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/?token={TOKEN}")
        page.wait_for_function("document.querySelector('#game').options.length > 0")
        page.fill("#player", "alice")
        page.click("#start")
        _wait_step(page, 5)
        in_page = "runs in this page" in page.inner_text("#message")
        page.click("#screen")  # focus the game, as a person clicks into it
        page.keyboard.down(key)
        held_from = _wait_step(page, 0)  # the key is down from this step at the latest: hold it 15 more
        _wait_step(page, held_from + 15)
        page.keyboard.up(key)
        mark = _wait_step(page, _wait_step(page, 0) + 10)
        page.click("#mark")
        page.click("#screen")
        _wait_step(page, mark + 10)
        page.select_option("#tagchoice", index=1)
        tag_text = page.eval_on_selector("#tagchoice", "s => s.value")
        page.click("#tag")
        page.wait_for_function("document.querySelectorAll('#tags li').length === 1")
        page.click("#stop")
        page.wait_for_function("document.querySelector('#message').textContent.startsWith('saved')")
        saved = page.inner_text("#message")
        # after Stop, on the session's timeline: pick the first two pictures, tag the steps between them
        page.wait_for_function("document.querySelectorAll('#timeline img').length >= 3")
        page.click("#timeline img:nth-child(1)")
        page.click("#timeline img:nth-child(2)")
        assert (page.input_value("#from"), page.input_value("#to")) == ("0", "15")
        page.fill("#tagtext", "warm-up")
        page.click("#tagrange")
        page.wait_for_function("document.querySelectorAll('#tags li').length === 2")
        shot = page.screenshot()
    finally:
        server.close()
    steps = int(saved.split()[1])
    store = TrajectoryStore(str(run))
    table = store.dataset().to_table(columns=["game", "source", "episode_id", "step", "keys", "terminated", "truncated"])
    # at least what the script waited for: step 5, 15 held steps, 10 more to the mark, 10 after it (how many
    # more the page played while the browser acted depends on the machine's speed: 50 on an idle one)
    assert table.num_rows == steps >= 40
    assert set(table["source"].to_pylist()) == {"human"}
    episodes = table["episode_id"].to_pylist()
    step_idx = np.array(table["step"].to_pylist())
    for ep in set(episodes):  # one row per game frame, none missing or repeated
        idx = np.sort(step_idx[[e == ep for e in episodes]])
        assert np.array_equal(idx, np.arange(len(idx)))
    keys = store.key_names()[table["game"][0].as_py()]
    pressed = np.array([row[keys.index(game_key)] for row in table["keys"].to_pylist()])
    assert pressed.sum() >= 10, "the held key is not in the stored actions"
    assert pressed[:3].sum() == 0, "a key was stored as pressed before it was pressed"
    first, last = np.flatnonzero(pressed)[[0, -1]]
    assert pressed[first:last + 1].all(), "a held key has gaps"  # held down continuously in the page
    tags = load_tags(store)
    assert sorted(s for (ep, s), text in tags.items() if text == "warm-up") == list(range(16))
    tagged = sorted(s for (ep, s), text in tags.items() if text == tag_text)
    # from the step the Mark click reached the game (on a loaded machine a few steps after the page showed `mark`)
    # to the step the test waited for before tagging (mark + 10), with no gap
    assert tagged and tagged[0] >= mark - 2 and tagged[-1] >= mark + 9, (tagged[:3], tagged[-3:], mark)
    assert tagged == list(range(tagged[0], tagged[-1] + 1))
    assert not pressed[tagged].any(), "the tag covers steps played after the key was released"
    meta = json.loads(store.shard_metadata(store.shard_paths()[0])[b"ipr.human"])
    assert meta["player"] == "alice" and len(meta["t_ms"]) == len(store.read_shard(store.shard_paths()[0], ["step"]))
    assert in_page == (game == "Bounce-Html")  # HTML: in the person's page; retro: on the server
    if game == "Bounce-Html":
        from PIL import Image
        import io

        with ThreadPoolExecutor(1) as pool:  # a thread of its own: this one runs the test's Playwright
            pool.submit(_replays_in_the_env, store, cfg, game).result()

        im = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
        assert im.shape[1] >= 800 and im.std() > 10  # a real page, not a blank one
        if os.environ.get("IPR_WRITE_DOCS"):
            (ROOT / "docs" / "record_page.png").write_bytes(shot)


def _replays_in_the_env(store, cfg, game):
    """Steps played in the page are the env's steps: the fleet's HtmlGameEnv, reset with the recorded
    seed and given the recorded actions, gives every stored frame pixel for pixel and every reward."""
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.games import make_env

    env = make_env(game, cfg.env)
    try:
        for path in store.shard_paths():
            table = store.read_shard(path)
            seeds = json.loads(store.shard_metadata(path)[b"ipr.human"])["reset_seeds"]
            shape = (*cfg.env.frame_size, 3)
            frames, after = decode_frames(table["frame"], shape), decode_frames(table["next_frame"], shape)
            rows = table.select(["keys", "mouse", "mouse_buttons", "scroll", "reward", "step"]).to_pylist()
            for i, row in enumerate(rows):
                if row["step"] == 0:
                    obs, _ = env.reset(seed=seeds[int(table["episode_id"][i].as_py().rsplit("-e", 1)[1])])
                    assert np.array_equal(obs, frames[i]), f"reset frame of row {i}"
                obs, reward, *_ = env.step({"keys": np.array(row["keys"]), "mouse": np.array(row["mouse"]),
                                            "mouse_buttons": np.array(row["mouse_buttons"]), "scroll": row["scroll"]})
                assert np.array_equal(obs, after[i]) and reward == row["reward"], f"row {i} differs from the env's step"
    finally:
        env.close()


def test_the_api_refuses_bad_requests_with_one_clear_answer(tmp_path):
    cfg, run = _run_cfg(tmp_path, "record.html_in_page=false")
    server = Server(cfg, ["Bounce-Html"])

    def call(path, body=None, token=TOKEN, raw=None):
        return api(server.port, path, body, token, raw)

    try:
        assert call("/api/games", token=None)[0] == 401
        assert call("/api/games", token="wrong")[0] == 403
        assert call("/api/start", {"game": "Tetris"})[0] == 400
        assert call("/api/step", {"session": "nope"})[0] == 409
        assert call("/api/start", raw=b"{not json")[0] == 400
        assert call("/api/start", raw=b"[1, 2]")[0] == 400
        assert call("/api/start", raw=b"x" * 70_000)[0] == 413
        code, s = call("/api/start", {"game": "Bounce-Html", "player": "bob"})
        assert code == 200
        assert call("/api/start", {"game": "Bounce-Html"})[0] == 409  # one session at a time
        assert call("/api/step", {"session": s["session"], "keys": ["Jump"]})[0] == 400
        assert call("/api/step", {"session": s["session"], "scroll": 5})[0] == 400
        assert call("/api/step", {"session": s["session"], "mouse": "left"})[0] == 400
        assert call("/api/tag", {"session": s["session"], "start": 0, "end": 5, "text": "x"})[0] == 400  # not played yet
        assert call("/api/start", {"game": "Bounce-Html", "player": "bad name!"})[0] == 409
        for _ in range(3):
            assert call("/api/step", {"session": s["session"], "keys": ["ArrowRight"]})[0] == 200
        assert call("/api/tag", {"session": s["session"], "start": 0, "end": 2, "text": " "})[0] == 400
        code, done = call("/api/stop", {"session": s["session"]})
        assert code == 200 and done["steps"] == 3 and done["episodes"] == 1
    finally:
        server.close()


def _answer(h: int, w: int, score=0, lives=3, over=False, shade=0) -> dict:
    """What bridge.step answers for one frame (a flat picture), as the recording page uploads it."""
    import base64

    frame = np.full((h, w, 4), shade, np.uint8)
    return {"frame": base64.b64encode(frame.tobytes()).decode(), "regions": [],
            "vars": {"score": score, "lives": lives, "game_over": over}}


def test_in_page_play_uploads_are_checked_and_the_server_decides_episode_ends(tmp_path):
    """The protocol of an HTML game played in the page, without a browser: the game's files come from
    the session's capability path on the other loopback name, with the clock and bridge in front of the
    game's scripts; batches must follow on; the server ends the episode on the game's own game-over,
    drops what the page played after it and names the next episode's seed; bad uploads get one 4xx."""
    cfg, run = _run_cfg(tmp_path, f"record.max_upload_bytes={256 * 1024}")
    server = Server(cfg, ["Bounce-Html", "Airstriker-Genesis"])
    h, w = cfg.env.frame_size

    def call(path, body=None, raw=None):
        return api(server.port, path, body, TOKEN, raw)

    def step(keys=(), **answer):
        return {"keys": list(keys), "mouse": [0.5, 0.5], "buttons": [0, 0, 0], "scroll": 0, "t_ms": 0,
                "answer": _answer(h, w, **answer)}

    try:
        code, s = call("/api/start", {"game": "Bounce-Html", "player": "dana"})
        assert code == 200 and s["mode"] == "page" and s["next"]["episode"] == 0
        url = urllib.parse.urlparse(s["next"]["url"])
        assert url.hostname == "localhost" and f"seed={s['next']['seed']}" in url.query  # not the page's origin
        with urllib.request.urlopen(s["next"]["url"]) as r:
            html = r.read().decode()
        assert html.index("__iprClock") < html.index("<script src=") and "__iprBridge" in html
        wrong = s["next"]["url"].replace(url.path.split("/")[2], "not-the-capability")
        for bad in (wrong, s["next"]["url"].rsplit("/", 1)[0] + "/%2E%2E/%2E%2E/html_spec.py"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad)
            assert e.value.code == 404
        sid = s["session"]
        assert call("/api/step", {"session": sid, "keys": []})[0] == 400  # its steps come by upload
        refusals = [
            {"session": sid, "episode": 0, "first": 0, "steps": [step()]},  # no reset answer
            {"session": sid, "episode": 1, "first": 0, "reset": _answer(h, w), "steps": [step()]},  # not begun
            {"session": sid, "episode": 0, "first": 0, "reset": {"frame": "!!"}, "steps": []},  # not base64 / no vars
            {"session": sid, "episode": 0, "first": 0, "reset": _answer(h + 1, w), "steps": []},  # wrong size
            {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w), "steps": [step(["Jump"])]},
            {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w), "steps": "all of them"},
            {"session": sid, "episode": "zero", "first": 0, "steps": []},
            {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w), "steps": [step(), 7]},
            {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w), "steps": [step(), {"keys": []}]},
        ]
        for body in refusals:
            code, answer = call("/api/upload", body)
            assert code == 400 and answer["error"], (body, answer)
        code, answer = call("/api/upload", raw=json.dumps({"session": sid, "pad": "x" * 300_000}).encode())
        assert code == 413 and str(256 * 1024) in answer["error"]
        ok_ = ok(server.port, "/api/upload", {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w),
                                               "steps": [step(["ArrowLeft"], shade=t) for t in range(5)]})
        assert ok_["kept"] == 5 and ok_["next"] is None and ok_["step"] == 5
        assert call("/api/upload", {"session": sid, "episode": 0, "first": 3, "steps": [step()]})[0] == 400
        ended = ok(server.port, "/api/upload", {"session": sid, "episode": 0, "first": 5, "steps": [
            step(score=1), step(score=1, over=True), step(score=1, over=True)]})
        assert (ended["kept"], ended["dropped"], ended["done"]) == (2, 1, True)
        assert ended["next"]["episode"] == 1 and ended["next"]["seed"] != s["next"]["seed"]
        late = ok(server.port, "/api/upload", {"session": sid, "episode": 0, "first": 8, "steps": [step()] * 4})
        assert late["kept"] == 0 and late["dropped"] == 4 and late["step"] == 7
        ok(server.port, "/api/upload", {"session": sid, "episode": 1, "first": 0, "reset": _answer(h, w),
                                         "steps": [step(["ArrowRight"])] * 3})
        done = ok(server.port, "/api/stop", {"session": sid})
        assert (done["steps"], done["episodes"]) == (10, 2)
        code, e = call("/api/start", {"game": "Airstriker-Genesis"})
        assert code == 200 and e["mode"] == "server"
        assert call("/api/upload", {"session": e["session"], "episode": 0, "first": 0, "steps": []})[0] == 400
        for _ in range(3):
            ok(server.port, "/api/step", {"session": e["session"], "keys": ["RIGHT"]})
        # a tab closed mid-session leaves it running: a new page may save it and start anew
        assert call("/api/start", {"game": "Bounce-Html"})[0] == 409
        code, again = call("/api/start", {"game": "Bounce-Html", "replace": True})
        assert code == 200 and again["mode"] == "page"
        assert call("/api/step", {"session": e["session"], "keys": []})[0] == 409  # the old one is over
        ok(server.port, "/api/stop", {"session": again["session"]})
    finally:
        server.close()
    table = TrajectoryStore(str(run)).dataset().to_table(
        columns=["game", "episode_id", "step", "reward", "terminated", "truncated", "keys"]).to_pylist()
    bounce = [r for r in table if r["game"] == "Bounce-Html"]
    assert len(table) - len(bounce) == 3  # the replaced retro session was committed
    assert [r["reward"] for r in bounce] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert [r["terminated"] for r in bounce].index(True) == 6 and bounce[-1]["truncated"]
    assert [r["keys"][0] for r in bounce[:5]] == [1] * 5 and [r["keys"][1] for r in bounce[7:]] == [1] * 3


def test_a_server_killed_mid_session_leaves_only_whole_chunks(tmp_path):
    cfg, run = _run_cfg(tmp_path, "record.chunk_steps=20", "record.html_in_page=false")
    port = _free_port()
    (tmp_path / "token").write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "ipr_dist.cli", "record", str(run), "--port", str(port),
                             "--games", "Bounce-Html", "--token-file", str(tmp_path / "token")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def call(path, body):
        return ok(port, path, body)

    try:
        def started():
            try:
                return call("/api/start", {"game": "Bounce-Html"})["session"]
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                return None

        session = wait_for(started, "the recording server to answer /api/start", every_s=0.2)
        for _ in range(50):  # two whole chunks of 20, and 10 steps of the third
            call("/api/step", {"session": session, "keys": ["ArrowLeft"]})
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    store = TrajectoryStore(str(run))
    assert store.count_steps() == 40
    assert [len(store.read_shard(p, ["step"])) for p in store.shard_paths()] == [20, 20]


def test_recorded_play_feeds_the_router_and_gives_utility_a_human_reference(smoke_run):
    """One recorded episode of each of two games: the router's report counts the entries that came from
    human steps, and `ipr eval` reports Utility as HNS for those games instead of *missing*."""
    from .conftest import run_ipr

    cfg = load_config(str(smoke_run / "config.yaml"), [f"run.root={smoke_run.parent}", "record.html_in_page=false"])
    server = Server(cfg, ["Airstriker-Genesis", "Bounce-Html"])

    def call(path, body):
        return ok(server.port, path, body)

    plays = {"Airstriker-Genesis": [["RIGHT", "B"], ["LEFT", "B"]], "Bounce-Html": [["ArrowLeft"], ["ArrowRight"]]}
    try:
        for player in ("alice", "bob"):
            for game, combos in plays.items():
                s = call("/api/start", {"game": game, "player": player})["session"]
                for t in range(120 if player == "alice" else 40):
                    call("/api/step", {"session": s, "keys": combos[(t // 15) % 2]})
                assert call("/api/stop", {"session": s})["episodes"] >= 1
    finally:
        server.close()
    for stage in (("physcode", "train"), ("physcode", "inspect")):
        proc = run_ipr(*stage, str(smoke_run), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = (smoke_run / "physcode" / "report.md").read_text()
    rows = dict(re.findall(r"^\| (\S+) \| \d+ \| (\d+) \|$", report, re.M))
    assert int(rows["Airstriker-Genesis-v0"]) > 0 and int(rows["Bounce-Html"]) > 0, report[-800:]
    router = json.loads((smoke_run / "physcode" / "router.json").read_text())
    assert router["games"]["Bounce-Html"]["human_counts"]
    proc = run_ipr("eval", str(smoke_run), "--methods", "random", "--games", "Airstriker-Genesis", "Bounce-Html",
                   "--episodes", "2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = json.loads((smoke_run / "eval" / "references.json").read_text())
    for game in ("Airstriker-Genesis", "Bounce-Html"):
        key = next(k for k in refs if k.startswith(game))
        assert refs[key]["human_score"] is not None and refs[key]["human_episodes"] >= 2
        assert set(refs[key]["human_players"]) == {"alice", "bob"}
    text = (smoke_run / "eval" / "report.md").read_text()
    assert "missing (no human recording)" not in text
    utility = next(line for line in text.splitlines() if line.startswith("| random |") and "(" in line and
                   text.index(line) > text.index("## Utility per game"))
    assert "missing" not in utility, utility


def test_a_desktop_game_is_recorded_like_the_others(tmp_path):
    """X-Moto through the same API: its frames stream from its Xvfb, its steps are stored as human play."""
    cfg, run = _run_cfg(tmp_path)
    server = Server(cfg, ["Xmoto-Desktop"])

    def call(path, body):
        return ok(server.port, path, body)

    try:
        s = call("/api/start", {"game": "Xmoto-Desktop", "player": "carol"})["session"]
        frames = {call("/api/step", {"session": s, "keys": ["ArrowUp"] if t < 15 else []})["frame"] for t in range(30)}
        done = call("/api/stop", {"session": s})
    finally:
        server.close()
    assert done["steps"] == 30 and len(frames) > 1  # the picture changes while the bike moves
    table = TrajectoryStore(str(run)).dataset().to_table(columns=["game", "game_kind", "source", "keys"])
    assert set(table["game_kind"].to_pylist()) == {"desktop"} and set(table["source"].to_pylist()) == {"human"}
    assert sum(row[0] for row in table["keys"].to_pylist()) == 15


def test_malformed_uploads_of_in_page_steps_get_one_4xx_each_and_the_session_goes_on(tmp_path):
    """Seeded fuzz of /api/upload: 300 corruptions of a valid batch (values of other types, keys dropped
    or added, the whole body a scalar or a list) and 100 corrupted JSON texts. Every answer is a 4xx with
    a message or, for a corruption that is still a valid batch, a 200; never a server error; afterwards
    the session records and stops as before."""
    from .test_fuzz import corrupt_text, mutate

    cfg, run = _run_cfg(tmp_path)
    server = Server(cfg, ["Bounce-Html"])
    h, w = cfg.env.frame_size
    rng = np.random.default_rng(7)
    statuses: dict[int, int] = {}
    try:
        sid = ok(server.port, "/api/start", {"game": "Bounce-Html"})["session"]
        step = {"keys": ["ArrowLeft"], "mouse": [0.5, 0.5], "buttons": [0, 0, 0], "scroll": 0, "t_ms": 5,
                "answer": _answer(h, w)}
        recorded = ok(server.port, "/api/upload", {"session": sid, "episode": 0, "first": 0, "reset": _answer(h, w),
                                                    "steps": [step]})["step"]
        for i in range(400):
            valid = {"session": sid, "episode": 0, "first": recorded, "steps": [dict(step), dict(step)]}
            if i < 300:
                code, answer = api(server.port, "/api/upload", raw=json.dumps(mutate(valid, rng)).encode())
            else:
                code, answer = api(server.port, "/api/upload", raw=corrupt_text(json.dumps(valid), rng).encode())
            statuses[code] = statuses.get(code, 0) + 1
            assert code in (200, 400, 409, 413) and (code == 200 or answer.get("error")), (code, answer)
            if code == 200:
                recorded = answer["step"]
        print("upload fuzz answers by status:", statuses)
        assert statuses.get(400, 0) > 200, statuses
        final = ok(server.port, "/api/upload", {"session": sid, "episode": 0, "first": recorded, "steps": [step] * 3})
        done = ok(server.port, "/api/stop", {"session": sid})
    finally:
        server.close()
    assert final["step"] == recorded + 3 == done["steps"]
    assert TrajectoryStore(str(run)).count_steps() == done["steps"]
