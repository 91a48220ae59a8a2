"""Env fleet steps/s against the raw single-process stable-retro loop, measured in the same run.

    .venv/bin/python benchmarks/fleet_throughput.py [--actors 1 2 4 8] [--seconds 8]

Raw: `env.step(env.action_space.sample())` on stable-retro's own env in this process. Fleet: N env
actors playing chunks of random actions, each writing its chunks as Parquet shards to a local store
(the driver commits their manifests): the fleet as collection runs it. Reported:
ratio = fleet / (raw x min(actors, cores)), target >= 0.9. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


class RawLoop:
    """stable-retro's own env stepped with random actions in this process; it keeps playing between
    measurements, so its game states (and emulator cost) range over episodes as the fleet's do."""

    def __init__(self, game: str):
        import stable_retro as retro

        self.env = retro.make(game, render_mode=None, inttype=retro.data.Integrations.ALL)
        self.env.reset(seed=0)

    def steps_per_second(self, seconds: float) -> float:
        env = self.env
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            n += 1
            if term or trunc:
                env.reset()
        return n / (time.perf_counter() - start)


def _raw_worker(game: str, seconds: float, queue) -> None:
    loop = RawLoop(game)
    loop.steps_per_second(1.0)
    queue.put(loop.steps_per_second(seconds))


def raw_parallel_steps_per_second(game: str, processes: int, seconds: float) -> float:
    """`processes` plain processes (no Ray) each running the raw loop at once: what this machine
    gives when it runs that many emulators together, the fair ceiling for a fleet of that size."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(game, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def fleet_steps_per_second(cfg, actors: int, seconds: float, raw: float, store_dir: str) -> float:
    import ray

    from actors.env_fleet import EnvFleet
    from ipr_dist.data.store import TrajectoryStore

    fleet_cfg = cfg.fleet.model_copy(update={"num_envs": actors})
    store = TrajectoryStore(f"{store_dir}/{actors}-{time.monotonic_ns()}")
    store.open_for_writing()
    fleet = EnvFleet(cfg.fleet.games, cfg.env, fleet_cfg, 0, cfg.games, store)
    try:
        fleet.run(fleet_cfg.chunk_steps * actors * 2)  # warm-up: every actor started and playing
        budget = int(raw * min(actors, os.cpu_count() or 1) * seconds)
        start = time.perf_counter()
        report = fleet.run(budget)
        elapsed = time.perf_counter() - start
        return budget / elapsed if report else 0.0
    finally:
        fleet.shutdown()
        del fleet
        time.sleep(1.0)
        ray.util.get_node_ip_address()  # keep the connection warm between runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--game", default="Airstriker-Genesis-v0")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--frame-size", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--chunk-steps", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per fleet size; the median is kept")
    ap.add_argument("--out", help="result file (default: benchmarks/results/<benchmark>.json)")
    args = ap.parse_args()

    import ray

    from ipr_dist.config import load_config

    cores = os.cpu_count() or 1
    raw_loop = RawLoop(args.game)
    raw_loop.steps_per_second(2.0)  # warm-up
    cfg = load_config(None, [f"fleet.games=[{args.game}]", f"env.frame_size=[{args.frame_size[0]}, {args.frame_size[1]}]",
                             "env.frame_skip=1", f"fleet.chunk_steps={args.chunk_steps}", "fleet.cpus_per_env=0.25"])
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.actors:
            # Each fleet run is bracketed by raw runs (before and after), which cancels slow drift of
            # the shared machine's speed; the median over repeats damps game-state variance.
            samples = []
            for _ in range(args.repeats):
                before = raw_loop.steps_per_second(args.seconds / 2)
                rate = fleet_steps_per_second(cfg, n, args.seconds, before, tmp)
                raw = (before + raw_loop.steps_per_second(args.seconds / 2)) / 2
                samples.append((rate / (raw * min(n, cores)), rate, raw))
            ratio, rate, raw = sorted(samples)[len(samples) // 2]
            parallel = raw_parallel_steps_per_second(args.game, min(n, cores), args.seconds)
            rows.append({"actors": n, "fleet_steps_per_s": round(rate, 1), "raw_steps_per_s": round(raw, 1),
                         "ratio": round(ratio, 3), "ratios_all": [round(r, 3) for r, _, _ in samples],
                         "raw_parallel_processes": min(n, cores), "raw_parallel_steps_per_s": round(parallel, 1),
                         "ratio_vs_raw_parallel": round(rate / parallel, 3)})
            print(f"fleet {n} actors: {rate:,.0f} steps/s  raw {raw:,.0f} steps/s  ratio {ratio:.3f} "
                  f"(all {[round(r, 3) for r, _, _ in samples]})  vs {min(n, cores)} raw processes at once "
                  f"{parallel:,.0f} steps/s: {rate / parallel:.3f}")
    ray.shutdown()
    result = {
        "benchmark": "fleet_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {cores} cores, {platform.python_version()}",
        "game": args.game,
        "frame_size": args.frame_size,
        "chunk_steps": args.chunk_steps,
        "store_writes": "every chunk, by the env actor that played it",
        "rows": rows,
        "ratio_definition": "fleet / (raw * min(actors, cores)); target >= 0.9",
        "ratio_vs_raw_parallel_definition": "fleet / (min(actors, cores) plain raw processes run at once)",
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
