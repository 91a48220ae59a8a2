"""The RL baselines of paper Table 2: PPO and DQN from RLlib (new API stack), one policy per
(algorithm, level, game), trained on the same environments through the same wrappers every other
method plays (games.make_env + discrete.MenuEnv, with the level's reward).

Checkpoints: <run>/baselines/<algo>@<level>/<game>/checkpoint, saved after every training iteration
(an interrupted training resumes from it) and marked finished by done.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ipr_dist.config import Config

BASELINES_DIR = "baselines"
ALGORITHMS = ("ppo", "dqn")
ENV_NAME = "ipr_menu"


def baseline_dir(cfg: Config, algo: str, level: str, game: str) -> Path:
    return Path(cfg.run_dir) / BASELINES_DIR / f"{algo}@{level}" / game


def _menu_env(env_config: dict):
    from ipr_dist.config import EnvConfig, GamesConfig
    from ipr_dist.games import make_env
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.games.discrete import MenuEnv

    games = GamesConfig.model_validate(env_config["games"])
    env = make_env(env_config["game"], EnvConfig.model_validate(env_config["env"]),
                   load_annotations(games.annotation_files), tuple(games.html_specs))
    return MenuEnv(env, env_config["level"], float_obs=True)


def _algorithm_config(cfg: Config, algo: str, level: str, game: str):
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    e = cfg.eval
    env_config = {"game": game, "level": level, "env": cfg.env.model_copy(
        update={"max_episode_steps": e.max_episode_steps}).model_dump(mode="json"),
        "games": cfg.games.model_dump(mode="json")}
    if algo == "ppo":
        conf = PPOConfig().training(train_batch_size_per_learner=e.rl_batch, minibatch_size=max(e.rl_batch // 4, 1),
                                    num_epochs=e.rl_epochs, lr=e.rl_lr, gamma=0.99)
    else:
        conf = DQNConfig().training(train_batch_size_per_learner=32, lr=e.rl_lr, gamma=0.99,
                                    num_steps_sampled_before_learning_starts=min(500, e.rl_steps // 4),
                                    target_network_update_freq=500,
                                    replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer",
                                                          "capacity": 20_000})
    return (conf.environment(ENV_NAME, env_config=env_config)
            .env_runners(num_env_runners=1, num_envs_per_env_runner=1, rollout_fragment_length=min(256, e.rl_batch),
                         num_cpus_per_env_runner=e.cpus_per_env)
            .learners(num_learners=0)
            .rl_module(model_config={"conv_filters": e.rl_conv_filters})
            .debugging(seed=cfg.run.seed))


def train(cfg: Config, algo: str, level: str, game: str, out=sys.stdout) -> Path:
    """Train (or resume, or skip when finished) one baseline; returns its checkpoint directory."""
    from ray.tune.registry import register_env

    folder = baseline_dir(cfg.with_absolute_root(), algo, level, game)
    ckpt = folder / "checkpoint"
    if (folder / "done.json").is_file():
        return ckpt
    register_env(ENV_NAME, _menu_env)
    algorithm = _algorithm_config(cfg, algo, level, game).build_algo()
    try:
        if ckpt.is_dir():
            algorithm.restore_from_path(str(ckpt))
        steps, returns = 0, []
        while True:
            result = algorithm.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            ret = result["env_runners"].get("episode_return_mean")
            if ret is not None and np.isfinite(ret):
                returns.append(float(ret))
            print(f"  {algo}@{level} {game}: {steps}/{cfg.eval.rl_steps} env steps, mean return "
                  f"{returns[-1] if returns else float('nan'):.2f}", file=out, flush=True)
            tmp = folder / "checkpoint.tmp"
            algorithm.save_to_path(str(tmp))
            if ckpt.exists():
                import shutil

                shutil.rmtree(ckpt)
            tmp.replace(ckpt)
            if steps >= cfg.eval.rl_steps:
                break
    finally:
        algorithm.stop()
    (folder / "done.json").write_text(json.dumps({"algo": algo, "level": level, "game": game, "env_steps": steps,
                                                  "episode_return_means": returns}))
    print(f"baseline {algo}@{level} on {game}: {steps} env steps, last mean return "
          f"{returns[-1] if returns else float('nan'):.2f}", file=out)
    return ckpt


class GreedyPolicy:
    """A trained baseline acting greedily (argmax of its action distribution) on menu actions."""

    def __init__(self, checkpoint: str | Path):
        import torch
        from ray.rllib.core.rl_module.rl_module import RLModule

        torch.set_num_threads(1)
        path = Path(checkpoint) / "learner_group" / "learner" / "rl_module" / "default_policy"
        self.module = RLModule.from_checkpoint(str(path))

    def __call__(self, frame: np.ndarray) -> int:
        import torch

        obs = torch.from_numpy(frame.astype(np.float32)[None] / 255.0)
        with torch.no_grad():
            out = self.module.forward_inference({"obs": obs})
        if "actions" in out:
            return int(np.asarray(out["actions"]).reshape(-1)[0])
        return int(out["action_dist_inputs"].argmax(-1)[0])
