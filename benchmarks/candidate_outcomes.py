"""Does the world model's pick choose the candidate with the better real future? On a trained run, at
states the IPR agent meets, every one of its B candidates is executed from that same state and the game
then played on by the same random continuations (common random numbers), so each candidate gets its real
return; the world model's imagined returns R^ are then compared with them.

    .venv/bin/python benchmarks/candidate_outcomes.py runs/local [--games Airstriker-Genesis-v0] \
        [--states 24] [--continuations 6] [--horizon 400]

Per game: Spearman's rho of R^ with the candidates' real returns within each state (over states whose
candidates' real returns differ), and the real return of the candidate each arm would execute at the same
states: the IPR agent's pick (`serving.agent.pick`, the run's beta and kappa), the first candidate (a
sample of the policy: what `ipr-no-wm` plays), a uniformly random one (`ipr-random-pick`) and the best one
(an oracle: how much choosing among these candidates could add at all). The return is the critic's own
target at the world model's level: `reward_scale` per step alive (survival) or per point (utility),
discounted by gamma, ended by a failure (and a life lost with `world_model.episodic_life`), cut after
`--horizon` steps. Retro games go back to a state through the emulator's own state
(`RetroGameEnv.snapshot`); HTML and desktop games by replaying the episode's actions from its seed (slow:
every future replays the prefix), each replay checked against the frame first seen there: a state whose
replay differs is skipped and counted. `--set world_model.episodic_life=true` measures the target that a
life lost ends (the scorer is unchanged). Records benchmarks/results/candidate_outcomes.json (keyed by run, game, a goal other than
survival's and the overrides).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, write_result  # noqa: E402


class Rewind:
    """Plays a game and puts it back to an earlier state: the emulator's state where the env has
    `snapshot`, else a replay of the episode's actions from its seed."""

    def __init__(self, env, seed: int):
        self.env, self.seed = env, seed
        self.native = hasattr(env, "snapshot")

    def reset(self):
        self.actions: list[dict] = []
        obs, info = self.env.reset(seed=self.seed)
        return obs, info

    def step(self, action: dict):
        self.actions.append(action)
        return self.env.step(action)

    def mark(self):
        return self.env.snapshot() if self.native else list(self.actions)

    def back(self, mark) -> np.ndarray:
        if self.native:
            return self.env.restore(mark)
        obs, _ = self.env.reset(seed=self.seed)
        for a in mark:
            obs, *_ = self.env.step(a)
        return obs


def real_return(rewind: Rewind, mark, actions: list[dict], continuation, horizon: int, w) -> tuple[float, float, np.ndarray]:
    """From `mark`, with `actions` played first and then `continuation`: the critic's target under the world
    model's config `w` (its level's reward times `reward_scale`, discounted, ended by a failure or with
    `episodic_life` a life lost), the game's points over the same future (undiscounted), and the observation at
    `mark` (to check a replay)."""
    from ipr_dist.games.outcome import life_lost

    obs = start = rewind.back(mark)
    g, points, discount, lives = 0.0, 0.0, 1.0, -1
    for t in range(horizon):
        a = actions[t] if t < len(actions) else continuation(obs, {})
        obs, reward, terminated, truncated, info = rewind.env.step(a)
        g += discount * w.reward_scale * (1.0 if w.level == "survival" else float(reward))
        points += float(reward)
        lost, lives = life_lost(lives, info.get("lives", -1)), info.get("lives", -1)
        if terminated or truncated or (w.episodic_life and lost):
            break
        discount *= w.gamma
    return g, points, start


def measure_game(cfg, agent, game: str, args) -> dict:
    import ray

    from ipr_dist.games import make_env
    from ipr_dist.games.actions import RandomActions
    from ipr_dist.games.catalog import load_annotations
    from learners.align import goal_of
    from serving.agent import pick

    p, w = cfg.policy, cfg.world_model
    env = make_env(game, cfg.env, load_annotations(cfg.games.annotation_files), cfg.games.spec_files)
    goal = goal_of(cfg, args.goal_level)(game)
    rows, skipped, episode = [], 0, 0
    started = time.perf_counter()
    try:
        while len(rows) < args.states and skipped <= 2 * args.states:  # a game that does not replay: give up
            rewind = Rewind(env, seed=10_000 + episode)
            obs, info = rewind.reset()
            episode += 1
            decisions, done = 0, False
            while not done and len(rows) < args.states and skipped <= 2 * args.states:
                props = ray.get(agent.policy.propose.remote([obs], [goal], p.candidates, p.temperature, p.top_p,
                                                            p.distinct_first_codes))
                codes, logprobs = props.codes[0], props.logprobs[0]
                f = agent.features(obs[None])[0]
                answer = ray.get(agent.scorer.score.remote(f, codes, members=True))
                best = pick(answer, logprobs, p)
                routed = [agent.route(game, c) for c in codes]
                decisions += 1
                if decisions % args.every == 0:
                    mark = rewind.mark()
                    keys = [json.dumps([agent._jsonable(game, a) for a in r]) for r in routed]
                    distinct = {k: i for i, k in reversed(list(enumerate(keys)))}  # first candidate per action list
                    real = np.zeros((2, len(distinct), args.continuations))  # critic's target, points
                    ok = True
                    for j in range(args.continuations):
                        for slot, i in enumerate(distinct.values()):
                            cont = RandomActions(env.game.keys, env.game.uses_mouse,
                                                 seed=1_000 * episode + decisions * 31 + j)
                            *real[:, slot, j], start = real_return(rewind, mark, routed[i], cont, args.horizon, w)
                            ok &= bool(np.array_equal(start, obs))
                    if ok:
                        order = [list(distinct).index(k) for k in keys]
                        rows.append({"imagined": np.asarray(answer, np.float64)[:, 0].tolist(), "pick": int(best),
                                     "real": real.mean(2)[:, order].tolist(),
                                     "stderr": np.sqrt(real.var(2, ddof=1).mean(1) / args.continuations).tolist(),
                                     "distinct_actions": len(distinct), "step": len(rewind.actions)})
                        print(f"  {game}: state {len(rows)}/{args.states} (episode {episode}, step "
                              f"{len(rewind.actions)}, {len(distinct)} distinct action lists, "
                              f"{time.perf_counter() - started:.0f} s)", flush=True)
                    else:
                        skipped += 1
                    obs = rewind.back(mark)
                for a in routed[best]:
                    obs, _, terminated, truncated, _ = rewind.step(a)
                    if terminated or truncated:
                        done = True
                        break
    finally:
        env.close()
    return summarise(game, rows, skipped, time.perf_counter() - started)


