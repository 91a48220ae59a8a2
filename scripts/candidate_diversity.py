"""What the world model has to choose from: on a trained run, for stored frames of each training game,
the policy's B candidates, how many distinct code sequences and distinct routed action lists they are,
and how far apart their imagined returns lie. If the candidates route to one action list, no scorer
can make IPR differ from its no-world-model ablation (which plays the first candidate).

    .venv/bin/python scripts/candidate_diversity.py runs/local [--contexts 8] [--set policy.distinct_first_codes=true]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--contexts", type=int, default=8, help="stored frames per game")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = parser.parse_args()

    import ray

    from cluster.runtime import init_ray
    from ipr_dist.cli import _run_config
    from learners.align import goal_of
    from learners.grpo import probe_contexts
    from serving.agent import Agent

    cfg = _run_config(argparse.Namespace(run=args.run, set=args.set)).with_absolute_root()  # the run given, wherever it is
    init_ray(cfg.ray)
    agent = Agent(cfg)
    p = cfg.policy
    contexts = probe_contexts(cfg, agent, goal_of(cfg, cfg.world_model.level), args.contexts * len(agent.games))
    props = ray.get(agent.policy.propose.remote([c.frame for c in contexts], [c.goal for c in contexts],
                                                p.candidates, p.temperature, p.top_p, p.distinct_first_codes))
    scores = ray.get([agent.scorer.score.remote(c.features, props.codes[j]) for j, c in enumerate(contexts)])
    rows: dict[str, dict[str, list]] = {}
    for j, c in enumerate(contexts):
        codes = props.codes[j]
        routed = [json.dumps([agent._jsonable(c.game, a) for a in agent.route(c.game, seq)]) for seq in codes]
        r = rows.setdefault(c.game, {"sequences": [], "action_lists": [], "spread": [], "best_is_first": []})
        r["sequences"].append(len({tuple(s) for s in codes.tolist()}))
        r["action_lists"].append(len(set(routed)))
        r["spread"].append(float(np.max(scores[j]) - np.min(scores[j])))
        best = int(np.argmax(scores[j]))
        r["best_is_first"].append(routed[best] == routed[0])
    print(f"{args.run}: B = {p.candidates} candidates per context, T = {p.temperature}, top-p = {p.top_p}, "
          f"distinct first codes {p.distinct_first_codes}")
    print("| game | contexts | distinct code sequences | distinct routed action lists | imagined-return spread "
          "(max - min) | best candidate routes like the first |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for game, r in sorted(rows.items()):
        print(f"| {game} | {len(r['sequences'])} | {np.mean(r['sequences']):.1f} | {np.mean(r['action_lists']):.1f} | "
              f"{np.mean(r['spread']):.4f} | {np.mean(r['best_is_first']):.0%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
