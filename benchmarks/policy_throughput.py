"""Policy (stage 3) throughput on this machine: proposals per second of the transformers backend,
B = 8 candidates of L = 4 PhysCode tokens per input, for batches of 1..16 inputs (environments).

    .venv/bin/python benchmarks/policy_throughput.py [--hidden 64] [--layers 2]

Model: the embedded tiny Qwen3-VL (`ipr policy init-tiny`, the local preset's size by default),
64 x 64 frames, K = 64 PhysCode tokens. Timed in-process (`PhysCodePolicy.propose`, one generate
per batch) and through the TransformersPolicyServer actor on local Ray (the same batch in one call),
as a ratio. The vLLM backend needs a GPU: record its figures here when run on one (say which).
Results: benchmarks/results/policy_throughput.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402

B, L, K = 8, 4, 64


def main() -> None:
    import numpy as np
    import ray
    import torch

    from cluster.runtime import init_ray
    from ipr_dist.config import RayConfig
    from ipr_dist.models.policy import PhysCodePolicy
    from ipr_dist.models.tiny_qwen3vl import build_tiny
    from serving.transformers_backend import TransformersPolicyServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the server actor gets one CPU; compare like with like
    rng = np.random.default_rng(0)
    result = {"benchmark": "policy_throughput", "device": "cpu", "cpu": platform.processor() or "cpu",
              "model": f"tiny Qwen3-VL, hidden {args.hidden}, {args.layers} layers", "candidates": B, "length": L,
              "codes": K, "in_process": {}, "actor": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny(Path(tmp) / "base", hidden=args.hidden, layers=args.layers)
        policy = PhysCodePolicy(base, codes=K)
        policy.save(Path(tmp) / "pc")
        init_ray(RayConfig())
        server = TransformersPolicyServer.options(num_cpus=1).remote(str(Path(tmp) / "pc"), K, L, window_ms=0.0)
        for n in [int(x) for x in args.batches.split(",")]:
            frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
            goals = ["Keep the ball in play with the paddle and break every brick."] * n
            policy.propose(frames, goals, B, L)
            ray.get(server.propose.remote(frames, goals, B))
            local, remote = [], []
            for _ in range(5):
                start = time.perf_counter()
                policy.propose(frames, goals, B, L)
                local.append(time.perf_counter() - start)
                start = time.perf_counter()
                ray.get(server.propose.remote(frames, goals, B))
                remote.append(time.perf_counter() - start)
            a, r = statistics.median(local), statistics.median(remote)
            result["in_process"][n] = n * B / a
            result["actor"][n] = n * B / r
            print(f"batch {n:2d}: {n * B / a:7.1f} proposals/s in process, {n * B / r:7.1f} through the actor "
                  f"({r / a:.2f}x the time)", flush=True)
        ray.kill(server)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
