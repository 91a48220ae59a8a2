"""Desktop game specs: the YAML that makes a native game binary a black-box environment (paper Sec. 9.1,
"Commercial games"): the command that starts it on a private virtual display, the window to capture,
the keys and pointer it takes, how long a step lasts in game time, how an episode starts, and pixel
readers for the state the binary does not expose.

    id: Neverball-Easy
    command: [/usr/games/neverball, --level, map-easy/easy.sol]
    env: {SDL_AUDIODRIVER: dummy}            # extra environment variables for the game
    home_files: {.neverball/neverballrc: "width 320\\n..."}   # written into the game's private HOME
    prepare: null                            # command run once per node into a HOME template (caches)
    screen: [320, 240]                       # the virtual display's size (the game's window fills it)
    window: {class: neverball}               # window to capture: {title: ...} or {class: ...} (substring)
    keys: [ArrowUp, ArrowDown, ArrowLeft, ArrowRight]
    mouse: false
    frame_ms: 33                             # game milliseconds per env step
    mode: stepped                            # stepped (paused between steps) | realtime
    reset: {restart: true, sequence: [{wait_ms: 1500}, {click: [0.5, 0.5]}, {wait_while: game_over}]}
    readers: {game_over: {template: fallout.png, region: [0.1, 0.3, 0.9, 0.7]}}
    score: none                              # or a reader: digits / count; none = no readable score
    detector: null                           # optional "package.module:function" frame -> boxes
    annotation: {...}

The project's own desktop specs (ipr_dist/games/desktop/) are registered through these same files.
"""

from __future__ import annotations

import functools
import shlex
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipr_dist.errors import GameError
from ipr_dist.games.catalog import GameAnnotation, GameInfo
from ipr_dist.games.html_spec import key_event
from ipr_dist.games.readers import check_reader_kind, parse_reader

DESKTOP_DIR = Path(__file__).with_name("desktop")

# X keysym names for the spec's key names (the same names HTML specs use).
_KEYSYMS = {" ": "space", "Enter": "Return", "Escape": "Escape", "Shift": "Shift_L", "Control": "Control_L",
            "Tab": "Tab", "Backspace": "BackSpace", "ArrowLeft": "Left", "ArrowRight": "Right", "ArrowUp": "Up",
            "ArrowDown": "Down"}


def keysym_name(name: str) -> str:
    """X keysym name of a spec key name (ArrowLeft -> Left, Space -> space, a -> a)."""
    key, _ = key_event(name)
    return _KEYSYMS.get(key, key)


class ResetAction(BaseModel):
    """One step of the reset procedure: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    wait_ms: int | None = Field(None, ge=0, le=120_000)
    cpu_ms: int | None = Field(None, ge=1, le=120_000)
    """With wait_ms: then wait on until the game's process has used this much CPU time since the wait
    began (at most timeout_ms). A loaded machine gives the game less of each second, so its loading and
    intro take longer in wall time; a wait in wall time alone ends too early there."""
    key: str | None = None
    click: tuple[float, float] | None = None
    wait_while: str | None = None
    """Wait while this pixel reader (e.g. game_over) fires: the game is still loading or showing its end."""
    timeout_ms: int = Field(30_000, ge=1, le=600_000)
    """wait_while, cpu_ms: give up (one GameError) after this long."""

    @model_validator(mode="after")
    def _one(self):
        if self.cpu_ms is not None and self.wait_ms is None:
            raise ValueError("cpu_ms goes with wait_ms: {wait_ms: N, cpu_ms: M} waits N ms, then until the game "
                             "has used M ms of CPU since the wait began")
        given = [k for k in ("wait_ms", "key", "click", "wait_while") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each reset step is one of {wait_ms: N}, {key: NAME}, {click: [x, y]}, "
                             "{wait_while: READER}")
        if self.key is not None:
            key_event(self.key)
        if self.click is not None and not all(0.0 <= v <= 1.0 for v in self.click):
            raise ValueError("click position is [x, y] as fractions of the window, each in [0, 1]")
        return self


class ResetProcedure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    restart: bool = True
    """Start a fresh game process for every episode (steadiest); false: play `sequence` in the running one."""
    sequence: list[ResetAction] = []
    """Input played (game running in real time) after the window appears, before the first observation."""


class WindowMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    """Substring of the window's title (WM_NAME)."""
    class_: str | None = Field(None, alias="class")
    """Substring of the window's class or instance (WM_CLASS)."""

    @model_validator(mode="after")
    def _one(self):
        if (self.title is None) == (self.class_ is None):
            raise ValueError("window needs exactly one of title or class")
        return self


class DesktopGameSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    id: str
    """Game id, as used in configs (`fleet.games`) and stored with every step."""
    command: list[str]
    """The game's command line (a list, or one string split like a shell would)."""
    env: dict[str, str] = {}
    """Extra environment variables for the game process."""
    home_files: dict[str, str] = {}
    """Files written into the game's private HOME before it starts (its settings), path -> text."""
    prepare: list[str] | None = None
    """A command run once per node with the HOME template as HOME (e.g. to build a level database);
    every env then starts from a copy of that template."""
    screen: tuple[int, int] = (320, 240)
    """Width and height of the private virtual display."""
    window: WindowMatch
    """Which window is the game: {title: ...} or {class: ...}."""
    keys: list[str] = []
    """Keys the game uses, in the order of the action's `keys` vector."""
    mouse: bool = False
    """Whether the game uses the pointer."""
    frame_ms: int = Field(33, ge=1, le=1000)
    """Game milliseconds per environment step."""
    mode: Literal["stepped", "realtime"] = "stepped"
    """stepped: the game runs only during a step (paused while the agent thinks); realtime: it never pauses."""
    clock: Literal["virtual", "real"] = "virtual"
    """Stepped mode: `virtual` preloads a clock library that hides the paused time from the game (its frame
    timer sees only the steps' slices); `real` lets it see wall time (thinking time becomes game time)."""
    startup_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for the game's window to appear."""
    reset: ResetProcedure = ResetProcedure()
    """How an episode starts."""
    readers: dict[str, Any] = {}
    """Pixel readers for game_over, failure, lives (and score), by variable name (ipr_dist/games/readers.py)."""
    score: Literal["none"] | dict[str, Any] = "none"
    """A digits/count reader for the score, or `none`: the game has no readable score (Survival and
    Curiosity only; the report says so)."""
    detector: str | None = None
    """Optional object detector, `package.module:function` taking an RGB frame (H, W, 3) and returning
    a list of {label, box: [x0, y0, x1, y1] in [0, 1], score}; its boxes go into `info["objects"]`."""
    annotation: GameAnnotation | None = None
    """Physics, causal structure, goal and meaning of each control (paper Sec. 9.1)."""

    spec_dir: Path = Field(Path("."), exclude=True)

    @field_validator("command", "prepare", mode="before")
    @classmethod
    def _split(cls, v):
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("command")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("command is empty; give the game's executable and its arguments")
        return v

    @field_validator("keys")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            keysym_name(k)
        if len(set(keys)) != len(keys):
            raise ValueError("keys must not repeat")
        return keys

    @field_validator("screen")
    @classmethod
    def _screen(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (32 <= v[0] <= 4096 and 32 <= v[1] <= 4096):
            raise ValueError("screen is [width, height], each between 32 and 4096 pixels")
        return v

    @field_validator("home_files")
    @classmethod
    def _inside_home(cls, files: dict[str, str]) -> dict[str, str]:
        for path in files:
            p = Path(path)
            if p.is_absolute() or ".." in p.parts or not p.parts:
                raise ValueError(f"home_files path {path!r} must be relative and stay inside the game's HOME")
        return files

    @model_validator(mode="after")
    def _readers(self):
        allowed = ("game_over", "failure", "lives")
        for name, raw in self.readers.items():
            if name not in allowed:
                raise ValueError(f"readers.{name}: unknown variable; readers may set {', '.join(allowed)} "
                                 "(the score has its own `score` key)")
            check_reader_kind(name, parse_reader(raw, self.spec_dir, f"readers.{name}"))
        for i, act in enumerate(self.reset.sequence):
            if act.wait_while is not None and act.wait_while not in ("game_over", "failure"):
                raise ValueError(f"reset.sequence.{i}.wait_while: {act.wait_while!r} is not a yes/no reader "
                                 "(game_over or failure)")
            if act.wait_while is not None and act.wait_while not in self.readers:
                raise ValueError(f"reset.sequence.{i}.wait_while: the spec has no {act.wait_while} reader")
        if "game_over" not in self.readers:
            raise ValueError("readers.game_over is required: a color or template reader that sees the game end")
        if self.score != "none":
            check_reader_kind("score", parse_reader(self.score, self.spec_dir, "score"))
        return self

    def pixel_readers(self) -> dict[str, Any]:
        out = {name: parse_reader(raw, self.spec_dir, name) for name, raw in self.readers.items()}
        if self.score != "none":
            out["score"] = parse_reader(self.score, self.spec_dir, "score")
        return out

    @property
    def has_score(self) -> bool:
        return self.score != "none"

    def executable(self) -> str | None:
        """Path of the game's executable, or None when it is not installed on this node."""
        exe = self.command[0]
        path = (self.spec_dir / exe) if "/" in exe and not Path(exe).is_absolute() else Path(exe)
        if "/" in exe:
            return str(path) if path.is_file() else None
        return shutil.which(exe)

    def check_installed(self) -> None:
        if self.executable() is None:
            raise GameError(f"game '{self.id}': its program {self.command[0]} is not installed on this node; "
                            f"install it (scripts/setup.sh installs the shipped desktop games) or fix `command`")

    def game_info(self, annotations: dict[str, GameAnnotation] | None = None) -> GameInfo:
        ann = (annotations or {}).get(self.id) or self.annotation
        variables = tuple(v for v in ("score", "lives", "game_over", "failure")
                          if (v == "score" and self.has_score) or v in self.readers)
        return GameInfo(self.id, "desktop", "Desktop", tuple(self.keys), self.mouse, self.executable() is not None,
                        variables, ann)


def load_desktop_spec(path: str | Path) -> DesktopGameSpec:
    """Read and validate a desktop spec; one clear error names the file and the problem."""
    from ipr_dist.games.specs import read_mapping, validate

    return validate(*read_mapping(path, "desktop game spec", "id, command, window, ..."), DesktopGameSpec)


@functools.lru_cache(maxsize=1)
def desktop_pack_specs() -> dict[str, DesktopGameSpec]:
    """The project's own desktop game specs, by id."""
    specs = [load_desktop_spec(p) for p in sorted(DESKTOP_DIR.glob("*.yaml"))]
    return {s.id: s for s in specs}
