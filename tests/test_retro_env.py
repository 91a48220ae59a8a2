"""The retro environment over the real stable-retro emulator (Airstriker-Genesis ships its ROM)."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ipr_dist.config import EnvConfig
from ipr_dist.errors import ConfigError, GameError
from ipr_dist.games import make_env
from ipr_dist.games.actions import RandomActions, noop_action
from ipr_dist.games.catalog import load_annotations

pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`

GAME = "Airstriker-Genesis"


def play(env_cfg: EnvConfig, seed: int, steps: int):
    env = make_env(GAME, env_cfg)
    try:
        obs, _ = env.reset(seed=seed)
        source = RandomActions(env.game.keys, False, seed=7)
        frames, infos = [obs], []
        for _ in range(steps):
            obs, reward, term, trunc, info = env.step(source(obs, {}))
            frames.append(obs)
            infos.append((reward, term, trunc, info["lives"], info["score"]))
            if term or trunc:
                obs, _ = env.reset(seed=seed + 1)
        return np.stack(frames), infos
    finally:
        env.close()


def test_check_env_passes():
    env = make_env(GAME, EnvConfig(frame_size=(48, 64)))
    try:
        check_env(env, skip_render_check=True)
        assert env.observation_space.shape == (48, 64, 3)
        assert set(env.action_space.spaces) == {"keys", "mouse", "mouse_buttons", "scroll"}
        assert env.game.keys == ("B", "UP", "DOWN", "LEFT", "RIGHT")  # its annotation's keys, of the core's 12
        assert env.action_space["keys"].n == 5
    finally:
        env.close()


def test_seeded_replay_is_identical_and_seeds_differ():
    cfg = EnvConfig(frame_size=(32, 32), frame_skip=2)
    a_frames, a_infos = play(cfg, seed=3, steps=300)
    b_frames, b_infos = play(cfg, seed=3, steps=300)
    assert np.array_equal(a_frames, b_frames)
    assert a_infos == b_infos
    c_frames, _ = play(cfg, seed=4, steps=300)
    assert not np.array_equal(a_frames, c_frames)


def test_restoring_a_snapshot_replays_the_same_future():
    """Several futures from one state: after `restore`, the same actions give the same frames, rewards, lives
    and score as the first time, including the reward of the first step after it (the emulator's reward
    tracking restarts from the restored memory) and the step count that truncation reads."""
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=4, max_episode_steps=10_000))
    try:
        obs, _ = env.reset(seed=0)
        source = RandomActions(env.game.keys, False, seed=5)
        for _ in range(60):
            obs, *_ = env.step(source(obs, {}))
        mark, at = env.snapshot(), obs
        actions = [source(obs, {}) for _ in range(300)]

        def future():
            out = []
            for a in actions:
                o, r, term, trunc, info = env.step(a)
                out.append((o.tobytes(), r, term, trunc, info["lives"], info["score"], info["step"]))
                if term or trunc:
                    break
            return out

        first = future()
        assert sum(r for _, r, *_ in first) > 0  # the future scores, so the reward tracking is exercised
        assert np.array_equal(env.restore(mark), at)
        assert future() == first
    finally:
        env.close()


def test_info_carries_lives_score_game_over_and_failure():
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=4))
    try:
        obs, info = env.reset(seed=0)
        assert info == {"lives": 3, "score": 0.0, "game_over": False, "failure": False, "step": 0}
        source = RandomActions(env.game.keys, False, seed=0)
        last = None
        for t in range(5000):
            obs, reward, term, trunc, last = env.step(source(obs, {}))
            assert last["step"] == t + 1
            if term:
                break
        assert term and last["game_over"] and last["failure"] and last["lives"] == 0
        assert last["score"] > 0  # random firing hits something before the last ship is lost
    finally:
        env.close()


def test_life_lost_ends_the_episode_when_configured():
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=4, failure_on="life_lost"))
    try:
        env.reset(seed=0)
        for _ in range(5000):
            _, _, term, _, info = env.step(noop_action(len(env.game.keys)))
            if term:
                break
        assert term and info["failure"] and info["lives"] == 2 and not info["game_over"]
    finally:
        env.close()


def test_truncation_at_max_episode_steps():
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), max_episode_steps=10))
    try:
        env.reset(seed=0)
        for t in range(10):
            _, _, term, trunc, info = env.step(noop_action(len(env.game.keys)))
        assert trunc and not term and not info["failure"]
    finally:
        env.close()


def test_unknown_game_and_missing_rom_are_clear_errors():
    with pytest.raises(GameError, match="unknown game 'Airstrikr-Genesis'.*did you mean"):
        make_env("Airstrikr-Genesis", EnvConfig())
    with pytest.raises(GameError, match="ROM of 'SuperMarioBros-Nes-v0' is not installed.*import-roms"):
        make_env("SuperMarioBros-Nes", EnvConfig())


def test_frame_skip_sums_the_rewards_of_the_frames_it_skips():
    """One step at frame_skip 4 is four emulator frames with the action held, fire (B, a `press` key) released
    on the fourth: the same reward total and score as four steps at frame_skip 1 with that action, B let go
    on the fourth (the emulator is deterministic for a seed)."""
    source = RandomActions(("B", "UP", "DOWN", "LEFT", "RIGHT"), False, seed=7)
    decisions = [source(None, {}) for _ in range(60)]

    def run(skip: int):
        env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=skip))
        try:
            env.reset(seed=3)
            rewards, scores = [], []
            for action in decisions:
                released = {**action, "keys": np.where(np.arange(5) == 0, 0, action["keys"])}  # B is slot 0
                for frame in range(4 // skip):  # each decision holds its action for 4 frames
                    _, r, term, trunc, info = env.step(released if skip == 1 and frame == 3 else action)
                    rewards.append(r)
                    scores.append(info["score"])
                    assert not (term or trunc)
            return rewards, scores
        finally:
            env.close()

    skipped, skipped_scores = run(4)
    single, single_scores = run(1)
    assert sum(skipped) > 0  # random play scored: the comparison is not of zeros
    assert [sum(single[4 * i:4 * i + 4]) for i in range(len(decisions))] == skipped
    assert single_scores[3::4] == skipped_scores


def hold_fire(annotations=None, steps: int = 300) -> float:
    """Score after B is held for `steps` steps at frame_skip 4."""
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=4), annotations)
    try:
        env.reset(seed=0)
        fire = {**noop_action(len(env.game.keys)), "keys": (np.array(env.game.keys) == "B").astype(np.int8)}
        for _ in range(steps):
            _, _, term, trunc, info = env.step(fire)
            if term or trunc:
                break
        return info["score"]
    finally:
        env.close()


def test_a_press_key_held_over_steps_presses_once_per_step():
    """Airstriker fires once per press of B. Its annotation lists B under `press`, so holding B, as a code
    routed to 'fire' does for several steps, shoots every step; as a held key it shoots once."""
    held = load_annotations()
    held["Airstriker-Genesis"] = held["Airstriker-Genesis"].model_copy(update={"press": []})
    assert hold_fire() > 50
    assert hold_fire(held) == 0


def test_a_press_key_the_game_does_not_have_is_a_clear_error():
    bad = load_annotations()
    bad["Airstriker-Genesis"] = bad["Airstriker-Genesis"].model_copy(update={"press": ["B", "FIRE"]})
    with pytest.raises(ConfigError, match=r"Airstriker-Genesis-v0: its annotation's `press` names \['FIRE'\]"):
        make_env(GAME, EnvConfig(), bad)


def test_the_keys_an_annotation_leaves_out_are_never_pressed():
    """Airstriker is played with B and the four directions (its annotation's `keys`); the core's other
    buttons stay released, and they matter: with X held as well, holding B never fires."""
    assert hold_fire() > 50
    full = load_annotations()
    full["Airstriker-Genesis"] = full["Airstriker-Genesis"].model_copy(update={"keys": []})
    env = make_env(GAME, EnvConfig(frame_size=(32, 32), frame_skip=4), full)
    try:
        assert len(env.game.keys) == 12
        env.reset(seed=0)
        fire_x = {**noop_action(12), "keys": np.isin(np.array(env.game.keys), ["B", "X"]).astype(np.int8)}
        for _ in range(300):
            _, _, term, trunc, info = env.step(fire_x)
            if term or trunc:
                break
        assert info["score"] == 0
    finally:
        env.close()
