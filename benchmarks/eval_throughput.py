"""Evaluation cost: episodes/s of the evaluation actors, and the Curiosity metric's cost against the
number of frames per episode.

1. Random-policy evaluation episodes on the embedded default's games (configs/local.yaml env, episodes
   capped at --steps), played by 1 evaluation actor (the reference) and by --envs actors in this
   script: episodes/s, env steps/s and their ratio to the reference.
2. magnitude_area on 128-d embeddings of n frames at 30 scales (one Cholesky solve per scale): seconds
   per episode for n = 16 ... 512, and each as a ratio to n = 64 (eval.frames_per_episode's default).

    .venv/bin/python benchmarks/eval_throughput.py --envs 2 --episodes 8 --steps 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import write_result


def episodes_per_second(cfg, games: list[str], workers: int, episodes: int) -> dict:
    import ray

    from actors.eval_worker import EvalWorker
    from cluster.evaluate import episode_seed

    env_cfg = cfg.env.model_copy(update={"max_episode_steps": cfg.eval.max_episode_steps})
    actors = [EvalWorker.options(num_cpus=0.5).remote(env_cfg, cfg.games, cfg.eval.frames_per_episode)
              for _ in range(workers)]
    # warm-up: each actor opens its first game (Chromium / emulator start is not evaluation cost)
    ray.get([a.play_episode.remote(games[i % len(games)], "random", 0, 1, None) for i, a in enumerate(actors)])
    tasks = [(games[i % len(games)], i) for i in range(episodes)]
    idle, pending, steps = list(actors), {}, 0
    start = time.perf_counter()
    while tasks or pending:
        while tasks and idle:
            g, i = tasks.pop(0)
            a = idle.pop()
            pending[a.play_episode.remote(g, "random", i, episode_seed(0, g, i), None)] = a
        done, _ = ray.wait(list(pending), num_returns=1)
        idle.append(pending.pop(done[0]))
        steps += ray.get(done[0]).length
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return {"workers": workers, "episodes": episodes, "env_steps": steps, "seconds": round(seconds, 2),
            "episodes_per_s": round(episodes / seconds, 3), "env_steps_per_s": round(steps / seconds, 1)}


def curiosity_cost(sizes: list[int], scales: int = 30, dim: int = 128, repeats: int = 3) -> list[dict]:
    from ipr_dist.metrics import convergence_scale, magnitude_area

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        grid = np.linspace(0, convergence_scale(x), scales)
        best = min(_timed(lambda: magnitude_area(x, grid)) for _ in range(repeats))
        rows.append({"frames": n, "seconds": round(best, 5)})
    ref = next(r["seconds"] for r in rows if r["frames"] == 64)
    for r in rows:
        r["ratio_to_64"] = round(r["seconds"] / ref, 2)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--envs", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()

    import ray

    from ipr_dist.config import load_config

    cfg = load_config(args.config, [f"eval.max_episode_steps={args.steps}"])
    games = cfg.fleet.games
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        ref = episodes_per_second(cfg, games, 1, args.episodes)
        par = episodes_per_second(cfg, games, args.envs, args.episodes)
    finally:
        ray.shutdown()
    cost = curiosity_cost([16, 32, 64, 128, 256, 512])
    result = {"benchmark": "eval_throughput", "games": games, "episode_cap": args.steps,
              "episodes": {"reference_1_actor": ref, f"{args.envs}_actors": par,
                           "ratio_episodes_per_s": round(par["episodes_per_s"] / ref["episodes_per_s"], 2)},
              "curiosity_seconds_per_episode": cost,
              "machine": "2 cores, CPU only"}
    print(result)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
