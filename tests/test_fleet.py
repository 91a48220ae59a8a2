"""The env fleet on local Ray with the real emulator: whole chunks, crash recovery, bad games."""

import os
import re
import signal
import threading

import numpy as np
import pyarrow.compute as pc

from actors.env_fleet import EnvFleet
from ipr_dist.config import load_config
from ipr_dist.data.store import TrajectoryStore

SMALL = ["env.frame_size=[24, 24]", "env.frame_skip=2", "fleet.chunk_steps=50", "fleet.cpus_per_env=0.25"]


def make(tmp_path, *overrides):
    cfg = load_config("configs/smoke.yaml", [*SMALL, *overrides])
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    return cfg, store


def assert_whole_chunks(store):
    """Every shard holds one whole chunk: consecutive steps of its episodes, as many as it was asked."""
    table = store.dataset().to_table(columns=["chunk_id", "episode_id", "step"])
    ids = table["chunk_id"].to_pylist()
    assert len(set(ids)) == len(store.shard_paths())
    for cid in set(ids):
        rows = table.filter(pc.equal(table["chunk_id"], cid))
        steps = np.array(rows["step"].to_pylist())
        eps = rows["episode_id"].to_pylist()
        same_ep = np.array([a == b for a, b in zip(eps, eps[1:])])
        assert np.all(np.diff(steps)[same_ep] == 1), cid
        assert np.all(steps[1:][~same_ep] == 0), cid


