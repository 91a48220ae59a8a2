"""A gymnasium.Env over stable-retro with the unified action type.

Observation: the RGB frame resized to `frame_size`. Action: the unified dict (games/actions.py), of
which retro games read only `keys`: the game's keys (every named button of the core, or the
buttons its annotation's `keys` lists; the others stay released). `info` carries lives, score, game_over, step and failure (the
irreversible failure that Survival measures). A step repeats its keys for `frame_skip` frames, except that keys
the game acts on when pressed (its annotation's `press`, e.g. a fire button) are released on the last
one, so holding such a key over steps presses it once per step. Emulation is deterministic; the seed
picks a number of no-op frames after reset, so different seeds give different episodes and the same seed and the
same actions give the same frames.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ipr_dist.games.actions import unified_action_space
from ipr_dist.games.catalog import GameAnnotation, GameInfo, require_installed, resolve_retro_id, retro_game_info

INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}


def resize_frame(frame: np.ndarray, size: tuple[int, int], interpolation: str = "linear") -> np.ndarray:
    """RGB frame resized to (height, width)."""
    h, w = size
    if frame.shape[:2] == (h, w):
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, (w, h), interpolation=INTERPOLATION[interpolation])


class RetroGameEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(
        self,
        game_id: str,
        frame_size: tuple[int, int] = (128, 128),
        frame_skip: int = 1,
        max_episode_steps: int = 14_400,
        failure_on: str = "game_over",
        noop_reset_max: int = 30,
        interpolation: str = "linear",
        state: str | None = None,
        render_mode: str | None = None,
        annotations: dict[str, GameAnnotation] | None = None,
    ):
        import stable_retro as retro

        self.game: GameInfo = retro_game_info(resolve_retro_id(game_id), annotations)
        require_installed(self.game)
        self.frame_size = tuple(frame_size)
        self.frame_skip = frame_skip
        self.max_episode_steps = max_episode_steps
        self.failure_on = failure_on
        self.noop_reset_max = noop_reset_max
        self.interpolation = interpolation
        self.render_mode = render_mode
        kwargs: dict[str, Any] = {"state": state} if state else {}
        self._retro = retro.make(
            self.game.id,
            inttype=retro.data.Integrations.ALL,
            use_restricted_actions=retro.Actions.FILTERED,
            render_mode=None,  # the default opens a window
            **kwargs,
        )
        buttons = self._retro.unwrapped.buttons
        # Our `keys` vector holds the game's keys (all the core's named buttons, or the annotation's `keys`);
        # map it back to the emulator's mask, whose other slots stay released.
        self._key_slots = np.array([buttons.index(k) for k in self.game.keys], dtype=np.int64)
        self._mask = np.zeros(len(buttons), dtype=np.uint8)
        # Keys the game acts on when pressed (annotation `press`) are released on a step's last frame.
        press = self.game.annotation.press if self.game.annotation else []
        self._hold = np.ones(len(buttons), dtype=np.uint8)
        self._hold[[buttons.index(k) for k in press]] = 0
        self.observation_space = spaces.Box(0, 255, shape=(*self.frame_size, 3), dtype=np.uint8)
        self.action_space = unified_action_space(self.game.keys)
        self._raw: np.ndarray | None = None
        self._t = 0
        self._lives: int | None = None

    # ------------------------------------------------------------------------------------------
    def _variables(self) -> dict[str, Any]:
        return dict(self._retro.unwrapped.data.lookup_all())

    def _info(self, variables: dict[str, Any], game_over: bool, failure: bool) -> dict[str, Any]:
        lives = variables.get("lives")
        score = variables.get("score")
        return {
            "lives": int(lives) if lives is not None else -1,
            "score": float(score) if score is not None else math.nan,
            "game_over": bool(game_over),
            "failure": bool(failure),
            "step": self._t,
        }

    def _obs(self) -> np.ndarray:
        return resize_frame(self._raw, self.frame_size, self.interpolation)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._raw, _ = self._retro.reset()
        self._mask[:] = 0
        for _ in range(int(self.np_random.integers(0, self.noop_reset_max + 1))):
            self._raw, _, done, _, _ = self._retro.step(self._mask)
            if done:  # a game that ends during no-ops is started again without them
                self._raw, _ = self._retro.reset()
                break
        self._t = 0
        variables = self._variables()
        self._lives = variables.get("lives")
        return self._obs(), self._info(variables, False, False)

    def step(self, action: dict[str, Any]):
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        self._mask[:] = 0
        self._mask[self._key_slots] = np.asarray(action["keys"], dtype=np.uint8)
        reward = 0.0
        done = False
        info: dict[str, Any] = {}
        for frame in range(self.frame_skip):
            last = frame == self.frame_skip - 1 and frame > 0
            self._raw, r, done, _, info = self._retro.step(self._mask * self._hold if last else self._mask)
            reward += float(r)
            if done:
                break
        self._t += 1
        lives = info.get("lives")
        life_lost = lives is not None and self._lives is not None and lives < self._lives
        self._lives = lives
        failure = done or (self.failure_on == "life_lost" and life_lost)
        terminated = failure
        truncated = not terminated and self._t >= self.max_episode_steps
        return self._obs(), reward, terminated, truncated, self._info(info, done, failure)

    def snapshot(self) -> tuple:
        """The game's whole state (the emulator's, the current frame, the step count and lives), which
        `restore` puts back: several futures played from one state (benchmarks/candidate_outcomes.py)."""
        if self._raw is None:
            raise RuntimeError("call reset() before snapshot()")
        return self._retro.unwrapped.em.get_state(), self._raw.copy(), self._t, self._lives

    def restore(self, snapshot: tuple) -> np.ndarray:
        """Back to a `snapshot` of this env; returns its observation. The emulator's reward and done
        tracking restart from the restored memory, as after a reset."""
        state, raw, t, lives = snapshot
        unwrapped = self._retro.unwrapped
        unwrapped.em.set_state(state)
        unwrapped.data.reset()
        unwrapped.data.update_ram()
        self._raw, self._t, self._lives = raw.copy(), t, lives
        return self._obs()

    def render(self):
        if self.render_mode == "rgb_array" and self._raw is not None:
            return self._raw.copy()
        return None

    def close(self):
        retro_env = getattr(self, "_retro", None)
        if retro_env is not None:
            retro_env.close()
            self._retro = None
