"""A gymnasium.Env that plays a native desktop game as a black box (paper Sec. 9.1, "Commercial games").

Each env owns a private virtual display (Xvfb) and the game process in it. A step applies the
unified action as XTest key and pointer events, lets the game run for the spec's `frame_ms`, and
captures the game window; in `stepped` mode the game is paused (SIGSTOP of its process group)
between steps, and a virtual clock (libfaketime) hides the paused time from it, so the game advances
only while a step runs. In `realtime` mode the game never pauses and a step waits for the next
frame boundary. Score, lives and game-over come from pixel readers on the native-resolution window
(ipr_dist/games/readers.py); an optional detector adds object boxes to `info["objects"]`.

Desktop games are not bit-deterministic: the game runs on the wall clock for each step's slice, so
how many frames it renders in a slice varies with the machine's load. benchmarks/desktop_env.py
measures how far two plays of one fixed action sequence agree.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ipr_dist.errors import EnvironmentCrashed, GameError
from ipr_dist.games import workdirs
from ipr_dist.games.actions import unified_action_space
from ipr_dist.games.catalog import GameAnnotation
from ipr_dist.games.desktop_spec import DesktopGameSpec, ResetAction, keysym_name
from ipr_dist.games.outcome import step_outcome
from ipr_dist.games.xdisplay import CACHE, GameProcess, VirtualDisplay

BUTTON_LEFT, BUTTON_RIGHT, SCROLL_UP, SCROLL_DOWN = 1, 3, 4, 5


class DesktopGameEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        spec: DesktopGameSpec,
        frame_size: tuple[int, int] = (128, 128),
        max_episode_steps: int = 14_400,
        failure_on: str = "game_over",
        render_mode: str | None = None,
        annotations: dict[str, GameAnnotation] | None = None,
    ):
        spec.check_installed()
        self.game_spec = spec
        self.game = spec.game_info(annotations)
        self.frame_size = tuple(frame_size)
        self.max_episode_steps = max_episode_steps
        self.failure_on = failure_on
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, shape=(*self.frame_size, 3), dtype=np.uint8)
        self.action_space = unified_action_space(self.game.keys)
        # Declared nondeterministic: the game runs on the wall clock, so one seed does not give one
        # episode (gymnasium's checker then skips its same-seed-same-frames check).
        self.spec = _env_spec(spec, {"frame_size": self.frame_size, "max_episode_steps": max_episode_steps,
                                     "failure_on": failure_on, "annotations": annotations})
        self.readers = spec.pixel_readers()
        self._detector = _load_detector(spec) if spec.detector else None
        self.timing = {"input": 0.0, "game": 0.0, "capture": 0.0, "read": 0.0, "steps": 0}
        prune_stale_workdirs()
        self._workdir = workdirs.make_workdir(WORKDIR_PREFIX + f"{_safe(spec.id)}-")
        self._game: GameProcess | None = None
        self._display: VirtualDisplay | None = None
        self._frame: np.ndarray | None = None
        self._native: np.ndarray | None = None
        self._box: tuple[int, int, int, int] | None = None
        try:
            self._display = VirtualDisplay(spec.screen, spec.id)
            self._keycodes = [self._display.keycode(keysym_name(k)) for k in spec.keys]
        except BaseException:
            self.close()
            raise
        self._held = np.zeros(len(spec.keys), np.int8)
        self._hold = 0
        self._pointer: tuple[int, int] | None = None
        self._t = 0
        self._score, self._lives = 0.0, -1  # after the last step read (reset starts them over)

    # --- the game process ------------------------------------------------------------------------
    def _fail(self, problem: str) -> GameError:
        return GameError(f"game '{self.game_spec.id}': {problem}")

    def _home_template(self) -> Path | None:
        """A HOME prepared once per node by the spec's `prepare` command (e.g. a level database)."""
        spec = self.game_spec
        if not spec.prepare:
            return None
        key = hashlib.sha256(repr((spec.command, spec.prepare, sorted(spec.env.items()))).encode()).hexdigest()[:16]
        template = CACHE / f"{_safe(spec.id)}-{key}"
        if (template / ".ready").is_file():
            return template
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / f"{template.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one env per node prepares; the others wait for it
            if not (template / ".ready").is_file():
                shutil.rmtree(template, ignore_errors=True)
                template.mkdir(parents=True)
                env = {**os.environ, **spec.env, "HOME": str(template), "DISPLAY": self._display.name,
                       "SDL_AUDIODRIVER": "dummy"}
                try:
                    done = subprocess.run(spec.prepare, env=env, cwd=str(spec.spec_dir), capture_output=True,
                                          timeout=600)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise self._fail(f"its prepare command {spec.prepare[0]} failed ({exc})") from None
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()[-1:]
                    raise self._fail(f"its prepare command exited with {done.returncode}"
                                     f"{': ' + tail[0][:200] if tail else ''}")
                (template / ".ready").write_text("")
        return template

    def _start_game(self) -> None:
        spec = self.game_spec
        home = self._workdir / "home"
        shutil.rmtree(home, ignore_errors=True)
        template = self._home_template()
        if template is not None:
            shutil.copytree(template, home, symlinks=True, ignore=shutil.ignore_patterns(".ready"))
        home.mkdir(exist_ok=True)
        for rel, text in spec.home_files.items():
            (home / rel).parent.mkdir(parents=True, exist_ok=True)
            (home / rel).write_text(text)
        self._game = GameProcess(spec.command, spec.env, home, self._display.name, spec.spec_dir, spec.id,
                                 virtual_clock=spec.mode == "stepped" and spec.clock == "virtual")
        deadline = time.monotonic() + spec.startup_timeout_s
        while True:
            if not self._game.alive():
                raise self._fail(f"it exited while starting (code {self._game.proc.returncode}; last output: "
                                 f"{self._game.last_output() or 'none'}); check `command` in its spec")
            win, box = self._display.find_window(spec.window.title, spec.window.class_)
            if win is not None:
                self._box = _clip(box, spec.screen)
                self._window = win
                break
            if time.monotonic() > deadline:
                what = f"title containing {spec.window.title!r}" if spec.window.title else f"class {spec.window.class_!r}"
                raise self._fail(f"no window with {what} appeared within {spec.startup_timeout_s:.0f} s; "
                                 "fix `window` in its spec (xprop WM_NAME WM_CLASS shows a window's names)")
            time.sleep(0.05)

    def _focus(self) -> None:
        """Keyboard focus to the game's window (the display is the env's own: no other window competes);
        retried while the window is still being mapped."""
        spec = self.game_spec
        deadline = time.monotonic() + 10
        while not self._display.focus(self._window):
            self._check_alive()
            win, box = self._display.find_window(spec.window.title, spec.window.class_)
            if win is not None:
                self._window, self._box = win, _clip(box, spec.screen)
            if time.monotonic() > deadline:
                raise self._fail("its window never took the keyboard focus; check `window` in its spec")
            time.sleep(0.05)

    def _stop_game(self) -> None:
        if self._game is not None:
            self._game.kill()
            self._game = None

    def _check_alive(self) -> None:
        self._check_display()
        if self._game is None or not self._game.alive():
            raise EnvironmentCrashed(f"game '{self.game_spec.id}': the game process exited "
                                     f"(last output: {self._game.last_output() if self._game else 'none'})")

    # --- input -----------------------------------------------------------------------------------
    def _to_root(self, xy) -> tuple[int, int]:
        x, y, w, h = self._box
        return int(x + float(xy[0]) * (w - 1)), int(y + float(xy[1]) * (h - 1))

    def _apply(self, action: dict[str, Any]) -> None:
        d = self._display
        keys = np.asarray(action["keys"]).reshape(-1).astype(np.int8)
        for i, on in enumerate(keys):
            if on != self._held[i]:
                d.key(self._keycodes[i], bool(on))
        self._held = keys
        if self.game_spec.mouse:
            pos = self._to_root(np.clip(np.asarray(action["mouse"], np.float64), 0.0, 1.0))
            if pos != self._pointer:
                d.move(*pos)
                self._pointer = pos
            click, right, hold = (int(b) for b in np.asarray(action["mouse_buttons"]).reshape(-1))
            if hold != self._hold:
                d.button(BUTTON_LEFT, bool(hold))
                self._hold = hold
            if click and not hold:
                d.button(BUTTON_LEFT, True)
                d.button(BUTTON_LEFT, False)
            if right:
                d.button(BUTTON_RIGHT, True)
                d.button(BUTTON_RIGHT, False)
            scroll = int(action["scroll"])
            if scroll:
                d.button(SCROLL_UP if scroll < 0 else SCROLL_DOWN, True)
                d.button(SCROLL_UP if scroll < 0 else SCROLL_DOWN, False)
        d.flush()

    def _release_all(self) -> None:
        for i, on in enumerate(self._held):
            if on:
                self._display.key(self._keycodes[i], False)
        if self._hold:
            self._display.button(BUTTON_LEFT, False)
        self._held[:] = 0
        self._hold = 0
        self._display.flush()

    def _play_sequence(self, sequence: list[ResetAction]) -> None:
        d = self._display
        for act in sequence:
            if act.wait_ms is not None:
                used = self._game.cpu_seconds() if act.cpu_ms is not None else 0.0
                time.sleep(act.wait_ms / 1000)
                deadline = time.monotonic() + act.timeout_ms / 1000
                while act.cpu_ms is not None and self._game.cpu_seconds() - used < act.cpu_ms / 1000:
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise self._fail(f"it used under {act.cpu_ms} ms of CPU in {act.timeout_ms} ms of its reset "
                                         "sequence's wait; lower cpu_ms (or raise timeout_ms) in its spec")
                    time.sleep(0.05)
            elif act.wait_while is not None:
                reader = self.readers[act.wait_while]
                deadline = time.monotonic() + act.timeout_ms / 1000
                while reader.read(d.grab(self._box)):
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise self._fail(f"its {act.wait_while} reader still fired {act.timeout_ms} ms into the reset "
                                         "sequence; check the reader's region and the reset steps in its spec")
                    time.sleep(0.05)
            elif act.key is not None:
                code = d.keycode(keysym_name(act.key))
                d.key(code, True)
                d.flush()
                time.sleep(0.05)
                d.key(code, False)
            else:
                d.move(*self._to_root(act.click))
                d.button(BUTTON_LEFT, True)
                d.flush()
                time.sleep(0.05)
                d.button(BUTTON_LEFT, False)
            d.flush()
            self._check_alive()

    # --- observation -----------------------------------------------------------------------------
    def _observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        import cv2

        t0 = time.perf_counter()
        self._native = self._display.grab(self._box)
        h, w = self.frame_size
        self._frame = cv2.resize(self._native, (w, h), interpolation=cv2.INTER_AREA)
        t1 = time.perf_counter()
        info = self._read(self._native)
        self.timing["capture"] += t1 - t0
        self.timing["read"] += time.perf_counter() - t1
        return self._frame, info

    def _read(self, frame: np.ndarray) -> dict[str, Any]:
        r = self.readers
        score = r["score"].read(frame) if "score" in r else 0.0
        if score is None:  # the digits were not found this frame (covered, blinking): keep the last score
            score = self._score
        lives = r["lives"].read(frame) if "lives" in r else None
        game_over = bool(r["game_over"].read(frame))
        failure = bool(r["failure"].read(frame)) if "failure" in r else game_over
        info = {"lives": int(lives) if lives is not None else -1, "score": float(score), "game_over": game_over,
                "failure": failure, "step": self._t}
        if self._detector is not None:
            info["objects"] = _check_boxes(self._detector(frame), self.game_spec.id)
        return info

    # --- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        spec = self.game_spec
        self._check_display()
        if spec.reset.restart or self._game is None or not self._game.alive():
            self._stop_game()
            self._start_game()
        else:
            self._game.resume()
        self._release_all()
        self._pointer = None
        self._focus()
        self._play_sequence(spec.reset.sequence)
        self._focus()  # a game that maps a new window or grabs focus during its start-up keeps the keyboard
        if spec.mode == "stepped":
            self._game.pause()
        self._t = 0
        self._score = 0.0
        obs, info = self._observe()
        self._score, self._lives = info["score"], info["lives"]
        self._next_frame = time.monotonic() + spec.frame_ms / 1000
        return obs, info

    def _check_display(self) -> None:
        if self._display is None or not self._display.alive():
            raise EnvironmentCrashed(f"game '{self.game_spec.id}': its virtual display (Xvfb) died")

    def step(self, action: dict[str, Any]):
        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        self._check_alive()
        t0 = time.perf_counter()
        self._apply(action)
        t1 = time.perf_counter()
        if self.game_spec.mode == "stepped":
            self._game.resume()
            time.sleep(self.game_spec.frame_ms / 1000)
            self._game.pause()
        else:
            time.sleep(max(0.0, self._next_frame - time.monotonic()))
            self._next_frame = max(self._next_frame + self.game_spec.frame_ms / 1000, time.monotonic())
        self.timing["input"] += t1 - t0
        self.timing["game"] += time.perf_counter() - t1
        self.timing["steps"] += 1
        self._check_alive()
        self._t += 1
        obs, info = self._observe()
        reward, terminated, truncated = step_outcome(info, self._score, self._lives, self.failure_on, self._t,
                                                     self.max_episode_steps)
        self._score, self._lives = info["score"], info["lives"]
        return obs, reward, terminated, truncated, info

    def render(self):
        return None if self._frame is None or self.render_mode != "rgb_array" else self._frame.copy()

    def native_frame(self) -> np.ndarray | None:
        """The last captured window at the display's resolution (what the pixel readers see)."""
        return None if self._native is None else self._native.copy()

    def close(self):
        self._stop_game()
        if self._display is not None:
            self._display.close()
            self._display = None
        if getattr(self, "_workdir", None) is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _env_spec(spec: DesktopGameSpec, kwargs: dict[str, Any]):
    from gymnasium.envs.registration import EnvSpec

    entry = "ipr_dist.games.desktop_env:DesktopGameEnv"
    try:
        return EnvSpec(id=spec.id, entry_point=entry, nondeterministic=True, kwargs={"spec": spec, **kwargs})
    except gym.error.Error:  # an id gymnasium cannot parse: use a neutral one
        return EnvSpec(id="DesktopGame", entry_point=entry, nondeterministic=True, kwargs={"spec": spec, **kwargs})


