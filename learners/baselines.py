"""The RL baselines of paper Table 2: PPO and DQN from RLlib (new API stack), one policy per
(algorithm, level, game), trained on the same environments through the same wrappers every other
method plays (games.make_env + discrete.MenuEnv, with the level's reward).

Checkpoints: <run>/baselines/<algo>@<level>/<game>/, a new committed version after every training
iteration (an interrupted training resumes from it); the last one's pointer says it is finished.
"""

from __future__ import annotations

import sys

import numpy as np

from ipr_dist.config import Config
from ipr_dist.run_layout import BASELINES, CheckpointRef, RunLayout

ALGORITHMS = ("ppo", "dqn")
ENV_NAME = "ipr_menu"


def baseline(cfg: Config, algo: str, level: str, game: str) -> CheckpointRef:
    return CheckpointRef(RunLayout.of(cfg), f"{BASELINES}/{algo}@{level}/{game}")


def _menu_env(env_config: dict):
    from ipr_dist.config import EnvConfig, GamesConfig
    from ipr_dist.games import make_env
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.games.discrete import MenuEnv

    games = GamesConfig.model_validate(env_config["games"])
    env = make_env(env_config["game"], EnvConfig.model_validate(env_config["env"]),
                   load_annotations(games.annotation_files), games.spec_files)
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
            # No restarts: an env runner's config travels through the object store, where Ray cannot
            # restart an actor reliably (ray#53727, which it logs as an error); a dead env runner fails the
            # iteration instead, and `ipr eval` run again resumes from the last iteration's checkpoint.
            .fault_tolerance(restart_failed_env_runners=False)
            .learners(num_learners=0)
            .rl_module(model_config={"conv_filters": e.rl_conv_filters})
            .debugging(seed=cfg.run.seed))


def train(cfg: Config, algo: str, level: str, game: str, out=sys.stdout) -> CheckpointRef:
    """Train (or resume, or skip when finished) one baseline; returns its checkpoint."""
    from ray.tune.registry import register_env

    ref = baseline(cfg.with_absolute_root(), algo, level, game)
    layout, name = ref.layout, ref.name
    pointer = layout.checkpoint(name)
    if pointer and pointer.get("done"):
        return ref
    register_env(ENV_NAME, _menu_env)
    algorithm = _algorithm_config(cfg, algo, level, game).build_algo()
    try:
        if pointer:
            with layout.open_checkpoint(name) as folder:
                algorithm.restore_from_path(str(folder))
        steps, returns = 0, []
        while True:
            result = algorithm.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            ret = result["env_runners"].get("episode_return_mean")
            if ret is not None and np.isfinite(ret):
                returns.append(float(ret))
            target = cfg.eval.rl_steps  # one iteration may sample past it (DQN's first takes 1,000 steps)
            done_of = f"{steps}/{target}" if steps <= target else f"{steps} (eval.rl_steps {target} reached)"
            print(f"  {algo}@{level} {game}: {done_of} env steps, {_mean_return(returns)}", file=out, flush=True)
            done = steps >= cfg.eval.rl_steps
            with layout.new_checkpoint(name, done=done, env_steps=steps, episode_return_means=returns) as folder:
                algorithm.save_to_path(str(folder))
            if done:
                break
    finally:
        algorithm.stop()
    print(f"baseline {algo}@{level} on {game}: {steps} env steps, last {_mean_return(returns)}", file=out)
    return ref


def _mean_return(returns: list[float]) -> str:
    """The latest mean episode return in words; before any episode has ended there is none (not "nan")."""
    return f"mean return {returns[-1]:.2f}" if returns else "mean return: no episode has ended yet"


class GreedyPolicy:
    """A trained baseline acting greedily (argmax of its action distribution) on menu actions."""

    def __init__(self, checkpoint: CheckpointRef):
        import torch
        from ray.rllib.core.rl_module.rl_module import RLModule

        torch.set_num_threads(1)
        with checkpoint.open() as folder:
            self.module = RLModule.from_checkpoint(str(folder / "learner_group" / "learner" / "rl_module" /
                                                       "default_policy"))

    def __call__(self, frame: np.ndarray) -> int:
        import torch

        obs = torch.from_numpy(frame.astype(np.float32)[None] / 255.0)
        with torch.no_grad():
            out = self.module.forward_inference({"obs": obs})
        if "actions" in out:
            return int(np.asarray(out["actions"]).reshape(-1)[0])
        return int(out["action_dist_inputs"].argmax(-1)[0])
