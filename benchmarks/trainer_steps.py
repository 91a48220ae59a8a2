"""Seconds per training step of the main job's trainers on this machine, on a finished run's own data:
PhysCode (Stage 1), the world model's dynamics and critic (Stage 2) and alignment (Stage 3), each with
1 and 2 torch threads (what `cpus_per_worker` 1 and 2 give a Ray Train worker); the critic's step
with its TD target evaluated on the codes each transition's game can execute (what it does) against
every code of the codebook (what it did before 2026-12-06); and the dynamics' step with the autoregressive
unroll running each new position against cached keys and values (what it does) against running the whole
growing context again at every step (before 2026-12-06).

    .venv/bin/python benchmarks/trainer_steps.py runs/local [--steps 20] [--repeats 3]

Thread counts and target variants alternate within each repeat, and the median over repeats is kept.
The models start from fresh weights (the step's cost does not depend on them). Results:
benchmarks/results/trainer_steps.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import world_model_throughput  # noqa: E402
from _results import write_result  # noqa: E402


def physcode_step(cfg):
    import numpy as np
    import torch

    from ipr_dist.models.physcode import PhysCode
    from ipr_dist.run_layout import RunLayout
    from learners.physcode import load_clips, model_config

    p = cfg.physcode
    data = load_clips(RunLayout.of(cfg), p.clip_len, p.flow_pool_grid, p.holdout)
    data.standardise(per_game=p.centre_per_game)
    model = PhysCode(model_config(cfg, data))
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    rng, train = np.random.default_rng(0), np.flatnonzero(~data.heldout)

    def step():
        out = model(*data.batch(rng.choice(train, p.batch), p.clip_len))
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
    return step


def world_model_steps(cfg):
    import numpy as np
    import torch

    from learners.world_model import build_models, prepare

    w = cfg.world_model
    physcode, seg = prepare(cfg)
    model, _ = build_models(cfg, seg, physcode.quantizer.codebook)
    rng = np.random.default_rng(0)
    starts, trans, known = seg.split(seg.starts, heldout=False), seg.split(seg.transitions, heldout=False), seg.rank_rows()
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr)

    whole_context_unroll = world_model_throughput.whole_context_unroll(model)

    def dynamics(whole_context: bool):
        def step():
            f, codes = seg.segment(rng.choice(starts, w.batch), w.horizon)
            if whole_context:
                teacher = (model.predict(f[:, :w.horizon], codes) - f[:, 1:]).abs().mean()
                loss = teacher + (whole_context_unroll(f[:, 0], codes) - f[:, 1:]).abs().mean()
            else:
                loss = model.dynamics_loss(f, codes)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    critic_model, _ = build_models(cfg, seg, physcode.quantizer.codebook)
    critic_opt = torch.optim.AdamW(critic_model.freeze_dynamics(), lr=w.critic_lr)

    def critic(every_code: bool):
        def step():
            args, kwargs = seg.td_batch(rng.choice(trans, w.batch), with_returns=True, n=w.td_steps, gamma=w.gamma)
            if every_code:  # the earlier target's cost: the next state's value under every code of the codebook
                args = (*args[:5], torch.ones_like(args[5]), *args[6:])
            loss = critic_model.value_loss(*args, **kwargs)["loss"]
            if w.critic_rank_weight > 0 and len(known):
                loss = loss + w.critic_rank_weight * critic_model.rank_loss(*seg.rank_batch(rng.choice(known, w.batch)))
            critic_opt.zero_grad()
            loss.backward()
            critic_opt.step()
            critic_model.update_target()
        return step
    return dynamics(False), dynamics(True), critic(False), critic(True)


def align_step(cfg):
    import numpy as np
    import torch

    from ipr_dist.models.policy import PhysCodePolicy
    from learners.align import base_policy, load_examples, window_loss

    p = cfg.policy
    examples, codes, _ = load_examples(cfg)
    with base_policy(cfg).open() as folder:
        policy = PhysCodePolicy(folder, codes, device="cpu")
    params = [q for q in policy.model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.align_lr)
    rng, train = np.random.default_rng(0), np.flatnonzero(~examples.heldout)
    policy.model.train()

    def step():
        loss = window_loss(policy, examples, rng.choice(train, p.align_batch))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def seconds_per_step(step, threads: int, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    step()  # warm-up at this thread count
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run whose main job finished (its data, features, PhysCode and base policy)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ipr_dist.cli import _run_config

    cfg = _run_config(argparse.Namespace(run=args.run, set=[])).with_absolute_root()
    dynamics, dynamics_whole_context, critic, critic_every_code = world_model_steps(cfg)
    trainers = {"physcode": physcode_step(cfg), "world_model_dynamics": dynamics,
                "world_model_dynamics_whole_context": dynamics_whole_context, "world_model_critic": critic,
                "world_model_critic_every_code": critic_every_code, "align": align_step(cfg)}
    times = {(name, t): [] for name in trainers for t in (1, 2)}
    for r in range(args.repeats):
        for name, step in trainers.items():
            for t in (1, 2) if r % 2 == 0 else (2, 1):
                times[name, t].append(seconds_per_step(step, t, args.steps))
        print(f"repeat {r + 1}: " + ", ".join(f"{n} {times[n, 1][-1]:.3f} / {times[n, 2][-1]:.3f} s"
                                               for n in trainers), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "trainer_steps", "run": str(args.run), "machine": platform.node(),
              "steps": args.steps, "repeats": args.repeats, "seconds_per_step": {
                  name: {"1 thread": med[name, 1], "2 threads": med[name, 2],
                         "speed-up with 2 threads": med[name, 1] / med[name, 2]} for name in trainers},
              "dynamics unroll with cached keys and values vs the whole context each step (1 thread)":
                  med["world_model_dynamics_whole_context", 1] / med["world_model_dynamics", 1],
              "dynamics unroll with cached keys and values vs the whole context each step (2 threads)":
                  med["world_model_dynamics_whole_context", 2] / med["world_model_dynamics", 2],
              "critic target over the game's codes vs every code (1 thread)":
                  med["world_model_critic_every_code", 1] / med["world_model_critic", 1],
              "critic target over the game's codes vs every code (2 threads)":
                  med["world_model_critic_every_code", 2] / med["world_model_critic", 2]}
    for name in trainers:
        s = result["seconds_per_step"][name]
        print(f"{name:32s} {s['1 thread']:.4f} s  {s['2 threads']:.4f} s  x{s['speed-up with 2 threads']:.2f}")
    write_result(result)


if __name__ == "__main__":
    main()
