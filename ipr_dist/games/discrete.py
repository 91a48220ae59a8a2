"""A finite action menu per game and a gymnasium wrapper around it, for the methods that need a
discrete action space (PPO and DQN through RLlib, the prompt-only VLM's named actions).

The menu: no-op, each of the game's keys alone, and for pointer games a move and a press-and-hold
at each cell centre of a 3x3 grid over the canvas. The wrapper keeps the unified action underneath,
so a baseline plays exactly the environment every other method plays.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import gymnasium as gym
import numpy as np

from ipr_dist.games.actions import keys_action, noop_action
from ipr_dist.games.catalog import GameInfo

GRID = (1 / 6, 1 / 2, 5 / 6)
LEVELS = ("survival", "curiosity", "utility")


def action_menu(game: GameInfo) -> list[tuple[str, dict[str, Any]]]:
    """(name, unified action) pairs; names are what a language model is shown and answers with."""
    menu = [("noop", noop_action(len(game.keys)))]
    menu += [(f"press {k}", keys_action(game.keys, [k])) for k in game.keys]
    if game.uses_mouse:
        for y in GRID:
            for x in GRID:
                point = np.array([x, y], np.float32)
                menu.append((f"move {x:.2f},{y:.2f}", {**noop_action(len(game.keys)), "mouse": point}))
                hold = {**noop_action(len(game.keys)), "mouse": point, "mouse_buttons": np.array([1, 0, 1], np.int8)}
                menu.append((f"hold {x:.2f},{y:.2f}", hold))
    return menu


class MenuEnv(gym.Wrapper):
    """Discrete(len(menu)) actions over a unified-action game env, with the reward of one level:
    survival +1 per step alive (0 on the failing step), utility the game's own reward, curiosity a
    count-based novelty bonus 1/sqrt(N(cell)) on a coarse 8x8, 4-grey-level hash of the frame."""

    def __init__(self, env: gym.Env, level: str = "utility", float_obs: bool = False):
        super().__init__(env)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.menu = action_menu(env.game)
        self.action_space = gym.spaces.Discrete(len(self.menu))
        # float_obs: frames as float32 in [0, 1], what RLlib's default CNN encoder takes.
        self.float_obs = float_obs
        shape = env.observation_space.shape
        self.observation_space = (gym.spaces.Box(0.0, 1.0, shape, np.float32) if float_obs
                                  else env.observation_space)
        self.counts: Counter = Counter()

    def _obs(self, frame: np.ndarray) -> np.ndarray:
        return frame.astype(np.float32) / 255.0 if self.float_obs else frame

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), info

    def _cell(self, frame: np.ndarray) -> bytes:
        h, w = frame.shape[:2]
        small = frame[:: max(h // 8, 1), :: max(w // 8, 1)].mean(axis=2)
        return (small // 64).astype(np.uint8).tobytes()

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(self.menu[int(action)][1])
        info = {**info, "game_reward": reward}
        if self.level == "survival":
            reward = 0.0 if info.get("failure") else 1.0
        elif self.level == "curiosity":
            cell = self._cell(obs)
            self.counts[cell] += 1
            reward = 1.0 / np.sqrt(self.counts[cell])
        return self._obs(obs), float(reward), terminated, truncated, info
