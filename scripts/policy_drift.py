"""How far Stage 4 moved the policy on each game: KL(pi_grpo || pi_aligned) of the first code's distribution at
the sampling temperature, on frames of the run's own random play (the same frames for both policies), per
game, with the games GRPO learned on marked. GRPO's updates on one game move the weights every game shares:
a large KL on a game GRPO did not learn on is drift that no advantage asked for.

    .venv/bin/python scripts/policy_drift.py runs/local [--frames 48] [--grpo DIR] [--aligned DIR]

`--grpo` / `--aligned`: a policy directory to read instead of the run's committed one (e.g. a copy's).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--frames", type=int, default=48, help="frames per game")
    parser.add_argument("--grpo", help="Stage 4 policy directory (default: the run's)")
    parser.add_argument("--aligned", help="aligned policy directory (default: the run's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from ipr_dist.cli import _run_config
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.models.policy import PhysCodePolicy, first_code_kl
    from ipr_dist.run_layout import RunLayout
    from learners.align import aligned_policy, goal_of, grpo_policy
    from learners.grpo import collected_shards, games_to_learn

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    cfg = _run_config(argparse.Namespace(run=args.run, set=args.set)).with_absolute_root()
    layout = RunLayout.of(cfg)
    store = TrajectoryStore(layout)
    shape = store.frame_shape()
    paths = collected_shards(store)
    goal = goal_of(cfg, cfg.world_model.level)
    rng = np.random.default_rng(cfg.run.seed)
    frames, goals, games = [], [], []
    for game in sorted(paths):
        for path in rng.choice(paths[game], size=min(args.frames, len(paths[game])), replace=False):
            table = store.read_shard(str(path), columns=["frame"])
            row = int(rng.integers(len(table)))
            frames.append(decode_frames(table["frame"].slice(row, 1), shape)[0])
            goals.append(goal(game))
            games.append(game)
    games = np.array(games)
    with ExitStack() as stack:
        grpo_dir = args.grpo or stack.enter_context(grpo_policy(cfg).open())
        aligned_dir = args.aligned or stack.enter_context(aligned_policy(cfg).open())
        if grpo_dir is None:
            raise SystemExit(f"{args.run}: no Stage 4 policy (run `ipr policy grpo {args.run}` first)")
        policy, reference = PhysCodePolicy(grpo_dir), PhysCodePolicy(aligned_dir)
    kl = first_code_kl(policy, reference, frames, goals, cfg.policy.temperature)
    learned = games_to_learn(cfg, sys.stderr)
    print(f"KL(pi_grpo || pi_aligned) of the first code at T={cfg.policy.temperature}, {args.frames} frames per game "
          "of random play")
    print("| game | GRPO learned on it | mean KL [95%] |")
    print("| --- | --- | ---: |")
    for game in sorted(set(games)):
        k = kl[games == game]
        boot = np.array([rng.choice(k, len(k)).mean() for _ in range(2000)])
        on = "every game" if learned is None else ("yes" if game in learned else "no")
        print(f"| {game} | {on} | {k.mean():.4f} [{np.quantile(boot, 0.025):.4f}, {np.quantile(boot, 0.975):.4f}] |")


if __name__ == "__main__":
    main()
