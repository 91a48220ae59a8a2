"""What data-parallel learners share: gradients averaged over a torch.distributed group.

Stage trainers call a model's loss *methods* (dynamics_loss, value_loss, ...), not its forward, so
DistributedDataParallel's forward hooks would not see them; averaging after backward is the same
arithmetic and works for any method. One process (no group) leaves the gradients untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params) -> None:
    """Mean of every parameter's gradient over the group, in one flat all-reduce."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def already_done(checkpoint, steps: int, done: str, resuming: str, out) -> dict | None:
    """A stage's checkpoint at or past `steps`: say so and return its metrics (nothing to train);
    an earlier one: say training resumes from it; none: None."""
    from pathlib import Path

    if not Path(checkpoint).is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state["step"] >= steps:
        print(f"{done} ({state['step']} steps): {checkpoint}", file=out)
        return state["metrics"]
    print(f"{resuming} from step {state['step']}", file=out)
    return None


def fit(cfg, train_loop, workers: int, stage: str, checkpoint, log_prefix: str) -> dict:
    """Run a stage's `train_loop` in `workers` Ray Train workers, then log the metrics rank 0 left
    in its checkpoint (under `log_prefix/` in metrics.jsonl) and return them."""
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.runtime import init_ray
    from ipr_dist.runlog import MetricsLog

    init_ray(cfg.ray)
    TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"{stage}-{cfg.run.name}", storage_path=str(Path(cfg.run_dir).resolve() / "ray_train")),
    ).fit()
    metrics = torch.load(checkpoint, map_location="cpu", weights_only=False)["metrics"]
    log = MetricsLog(cfg.run_dir)
    log.log(metrics.get("step", 0), **{f"{log_prefix}/{k}": v for k, v in metrics.items() if k != "step"})
    log.close()
    return metrics
