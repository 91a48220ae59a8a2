"""A gymnasium.Env that plays one HTML/Canvas game page in Chromium through Playwright.

Time is virtual: the page's clock (clock.js) is installed before the game loads and moves only when
a step advances it by the spec's `frame_ms`, so a step is deterministic and independent of machine
speed. A step is one call into the page (bridge.js): apply the action as DOM input events, advance
the clock, read the game variables and the canvas scaled to the observation size. `ipr record` puts
the same two scripts into the game a person plays in their own browser, and reads the page's answers
with the same `HtmlReadout`. The page can load
only the game's own files: every other request is aborted (and counted in `blocked_requests`).
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
from typing import Any
from urllib.parse import unquote, urlencode, urlparse

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ipr_dist.errors import EnvironmentCrashed, GameError
from ipr_dist.games import workdirs
from ipr_dist.games.actions import unified_action_space
from ipr_dist.games.catalog import GameAnnotation
from ipr_dist.games.html_spec import HTML_DIR, HtmlGameSpec, key_event, legacy_codes
from ipr_dist.games.outcome import step_outcome

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic", "--mute-audio",
    # Defence in depth under request routing: no host name resolves except the local ones.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
GAME_ORIGIN = "http://ipr-game.invalid"  # the game's own files are served from here, by the router
PAUSED_AT = 1_700_000_000  # seconds since the epoch the page's Date starts at (fixed: determinism)
# Run in every game page before the game's own scripts: the virtual clock, started, then the bridge.
PAGE_SCRIPTS = "\n".join([(HTML_DIR / "clock.js").read_text(), f"window.__iprClock.install({PAUSED_AT * 1000});",
                          (HTML_DIR / "bridge.js").read_text()])
NO_ACTION = {"keys": [], "mouse": [0.5, 0.5], "mouse_buttons": [0, 0, 0], "scroll": 0}


def page_seed(seed: int | None) -> int:
    """The seed a game page gets for an episode (its `?seed=` parameter) from the env's reset seed."""
    from gymnasium.utils.seeding import np_random

    return int(np_random(seed)[0].integers(0, 2**31 - 1))


