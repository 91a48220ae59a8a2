"""Game spec files, HTML and desktop alike: one reader, one validator with one kind of error, and
one lookup of a game by path or id. A spec naming a `command` is a desktop game's (desktop_spec.py);
any other is an HTML game's (html_spec.py). Each file is read and parsed once per lookup."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ValidationError

from ipr_dist.errors import GameError

if TYPE_CHECKING:
    from ipr_dist.games.desktop_spec import DesktopGameSpec
    from ipr_dist.games.html_spec import HtmlGameSpec


def read_mapping(path: str | Path, what: str, keys_hint: str) -> tuple[Path, dict]:
    """The spec file's YAML mapping; GameError naming the file when it is missing, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise GameError(f"{p}: {what} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise GameError(f"{p}: {what} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise GameError(f"{p}: {what} must be a mapping ({keys_hint})")
    return p, raw


def validate(p: Path, raw: dict, model: type[BaseModel]):
    """`model` from a spec mapping; the first problem as one GameError naming the file and the key."""
    try:
        return model.model_validate({**raw, "spec_dir": p.resolve().parent})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in model.model_fields if k != "spec_dir")
            raise GameError(f"{p}: unknown key '{key}'; allowed keys: {allowed}") from None
        raise GameError(f"{p}: {key + ': ' if key else ''}{e['msg'].removeprefix('Value error, ')}") from None


def load_any(path: str | Path) -> HtmlGameSpec | DesktopGameSpec:
    """An HTML or a desktop spec, by what the file names (a `command`: desktop)."""
    from ipr_dist.games.desktop_spec import DesktopGameSpec
    from ipr_dist.games.html_spec import HtmlGameSpec

    p, raw = read_mapping(path, "game spec", "id, entry or command, ...")
    return validate(p, raw, DesktopGameSpec if "command" in raw else HtmlGameSpec)


def find_game_spec(game: str, spec_files: tuple[str, ...] = ()) -> HtmlGameSpec | DesktopGameSpec | None:
    """The spec of an HTML or desktop game: a spec file path, an id of a shipped spec, or the id of one
    of the user's spec files; None for a retro game."""
    from ipr_dist.games.desktop_spec import desktop_pack_specs
    from ipr_dist.games.html_spec import pack_specs

    if game.endswith((".yaml", ".yml")):
        return load_any(game)
    for shipped in (pack_specs(), desktop_pack_specs()):
        if game in shipped:
            return shipped[game]
    for path in spec_files:
        spec = load_any(path)
        if spec.id == game:
            return spec
    return None
