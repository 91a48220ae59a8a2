"""How a game's key is played, per source of steps in a run's store (random, agent, human): the share of
steps it is held, how often it goes from released to pressed between two steps of an episode (press edges),
and the reward per 100 steps. Games that act on a press rather than on a held key (Airstriker fires once
per press of B) reward press edges, not held keys; docs/evaluation.md measures why the agent's raw score
there stayed below random play's. Since such keys are annotated `press` (released on each step's last
frame), every held step of one is a press; in stores collected before, only the edges are.

    .venv/bin/python scripts/key_edges.py runs/local --game Airstriker-Genesis-v0 --key B
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def key_play(episode: np.ndarray, step: np.ndarray, held: np.ndarray, reward: np.ndarray) -> dict:
    """Held share, press edges and reward, both per 100 steps, of one source's steps of one game."""
    order = np.lexsort((step, episode))
    episode, held, reward = episode[order], held[order].astype(bool), reward[order]
    same = episode[1:] == episode[:-1]
    edges = int((held[1:] & ~held[:-1] & same).sum())
    n = len(held)
    return {"steps": n, "held": float(held.mean()), "press_edges_per_100": 100 * edges / n,
            "reward_per_100": 100 * float(reward.sum()) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory or URI (its data/ holds the store)")
    parser.add_argument("--game", required=True)
    parser.add_argument("--key", required=True, help="a key name of the game, as in `ipr games list`")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc

    from ipr_dist.data.store import open_store

    store = open_store(args.run)
    names = store.key_names().get(args.game)
    if names is None:
        sys.exit(f"error: the store of {args.run} has no steps of {args.game}; `ipr data inspect {args.run}` "
                 f"lists its games")
    if args.key not in names:
        sys.exit(f"error: {args.game} has no key {args.key!r}; its keys are {', '.join(names)}")
    k = names.index(args.key)
    columns = ["game", "source", "episode_id", "step", "keys", "reward"]
    t = pa.concat_tables([store.read_shard(p, columns) for p in store.shard_paths()])
    t = t.filter(pc.equal(t["game"], args.game))
    keys = np.array(t["keys"].to_pylist(), dtype=np.int8)[:, k]
    source, episode, step = (np.array(t[c].to_pylist()) for c in ("source", "episode_id", "step"))
    reward = np.array(t["reward"].to_pylist(), dtype=np.float64)
    print(f"| source | steps | {args.key} held | press edges / 100 steps | reward / 100 steps |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in sorted(set(source)):
        m = source == s
        r = key_play(episode[m], step[m], keys[m], reward[m])
        print(f"| {s} | {r['steps']} | {r['held']:.3f} | {r['press_edges_per_100']:.1f} | {r['reward_per_100']:.2f} |")


if __name__ == "__main__":
    main()
