"""Game environments behind one interface: `make_env(game_id, env_cfg)` returns a gymnasium.Env
whose observation is an RGB frame and whose action is the unified action type."""

from __future__ import annotations

from ipr_dist.config import EnvConfig
from ipr_dist.games.catalog import GameAnnotation, GameInfo, retro_game_info, resolve_retro_id


def game_info(game_id: str, annotations: dict[str, GameAnnotation] | None = None) -> GameInfo:
    """Catalog entry of any game id; raises GameError naming the id when it is unknown."""
    return retro_game_info(resolve_retro_id(game_id), annotations)


def make_env(game_id: str, env_cfg: EnvConfig, annotations: dict[str, GameAnnotation] | None = None):
    from ipr_dist.games.retro_env import RetroGameEnv

    return RetroGameEnv(
        game_id,
        frame_size=env_cfg.frame_size,
        frame_skip=env_cfg.frame_skip,
        max_episode_steps=env_cfg.max_episode_steps,
        failure_on=env_cfg.failure_on,
        noop_reset_max=env_cfg.noop_reset_max,
        interpolation=env_cfg.interpolation,
        annotations=annotations,
    )
