"""Desktop games as black boxes, on real Debian games (X-Moto, Neverball) under a private Xvfb each:
the gymnasium contract, pixel readers that fire on a real failure, a mixed fleet, and a SIGKILLed
actor that leaves no display or game process behind. Also the spec errors a user can make."""

import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

from actors.env_fleet import EnvFleet
from ipr_dist.config import EnvConfig, load_config
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.errors import GameError
from ipr_dist.games import game_info, list_games, make_env
from ipr_dist.games.actions import keys_action, noop_action
from ipr_dist.games.desktop_spec import DESKTOP_DIR, desktop_pack_specs, load_desktop_spec

from .conftest import wait_for
from .test_fleet import _descendants, assert_whole_chunks

ENV = EnvConfig(frame_size=(48, 48), max_episode_steps=400)
GAME_BINARIES = (b"Xvfb", b"/usr/games/xmoto", b"/usr/games/neverball")


def _cmd(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _game_processes(root: int) -> dict[int, bytes]:
    """The Xvfb and game processes under an actor process, pid -> executable."""
    return {p: c for p in _descendants(root) if (c := _cmd(p)) in GAME_BINARIES}


@pytest.mark.parametrize("game", sorted(desktop_pack_specs()))
def test_shipped_desktop_specs_pass_gymnasiums_env_checker(game):
    env = make_env(game, ENV)
    try:
        check_env(env, skip_render_check=True)
        obs, info = env.reset(seed=1)
        assert obs.shape == (48, 48, 3) and obs.dtype == np.uint8
        assert set(info) >= {"lives", "score", "game_over", "failure", "step"}
        assert not info["game_over"], "the game-over reader fired at the start of an episode"
        native = env.native_frame()
        assert native.shape == (240, 320, 3) and native.std() > 10, "the capture is blank"
    finally:
        env.close()


def _play_until_over(game: str, pressed: list[str], steps: int, tmp_path, episodes: int = 1) -> list:
    """Per episode, the step at which the game-over reader fired (None: it never did; the last native
    frame is then saved for the log), with that step's info."""
    from PIL import Image

    env = make_env(game, ENV)
    ends = []
    try:
        for episode in range(episodes):
            _, info = env.reset(seed=episode)
            Image.fromarray(env.native_frame()).save(tmp_path / "reset.png")
            assert not info["game_over"], f"the game-over reader fired at reset (frame: {tmp_path / 'reset.png'})"
            action = keys_action(env.game.keys, pressed)
            for t in range(steps):
                _, _, terminated, truncated, info = env.step(action)
                if terminated:
                    ends.append((t, info))
                    break
            else:
                Image.fromarray(env.native_frame()).save(tmp_path / f"last{episode}.png")
                ends.append((None, {**info, "last_frame": str(tmp_path / f"last{episode}.png")}))
        return ends
    finally:
        env.close()


def test_xmoto_crash_is_seen_by_its_template_reader(tmp_path):
    """Full throttle flips the bike onto the rider's head within a few seconds of game time."""
    [(t, info)] = _play_until_over("Xmoto-Desktop", ["ArrowUp"], 300, tmp_path)
    assert t is not None, f"no crash seen in 300 steps of full throttle: {info}"
    assert info["game_over"] and info["failure"] and t > 5


def test_neverball_fall_into_the_hole_is_seen_by_its_colour_reader(tmp_path):
    """Tilting forward from the start rolls the ball into the level's hole, in each of 6 episodes (frame-
    stepped: the same game time per step however loaded the machine is).

    Six episodes also guard the spec's renderer: with Mesa's llvmpipe, Neverball froze in its level intro
    in about 1 episode in 5 under load (its JIT-compiled rasteriser spinning), so a frozen intro would
    show here as an episode with no fall; the spec renders with softpipe (docs/desktop_games.md)."""
    ends = _play_until_over("Neverball-Desktop", ["ArrowUp"], 400, tmp_path, episodes=6)
    for episode, (t, info) in enumerate(ends):
        assert t is not None, f"episode {episode}: no fall seen in 400 steps of tilting forward: {info}"
        assert info["game_over"] and t > 5


def test_a_reset_wait_for_cpu_time_the_game_never_gets_is_one_error(tmp_path):
    """`{wait_ms, cpu_ms}` waits until the game has had that much CPU (Neverball's intro on a loaded
    machine); a game that cannot get it within timeout_ms is named, with what to change."""
    spec = yaml.safe_load((DESKTOP_DIR / "neverball.yaml").read_text())
    spec["reset"]["sequence"] = [{"wait_ms": 10, "cpu_ms": 120_000, "timeout_ms": 1500}]
    path = tmp_path / "neverball.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = make_env(str(path), ENV)
    try:
        with pytest.raises(GameError, match=r"Neverball-Desktop.*used under 120000 ms of CPU in 1500 ms.*lower cpu_ms"):
            env.reset()
    finally:
        env.close()


def test_stepped_game_is_paused_between_steps():
    """In stepped mode the game process is stopped (state T) whenever no step runs."""
    env = make_env("Xmoto-Desktop", ENV)
    try:
        env.reset(seed=0)
        env.step(noop_action(len(env.game.keys)))
        with open(f"/proc/{env._game.proc.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"
        first = env.native_frame()
        time.sleep(0.5)  # wall time passes while paused; the game draws nothing meanwhile
        assert np.array_equal(env._display.grab(env._box), first)
    finally:
        env.close()


@pytest.mark.unit
def test_pause_returns_once_the_game_has_stopped(tmp_path):
    """`pause` returns only when the game process is stopped, not when the signal is sent: a signal takes
    effect when its target next runs, and a busy game went on drawing for a moment after it (measured on
    2 loaded cores: a busy process not yet stopped right after SIGSTOP 1,711 times in 2,000; a repeated
    suite run of 2026-12-04 failed on that). A process that burns a core stands in for the game. A game
    that exited while a process it started lives on is a crash, not a wait."""
    from ipr_dist.errors import EnvironmentCrashed
    from ipr_dist.games.xdisplay import GameProcess

    game = GameProcess([sys.executable, "-c", "while True: pass"], {}, tmp_path / "home", ":0", tmp_path, "Busy-Test")
    try:
        for _ in range(200):
            game.pause()
            with open(f"/proc/{game.proc.pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] == "T"
            game.resume()
    finally:
        game.kill()
    # a game that exited (and was reaped) while a process it started lives on in its group
    leaver = [sys.executable, "-c", "import subprocess; subprocess.Popen(['sleep', '600'])"]
    game = GameProcess(leaver, {}, tmp_path / "home", ":0", tmp_path, "Leaver-Test")
    try:
        game.proc.wait()
        with pytest.raises(EnvironmentCrashed, match="the game process exited"):
            game.pause()
    finally:
        game.kill()


def test_realtime_game_runs_between_steps():
    """In real-time mode the game is never stopped: it keeps drawing while no step runs (X-Moto's level
    timer), which the next step's frame then shows."""
    from ipr_dist.games.desktop_env import DesktopGameEnv

    spec = desktop_pack_specs()["Xmoto-Desktop"].model_copy(update={"mode": "realtime"})
    env = DesktopGameEnv(spec, frame_size=ENV.frame_size)
    try:
        env.reset(seed=0)
        env.step(noop_action(len(env.game.keys)))
        with open(f"/proc/{env._game.proc.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"
        first = env.native_frame()
        wait_for(lambda: not np.array_equal(env._display.grab(env._box), first),
                 "a real-time game to draw between steps (its level timer redraws many times a second)")
        assert not env._game.paused
    finally:
        env.close()


def _fleet(tmp_path, games, num_envs):
    cfg = load_config("configs/smoke.yaml", ["env.frame_size=[24, 24]", "fleet.chunk_steps=40", "fleet.cpus_per_env=0.25",
                                             f"fleet.num_envs={num_envs}", f"fleet.games=[{', '.join(games)}]"])
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    return EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store), store


def test_mixed_retro_html_desktop_fleet_writes_one_store(tmp_path, ray_local):
    fleet, store = _fleet(tmp_path, ["Airstriker-Genesis", "Bounce-Html", "Xmoto-Desktop"], 3)
    try:
        report = fleet.run(360)
    finally:
        fleet.shutdown()
    assert report.committed_steps == store.count_steps() == 360 and report.restarts == 0
    assert_whole_chunks(store)
    assert {s.game for s in store.summary()} == {"Airstriker-Genesis-v0", "Bounce-Html", "Xmoto-Desktop"}
    assert store.key_names()["Xmoto-Desktop"] == ["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "Space"]


def test_sigkill_of_a_desktop_actor_restarts_it_and_leaves_no_display_or_game(tmp_path, ray_local):
    fleet, store = _fleet(tmp_path, ["Xmoto-Desktop"], 1)
    victim = fleet.pids()[0]
    first_generation: dict[int, bytes] = {}
    killed = threading.Event()

    def kill_actor(report):
        if report.committed_chunks >= 2 and not killed.is_set():
            first_generation.update(_game_processes(victim))
            os.kill(victim, signal.SIGKILL)
            killed.set()

    try:
        report = fleet.run(200, progress=kill_actor)
        restarted = fleet.pids()[0]
        second_generation = _game_processes(restarted)
    finally:
        fleet.shutdown()
    assert killed.is_set() and report.restarts == 1 and restarted != victim
    assert sorted(first_generation.values()) == [b"/usr/games/xmoto", b"Xvfb"]
    assert sorted(second_generation.values()) == [b"/usr/games/xmoto", b"Xvfb"], "no fresh display and game"
    assert report.dropped_chunks >= 1
    assert report.committed_steps == store.count_steps() == 200
    assert_whole_chunks(store)
    for generation, what in ((first_generation, "the killed actor's"), (second_generation, "shutdown left the")):
        deadline = time.monotonic() + 30  # only bounds a hang: the kernel's parent-death signal is prompt
        while any(_alive(p) for p in generation) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in generation), f"{what} Xvfb or game process outlived it"


def test_a_crashed_game_process_restarts_its_actor(tmp_path, ray_local):
    """The game dies under a running actor (not the actor itself): the env reports it crashed, the
    actor ends, and Ray restarts it with a fresh display and game."""
    fleet, store = _fleet(tmp_path, ["Xmoto-Desktop"], 1)
    actor = fleet.pids()[0]
    killed: list[int] = []

    def kill_game(report):
        if report.committed_chunks >= 1 and not killed:
            games = [p for p, c in _game_processes(actor).items() if c == b"/usr/games/xmoto"]
            for p in games:
                os.kill(p, signal.SIGKILL)
            killed.extend(games)

    try:
        report = fleet.run(160, progress=kill_game)
        restarted = fleet.pids()[0]
    finally:
        fleet.shutdown()
    assert killed and report.restarts >= 1 and restarted != actor
    assert report.committed_steps == store.count_steps() == 160
    assert_whole_chunks(store)


def test_a_desktop_game_that_cannot_start_is_given_up_and_the_rest_keep_running(tmp_path, ray_local):
    spec = tmp_path / "broken.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "id": "Broken-Desktop", "command": ["/bin/sh", "-c", "exit 7"]}))
    fleet, store = _fleet(tmp_path, ["Airstriker-Genesis", str(spec)], 2)
    try:
        report = fleet.run(120)
    finally:
        fleet.shutdown()
    assert report.committed_steps == 120
    assert list(report.failed_envs) == [1]
    assert "Broken-Desktop" in report.failed_envs[1] and "exited while starting (code 7" in report.failed_envs[1]


@pytest.mark.unit
def test_desktop_games_are_listed_by_kind():
    ids = {g.id for g in list_games() if g.kind == "desktop"}
    assert ids == {"Xmoto-Desktop", "Neverball-Desktop"}
    info = game_info("Xmoto-Desktop")
    assert info.variables == ("game_over",) and info.annotation.goal


# --- a user's spec mistakes: one GameError naming the game and the problem -----------------------

BASE = {"id": "Bad-Desktop", "command": ["/bin/sleep", "30"], "screen": [64, 48], "window": {"class": "Nothing"},
        "frame_ms": 20, "startup_timeout_s": 3, "readers": {"game_over": {"color": [255, 0, 0], "min_fraction": 0.5}}}


def _spec(tmp_path, **changes):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**BASE, **changes}))
    return p


