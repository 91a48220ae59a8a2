"""The game catalog: every stable-retro integration, its controls and variables, and the per-game
annotations of paper Sec. 9.1 (physics mechanism, causal structure, goal, meaning of each control).

Annotations live in YAML files (`annotations.yaml` next to this module, plus any files named in
`games.annotation_files`); a game without one still works, it just has no goal text or control
meanings beyond the button names.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ipr_dist.errors import ConfigError, GameError

BUNDLED_ANNOTATIONS = Path(__file__).with_name("annotations.yaml")


class GameAnnotation(BaseModel):
    """What a person would tell a new player: the physics, the causes and effects, the goal, and what
    each control does (paper Sec. 9.1)."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = None
    physics: list[str] = []
    causal: list[str] = []
    goal: str | None = None
    controls: dict[str, str] = {}
    # Retro games: the buttons the game is played with, in this order (a minimal action set, as ALE's);
    # the core's other buttons are never pressed. Empty: every button of the core. A button a game does not
    # use is not harmless: Airstriker ignores B while X or Z is held, so random play over all 12 fired a
    # quarter as often as over these.
    keys: list[str] = []
    # Controls the game acts on when pressed, not while held (Airstriker fires once per press of B).
    # The retro env releases them on the last frame of each step, so a key held over several steps
    # presses it once per step, as a player tapping it would (with frame_skip >= 2).
    press: list[str] = []


@dataclass(frozen=True)
class GameInfo:
    id: str
    kind: str  # retro | html | desktop
    platform: str
    keys: tuple[str, ...]  # the game's own controls, in the order of the action's `keys` vector
    uses_mouse: bool
    installed: bool  # ROM present (retro) / game files present (html)
    variables: tuple[str, ...]  # game variables its integration exposes (lives, score, ...)
    annotation: GameAnnotation | None = field(default=None, compare=False)


def load_annotations(extra_files: Iterable[str | Path] = ()) -> dict[str, GameAnnotation]:
    """Bundled annotations, overlaid by the user's files in order."""
    out: dict[str, GameAnnotation] = {}
    for path in [BUNDLED_ANNOTATIONS, *map(Path, extra_files)]:
        if not path.is_file():
            raise ConfigError(f"{path}: annotation file not found; fix games.annotation_files")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{path}: annotation file is not valid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of game id -> annotation")
        for game, entry in raw.items():
            try:
                out[str(game)] = GameAnnotation.model_validate(entry or {})
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(str(p) for p in e["loc"])
                allowed = ", ".join(GameAnnotation.model_fields)
                raise ConfigError(f"{path}: {game}.{key}: {e['msg']} (annotation keys: {allowed})") from None
    return out


def describe_keys(game: GameInfo, pressed: Iterable[str], pointer: Iterable[str] = ()) -> str:
    """Text y_t for an executed control, from the game's control annotations ("move right and fire").
    `pointer` names the mouse flags that were set (click, right_click, hold, scroll)."""
    meanings = game.annotation.controls if game.annotation else {}
    words = [meanings.get(k, f"press {k}") for k in pressed]
    words += [meanings.get(p, p.replace("_", " ")) for p in pointer]
    return " and ".join(words) if words else "do nothing"


# --- retro integrations --------------------------------------------------------------------------


def _retro():
    import stable_retro

    return stable_retro


def _integration_dirs() -> list[Path]:
    data = _retro().data
    return [Path(data.path()) / p for p in data.Integrations.ALL.paths]


@functools.lru_cache(maxsize=1)
def retro_game_ids() -> tuple[str, ...]:
    return tuple(_retro().data.list_games(_retro().data.Integrations.ALL))


def _game_dir(game_id: str) -> Path | None:
    for d in _integration_dirs():
        if (d / game_id / "rom.sha").is_file():
            return d / game_id
    return None


def _retro_platform(game_id: str) -> str:
    base = game_id[: -len("-v0")] if game_id.endswith("-v0") else game_id
    return base.rsplit("-", 1)[-1]


