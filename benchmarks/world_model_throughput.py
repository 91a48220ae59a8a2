"""Stage 2 throughput on this machine: imagined candidate rollouts per second, and what the scorer
actor adds to a direct in-process call.

    .venv/bin/python benchmarks/world_model_throughput.py [--device cuda]

Rollouts: `imagine` on N environments x B = 8 candidates x H = 5 imagined steps (one forward per
step over all N x B), for N = 1..64, at the `local` preset's size (d 128, 4 layers, 128-d features,
K = 64) and the paper's (d 512, 8 layers, 1024-d DINOv3 features, K = 256). Latency: one
environment's request (B = 8) answered by the WorldModelScorer actor on local Ray, against the same
`imagine` call in this process, as a ratio (median of many calls), with the scorer's batching window
at 0 and at its default 5 ms. Results: benchmarks/results/world_model_throughput.json.
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

SIZES = {"local": dict(f_dim=128, code_dim=128, d=128, layers=4, heads=4, codes=64),
         "paper": dict(f_dim=1024, code_dim=512, d=512, layers=8, heads=8, codes=256)}
B, H = 8, 5


def build(size: str, device: str):
    import torch

    from ipr_dist.models.world_model import WorldModel, WorldModelConfig

    s = dict(SIZES[size])
    codes = s.pop("codes")
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig(horizon=H, **s), torch.randn(codes, s["code_dim"]))
    return model.to(device).eval(), codes


def whole_context_unroll(model):
    """The unroll before 2026-12-06: every imagined step runs the whole growing context again."""
    import torch

    def unroll(f0, codes):
        feats = [f0]
        for k in range(codes.shape[1]):
            feats.append(model.predict(torch.stack(feats, 1), codes[:, :k + 1])[:, -1])
        return torch.stack(feats[1:], 1)
    return unroll


def rollouts_per_second(model, codes: int, envs: int, device: str, seconds: float = 2.0) -> float:
    import torch

    f = torch.randn(envs, model.cfg.f_dim, device=device)
    seqs = torch.randint(0, codes, (envs, B, H), device=device)
    model.imagine(f, seqs)  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        model.imagine(f, seqs)
        if device == "cuda":
            torch.cuda.synchronize()
        calls += 1
    return envs * B * calls / (time.perf_counter() - start)


def scorer_latency(model, codes: int, window_ms: float, calls: int = 200) -> dict:
    import numpy as np
    import ray
    import torch

    from actors.world_model_scorer import WorldModelScorer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "config": model.cfg.__dict__, "phase": 2, "step": 0}, path)
        scorer = WorldModelScorer.options(num_cpus=1).remote(str(path), window_ms=window_ms)
        rng = np.random.default_rng(0)
        f = rng.normal(size=model.cfg.f_dim).astype(np.float32)
        seqs = rng.integers(0, codes, (B, H))
        for _ in range(10):
            ray.get(scorer.score.remote(f, seqs))
        actor, direct = [], []
        ft, st = torch.from_numpy(f)[None], torch.from_numpy(seqs)[None]
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(scorer.score.remote(f, seqs))
            actor.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.imagine(ft, st)
            direct.append(time.perf_counter() - start)
        ray.kill(scorer)
    a, d = statistics.median(actor), statistics.median(direct)
    return {"window_ms": window_ms, "actor_ms": a * 1e3, "direct_ms": d * 1e3, "ratio": a / d}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--envs", default="1,2,4,8,16,32,64")
    ap.add_argument("--out")
    args = ap.parse_args()
    envs = [int(n) for n in args.envs.split(",")]
    result = {"benchmark": "world_model_throughput", "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "cpu_threads": torch.get_num_threads(), "candidates": B, "horizon": H, "rollouts_per_s": {}}
    for size in SIZES:
        model, codes = build(size, args.device)
        result["rollouts_per_s"][size] = {}
        for n in envs:
            rate = rollouts_per_second(model, codes, n, args.device)
            result["rollouts_per_s"][size][n] = rate
            print(f"{size:5s} envs {n:3d}: {rate:9.0f} candidate rollouts/s ({rate * H:9.0f} imagined steps/s)",
                  flush=True)
    result["cached_unroll_vs_whole_context"] = {}
    for size in SIZES:  # imagine with the unroll before 2026-12-06 (whole context each step), alternated with today's
        model, codes = build(size, args.device)
        cached, whole = [], []
        for _ in range(3):
            cached.append(rollouts_per_second(model, codes, 8, args.device, seconds=1.0))
            model.unroll = whole_context_unroll(model)
            whole.append(rollouts_per_second(model, codes, 8, args.device, seconds=1.0))
            del model.unroll
        ratio = statistics.median(cached) / statistics.median(whole)
        result["cached_unroll_vs_whole_context"][size] = {"envs": 8, "ratio": ratio}
        print(f"{size:5s} envs   8: imagine with the cached unroll {ratio:.2f}x the rollouts/s of the whole-context one",
              flush=True)
    if args.device == "cpu":
        from cluster.runtime import init_ray
        from ipr_dist.config import RayConfig

        init_ray(RayConfig())
        model, codes = build("local", "cpu")
        torch.set_num_threads(1)  # the actor gets one CPU; compare like with like
        result["scorer_latency"] = [scorer_latency(model, codes, w) for w in (0.0, 5.0)]
        for row in result["scorer_latency"]:
            print(f"scorer, window {row['window_ms']} ms: {row['actor_ms']:.2f} ms vs direct {row['direct_ms']:.2f} ms "
                  f"= {row['ratio']:.2f}x")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
