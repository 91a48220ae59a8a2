"""Game environments behind one interface: `make_env(game, env_cfg)` returns a gymnasium.Env whose
observation is an RGB frame and whose action is the unified action type, for every game kind.

A game is named by a stable-retro id (`Airstriker-Genesis`), the id of an HTML game of the pack
(`Cannon-Html`) or of a user's spec listed in `games.html_specs`, or the path of an HTML game spec.
"""

from __future__ import annotations

from ipr_dist.config import EnvConfig
from ipr_dist.games.catalog import GameAnnotation, GameInfo, list_retro_games, resolve_retro_id, retro_game_info
from ipr_dist.games.html_spec import find_spec, load_spec, pack_specs


def list_games(annotations: dict[str, GameAnnotation] | None = None, html_specs: tuple[str, ...] = ()) -> list[GameInfo]:
    """Every game: stable-retro integrations, the HTML game pack, and the user's HTML specs."""
    html = [s.game_info(annotations) for s in pack_specs().values()]
    html += [load_spec(p).game_info(annotations) for p in html_specs]
    return list_retro_games(annotations) + html


def game_info(game: str, annotations: dict[str, GameAnnotation] | None = None,
              html_specs: tuple[str, ...] = ()) -> GameInfo:
    """Catalog entry of any game; raises GameError naming the game when it is unknown."""
    spec = find_spec(game, tuple(html_specs))
    if spec is not None:
        spec.check_entry()
        return spec.game_info(annotations)
    return retro_game_info(resolve_retro_id(game), annotations)


def make_env(game: str, env_cfg: EnvConfig, annotations: dict[str, GameAnnotation] | None = None,
             html_specs: tuple[str, ...] = ()):
    spec = find_spec(game, tuple(html_specs))
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
