"""Weight push from the GRPO learner to policy servers: collective broadcast vs the object store.

In one Ray instance, for the embedded tiny policy and for a ~100M-parameter stand-in (the same
Qwen3-VL architecture, wider and deeper, random weights), a learner group (M = 1) and S transformers
policy servers: the time of one push by the broadcast path (learner rank 0 -> each server's gloo
pair group, actors/weight_sync.py) and by the object-store path (rank 0's state dict as a Ray
object, each server loading it), median of `--repeats` pushes after a warm-up push, and their ratio.
On CPU both paths move float32; on GPUs the broadcast moves bfloat16 over NCCL (not measured here).

    .venv/bin/python benchmarks/weight_push.py --servers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import write_result

MODELS = {"tiny": dict(hidden=64, layers=2, vision_hidden=32), "stand-in ~100M": dict(hidden=768, layers=16, vision_hidden=256,
                                                                                     vocab=8192)}


def measure(name: str, build: dict, servers: int, repeats: int, codes: int = 16) -> dict:
    import ray

    from ipr_dist.config import load_config
    from ipr_dist.models.policy import PhysCodePolicy
    from ipr_dist.models.tiny_qwen3vl import build_tiny
    from learners.learner_group import LearnerGroup
    from serving.transformers_backend import TransformersPolicyServer

    folder = Path(tempfile.mkdtemp(prefix="ipr-push-"))
    base = build_tiny(folder / "base", **build)
    policy = PhysCodePolicy(base, codes=codes)
    params = sum(p.numel() for p in policy.model.parameters())
    policy.save(folder / "aligned")
    del policy
    cfg = load_config("configs/smoke.yaml", ["grpo.cpus_per_learner=0.25"])
    group = LearnerGroup(cfg, str(folder / "aligned"), str(folder / "aligned"), codes, resume=False)
    handles = {f"server-{i}": TransformersPolicyServer.options(num_cpus=0.25).remote(str(folder / "aligned"), codes, 3)
               for i in range(servers)}
    ray.get([s.version.remote() for s in handles.values()])
    times: dict[str, list[float]] = {"broadcast": [], "object_store": []}
    try:
        for i in range(repeats + 1):  # the first push of each path is a warm-up (and the broadcast's join)
            start = time.perf_counter()
            assert group.push(handles, i + 1) == {}
            if i:
                times["broadcast"].append(time.perf_counter() - start)
            start = time.perf_counter()
            weights = group.weights_ref()
            ray.get([s.update_weights.remote(weights, i + 1) for s in handles.values()])
            del weights
            if i:
                times["object_store"].append(time.perf_counter() - start)
    finally:
        group.shutdown()
        for s in handles.values():
            ray.kill(s)
    broadcast, store = statistics.median(times["broadcast"]), statistics.median(times["object_store"])
    row = {"model": name, "parameters": params, "megabytes_fp32": params * 4 / 2**20, "servers": servers,
           "broadcast_s": broadcast, "object_store_s": store, "object_store_over_broadcast": store / broadcast,
           "all_broadcast_s": times["broadcast"], "all_object_store_s": times["object_store"]}
    print(f"{name:16} {params / 1e6:7.1f}M params  broadcast {broadcast:7.3f} s  object store {store:7.3f} s  "
          f"ratio {store / broadcast:5.2f}", flush=True)
    return row


def main() -> None:
    import os

    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        rows = [measure(name, build, args.servers, args.repeats) for name, build in MODELS.items()]
    finally:
        ray.shutdown()
    write_result({"benchmark": "weight_push", "machine": f"{os.cpu_count()} cores, CPU only", "servers": args.servers,
                  "repeats": args.repeats, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
