"""Game environments behind one interface: `make_env(game, env_cfg)` returns a gymnasium.Env whose
observation is an RGB frame and whose action is the unified action type, for every game kind.

A game is named by a stable-retro id (`Airstriker-Genesis`), the id of a shipped HTML game
(`Cannon-Html`) or desktop game (`Xmoto-Desktop`), the id of a user's spec listed in
`games.html_specs` / `games.desktop_specs`, or the path of a spec file (HTML or desktop).
"""

from __future__ import annotations

from ipr_dist.config import EnvConfig
from ipr_dist.games.catalog import GameAnnotation, GameInfo, list_retro_games, resolve_retro_id, retro_game_info
from ipr_dist.games.desktop_spec import desktop_pack_specs, find_desktop_spec, is_desktop_spec, load_desktop_spec, spec_mapping
from ipr_dist.games.html_spec import find_spec, load_spec, pack_specs


def list_games(annotations: dict[str, GameAnnotation] | None = None, spec_files: tuple[str, ...] = ()) -> list[GameInfo]:
    """Every game: stable-retro integrations, the shipped HTML and desktop games, and the user's specs."""
    html = [s.game_info(annotations) for s in pack_specs().values()]
    desktop = [s.game_info(annotations) for s in desktop_pack_specs().values()]
    for p in spec_files:
        if is_desktop_spec(spec_mapping(p)):
            desktop.append(load_desktop_spec(p).game_info(annotations))
        else:
            html.append(load_spec(p).game_info(annotations))
    return list_retro_games(annotations) + html + desktop


def game_info(game: str, annotations: dict[str, GameAnnotation] | None = None,
              spec_files: tuple[str, ...] = ()) -> GameInfo:
    """Catalog entry of any game; raises GameError naming the game when it is unknown."""
    desktop = find_desktop_spec(game, tuple(spec_files))
    if desktop is not None:
        return desktop.game_info(annotations)
    spec = find_spec(game, tuple(spec_files))
    if spec is not None:
        spec.check_entry()
        return spec.game_info(annotations)
    return retro_game_info(resolve_retro_id(game), annotations)


def make_env(game: str, env_cfg: EnvConfig, annotations: dict[str, GameAnnotation] | None = None,
             spec_files: tuple[str, ...] = ()):
    desktop = find_desktop_spec(game, tuple(spec_files))
    if desktop is not None:
        from ipr_dist.games.desktop_env import DesktopGameEnv

        return DesktopGameEnv(desktop, frame_size=env_cfg.frame_size, max_episode_steps=env_cfg.max_episode_steps,
                              failure_on=env_cfg.failure_on, annotations=annotations)
    spec = find_spec(game, tuple(spec_files))
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
