"""Game environments behind one interface: `make_env(game, env_cfg)` returns a gymnasium.Env whose
observation is an RGB frame and whose action is the unified action type, for every game kind.

A game is named by a stable-retro id (`Airstriker-Genesis`), the id of a shipped HTML game
(`Cannon-Html`) or desktop game (`Xmoto-Desktop`), the id of a user's spec listed in
`games.html_specs` / `games.desktop_specs`, or the path of a spec file (HTML or desktop).
"""

from __future__ import annotations

from ipr_dist.config import EnvConfig
from ipr_dist.errors import ConfigError
from ipr_dist.games.catalog import GameAnnotation, GameInfo, list_retro_games, resolve_retro_id, retro_game_info
from ipr_dist.games.desktop_spec import DesktopGameSpec, desktop_pack_specs
from ipr_dist.games.html_spec import pack_specs
from ipr_dist.games.specs import find_game_spec, load_any


def list_games(annotations: dict[str, GameAnnotation] | None = None, spec_files: tuple[str, ...] = ()) -> list[GameInfo]:
    """Every game: stable-retro integrations, the shipped HTML and desktop games, and the user's specs."""
    user = [load_any(p) for p in spec_files]
    html = [*pack_specs().values(), *(s for s in user if not isinstance(s, DesktopGameSpec))]
    desktop = [*desktop_pack_specs().values(), *(s for s in user if isinstance(s, DesktopGameSpec))]
    return list_retro_games(annotations) + [s.game_info(annotations) for s in html + desktop]


def game_info(game: str, annotations: dict[str, GameAnnotation] | None = None,
              spec_files: tuple[str, ...] = ()) -> GameInfo:
    """Catalog entry of any game; raises GameError naming the game when it is unknown."""
    spec = find_game_spec(game, tuple(spec_files))
    if spec is None:
        return retro_game_info(resolve_retro_id(game), annotations)
    if not isinstance(spec, DesktopGameSpec):
        spec.check_entry()  # an HTML game's page must exist (a desktop game may be listed uninstalled)
    info = spec.game_info(annotations)
    for name in ("keys", "press"):
        if info.annotation is not None and getattr(info.annotation, name):
            raise ConfigError(
                f"{game}: its annotation sets `{name}`, which only retro games honour (an {info.kind} game's keys "
                "come from its spec and reach it as key events); remove it from the annotation"
            )
    return info


def make_env(game: str, env_cfg: EnvConfig, annotations: dict[str, GameAnnotation] | None = None,
             spec_files: tuple[str, ...] = ()):
    spec = find_game_spec(game, tuple(spec_files))
    if isinstance(spec, DesktopGameSpec):
        from ipr_dist.games.desktop_env import DesktopGameEnv

        return DesktopGameEnv(spec, frame_size=env_cfg.frame_size, max_episode_steps=env_cfg.max_episode_steps,
                              failure_on=env_cfg.failure_on, annotations=annotations)
    if spec is not None:
        from ipr_dist.games.browser import find_browser
        from ipr_dist.games.html_env import HtmlGameEnv

        return HtmlGameEnv(spec, frame_size=env_cfg.frame_size, max_episode_steps=env_cfg.max_episode_steps,
                           failure_on=env_cfg.failure_on, annotations=annotations,
                           executable=find_browser(env_cfg.browser))
    from ipr_dist.games.retro_env import RetroGameEnv

    return RetroGameEnv(
        game,
        frame_size=env_cfg.frame_size,
        frame_skip=env_cfg.frame_skip,
        max_episode_steps=env_cfg.max_episode_steps,
        failure_on=env_cfg.failure_on,
        noop_reset_max=env_cfg.noop_reset_max,
        interpolation=env_cfg.interpolation,
        annotations=annotations,
    )
