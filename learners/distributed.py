"""What the Stage 1-3 trainers share: gradients averaged over a torch.distributed group, their
devices, and `fit`, which runs a training loop in Ray Train workers and shows its progress.

Stage trainers call a model's loss *methods* (dynamics_loss, value_loss, ...), not its forward, so
DistributedDataParallel's forward hooks would not see them; averaging after backward is the same
arithmetic and works for any method. One process (no group) leaves the gradients untouched.
"""

from __future__ import annotations

import sys

import ray
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


def already_done(layout, name: str, file: str, steps: int, done: str, resuming: str, out) -> dict | None:
    """A stage's committed checkpoint at or past `steps`: say so and return its metrics (nothing to
    train); an earlier one: say training resumes from it; none: None."""
    state = layout.load_torch(name, file)
    if state is None:
        return None
    if state["step"] >= steps:
        print(f"{done} ({state['step']} steps): {layout.checkpoint_display(name)}", file=out)
        return state["metrics"]
    print(f"{resuming} from step {state['step']}", file=out)
    return None


def train_device() -> torch.device:
    """This Ray Train worker's device: the GPU Ray gave it when its stage asks for GPUs, else the CPU."""
    import ray.train.torch

    return ray.train.torch.get_device()


def train_role(stage: str, settings: str, workers: int, cpus: float, gpus: float, resources: dict):
    """A stage's Ray Train workers as a placement role (checked before the trainer starts)."""
    from actors.placement import Role

    return Role(f"{stage} workers", settings, workers, {"CPU": cpus, "GPU": gpus, **resources}, reserve=False)


def scaling_config(role):
    """Ray Train's ScalingConfig for a stage's workers: their count, and the CPUs, GPUs and custom
    resources each asks for (GPUs: the workers train on them, NCCL between them)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=role.count, use_gpu=role.request.get("GPU", 0) > 0,
                         resources_per_worker=role.request)


def fit(cfg, train_loop, role, stage: str, name: str, file: str, log_prefix: str, total_steps: int, out=None) -> dict:
    """Run a stage's `train_loop` in the Ray Train workers `role` describes (their CPUs, GPUs and custom
    resources from the stage's config), showing its progress, then log the metrics rank 0 left in its
    committed checkpoint `name` (under `log_prefix/` in the run's metrics) and return them. A request
    no node can hold fails here, at once. Rank 0's per-step metrics reach this driver through a
    `StageProgress` actor (Ray Train V2 keeps none of what `report()` is given): they go to
    metrics.jsonl and TensorBoard under `log_prefix/`, to the Ray metrics `ipr_stage_step` and
    `ipr_stage_metric`, and to one progress bar on the console. Ray Train keeps its own state on the
    run's filesystem (`<run>/ray_train/`), so workers on any node reach it."""
    import threading

    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from tqdm import tqdm

    from actors.placement import check, cluster_offer
    from ipr_dist.run_layout import RAY_TRAIN, RunLayout
    from ipr_dist.runlog import MetricsLog

    check([role], cluster_offer(), stage)
    layout = RunLayout.of(cfg)
    progress = StageProgress.options(num_cpus=0).remote()
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg.model_dump(mode="json"), "progress": progress},
        scaling_config=scaling_config(role),
        run_config=RunConfig(name=f"{stage}-{cfg.run.name}", storage_path=layout.path(RAY_TRAIN),
                             storage_filesystem=layout.fs,
                             logging_config=ray.LoggingConfig(log_level="WARNING")))  # no per-report echo
    failure: list[BaseException] = []

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # raised again in this thread, after the last metrics are logged
            failure.append(exc)

    log = MetricsLog(layout, tensorboard=True)
    gauges = StageGauges(log_prefix)
    bar = tqdm(total=total_steps, desc=f"{stage} steps", file=out or sys.stdout, mininterval=2.0, dynamic_ncols=True)
    thread = threading.Thread(target=run, name=f"{stage}-fit", daemon=True)
    thread.start()
    try:
        while True:
            thread.join(timeout=1.0)
            for row in ray.get(progress.drain.remote()):
                step = int(row.pop("step"))
                done = int(row.pop("progress", step))
                values = {f"{log_prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
                log.log(step, **values)
                gauges.set(done, values)
                bar.update(max(0, done - bar.n))
            if not thread.is_alive():
                break
    finally:
        bar.close()
        log.close()
        ray.kill(progress)
    if failure:
        raise failure[0]
    metrics = layout.load_torch(name, file)["metrics"]
    log = MetricsLog(layout)
    log.log(metrics.get("step", 0), **{f"{log_prefix}/{k}": v for k, v in metrics.items() if k != "step"})
    log.close()
    return metrics


@ray.remote
class StageProgress:
    """Rank 0 of a stage's Ray Train workers reports each logged step here; the driver drains them."""

    def __init__(self):
        self.rows: list[dict] = []

    def report(self, row: dict) -> None:
        self.rows.append(row)

    def drain(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


def report_step(config: dict, metrics: dict) -> None:
    """A training loop's per-step metrics (with "step", and "progress" when the bar counts more than
    this phase's steps) to the driver, from rank 0 (the other ranks run the same averaged step)."""
    import ray.train

    progress = config.get("progress")
    if progress is not None and ray.train.get_context().get_world_rank() == 0:
        progress.report.remote(dict(metrics))


class StageGauges:
    """Ray metrics of a Stage 1-3 trainer, exported by the driver: its step and every numeric metric."""

    def __init__(self, stage: str):
        from ipr_dist.metrics.ray_metrics import make

        self.tags = {"stage": stage}
        self.step, self.metric = make("ipr_stage_step"), make("ipr_stage_metric")

    def set(self, step: int, values: dict) -> None:
        self.step.set(step, tags=self.tags)
        for name, value in values.items():
            self.metric.set(float(value), tags={**self.tags, "name": name})
