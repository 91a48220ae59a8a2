"""Collection's data path: driver-written shards (the path before issue "Cluster path 1/3") against
actor-written shards (today's), in the same run, on local Ray.

    .venv/bin/python benchmarks/collection_path.py [--actors 4 16 48] [--frame-sizes 64 128] [--seconds 20]

Both paths play Airstriker-Genesis with random actions in N env actors (fractional CPUs: N actors
share this machine's cores) and store every step in a Parquet store on local disk:
  driver-written: each actor returns its chunk's arrays (frames included) as an ObjectRef; the
                  driver fetches them and writes the shard on 2 writer threads (what `EnvFleet.run`
                  did before);
  actor-written:  each actor writes its shard itself and returns its name and row count; the
                  driver writes the manifest (`EnvFleet.run` now).
Reported per (path, actors, frame size): total committed steps/s, and the driver's CPU seconds per
1,000 steps (time.process_time of the driver process, all its threads: what caps a head node). The
two paths alternate, 2 repeats each, medians kept. Results: benchmarks/results/collection_path.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


def driver_written(cfg, store, actors: int, steps: int) -> tuple[float, float]:
    """The former path: arrays to the driver, shards written by its writer threads."""
    import ray

    from actors.env_fleet import EnvRunner

    @ray.remote
    class ArrayActor:  # the env actor of the former path: returns the chunk's arrays
        def __init__(self, *args):
            self.runner = EnvRunner(*args)

        def ready(self) -> bool:
            return True

        def collect(self, k: int):
            arrays, meta, stats = self.runner.play_chunk(k, 0)
            return arrays, meta, stats

    fleet = [ArrayActor.options(num_cpus=cfg.fleet.cpus_per_env).remote(
        i, cfg.fleet.games[0], cfg.env, cfg.fleet, cfg.games, 0, f"d{actors}", store) for i in range(actors)]
    ray.get([a.ready.remote() for a in fleet])
    k = cfg.fleet.chunk_steps
    for a in fleet:  # warm-up: one chunk each, not written
        ray.get(a.collect.remote(k))
    cpu, start = time.process_time(), time.perf_counter()
    pending = {a.collect.remote(k): a for a in fleet for _ in range(cfg.fleet.inflight_chunks)}
    scheduled = k * len(pending)
    written = 0
    writes = set()
    with ThreadPoolExecutor(2) as pool:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            arrays, meta, _ = ray.get(ref)
            writes.add(pool.submit(store.write_chunk, arrays, meta))
            if scheduled < steps:
                pending[actor.collect.remote(k)] = actor
                scheduled += k
            done, writes = wait(writes, timeout=0, return_when=FIRST_COMPLETED)
            written += sum(f.result() for f in done)
        written += sum(f.result() for f in writes)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    for a in fleet:
        ray.kill(a)
    return written / elapsed, 1000 * cpu / written


def actor_written(cfg, store, actors: int, steps: int) -> tuple[float, float]:
    """Today's path: EnvFleet.run, the actors write their shards, the driver commits manifests."""
    from actors.env_fleet import EnvFleet

    fleet = EnvFleet(cfg.fleet.games, cfg.env, cfg.fleet, 0, cfg.games, store)
    try:
        fleet.run(cfg.fleet.chunk_steps * actors)  # warm-up: every actor started and playing
        cpu, start = time.process_time(), time.perf_counter()
        report = fleet.run(steps)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        fleet.shutdown()
    return report.committed_steps / elapsed, 1000 * cpu / report.committed_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--frame-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seconds", type=float, default=20.0, help="about how long each measurement plays")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()

    import ray

    from ipr_dist.config import load_config
    from ipr_dist.data.store import TrajectoryStore

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.frame_sizes:
            for n in args.actors:
                cfg = load_config(None, ["fleet.games=[Airstriker-Genesis]", f"env.frame_size=[{size}, {size}]",
                                         "env.frame_skip=1", "fleet.chunk_steps=256",
                                         f"fleet.cpus_per_env={int(cores / n * 1e4) / 1e4}", f"fleet.num_envs={n}"])
                steps = int(1500 * cores * args.seconds) // 256 * 256  # ~1,500 raw steps/s per core
                samples = {"driver": [], "actor": []}
                for r in range(args.repeats):
                    for path, fn in (("driver", driver_written), ("actor", actor_written)):
                        store = TrajectoryStore(f"{tmp}/{path}-{size}-{n}-{r}")
                        store.open_for_writing()
                        rate, cpu = fn(cfg, store, n, steps)
                        samples[path].append((rate, cpu))
                        print(f"{size}x{size} {n:>3} actors {path}-written: {rate:,.0f} steps/s, driver "
                              f"{cpu:.3f} CPU s / 1000 steps", flush=True)
                for path, vals in samples.items():
                    rows.append({"path": f"{path}-written", "actors": n, "frame_size": size,
                                 "steps_per_s": round(statistics.median(v[0] for v in vals), 1),
                                 "driver_cpu_s_per_1000_steps": round(statistics.median(v[1] for v in vals), 4),
                                 "all": [[round(a, 1), round(b, 4)] for a, b in vals]})
    ray.shutdown()
    write_result({
        "benchmark": "collection_path",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {cores} cores, {platform.python_version()}",
        "game": "Airstriker-Genesis", "chunk_steps": 256, "frame_skip": 1, "store": "local disk, zstd Parquet",
        "rows": rows,
    }, args.out)


if __name__ == "__main__":
    main()
