"""HTML/Canvas games in real Chromium through Playwright: the pack, specs, failures, no network."""

import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ipr_dist.config import EnvConfig
from ipr_dist.errors import GameError
from ipr_dist.games import game_info, make_env
from ipr_dist.games.actions import RandomActions, keys_action, noop_action
from ipr_dist.games.html_spec import PACK_DIR, load_spec, pack_specs

FIXTURES = Path(__file__).parent / "fixtures" / "html"
SMALL = EnvConfig(frame_size=(48, 64))


def test_pack_has_twelve_or_more_annotated_games_covering_the_physics():
    specs = pack_specs()
    assert len(specs) >= 12
    physics = " | ".join(p for s in specs.values() for p in s.annotation.physics)
    for principle in ("gravity and jumping", "projectile motion", "collision", "bouncing", "inertia and momentum",
                      "friction and sliding"):
        assert principle in physics, principle
    mouse_games = [s.id for s in specs.values() if s.mouse]
    assert {"Cannon-Html", "Throw-Html"} <= set(mouse_games)  # aim-and-release, drag
    for s in specs.values():
        a = s.annotation
        assert a.goal and a.causal and a.physics
        assert set(s.keys) <= set(a.controls), s.id  # every key's meaning is annotated
        assert not s.mouse or "mouse" in a.controls, s.id


@pytest.mark.parametrize("game", sorted(pack_specs()))
def test_pack_game_passes_check_env_and_replays_identically(game):
    env = make_env(game, SMALL)
    try:
        check_env(env, skip_render_check=True)
        runs = []
        for _ in range(2):
            obs, info = env.reset(seed=11)
            source = RandomActions(env.game.keys, env.game.uses_mouse, seed=5)
            frames, infos = [obs], [info]
            for _ in range(60):
                obs, reward, term, trunc, info = env.step(source(obs, info))
                frames.append(obs)
                infos.append((reward, info))
                if term or trunc:
                    break
            runs.append((np.stack(frames), infos))
        assert np.array_equal(runs[0][0], runs[1][0])
        assert runs[0][1] == runs[1][1]
        assert runs[0][0].std() > 0  # a real picture, not a blank canvas
        assert env.blocked_requests == []
    finally:
        env.close()


def test_different_seeds_give_different_games():
    env = make_env("Hopper-Html", SMALL)
    try:
        def frames(seed):
            obs, _ = env.reset(seed=seed)
            out = [obs]
            for _ in range(120):
                out.append(env.step(noop_action(3))[0])
            return np.stack(out)
        assert not np.array_equal(frames(1), frames(2))
    finally:
        env.close()


def test_keyboard_reaches_the_game():
    env = make_env("Stacker-Html", SMALL)
    try:
        env.reset(seed=0)
        drop = keys_action(env.game.keys, ["Space"])
        score = 0.0
        for t in range(400):  # press and release Space every 40 steps: blocks drop and land
            _, reward, term, _, info = env.step(drop if t % 40 == 0 else noop_action(1))
            score += reward
        assert score > 0 or info["lives"] < 3
    finally:
        env.close()


def test_mouse_hold_and_release_fires_the_cannon():
    env = make_env("Cannon-Html", SMALL)
    try:
        _, info = env.reset(seed=0)
        aim = noop_action(0)
        aim["mouse"] = np.array([0.3, 0.5], np.float32)
        aim["mouse_buttons"] = np.array([0, 0, 1], np.int8)  # hold: aim
        for _ in range(5):
            env.step(aim)
        release = {**aim, "mouse_buttons": np.zeros(3, np.int8)}
        outcome = None
        for _ in range(300):  # the shot flies, then hits (score) or misses (life lost)
            _, reward, _, _, info = env.step(release)
            if reward or info["lives"] < 3:
                outcome = info
                break
        assert outcome is not None
    finally:
        env.close()


def test_frames_follow_the_virtual_clock_not_the_machine():
    import time

    env = make_env("Dodge-Html", SMALL)
    try:
        env.reset(seed=3)
        a = env.step(noop_action(2))[0]
        time.sleep(1.0)  # real time passes; the page's does not
        b = env.step(noop_action(2))[0]
        env.reset(seed=3)
        a2 = env.step(noop_action(2))[0]
        b2 = env.step(noop_action(2))[0]
        assert np.array_equal(a, a2) and np.array_equal(b, b2)
    finally:
        env.close()