@pytest.mark.unit
def test_a_game_that_is_not_installed_is_refused(tmp_path):
    path = _spec(tmp_path, command=["/opt/no/such/game"])
    assert not load_desktop_spec(path).game_info().installed
    with pytest.raises(GameError, match="Bad-Desktop.*not installed"):
        make_env(str(path), ENV)


def test_a_game_that_exits_at_start_is_one_error(tmp_path):
    env = make_env(str(_spec(tmp_path, command=["/bin/sh", "-c", "echo no data files >&2; exit 3"])), ENV)
    try:
        with pytest.raises(GameError, match=r"Bad-Desktop.*exited while starting \(code 3.*no data files"):
            env.reset()
    finally:
        env.close()


def test_a_window_that_never_appears_is_one_error(tmp_path):
    env = make_env(str(_spec(tmp_path)), ENV)
    try:
        with pytest.raises(GameError, match=r"Bad-Desktop.*no window with class 'Nothing' appeared within 3 s"):
            env.reset()
    finally:
        env.close()


@pytest.mark.unit
@pytest.mark.parametrize("changes, problem", [
    ({"readers": {"game_over": {"color": [0, 0, 0], "region": [0.5, 0.5, 0.2, 0.9]}}}, "region"),
    ({"readers": {"game_over": {"template": "missing.png"}}}, "missing.png not found"),
    ({"readers": {"game_over": {"color": [0, 0, 0]}, "score": {"digits": "d/"}}}, "readers.score: unknown variable"),
    ({"readers": {"game_over": {"color": [0, 0, 0]}, "lives": {"color": [1, 2, 3]}}}, "a number needs a digits"),
    ({"readers": {}}, "readers.game_over is required"),
    ({"keys": ["ArrowUp", "Hyper"]}, "unknown key name 'Hyper'"),
    ({"home_files": {"../../etc/passwd": "x"}}, "must be relative and stay inside"),
    ({"mode": "paused"}, "mode"),
    ({"window": {"title": "a", "class": "b"}}, "exactly one of title or class"),
    ({"command": []}, "command is empty"),
    ({"reset": {"sequence": [{"wait_ms": 5, "key": "Space"}]}}, "each reset step is one of"),
    ({"reset": {"sequence": [{"cpu_ms": 500}]}}, "cpu_ms goes with wait_ms"),
])
def test_spec_mistakes_are_named(tmp_path, changes, problem):
    path = _spec(tmp_path, **changes)
    with pytest.raises(GameError) as err:
        load_desktop_spec(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def bright_region_detector(frame):
    """A stand-in for a user's detector model: one box around the frame's brightest pixels."""
    ys, xs = np.nonzero(frame.mean(axis=-1) > 200)
    if len(xs) == 0:
        return []
    h, w = frame.shape[:2]
    return [{"label": "bright", "box": [xs.min() / w, ys.min() / h, xs.max() / w, ys.max() / h], "score": 0.9}]


def test_a_detectors_boxes_reach_info_and_the_prompt(tmp_path):
    from ipr_dist.games.desktop_spec import DESKTOP_DIR
    from serving.prompt_vlm import build_prompt

    shutil.copytree(DESKTOP_DIR, tmp_path / "desktop")
    raw = yaml.safe_load((tmp_path / "desktop" / "xmoto.yaml").read_text())
    raw["detector"] = "tests.test_desktop_env:bright_region_detector"
    (tmp_path / "desktop" / "xmoto.yaml").write_text(yaml.safe_dump(raw))
    env = make_env(str(tmp_path / "desktop" / "xmoto.yaml"), ENV)
    try:
        _, info = env.reset(seed=0)
        _, _, _, _, info = env.step(noop_action(len(env.game.keys)))
    finally:
        env.close()
    assert info["objects"] and info["objects"][0]["label"] == "bright"
    prompt = build_prompt(env.game, ["noop"], "ride", [], "", info["objects"])
    assert "Detected objects" in prompt and "bright at [" in prompt

    raw["detector"] = "tests.no_such_module:find"
    (tmp_path / "desktop" / "xmoto.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(GameError, match="detector 'tests.no_such_module:find' cannot be loaded"):
        make_env(str(tmp_path / "desktop" / "xmoto.yaml"), ENV)


@pytest.mark.parametrize("virtual_clock", [True, False])
def test_the_virtual_clock_hides_paused_time_from_the_game(tmp_path, virtual_clock):
    """A stand-in game that logs its monotonic clock and sleeps to absolute deadlines (as Python's
    time.sleep does): paused between slices, with the clock library it sees only the slices' time."""
    import sys

    from ipr_dist.games.xdisplay import GameProcess

    log = tmp_path / "clock.log"
    # Each value written whole (a temporary, then a rename): the game may be stopped anywhere, also
    # between opening the log and writing to it, which a read then saw as an empty file. Every 2 ms: the
    # last value before a pause is at most one period plus a scheduling delay old, which the 0.02 s below covers.
    script = ("import os, time\nt0 = time.monotonic()\nwhile True:\n    time.sleep(0.002)\n"
              f"    open({str(log)!r} + '.tmp', 'w').write(str(time.monotonic() - t0))\n"
              f"    os.replace({str(log)!r} + '.tmp', {str(log)!r})\n")
    home = tmp_path / "home"
    home.mkdir()
    game = GameProcess([sys.executable, "-c", script], {}, home, ":0", tmp_path, "Clock-Test", virtual_clock=virtual_clock)
    try:
        while not log.exists():
            time.sleep(0.01)
        game.pause()
        start, running = float(log.read_text()), 0.0
        for _ in range(5):  # five slices of >= 0.1 s, each followed by >= 0.4 s paused
            t = time.monotonic()
            game.resume()
            time.sleep(0.1)
            game.pause()
            running += time.monotonic() - t
            time.sleep(0.4)
        seen = float(log.read_text()) - start  # game time from before the first slice to its last write
    finally:
        game.kill()
    if virtual_clock:
        assert seen <= running + 0.02, (seen, running)  # only the slices' time: the >= 2 s paused is hidden
    else:
        assert seen >= 4 * 0.4, (seen, running)  # the wall clock: the pauses between slices became game time


@pytest.mark.unit
def test_workdirs_of_dead_processes_are_pruned_and_live_ones_kept(tmp_path, monkeypatch):
    """A SIGKILLed actor cannot close its env, so its workdir (~12 MB) would stay in /tmp for ever; the
    next env on the node deletes those whose owner process is gone, and no other."""
    import subprocess
    import tempfile

    from ipr_dist.games.desktop_env import WORKDIR_PREFIX, prune_stale_workdirs
    from ipr_dist.games.workdirs import OWNER

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    dirs = {}
    for name, pid, age in [("dead", dead.pid, 600), ("alive", os.getpid(), 600), ("young", dead.pid, 0)]:
        d = tmp_path / f"{WORKDIR_PREFIX}Game-{name}"
        (d / "home").mkdir(parents=True)
        (d / OWNER).write_text(str(pid))
        os.utime(d, (time.time() - age, time.time() - age))
        dirs[name] = d
    other = tmp_path / "not-ours"
    other.mkdir()
    assert prune_stale_workdirs() == 1
    assert not dirs["dead"].exists() and dirs["alive"].exists() and dirs["young"].exists() and other.exists()


@pytest.mark.unit
def test_a_workdir_still_written_into_while_pruned_keeps_its_owner_until_a_later_prune(tmp_path, monkeypatch):
    """A killed browser's children may still write into its workdir while the next env prunes it. Whatever
    the interleaving, the folder is either gone or still carries its owner file (an ownerless folder would be
    skipped by every later prune), and once the writing stops the next prune removes it."""
    import subprocess
    import tempfile
    import threading

    from ipr_dist.games.workdirs import OWNER, prune_stale_workdirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    d = tmp_path / "ipr-test-dying"
    (d / "profile" / "cache").mkdir(parents=True)
    (d / OWNER).write_text(str(dead.pid))
    stop = threading.Event()

    def write():
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                (d / "profile" / "cache" / f"f{i}").write_bytes(b"x" * 512)
            except OSError:  # the folder went under it
                return

    writer = threading.Thread(target=write)
    writer.start()
    for _ in range(5):
        prune_stale_workdirs("ipr-test-", min_age_s=0)
        assert not d.exists() or (d / OWNER).read_text() == str(dead.pid)
    stop.set()
    writer.join()
    prune_stale_workdirs("ipr-test-", min_age_s=0)
    assert not d.exists()
