"""HTML/Canvas game specs: the short YAML a user writes to make any canvas game an environment.

    id: Cannon-Html                 # the game id used in configs and the store
    entry: cannon.html              # file relative to this spec, or a local URL (http://localhost:8000/)
    canvas: "#game"                 # CSS selector of the game's <canvas>
    keys: []                        # keys the game uses (KeyboardEvent.key names; Space for " ")
    mouse: true                     # whether it uses the pointer (position, click, hold, scroll)
    frame_ms: 16                    # virtual time per environment step
    score: ipr.score                # JavaScript expressions read after every step
    lives: ipr.lives                # optional
    game_over: ipr.gameOver
    failure: null                   # optional irreversible-failure expression (default: game_over)
    seed_param: seed                # URL query parameter that seeds the game (null: unseeded)
    annotation: {...}               # physics, causal, goal, controls (as in annotations.yaml)

The project's own game pack (ipr_dist/games/html/pack/) is registered through these same specs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipr_dist.errors import GameError
from ipr_dist.games.catalog import GameAnnotation, GameInfo
from ipr_dist.games.readers import check_reader_kind, parse_reader

HTML_DIR = Path(__file__).with_name("html")
PACK_DIR = HTML_DIR / "pack"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

# KeyboardEvent.key and .code for the key names a spec may use.
_NAMED_KEYS = {"Space": (" ", "Space"), "Enter": ("Enter", "Enter"), "Escape": ("Escape", "Escape"),
               "Shift": ("Shift", "ShiftLeft"), "Control": ("Control", "ControlLeft"), "Tab": ("Tab", "Tab"),
               "Backspace": ("Backspace", "Backspace")}


_LEGACY_CODES = {" ": 32, "Enter": 13, "Escape": 27, "Shift": 16, "Control": 17, "Tab": 9, "Backspace": 8,
                 "ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}


def legacy_codes(name: str) -> tuple[int, int]:
    """(keyCode, charCode) a real keyboard gives a key's events: keyCode on keydown/keyup, charCode on
    the keypress of a printable key (0 for the others)."""
    key, _ = key_event(name)
    if key in _LEGACY_CODES:
        key_code = _LEGACY_CODES[key]
        return key_code, key_code if key in (" ", "Enter") else 0
    return ord(key.upper()), ord(key)


def key_event(name: str) -> tuple[str, str]:
    """(key, code) of a KeyboardEvent for a spec key name: Arrow*, Space, Enter, letters, digits."""
    if name in _NAMED_KEYS:
        return _NAMED_KEYS[name]
    if name.startswith("Arrow") and name[5:] in {"Left", "Right", "Up", "Down"}:
        return name, name
    if len(name) == 1 and name.isalpha():
        return name.lower(), f"Key{name.upper()}"
    if len(name) == 1 and name.isdigit():
        return name, f"Digit{name}"
    raise ValueError(f"unknown key name {name!r}; use ArrowLeft/Right/Up/Down, Space, Enter, Escape, Shift, "
                     "Control, Tab, Backspace, a letter or a digit")


class HtmlGameSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """Game id, as used in configs (`fleet.games`) and stored with every step."""
    entry: str
    """Path of the game's HTML file relative to the spec, or a local URL (http://localhost:PORT/...)."""
    canvas: str = "canvas"
    """CSS selector of the game's <canvas>."""
    keys: list[str] = []
    """Keys the game uses, in the order of the action's `keys` vector."""
    mouse: bool = False
    """Whether the game uses the pointer."""
    frame_ms: int = Field(16, ge=1, le=1000)
    """Virtual milliseconds per environment step (16: the page's animation-frame period)."""
    score: str | dict[str, Any]
    """JavaScript expression giving the score (a number), a pixel reader (digits / count) of the canvas,
    or `none`: the game has no readable score (Survival and Curiosity only; the report says so)."""
    lives: str | dict[str, Any] | None = None
    """JavaScript expression (or digits / count pixel reader) giving the remaining lives, if the game has lives."""
    game_over: str | dict[str, Any]
    """JavaScript expression that is true once the game is over, or a color / template pixel reader."""
    failure: str | dict[str, Any] | None = None
    """Expression or pixel reader for an irreversible failure (default: game_over)."""
    seed_param: str | None = "seed"
    """URL query parameter the episode seed is passed in (None: the game is not seeded)."""
    annotation: GameAnnotation | None = None
    """Physics, causal structure, goal and meaning of each control (paper Sec. 9.1)."""

    spec_dir: Path = Field(Path("."), exclude=True)

    @field_validator("keys")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            key_event(k)
        if len(set(keys)) != len(keys):
            raise ValueError("keys must not repeat")
        return keys

    @model_validator(mode="after")
    def _readers(self):
        for name in ("score", "lives", "game_over", "failure"):
            raw = getattr(self, name)
            if isinstance(raw, dict):
                check_reader_kind(name, parse_reader(raw, self.spec_dir, name))
            elif isinstance(raw, str) and not raw.strip():
                raise ValueError(f"{name}: empty expression")
        return self

    @property
    def has_score(self) -> bool:
        return self.score != "none"

    def expressions(self) -> dict[str, str]:
        """The variables read by a JavaScript expression, name -> expression."""
        return {k: v for k in ("score", "lives", "game_over", "failure")
                if isinstance(v := getattr(self, k), str) and not (k == "score" and v == "none")}

    def pixel_readers(self) -> dict[str, Any]:
        """The variables read from the canvas's pixels, name -> reader."""
        return {k: parse_reader(v, self.spec_dir, k) for k in ("score", "lives", "game_over", "failure")
                if isinstance(v := getattr(self, k), dict)}

    @property
    def url(self) -> str | None:
        """The game's local URL, when the entry is one (else the entry is a file)."""
        return self.entry if urlparse(self.entry).scheme in {"http", "https"} else None

    @property
    def entry_path(self) -> Path:
        return (self.spec_dir / self.entry).resolve()

    @property
    def root(self) -> Path:
        """Directory served to the page: the entry file's folder; nothing outside it is reachable."""
        return self.entry_path.parent

    def read_file(self, rel: str) -> tuple[bytes, str] | None:
        """(content, MIME type) of a file of the game's own folder, by its path relative to the folder;
        None for anything else (missing, or outside the folder)."""
        import mimetypes

        path = (self.root / rel).resolve()
        if not (path.is_file() and path.is_relative_to(self.root)):
            return None
        return path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def check_entry(self) -> None:
        if self.url:
            host = urlparse(self.url).hostname
            if host not in LOCAL_HOSTS:
                raise GameError(f"game '{self.id}': entry {self.url} is not a local URL; games may load nothing "
                                "from the network, so serve the game on localhost or give a file path")
        elif not self._entry_is_file():
            raise GameError(f"game '{self.id}': entry file {self.spec_dir / self.entry} not found; fix `entry` in its "
                            "spec")

    def _entry_is_file(self) -> bool:
        try:
            return self.entry_path.is_file()
        except (OSError, ValueError):  # a name the filesystem cannot hold (too long, a NUL byte)
            return False

    def game_info(self, annotations: dict[str, GameAnnotation] | None = None) -> GameInfo:
        ann = (annotations or {}).get(self.id) or self.annotation
        installed = bool(self.url) or self._entry_is_file()
        variables = tuple(v for v in ("score", "lives", "game_over", "failure")
                          if getattr(self, v) and not (v == "score" and not self.has_score))
        return GameInfo(self.id, "html", "Html", tuple(self.keys), self.mouse, installed, variables, ann)


def load_spec(path: str | Path) -> HtmlGameSpec:
    """Read and validate a spec file; one clear error names the file and the problem."""
    from ipr_dist.games.specs import read_mapping, validate

    return validate(*read_mapping(path, "HTML game spec", "id, entry, canvas, ..."), HtmlGameSpec)


@functools.lru_cache(maxsize=1)
def pack_specs() -> dict[str, HtmlGameSpec]:
    """The project's own game pack, by id."""
    specs = [load_spec(p) for p in sorted(PACK_DIR.glob("*.yaml"))]
    return {s.id: s for s in specs}