class HtmlReadout:
    """What a game page's bridge is told (`bridge_config`) and how its answers become an observation
    and the env's info (score, lives, game over, failure): one reading for the environment and for
    `ipr record`'s in-page play."""

    def __init__(self, spec: HtmlGameSpec, frame_size: tuple[int, int]):
        self.spec = spec
        self.frame_size = tuple(frame_size)
        self.config = {
            "canvas": spec.canvas,
            "keys": [[*key_event(k), *legacy_codes(k)] for k in spec.keys],
            "mouse": spec.mouse,
            "frame_ms": spec.frame_ms,
            "width": self.frame_size[1],
            "height": self.frame_size[0],
            "exprs": spec.expressions(),
        }
        # Variables read from the canvas's pixels: the page cuts each reader's region out at the canvas's
        # resolution, so here each reader reads the whole of what it is given.
        readers = spec.pixel_readers()
        self.config["regions"] = [list(r.region) for r in readers.values()]
        self._readers = {k: r.model_copy(update={"region": (0.0, 0.0, 1.0, 1.0)}) for k, r in readers.items()}

    def fail(self, problem: str) -> GameError:
        return GameError(f"game '{self.spec.id}': {problem}")

    def observe(self, raw: dict) -> tuple[np.ndarray, dict[str, Any]]:
        """(RGB frame, variables) of one answer of bridge.step."""
        h, w = self.frame_size
        rgba = np.frombuffer(base64.b64decode(raw["frame"]), np.uint8).reshape(h, w, 4)
        frame = rgba[..., :3].copy()
        vars = dict(raw["vars"])
        for (name, reader), region in zip(self._readers.items(), raw.get("regions", [])):
            pixels = np.frombuffer(base64.b64decode(region["data"]), np.uint8).reshape(region["h"], region["w"], 4)
            vars[name] = reader.read(pixels[..., :3])
        return frame, vars

    def _number(self, vars: dict, name: str, required: bool) -> float | None:
        v = vars.get(name)
        if isinstance(v, dict) and "error" in v:
            raise self.fail(f"its {name} expression `{self.config['exprs'].get(name, 'pixel reader')}` throws: {v['error']}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            if required or v is not None:
                raise self.fail(f"it never exposes its {name}: `{self.config['exprs'].get(name, 'pixel reader')}` gave "
                                f"{v!r}, not a number; fix the expression in its spec")
            return None
        return float(v)

    def _flag(self, vars: dict, name: str) -> bool:
        v = vars.get(name)
        if isinstance(v, dict) and "error" in v:
            raise self.fail(f"its {name} expression `{self.config['exprs'].get(name, 'pixel reader')}` throws: {v['error']}")
        return bool(v)

    def info(self, vars: dict, t: int, last_score: float) -> dict[str, Any]:
        """The env's info at step `t`; `last_score` stands in while a score reader finds no digits."""
        spec = self.spec
        if not spec.has_score:
            score = 0.0
        elif "score" in self._readers and vars.get("score") is None:  # digits not found this frame: keep the last
            score = last_score
        else:
            score = self._number(vars, "score", required=True)
        lives = self._number(vars, "lives", required=False) if spec.lives is not None else None
        game_over = self._flag(vars, "game_over")
        failure = self._flag(vars, "failure") if spec.failure is not None else game_over
        return {"lives": int(lives) if lives is not None else -1, "score": score, "game_over": game_over,
                "failure": failure, "step": t}


BROWSER_WORKDIR_PREFIX = "ipr-browser-"
MAX_BROWSER_TMPDIR = 56  # + "/org.chromium.Chromium.XXXXXX/SingletonSocket" (45) < 108, a unix socket path's limit


class _SharedBrowser:
    """One Playwright driver and one Chromium per process, shared by its environments (Playwright's
    sync API allows one driver per thread); each environment has its own browser context.

    The driver and Chromium keep their temporary files (a profile per launch, artifacts) in a workdir of
    this process (ipr_dist/games/workdirs.py): closed, the driver removes them; killed with its actor, it
    cannot, and the next browser started on the node removes the folders of dead processes."""

    pw = None
    browser = None
    users = 0
    workdir = None

    @classmethod
    def acquire(cls, executable: str, game_id: str):
        from playwright.sync_api import sync_playwright

        if cls.browser is None or not cls.browser.is_connected():
            if cls.pw is None:
                workdirs.prune_stale_workdirs(BROWSER_WORKDIR_PREFIX)
                cls.workdir = workdirs.make_workdir(BROWSER_WORKDIR_PREFIX)
                saved = os.environ.get("TMPDIR")
                # the driver (and Chromium, its child) inherit it; Chromium's socket paths under it must stay
                # within a unix socket's 107 bytes, so a long temp dir keeps the driver's own default
                if len(str(cls.workdir)) <= MAX_BROWSER_TMPDIR:
                    os.environ["TMPDIR"] = str(cls.workdir)
                try:
                    cls.pw = sync_playwright().start()
                finally:
                    if saved is None:
                        os.environ.pop("TMPDIR", None)
                    else:
                        os.environ["TMPDIR"] = saved
            try:
                cls.browser = cls.pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
            except Exception as exc:
                cls._stop()
                raise GameError(f"game '{game_id}': cannot start Chromium at {executable} "
                                f"({str(exc).splitlines()[0]}); run scripts/setup.sh, which installs it") from None
        cls.users += 1
        return cls.browser

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users <= 0:
            cls._stop()

    @classmethod
    def _stop(cls) -> None:
        for close in (lambda: cls.browser and cls.browser.close(), lambda: cls.pw and cls.pw.stop()):
            try:
                close()
            except Exception:  # already gone (crashed): nothing left to close
                pass
        if cls.workdir is not None:
            shutil.rmtree(cls.workdir, ignore_errors=True)
        cls.pw, cls.browser, cls.users, cls.workdir = None, None, 0, None


class HtmlGameEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(
        self,
        spec: HtmlGameSpec,
        frame_size: tuple[int, int] = (128, 128),
        max_episode_steps: int = 14_400,
        failure_on: str = "game_over",
        render_mode: str | None = None,
        annotations: dict[str, GameAnnotation] | None = None,
        executable: str | None = None,
    ):
        spec.check_entry()
        self.game_spec = spec
        self.game = spec.game_info(annotations)
        self.frame_size = tuple(frame_size)
        self.max_episode_steps = max_episode_steps
        self.failure_on = failure_on
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, shape=(*self.frame_size, 3), dtype=np.uint8)
        self.action_space = unified_action_space(self.game.keys)
        self.blocked_requests: list[str] = []
        self._errors: list[str] = []
        self._crashed = False
        from ipr_dist.games.browser import find_browser

        self._browser = _SharedBrowser.acquire(executable or find_browser(), spec.id)
        self._context = self._browser.new_context(viewport={"width": 640, "height": 480}, service_workers="block")
        self._context.add_init_script(PAGE_SCRIPTS)
        self._context.route("**/*", self._route)
        if hasattr(self._context, "route_web_socket"):
            self._context.route_web_socket(re.compile(".*"), self._block_websocket)
        self.page = self._context.new_page()
        self.page.on("pageerror", lambda err: self._errors.append(str(err).splitlines()[0] if str(err) else repr(err)))
        self.page.on("crash", lambda _: setattr(self, "_crashed", True))
        self.readout = HtmlReadout(spec, self.frame_size)
        self._t = 0
        self._score, self._lives = 0.0, -1  # after the last step read (reset starts them over)
        self._frame: np.ndarray | None = None

    # --- network: the game's own files only ------------------------------------------------------
    def _route(self, route) -> None:
        url = route.request.url
        spec = self.game_spec
        if spec.url:
            allowed = urlparse(spec.url)
            u = urlparse(url)
            if (u.scheme, u.hostname, u.port) == (allowed.scheme, allowed.hostname, allowed.port):
                route.continue_()
                return
        elif url.startswith(GAME_ORIGIN + "/"):
            found = spec.read_file(unquote(urlparse(url).path).lstrip("/"))
            if found is not None:
                route.fulfill(status=200, body=found[0], content_type=found[1])
            else:
                route.fulfill(status=404, body=b"not found")
            return
        self.blocked_requests.append(url)
        route.abort("blockedbyclient")

    def _block_websocket(self, ws) -> None:
        self.blocked_requests.append(ws.url)
        ws.close()

    # --- page calls ------------------------------------------------------------------------------
    def _call(self, expression: str, arg: Any = None) -> Any:
        from playwright.sync_api import Error as PlaywrightError

        try:
            result = self.page.evaluate(expression, arg)
        except PlaywrightError as exc:
            text = str(exc)
            if self._crashed or any(s in text for s in ("Target crashed", "has been closed", "Target closed")):
                raise EnvironmentCrashed(f"game '{self.game_spec.id}': browser or page crashed ({text.splitlines()[0]})") from None
            first = next((line for line in text.splitlines() if line.strip()), text)
            raise self.readout.fail(f"the page threw a JavaScript error: {first.removeprefix('Error: page.evaluate: ')}") from None
        if self._errors:
            raise self.readout.fail(f"the page threw a JavaScript error: {self._errors[0]}")
        return result

    # --- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(0, 2**31 - 1))  # = page_seed(seed) when a seed is given
        query = f"?{urlencode({self.game_spec.seed_param: episode_seed})}" if self.game_spec.seed_param else ""
        url = (self.game_spec.url or f"{GAME_ORIGIN}/{self.game_spec.entry_path.name}") + query
        self._errors.clear()
        self._score = 0.0
        try:
            response = self.page.goto(url, wait_until="load")
        except Exception as exc:
            if self._crashed:
                raise EnvironmentCrashed(f"game '{self.game_spec.id}': page crashed while loading") from None
            raise self.readout.fail(f"cannot load {url} ({str(exc).splitlines()[0]})") from None
        if response is not None and not response.ok:
            raise self.readout.fail(f"loading {url} gave HTTP {response.status}")
        setup = self._call("cfg => window.__iprBridge.setup(cfg)", self.readout.config)
        if "error" in setup:
            raise self.readout.fail(setup["error"])
        self._t = 0
        obs, vars = self._observe(self._call("a => window.__iprBridge.step(a)", NO_ACTION))
        info = self.readout.info(vars, self._t, self._score)
        self._score, self._lives = info["score"], info["lives"]
        return obs, info

    def step(self, action: dict[str, Any]):
        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        payload = {
            "keys": [int(k) for k in np.asarray(action["keys"]).reshape(-1)],
            "mouse": [float(x) for x in np.clip(np.asarray(action["mouse"], np.float64), 0.0, 1.0)],
            "mouse_buttons": [int(b) for b in np.asarray(action["mouse_buttons"]).reshape(-1)],
            "scroll": int(action["scroll"]),
        }
        obs, vars = self._observe(self._call("a => window.__iprBridge.step(a)", payload))
        self._t += 1
        info = self.readout.info(vars, self._t, self._score)
        reward, terminated, truncated = step_outcome(info, self._score, self._lives, self.failure_on, self._t,
                                                     self.max_episode_steps)
        self._score, self._lives = info["score"], info["lives"]
        return obs, reward, terminated, truncated, info

    def _observe(self, raw: dict) -> tuple[np.ndarray, dict[str, Any]]:
        self._frame, vars = self.readout.observe(raw)
        return self._frame, vars

    def render(self):
        return None if self._frame is None or self.render_mode != "rgb_array" else self._frame.copy()

    def close(self):
        if getattr(self, "_browser", None) is None:
            return
        try:
            self._context.close()
        except Exception:  # the browser is already gone (crashed)
            pass
        self._browser = None
        _SharedBrowser.release()
