"""What does holding one control all episode long score? Every key combination of a game held for a whole
episode, on the evaluation's seeds and cap, beside random play: the Survival a near-constant agent gets
for free (the evaluation report's "Executed controls" table says how near-constant an agent is).

    .venv/bin/python scripts/held_controls.py configs/local.yaml Airstriker-Genesis [--episodes 3]

Keyboard games only (a pointer game has a control per cell: too many to hold one by one). Prints one
markdown row per control, longest-lived first: mean episode length / cap (Survival when the game's step
unit is the cap, as for every game of the local preset) and mean score.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("game")
    parser.add_argument("--episodes", type=int, default=3, help="episodes per control, the evaluation's first seeds")
    args = parser.parse_args()

    from ipr_dist.config import load_config
    from ipr_dist.games import game_info, make_env
    from ipr_dist.games.actions import RandomActions, noop_action
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.models.router import Control
    from cluster.evaluate import episode_seed

    cfg = load_config(args.config)
    annotations = load_annotations(cfg.games.annotation_files)
    if game_info(args.game, annotations, cfg.games.spec_files).uses_mouse:
        sys.exit(f"held_controls: {args.game} is a pointer game; this script holds keyboard controls only")
    env = make_env(args.game, cfg.env, annotations, cfg.games.spec_files)
    game, cap = env.game, cfg.eval.max_episode_steps
    seeds = [episode_seed(cfg.run.seed, game.id, i) for i in range(args.episodes)]

    def play(act, seed: int) -> tuple[int, float]:
        obs, info = env.reset(seed=seed)
        score = 0.0
        for t in range(cap):
            obs, reward, terminated, _, info = env.step(act(obs, info))
            score += float(reward)
            if terminated:
                return t + 1, score
        return cap, score

    rows = []
    for pressed in itertools.product([0, 1], repeat=len(game.keys)):
        action = noop_action(len(game.keys))
        action["keys"][:] = pressed
        runs = [play(lambda obs, info: action, s) for s in seeds]
        name = Control(tuple(int(i) for i in np.flatnonzero(pressed))).name(game.keys)
        rows.append((np.mean([n for n, _ in runs]) / cap, name, np.mean([s for _, s in runs])))
    runs = [play(RandomActions(game.keys, False, s), s) for s in seeds]
    env.close()
    print(f"| {game.id}, held for the episode ({args.episodes} seeds, cap {cap}) | length / cap | score |")
    print("| --- | ---: | ---: |")
    print(f"| random play | {np.mean([n for n, _ in runs]) / cap:.3f} | {np.mean([s for _, s in runs]):.1f} |")
    for survival, name, score in sorted(rows, key=lambda r: (-r[0], r[1])):
        print(f"| {name} | {survival:.3f} | {score:.1f} |")


if __name__ == "__main__":
    main()
