"""What the GPU plumbing of the stage trainers costs on the CPU: PhysCode and world-model optimizer
steps as the Ray Train loops now run them (batches moved to the worker's device, the autocast
context, float32 VQ distances) against the same steps without any of it, interleaved in one
process on the same model, data and batches; median step time of each and their ratio.

    .venv/bin/python benchmarks/stage_device_path.py [RUN]     (default RUN: runs/local)

Needs a run through Stage 2 (its feature shards and PhysCode checkpoint). Results:
benchmarks/results/stage_device_path.json.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


def main() -> None:
    import torch

    from ipr_dist.config import load_config
    from ipr_dist.models.physcode import PhysCode
    from ipr_dist.run_layout import RunLayout
    from ipr_dist.devices import autocast
    from learners.physcode import load_clips, model_config
    from learners.world_model import build_models, prepare

    run = sys.argv[1] if len(sys.argv) > 1 else "runs/local"
    torch.set_num_threads(1)
    cfg = load_config(f"{run}/config.yaml", [f"run.root={Path(run).parent}", f"run.name={Path(run).name}"])
    device = torch.device("cpu")
    p = cfg.physcode
    data = load_clips(RunLayout.of(cfg), p.clip_len, p.flow_pool_grid, p.holdout)
    data.standardise()
    torch.manual_seed(0)
    model = PhysCode(model_config(cfg, data)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    rng = np.random.default_rng(0)
    times = {"reference": [], "device_path": []}

    def physcode_step(path: bool) -> float:
        batch = data.batch(rng.integers(0, len(data.clips), p.batch), p.clip_len)
        start = time.perf_counter()
        if path:
            batch = tuple(x.to(device, non_blocking=True) for x in batch)
        with autocast(device, cfg.ray.bf16) if path else contextlib.nullcontext():
            out = model(*batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return time.perf_counter() - start

    for step in range(80):
        path = step % 2 == 1  # interleaved, so drift of the machine hits both alike
        seconds = physcode_step(path)
        if step >= 10:
            times["device_path" if path else "reference"].append(seconds)
    physcode_s = {k: statistics.median(v) for k, v in times.items()}

    trained, seg = prepare(cfg)
    wm, _ = build_models(cfg, seg, trained.quantizer.codebook)
    w = cfg.world_model
    wopt = torch.optim.AdamW(wm.parameters(), lr=w.lr)
    starts = seg.split(seg.starts, heldout=False)
    times = {"reference": [], "device_path": []}
    seg_path = seg.to(device)
    for step in range(80):
        path = step % 2 == 1
        idx = rng.choice(starts, w.batch)
        start = time.perf_counter()
        with autocast(device, cfg.ray.bf16) if path else contextlib.nullcontext():
            losses = wm.dynamics_loss(*(seg_path if path else seg).segment(idx, w.horizon))
        wopt.zero_grad()
        losses["loss"].backward()
        wopt.step()
        if step >= 10:
            times["device_path" if path else "reference"].append(time.perf_counter() - start)
    world = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "stage_device_path", "date": time.strftime("%Y-%m-%d"), "run": run, "device": "cpu",
              "physcode_step_s": physcode_s, "physcode_ratio": physcode_s["device_path"] / physcode_s["reference"],
              "world_model_step_s": world, "world_model_ratio": world["device_path"] / world["reference"],
              "physcode_batch": p.batch, "world_model_batch": w.batch}
    print(f"PhysCode step: {physcode_s['device_path'] * 1000:.1f} ms with the device path vs "
          f"{physcode_s['reference'] * 1000:.1f} ms without (ratio {result['physcode_ratio']:.3f}); world model: "
          f"{world['device_path'] * 1000:.1f} vs {world['reference'] * 1000:.1f} ms ({result['world_model_ratio']:.3f})")
    write_result(result)


if __name__ == "__main__":
    main()
