"""The smoke pipeline with every stage on the GPU (transformers backend: no vLLM wheel fits the lent
GPU machines), printing per stage where it ran, its peak GPU memory and its time. Run by
scripts/gpu_check.sh; on a machine with no CUDA GPU it runs the same stages on the CPU, which checks
the script itself (and says so)."""

from __future__ import annotations

import json
import sys
import tempfile
import time


def main() -> int:
    import torch

    from cluster.jobs import train
    from ipr_dist.config import load_config

    gpu = torch.cuda.is_available()
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ipr-gpu-check-")
    share = "0.25" if gpu else "0"  # four Stage 4 roles share the one GPU (gloo weight sync between them)
    overrides = [f"run.root={root}", "fleet.games=[Airstriker-Genesis, Bounce-Html]",
                 f"features.gpus_per_worker={share}", f"physcode.gpus_per_worker={1 if gpu else 0}",
                 f"world_model.gpus_per_worker={1 if gpu else 0}", f"policy.align_gpus_per_worker={1 if gpu else 0}",
                 f"policy.num_gpus={share}", f"grpo.gpus_per_learner={share}", f"world_model.scorer_gpus={share}",
                 "grpo.micro_batch=1"]
    cfg = load_config("configs/smoke.yaml", overrides)
    print(f"gpu_check: {'CUDA: ' + torch.cuda.get_device_name(0) if gpu else 'no CUDA GPU: every stage on the CPU'}; "
          f"torch {torch.__version__}; run {cfg.run_dir}", flush=True)
    start = time.perf_counter()
    out = train(cfg)
    results, seconds = out["results"], out["seconds"]
    rows = []
    for name, result in results.items():
        devices = {}
        if isinstance(result, dict) and "system/device" in result:
            devices[name.split(": ")[-1]] = result
        for role, stats in (result or {}).get("devices", {}).items() if isinstance(result, dict) else ():
            devices[role] = stats
        for role, stats in devices.items() or [("-", {})]:
            rows.append((name, role, stats.get("system/device", "-"), stats.get("system/peak_gpu_memory_gb", 0.0),
                         seconds[name]))
    print(f"\n{'stage':36} {'role':22} {'device':34} {'peak GPU GB':>11} {'seconds':>8}")
    for stage, role, device, peak, secs in rows:
        print(f"{stage:36} {role:22} {device:34} {peak:11.2f} {secs:8.1f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    print("GPU_CHECK " + json.dumps({"gpu": gpu, "rows": rows}))
    ok = all(device.startswith("cuda") for _, role, device, _, _ in rows if role != "-") if gpu else True
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