def summarise(game: str, rows: list[dict], skipped: int, seconds: float) -> dict:
    """Per outcome (the critic's target, the game's points): how often the candidates' real outcomes differ
    by more than twice their standard error, rho of R^ with them within a state, and each arm's outcome."""
    from scipy.stats import spearmanr

    from ipr_dist.metrics.report import bootstrap_interval

    if not rows:
        raise SystemExit(f"{game}: no state could be measured ({skipped} replays differed from the first play); "
                         "this game does not replay deterministically from its seed")
    imagined = np.array([r["imagined"] for r in rows])
    picks = np.array([r["pick"] for r in rows])

    def interval(x):  # mean [2.5%, 97.5%], the report's bootstrap over states
        return [round(float(v), 5) for v in (x.mean(), *bootstrap_interval(x))]

    out = {"states": len(rows), "skipped_replays_differ": skipped, "seconds": round(seconds, 1),
           "mean_distinct_action_lists": float(np.mean([r["distinct_actions"] for r in rows]))}
    for o, name in enumerate(("target", "points")):
        real = np.array([r["real"][o] for r in rows])
        stderr = np.array([r["stderr"][o] for r in rows])
        picked = real[np.arange(len(rows)), picks]
        differs = real.max(1) - real.min(1) > 2 * stderr
        rhos = [spearmanr(i, r).statistic for i, r, d in zip(imagined, real, differs) if d and np.ptp(i) > 0]
        out[name] = {"states_whose_candidates_differ": int(differs.sum()),
                     "rho_within_state": [round(float(np.mean(rhos)), 3), len(rhos)] if rhos else None,
                     "real": {"pick": interval(picked), "first": interval(real[:, 0]),
                              "random": interval(real.mean(1)), "best": interval(real.max(1))},
                     "pick_minus_first": interval(picked - real[:, 0]),
                     "pick_minus_random": interval(picked - real.mean(1)),
                     "best_minus_random": interval(real.max(1) - real.mean(1))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--games", nargs="+", help="default: the run's games")
    parser.add_argument("--states", type=int, default=24, help="states measured per game")
    parser.add_argument("--continuations", type=int, default=6, help="random continuations per candidate")
    parser.add_argument("--horizon", type=int, default=400, help="steps of each future (the discount's 0.99^400 = 0.018)")
    parser.add_argument("--every", type=int, default=3, help="measure every n-th decision of the agent")
    parser.add_argument("--goal-level", default="survival", choices=["survival", "curiosity", "utility"],
                        help="the goal the policy is given, as ipr@LEVEL")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = parser.parse_args()
    if args.continuations < 2:
        parser.error("--continuations must be at least 2: a candidate's standard error needs two futures")

    import ray

    from cluster.runtime import init_ray
    from ipr_dist.cli import _run_config
    from serving.agent import Agent

    cfg = _run_config(argparse.Namespace(run=args.run, set=args.set)).with_absolute_root()
    init_ray(cfg.ray)
    agent = Agent(cfg)
    path = RESULTS / "candidate_outcomes.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    p, w = cfg.policy, cfg.world_model
    for game in args.games or agent.games:
        out = measure_game(cfg, agent, game, args)
        out.update({"benchmark": "candidate_outcomes", "date": time.strftime("%Y-%m-%d"), "level": w.level,
                    "goal_level": args.goal_level,
                    "candidates": p.candidates, "pick_prior_weight": p.pick_prior_weight,
                    "continuations": args.continuations, "horizon": args.horizon})
        level = "" if args.goal_level == "survival" else f" @{args.goal_level}"
        results[f"{Path(args.run).resolve()} {game}{level}" + "".join(f" --set {o}" for o in args.set)] = out
        for name in ("target", "points"):
            o = out[name]
            print(f"{game}, {name}: {out['states']} states, {o['states_whose_candidates_differ']} whose candidates' "
                  f"outcomes differ; rho(R^, real) within a state {o['rho_within_state']}; real: "
                  + ", ".join(f"{arm} {v[0]:.4f}" for arm, v in o["real"].items())
                  + f"; pick - first {o['pick_minus_first']}, pick - random {o['pick_minus_random']}, "
                  f"best - random {o['best_minus_random']}", flush=True)
    results["benchmark"] = "candidate_outcomes"
    write_result(results)
    ray.shutdown()


if __name__ == "__main__":
    main()
