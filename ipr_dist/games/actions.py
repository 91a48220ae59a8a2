"""The unified action type every game kind shares (paper Sec. 9.1).

An action is a dict of fixed-shape arrays:
  keys           multi-hot vector over the game's own buttons/keys, in the game's order
  mouse          pointer position normalised to [0, 1]^2 (scaled to the canvas by HTML games)
  mouse_buttons  flags [left click, right click, hold]
  scroll         -1 (up), 0, +1 (down)
Retro games use only `keys`; HTML and desktop games use all four. The same space type for every
game means the trajectory store, the router and the policy never special-case a game kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from gymnasium import spaces

MOUSE_BUTTONS = ("left", "right", "hold")
POINTER_FLAGS = ("click", "right_click", "hold")  # the same flags as annotations' `controls` name them
CENTER = (0.5, 0.5)


def unified_action_space(keys: Sequence[str], seed: int | None = None) -> spaces.Dict:
    """The action space of a game whose own controls are `keys`."""
    space = spaces.Dict(
        {
            # A mouse-only game has no keys; gymnasium's MultiBinary needs n >= 1, so an empty Box stands in.
            "keys": spaces.MultiBinary(len(keys)) if keys else spaces.Box(0, 1, shape=(0,), dtype=np.int8),
            "mouse": spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32),
            "mouse_buttons": spaces.MultiBinary(len(MOUSE_BUTTONS)),
            "scroll": spaces.Discrete(3, start=-1),
        }
    )
    if seed is not None:
        space.seed(seed)
    return space


def noop_action(num_keys: int) -> dict[str, Any]:
    """No key pressed, pointer centred, no mouse button, no scroll."""
    return {
        "keys": np.zeros(num_keys, dtype=np.int8),
        "mouse": np.array(CENTER, dtype=np.float32),
        "mouse_buttons": np.zeros(len(MOUSE_BUTTONS), dtype=np.int8),
        "scroll": 0,
    }


def keys_action(keys: Sequence[str], pressed: Sequence[str]) -> dict[str, Any]:
    """The action pressing the named keys (and nothing else)."""
    unknown = [k for k in pressed if k not in keys]
    if unknown:
        raise ValueError(f"keys {unknown} are not among this game's controls {list(keys)}")
    action = noop_action(len(keys))
    for k in pressed:
        action["keys"][list(keys).index(k)] = 1
    return action


class ActionSource(Protocol):
    """Chooses the next action from the current observation; `name` is stored as the step's source."""

    name: str

    def __call__(self, obs: np.ndarray, info: dict[str, Any]) -> dict[str, Any]: ...


class RandomActions:
    """Each key pressed with probability 1/2 per step, independently (stable-retro's random agent);
    the mouse is moved and clicked uniformly at random only for games that use it. Draws come in
    blocks, which keeps the per-step cost off the environment's hot loop."""

    name = "random"
    BLOCK = 1024

    def __init__(self, keys: Sequence[str], uses_mouse: bool, seed: int):
        self.num_keys = len(keys)
        self.uses_mouse = uses_mouse
        self.rng = np.random.default_rng(seed)
        self._noop = noop_action(self.num_keys)
        self._i = self.BLOCK

    def _refill(self) -> None:
        n = self.BLOCK
        self._keys = self.rng.integers(0, 2, (n, self.num_keys), dtype=np.int8)
        if self.uses_mouse:
            self._mouse = self.rng.random((n, 2), dtype=np.float32)
            self._buttons = self.rng.integers(0, 2, (n, len(MOUSE_BUTTONS)), dtype=np.int8)
            self._scroll = self.rng.integers(-1, 2, n)
        self._i = 0

    def __call__(self, obs: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        if self._i == self.BLOCK:
            self._refill()
        i = self._i
        self._i += 1
        if not self.uses_mouse:
            return {**self._noop, "keys": self._keys[i]}
        return {"keys": self._keys[i], "mouse": self._mouse[i], "mouse_buttons": self._buttons[i],
                "scroll": int(self._scroll[i])}


class ScriptedActions:
    """Cycles through key combinations, holding each for `hold` steps; combinations naming keys the
    game does not have are refused up front."""

    name = "scripted"

    def __init__(self, keys: Sequence[str], combos: Sequence[Sequence[str]], hold: int):
        if not combos:
            raise ValueError("a scripted action source needs at least one key combination")
        self.actions = [keys_action(keys, combo) for combo in combos]
        self.hold = hold
        self.t = 0

    def __call__(self, obs: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        action = self.actions[(self.t // self.hold) % len(self.actions)]
        self.t += 1
        return action