WORKDIR_PREFIX = "ipr-desktop-"


def prune_stale_workdirs(min_age_s: float = 60.0) -> int:
    """Delete the workdirs (private HOME, clock, game log: ~12 MB each) that desktop envs of processes no
    longer alive left behind. Returns how many went."""
    return workdirs.prune_stale_workdirs(WORKDIR_PREFIX, min_age_s, legacy_marker="home")


def _safe(game_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in game_id)[:64]


def _clip(box: tuple[int, int, int, int], screen: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window's rectangle cut to the screen (a window larger than the display is captured in part)."""
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(screen[0], x + w), min(screen[1], y + h)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _load_detector(spec: DesktopGameSpec):
    module, _, name = spec.detector.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise GameError(f"game '{spec.id}': detector {spec.detector!r} cannot be loaded ({exc}); give "
                        "`package.module:function` of an importable function") from None
    if not callable(fn):
        raise GameError(f"game '{spec.id}': detector {spec.detector!r} is not a function")
    return fn


def _check_boxes(boxes: Any, game_id: str) -> list[dict[str, Any]]:
    out = []
    try:
        for b in boxes:
            box = [float(v) for v in b["box"]]
            if len(box) != 4:
                raise ValueError("box needs 4 numbers")
            out.append({"label": str(b["label"]), "box": box, "score": float(b.get("score", 1.0))})
    except (TypeError, KeyError, ValueError) as exc:
        raise GameError(f"game '{game_id}': its detector returned {boxes!r:.80}, not a list of "
                        f"{{label, box: [x0, y0, x1, y1], score}} ({exc})") from None
    return out
