"""Stage 4 throughput on the embedded default: real env steps/s during GRPO and where wall time goes.

A copy of a finished run's Stage 1-3 outputs (default runs/local) gets two short GRPO runs in this
script: the reference with k = 0 (each real step's own update only) and the paper's k = 4. Reported:
real env steps/s of each and their ratio (what the 4 imagination-only updates per real step cost the
acting side), and per loop the share of its wall time in proposing, scoring, playing, waiting on the
limiter, updating and syncing weights.

    .venv/bin/python benchmarks/grpo_throughput.py --run runs/local --real-steps 160
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import write_result

KEEP = ("config.yaml", "data", "features", "physcode", "world_model")


def copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in KEEP:
        src = run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    (dest / "policy").mkdir()
    shutil.copytree(run / "policy" / "aligned", dest / "policy" / "aligned")  # every version and the pointer
    return dest


def stage4(run: Path, real_steps: int, k: int) -> dict:
    from cluster.runtime import init_ray
    from ipr_dist.config import load_config
    from learners.grpo import train

    cfg = load_config(run / "config.yaml", [f"run.root={run.parent}", f"run.name={run.name}",
                                           f"grpo.real_steps={real_steps}", f"grpo.imagined_per_real={k}",
                                           f"grpo.checkpoint_every={real_steps}"])
    init_ray(cfg.ray)  # this script is the entry point: the stage joins the Ray it starts
    start = time.perf_counter()
    result = train(cfg, out=io.StringIO())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def shares(seconds: dict, total: float) -> dict:
    return {k: round(v / total, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/local")
    ap.add_argument("--real-steps", type=int, default=160)
    args = ap.parse_args()
    import ray

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (0, 4):
            run = copy_run(Path(args.run), Path(tmp) / f"k{k}")
            r = stage4(run, args.real_steps, k)
            ray.shutdown()
            rows[k] = {"real_steps": r["real_steps"], "imagined_updates": r["imagined_updates"], "ratio": r["ratio"],
                       "env_steps": r["env_steps"], "seconds": round(r["seconds"], 1),
                       "env_steps_per_s": round(r["env_steps"] / r["seconds"], 1),
                       "real_steps_per_s": round(r["real_steps"] / r["seconds"], 2),
                       "updates": r["updates"],
                       "acting_share": shares(r["acting_seconds"], r["seconds"]),
                       "learning_share": shares(r["learning_seconds"], r["seconds"])}
            print(k, rows[k], flush=True)
    result = {"benchmark": "grpo_throughput", "machine": "2 cores, no GPU (shared)", "run": args.run,
              "real_steps": args.real_steps, "k0": rows[0], "k4": rows[4],
              "env_steps_ratio_k4_vs_k0": round(rows[4]["env_steps_per_s"] / rows[0]["env_steps_per_s"], 3)}
    write_result(result)


if __name__ == "__main__":
    main()