def test_fleet_commits_exactly_the_budget_in_whole_chunks(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=2")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        report = fleet.run(430)
    finally:
        fleet.shutdown()
    assert report.committed_steps == store.count_steps() == 430
    assert report.restarts == 0 and report.dropped_chunks == 0
    assert_whole_chunks(store)
    frames = store.dataset().to_table(columns=["frame"])
    assert len(frames) == 430


def test_sigkill_of_an_env_actor_recovers_and_store_matches_committed(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=2")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    victim = fleet.pids()[0]
    killed = threading.Event()

    def kill_when_collecting(report):
        if report.committed_chunks >= 4 and not killed.is_set():
            os.kill(victim, signal.SIGKILL)
            killed.set()

    try:
        report = fleet.run(3000, progress=kill_when_collecting)
        new_pids = fleet.pids()
    finally:
        fleet.shutdown()
    assert killed.is_set()
    assert report.restarts == 1 and report.dropped_chunks >= 1
    assert victim not in new_pids
    assert report.committed_steps == store.count_steps() == 3000
    assert_whole_chunks(store)
    chunk_ids = set(store.dataset().to_table(columns=["chunk_id"])["chunk_id"].to_pylist())
    assert any(re.search(r"-a0000-g[1-9]", c) for c in chunk_ids), "the restarted actor kept collecting"


def test_an_env_that_cannot_start_is_given_up_and_the_rest_keep_running(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=2", "fleet.games=[Airstriker-Genesis, SuperMarioBros-Nes]")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        report = fleet.run(200)
    finally:
        fleet.shutdown()
    assert report.committed_steps == 200
    assert list(report.failed_envs) == [1]
    assert "SuperMarioBros-Nes" in report.failed_envs[1] and "not installed" in report.failed_envs[1]


def test_scripted_source_is_recorded_as_scripted(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=1", "fleet.action_source=scripted",
                      "fleet.scripted_actions=[[RIGHT], [LEFT, B]]", "fleet.scripted_hold=3")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        fleet.run(12)
    finally:
        fleet.shutdown()
    table = store.dataset().to_table(columns=["keys", "source"])
    keys = store.key_names()["Airstriker-Genesis-v0"]
    pressed = [tuple(sorted(k for k, on in zip(keys, row) if on)) for row in table["keys"].to_pylist()]
    assert pressed == [("RIGHT",)] * 3 + [("B", "LEFT")] * 3 + [("RIGHT",)] * 3 + [("B", "LEFT")] * 3
    assert set(table["source"].to_pylist()) == {"scripted"}


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (the actor's Playwright driver and its Chromium processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_chromium(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"chromium" in f.read().split(b"\0")[0]
    except OSError:
        return False


def test_mixed_retro_and_html_fleet_writes_one_store(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=2", "fleet.games=[Airstriker-Genesis, Cannon-Html]")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        report = fleet.run(400)
    finally:
        fleet.shutdown()
    assert report.committed_steps == store.count_steps() == 400
    kinds = {(s.game, s.source) for s in store.summary()}
    assert kinds == {("Airstriker-Genesis-v0", "random"), ("Cannon-Html", "random")}
    table = store.dataset().to_table(columns=["game", "game_kind", "keys", "mouse"])
    html = table.filter(pc.equal(table["game"], "Cannon-Html"))
    assert set(html["game_kind"].to_pylist()) == {"html"} and html["keys"].to_pylist()[0] == []
    assert len(set(map(tuple, html["mouse"].to_pylist()))) > 1  # the pointer moved
    assert store.key_names()["Airstriker-Genesis-v0"][0] == "B"
    assert_whole_chunks(store)


def test_a_game_that_throws_is_given_up_and_the_others_keep_running(tmp_path, ray_local):
    thrower = os.path.join(os.path.dirname(__file__), "fixtures", "html", "thrower.yaml")
    cfg, store = make(tmp_path, "fleet.num_envs=2", f"fleet.games=[Dodge-Html, '{thrower}']")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        report = fleet.run(200)
    finally:
        fleet.shutdown()
    assert report.committed_steps == store.count_steps() == 200
    assert list(report.failed_envs) == [1]
    assert "Thrower-Test" in report.failed_envs[1] and "boom: physics exploded" in report.failed_envs[1]
    assert {s.game for s in store.summary()} == {"Dodge-Html"}


def test_a_killed_browser_restarts_its_actor(tmp_path, ray_local):
    cfg, store = make(tmp_path, "fleet.num_envs=1", "fleet.games=[Juggle-Html]", "fleet.chunk_steps=40")
    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    actor_pid = fleet.pids()[0]
    killed = []

    def kill_browser(report):
        if report.committed_chunks >= 2 and not killed:
            killed.extend(p for p in _descendants(actor_pid) if _is_chromium(p))
            for p in killed:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    try:
        report = fleet.run(600, progress=kill_browser)
        new_pid = fleet.pids()[0]
    finally:
        fleet.shutdown()
    assert killed
    assert report.restarts >= 1 and new_pid != actor_pid
    assert report.committed_steps == store.count_steps() == 600
    assert_whole_chunks(store)


def test_agent_play_traces_the_steps_that_lose_a_life(tmp_path):
    """EnvRunner.play(trace=True), the real emulator (Airstriker, no keys pressed until its ship is hit): each
    traced step says whether it lost a life, as the game's lives before and after it say (Stage 4's online
    critic ends its episode there with world_model.episodic_life); the episode goes on."""
    from actors.env_fleet import EnvRunner
    from ipr_dist.games.actions import noop_action
    from ipr_dist.games.outcome import life_lost

    cfg, store = make(tmp_path)
    runner = EnvRunner(0, "Airstriker-Genesis-v0", cfg.env, cfg.fleet, cfg.games, 0, "t", store)
    try:
        noop, seen = noop_action(len(runner.game.keys)), []
        for _ in range(3000):
            before = runner.info["lives"]
            out = runner.play([noop], 0, 5000, trace=True)
            assert not out["episode_ended"]
            seen.append(out["trace"]["life_lost"][0])
            assert seen[-1] == life_lost(before, runner.info["lives"])
            if seen[-1]:
                break
        assert seen[-1] and not any(seen[:-1]) and runner.info["lives"] == before - 1
    finally:
        runner.env.close()