def retro_game_info(game_id: str, annotations: dict[str, GameAnnotation] | None = None) -> GameInfo:
    retro = _retro()
    gdir = _game_dir(game_id)
    if gdir is None:
        raise GameError(unknown_game_message(game_id))
    platform = _retro_platform(game_id)
    core = retro.data.EMU_INFO.get(platform, {})
    buttons = tuple(b for b in core.get("buttons", []) if b)
    installed = any((gdir / f"rom{ext}").is_file() for ext, p in retro.data.EMU_EXTENSIONS.items() if p == platform)
    try:
        variables = tuple(sorted(json.loads((gdir / "data.json").read_text()).get("info", {})))
    except (OSError, ValueError):
        variables = ()
    annotations = annotations if annotations is not None else load_annotations()
    ann = annotations.get(game_id) or annotations.get(_short_id(game_id))
    keys = tuple(ann.keys) if ann and ann.keys else buttons
    for field_name, names, allowed in [("keys", ann.keys if ann else [], buttons), ("press", ann.press if ann else [], keys)]:
        unknown = sorted(set(names) - set(allowed))
        if unknown or len(set(names)) < len(names):
            problem = f"names {unknown}, which are not among" if unknown else "repeats a button of"
            raise ConfigError(
                f"{game_id}: its annotation's `{field_name}` {problem} its controls {list(allowed)}; "
                "fix the annotation (games.annotation_files)"
            )
    return GameInfo(game_id, "retro", platform, keys, False, installed, variables, ann)


def _short_id(game_id: str) -> str:
    return game_id[: -len("-v0")] if game_id.endswith("-v0") else game_id


def resolve_retro_id(game_id: str) -> str:
    """Accept both stable-retro's id (`Airstriker-Genesis-v0`) and the short form (`Airstriker-Genesis`)."""
    ids = retro_game_ids()
    if game_id in ids:
        return game_id
    if f"{game_id}-v0" in ids:
        return f"{game_id}-v0"
    raise GameError(unknown_game_message(game_id))


def unknown_game_message(game_id: str) -> str:
    names = list(retro_game_ids()) + [_short_id(g) for g in retro_game_ids()]
    close = difflib.get_close_matches(game_id, names, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown game '{game_id}'{hint}; run `ipr games list` to see every game id"


def list_retro_games(annotations: dict[str, GameAnnotation] | None = None) -> list[GameInfo]:
    annotations = annotations if annotations is not None else load_annotations()
    return [retro_game_info(g, annotations) for g in retro_game_ids()]


def require_installed(info: GameInfo) -> None:
    if not info.installed:
        raise GameError(
            f"the ROM of '{info.id}' is not installed; import your copy with `ipr games import-roms DIR`"
        )


# --- importing ROMs ------------------------------------------------------------------------------

ROM_EXTENSIONS = {".md", ".smd", ".gen", ".bin", ".sfc", ".smc", ".nes", ".sms", ".gg", ".gb", ".gbc", ".gba",
                  ".a26", ".pce", ".32x", ".n64", ".z64", ".v64", ".zip"}


@dataclass
class ImportReport:
    imported: list[tuple[str, str]] = field(default_factory=list)  # (file, game)
    already: list[tuple[str, str]] = field(default_factory=list)  # (file, game): identical ROM present
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def import_roms(directory: str | Path) -> ImportReport:
    """Match every file under `directory` (and inside zip archives) against the SHA-1 of each
    integration's ROM, the way stable-retro's importer does, and install the matches. A file is only
    written when its hash matches, so an existing ROM is never replaced by a different file."""
    retro = _retro()
    root = Path(directory)
    if not root.is_dir():
        raise GameError(f"{root}: not a directory; pass the folder that holds your ROM files")
    known = retro.data.get_known_hashes()
    report = ImportReport()

    def consider(label: str, name: str, reader) -> bool:
        try:
            data, sha = retro.data.groom_rom(name, reader)
        except (OSError, ValueError) as exc:
            report.unmatched.append((label, f"unreadable ({exc})"))
            return False
        if sha not in known:
            return False
        game, ext, base = known[sha]
        target = Path(base) / game / f"rom{ext}"
        if target.is_file() and target.read_bytes() == data:
            report.already.append((label, game))
            return True
        tmp = target.with_name(f".rom{ext}.importing")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        report.imported.append((label, game))
        return True

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        label = str(path.relative_to(root))
        with path.open("rb") as f:
            if consider(label, path.name, f):
                continue
        if path.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    hits = 0
                    for entry in zf.infolist():
                        if not entry.is_dir():
                            with zf.open(entry) as inner:
                                hits += consider(f"{label}:{entry.filename}", entry.filename, inner)
                    if hits:
                        continue
                report.unmatched.append((label, "no file in the archive matches a known game"))
            except zipfile.BadZipFile:
                report.unmatched.append((label, "corrupt zip archive"))
        elif not any(lbl == label for lbl, _ in report.unmatched):
            why = "no known game has this ROM's SHA-1 (corrupt, modified or unsupported dump)"
            if path.suffix.lower() not in ROM_EXTENSIONS:
                why = "not a ROM file (unknown extension) and matches no known game"
            report.unmatched.append((label, why))
    retro_game_ids.cache_clear()
    return report
