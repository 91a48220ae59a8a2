"""Stage 3 quality on a run's own examples: does the aligned policy read the frame?

    .venv/bin/python benchmarks/align_quality.py runs/local [--steps 400]

On the run's alignment examples (`learners/align.py: load_examples`, same held-out split and the same
seeded held-out sample as `evaluate`), trains in this process, seed 0, batch 32, lr 1e-3:
  - the tiny Qwen3-VL alone (its own random vision tower),
  - the tiny Qwen3-VL with the frame adapter initialised from the run's Stage 1 encoder, each image token
    carrying one cell of the conv map (a 2 x 2 map for a 64 x 64 frame), 2 x 2 cells (a 4 x 4 map: the
    default), the same with a two-layer projector, or 4 x 4 cells (the whole 8 x 8 map),
  - the one-cell adapter from random weights,
and, as the reference that is not a VLM, a 3-layer CNN on the same frames plus an embedding of the example's
goal text (the prompt the policy sees: the game's annotated goal or a level's goal) with one head per window
position (first code and whole window read off its argmaxes). Prints and records
first-code and whole-window accuracy against the per-game most-frequent baselines:
benchmarks/results/align_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


VARIANTS = ("tiny Qwen3-VL alone", "adapter (Stage 1 encoder)", "adapter (random)", "adapter, 4 x 4 cells",
            "adapter, 4 x 4 cells, MLP projector", "adapter, 8 x 8 cells")


def train_vlm(cfg, examples, codes: int, length: int, variant: str, steps: int) -> dict:
    import numpy as np
    import torch

    from ipr_dist.models.policy import PhysCodePolicy
    from ipr_dist.models.tiny_qwen3vl import build_tiny
    from learners.align import add_frame_adapter, evaluate, window_loss
    from learners.physcode import lr_at

    folder = Path(tempfile.mkdtemp()) / "policy"
    build_tiny(folder, hidden=cfg.policy.tiny_hidden, layers=cfg.policy.tiny_layers, seed=0)
    adapter = {"adapter, 4 x 4 cells": {"frame_adapter_cells": 2, "frame_adapter_mlp": False},
               "adapter, 4 x 4 cells, MLP projector": {"frame_adapter_cells": 2, "frame_adapter_mlp": True},
               "adapter, 8 x 8 cells": {"frame_adapter_cells": 4, "frame_adapter_mlp": False},
               "adapter (Stage 1 encoder)": {"frame_adapter_cells": 1, "frame_adapter_mlp": False}}.get(variant)
    if adapter is not None:
        add_frame_adapter(cfg.model_copy(update={"policy": cfg.policy.model_copy(update=adapter)}), folder)
    elif variant == "adapter (random)":
        add_frame_adapter(cfg.model_copy(update={"features": cfg.features.model_copy(update={"appearance": "dinov3"})}),
                          folder)
    torch.manual_seed(0)
    policy = PhysCodePolicy(folder, codes)
    params = [q for q in policy.model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    train = np.flatnonzero(~examples.heldout)
    rng = np.random.default_rng(0)
    policy.model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-3, 20, steps)
        loss = window_loss(policy, examples, rng.choice(train, 32))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    metrics = evaluate(policy, examples, length)
    return {"seconds": time.perf_counter() - start, **{k.split("/")[1]: v for k, v in metrics.items()}}


def train_cnn(examples, codes: int, length: int, steps: int) -> dict:
    """The reference: conv net on the frame + the goal text's embedding -> L heads over the K codes."""
    import numpy as np
    import torch
    from torch import nn

    from learners.align import evaluate_sample

    torch.manual_seed(0)
    goals = sorted(set(examples.goals))
    goal_id = np.array([goals.index(g) for g in examples.goals])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
                                      nn.Conv2d(64, 64, 4, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
            self.game = nn.Embedding(len(goals), 64)
            self.head = nn.Sequential(nn.Linear(64 * 16 + 64, 256), nn.GELU(), nn.Linear(256, length * codes))

        def forward(self, frames, game):
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
            return self.head(torch.cat([self.conv(x), self.game(torch.from_numpy(game))], 1)).view(-1, length, codes)

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train = np.flatnonzero(~examples.heldout)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(train, 64)
        logits = net(examples.frames[idx], goal_id[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, codes), torch.from_numpy(examples.windows[idx]).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = evaluate_sample(examples)
    with torch.no_grad():
        pred = net(examples.frames[held], goal_id[held]).argmax(-1).numpy()
    target = examples.windows[held]
    return {"seconds": time.perf_counter() - start, "first_code_accuracy": float((pred[:, 0] == target[:, 0]).mean()),
            "window_accuracy": float((pred == target).all(1).mean()), "examples": int(len(held))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory with PhysCode trained (e.g. runs/local)")
    parser.add_argument("--steps", type=int, default=400, help="alignment steps of each VLM variant")
    parser.add_argument("--cnn-steps", type=int, default=2000)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                        help=f"VLM variants to train (default all: {', '.join(VARIANTS)}); none: the CNN reference only")
    args = parser.parse_args()
    from ipr_dist.cli import _run_config
    from learners.align import load_examples

    cfg = _run_config(argparse.Namespace(run=args.run, set=[])).with_absolute_root()  # the run given, wherever it is
    examples, codes, length = load_examples(cfg)
    rows = {}
    for variant in args.variants:
        rows[variant] = train_vlm(cfg, examples, codes, length, variant, args.steps)
        print(variant, {k: round(v, 3) for k, v in rows[variant].items()}, flush=True)
    rows["reference: 3-layer CNN + game embedding"] = train_cnn(examples, codes, length, args.cnn_steps)
    print("CNN", {k: round(v, 3) for k, v in rows["reference: 3-layer CNN + game embedding"].items()}, flush=True)
    base = next((rows[v] for v in args.variants), {})
    name = "align_quality" if args.variants else "align_cnn_reference"  # a reference-only run keeps the full record
    write_result({"benchmark": name, "run": args.run, "examples": len(examples.windows),
                  "vlm_steps": args.steps, "cnn_steps": args.cnn_steps,
                  "first_code_game_baseline": base.get("first_code_game_baseline"),
                  "window_game_baseline": base.get("window_game_baseline"), "rows": rows})


if __name__ == "__main__":
    main()