@pytest.mark.parametrize("spec,needle", [
    ("thrower.yaml", "game 'Thrower-Test': the page threw a JavaScript error: "),
    ("noscore.yaml", "game 'NoScore-Test': it never exposes its score: `window.points` gave None"),
    ("wrongcanvas.yaml", "game 'WrongCanvas-Test': canvas selector '#screen' matches no element"),
    ("missing.yaml", "game 'Missing-Test': entry file"),
])
def test_broken_games_fail_with_one_clear_message(spec, needle):
    with pytest.raises(GameError) as err:
        env = make_env(str(FIXTURES / spec), SMALL)
        try:
            env.reset(seed=0)
            for _ in range(10):
                env.step(noop_action(len(env.game.keys)))
        finally:
            env.close()
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_spec_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: X\nentry: x.html\nscore: s\ngame_over: g\nkeys: [Jump]\n")
    with pytest.raises(GameError, match=r"bad.yaml: keys: .*unknown key name 'Jump'"):
        load_spec(bad)
    bad.write_text("id: X\nentry: x.html\nscore: s\ngame_over: g\ncanvass: '#c'\n")
    with pytest.raises(GameError, match=r"unknown key 'canvass'"):
        load_spec(bad)
    bad.write_text("id: X\nentry: https://games.example.com/x.html\nscore: s\ngame_over: g\n")
    with pytest.raises(GameError, match="not a local URL"):
        game_info(str(bad))


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        super().do_GET()

    def do_POST(self):
        type(self).hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """A real HTTP server on 127.0.0.1 that records every request it receives."""
    handler = type("Handler", (_CountingHandler,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    server.shutdown()


def test_no_request_leaves_the_browser(tmp_path, local_server):
    remote, hits = local_server
    (tmp_path / "phonehome.html").write_text((FIXTURES / "phonehome.html").read_text().replace("__REMOTE__", remote))
    (tmp_path / "phonehome.yaml").write_text(
        "id: PhoneHome-Test\nentry: phonehome.html\ncanvas: '#game'\nscore: state.score\ngame_over: state.over\n")
    env = make_env(str(tmp_path / "phonehome.yaml"), SMALL)
    try:
        env.reset(seed=0)
        for _ in range(20):
            env.step(noop_action(0))
        blocked = " ".join(env.blocked_requests)
        assert f"{remote}/track" in blocked and "example.com" in blocked and f"{remote}/pixel.png" in blocked
        assert env._call("() => state.fetchFailed") is True
    finally:
        env.close()
    assert hits == []  # the server that would have received a leaked request heard nothing


def test_third_party_game_from_a_local_url(tmp_path, local_server):
    """The worked example of docs/html_games.md: an existing game served on localhost plus a spec."""
    remote, hits = local_server
    shutil.copy(PACK_DIR / "bounce.html", tmp_path / "bounce.html")
    shutil.copy(PACK_DIR / "bounce.js", tmp_path / "bounce.js")
    shutil.copy(PACK_DIR / "harness.js", tmp_path / "harness.js")
    spec = tmp_path / "my_breakout.yaml"
    spec.write_text(f"""id: MyBreakout
entry: {remote}/bounce.html
canvas: "#game"
keys: [ArrowLeft, ArrowRight]
score: ipr.score
lives: ipr.lives
game_over: ipr.gameOver
annotation:
  goal: Break the bricks.
  controls: {{ArrowLeft: paddle left, ArrowRight: paddle right}}
""")
    info = game_info(str(spec))
    assert info.kind == "html" and info.keys == ("ArrowLeft", "ArrowRight") and info.annotation.goal
    env = make_env(str(spec), SMALL)
    try:
        env.reset(seed=0)
        for _ in range(30):
            obs, _, _, _, info = env.step(keys_action(env.game.keys, ["ArrowLeft"]))
        assert info["lives"] == 3 and obs.std() > 0
    finally:
        env.close()
    assert any(h.startswith("/bounce.html?seed=") for h in hits) and "/harness.js" in hits


# --- third-party games as a new user meets them ------------------------------------------------------


def test_a_game_that_reads_legacy_which_and_keycode_starts_and_scores():
    """Older canvas games read event.which / keyCode / charCode; this one starts only on which === 32."""
    env = make_env(str(FIXTURES / "legacy" / "legacy.yaml"), SMALL)
    try:
        _, info = env.reset(seed=0)
        for _ in range(5):
            _, _, _, _, info = env.step(noop_action(3))
        assert info["score"] == 0, "the game started without Space"
        _, reward, _, _, info = env.step(keys_action(env.game.keys, ["Space"]))
        for _ in range(5):
            _, reward, _, _, info = env.step(keys_action(env.game.keys, ["ArrowRight"]))
        assert info["score"] >= 5 and reward == 1.0
        assert env.page.evaluate("() => legacy.presses") == 1  # Space's keypress carried charCode 32
    finally:
        env.close()


def test_a_module_scoped_games_score_is_read_from_its_canvas():
    """An ES-module game keeps its score where no expression reaches; a digits reader reads what it draws,
    and a colour reader sees its game-over band."""
    spec = load_spec(FIXTURES / "module" / "module.yaml")
    assert spec.expressions() == {} and set(spec.pixel_readers()) == {"score", "game_over"}
    env = make_env(str(FIXTURES / "module" / "module.yaml"), SMALL)
    try:
        _, info = env.reset(seed=0)
        assert info["score"] == 0 and not info["game_over"]
        scores, rewards = [], []
        for t in range(45):
            pressed = ["Space"] if t in (2, 3, 10) else []  # a held key is one keydown: 7 at t=2, 14 at t=10
            _, reward, terminated, _, info = env.step(keys_action(env.game.keys, pressed))
            scores.append(info["score"])
            rewards.append(reward)
            if terminated:
                break
        assert terminated and info["game_over"]
        assert max(scores) == 14 and sorted(set(scores)) == [0, 7, 14]
        assert sum(rewards) == 14
    finally:
        env.close()


def test_a_game_with_no_readable_score_is_declared(tmp_path):
    spec_text = (FIXTURES / "module" / "module.yaml").read_text().replace(
        "score: {digits: digits, region: [0.0, 0.0, 0.5, 0.2], threshold: 0.9}", "score: none")
    shutil.copytree(FIXTURES / "module", tmp_path / "module")
    (tmp_path / "module" / "module.yaml").write_text(spec_text)
    info = game_info(str(tmp_path / "module" / "module.yaml"))
    assert "score" not in info.variables and "game_over" in info.variables
    env = make_env(str(tmp_path / "module" / "module.yaml"), SMALL)
    try:
        env.reset(seed=0)
        _, reward, _, _, step_info = env.step(keys_action(env.game.keys, ["Space"]))
        assert reward == 0.0 and step_info["score"] == 0.0
    finally:
        env.close()


def test_the_browsers_temporary_files_go_with_it_even_when_its_process_is_killed(monkeypatch):
    """Chromium's profile and Playwright's artifacts live in a workdir of the env's process: removed on
    close; left by a SIGKILLed process (a killed Ray actor), they are removed by the next browser started
    on the node, and nothing lands loose in the temp dir."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from ipr_dist.games.html_env import BROWSER_WORKDIR_PREFIX, _SharedBrowser
    from ipr_dist.games.workdirs import prune_stale_workdirs

    from .conftest import wait_for

    tmp_path = Path(tempfile.mkdtemp(prefix="ipr-t-", dir="/tmp"))  # short: Chromium's socket paths lie under it
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR, here and in the child
    child = subprocess.Popen([sys.executable, "-c", (
        "from ipr_dist.config import EnvConfig\nfrom ipr_dist.games import make_env\n"
        "env = make_env('Bounce-Html', EnvConfig(frame_size=(32, 32)))\nenv.reset(seed=0)\nprint('up', flush=True)\n"
        "import time\ntime.sleep(600)\n")], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1],
        start_new_session=True)
    try:
        assert child.stdout.readline().strip() == b"up"
        [left] = tmp_path.glob(BROWSER_WORKDIR_PREFIX + "*")
        assert any(p.name.startswith("playwright") for p in left.iterdir())
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the env's process with its driver and Chromium
        child.wait()

    def group_gone():  # Chromium's processes die after the env's own; on a loaded machine they may still write
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, "the killed env's Chromium processes to exit")
    assert prune_stale_workdirs(BROWSER_WORKDIR_PREFIX, min_age_s=0) == 1 and not left.exists()

    env = make_env("Bounce-Html", EnvConfig(frame_size=(32, 32)))
    try:
        env.reset(seed=0)
        mine = _SharedBrowser.workdir
        assert mine.parent == tmp_path and any(p.name.startswith("playwright") for p in mine.iterdir())
    finally:
        env.close()
    assert not mine.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("playwright", "org.chromium"))]
    shutil.rmtree(tmp_path)
