"""Stage 2's critic retrained on one run's store under different targets: which one orders real
outcomes best on held-out episodes?

    .venv/bin/python benchmarks/critic_levers.py runs/local --variant mc=0.5 --variant rank=0.1

The run's trained world model (dynamics frozen, as in phase ii) keeps its trunk; its value branch
(the critic's last layer, value, reward and continuation heads) is re-initialised and trained for
`world_model.critic_steps` steps per variant, in this process, with the main job's batch, learning
rate, target network and n-step targets. A variant is `name=value` pairs joined by commas:
  base            the run's settings (the first row; a check that this script trains what the main job does)
  mc=W            world_model.critic_mc_weight W: the observed return mixed into the target where known
  rank=L          world_model.critic_rank_weight L: plus L x `WorldModel.rank_loss`, a within-game pairwise
                  ranking loss on training steps whose return is known
  steps=N         N critic steps instead of the config's
With --commit, the last variant's model is committed as the run's world-model checkpoint (a copy of a
run, to play it with `ipr eval`: remove the copy's world_model/online first, or Stage 4's versions win).
Per variant: the critic's held-out Spearman rho with the observed return (all steps, and per game with
the episode ends it rests on), the within-game rho on training rows, and R^'s held-out rho
(`return_ranking`, the metric of world_model/report.md). Records in benchmarks/results/critic_levers.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, write_result  # noqa: E402


def parse_variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "base":
            continue
        if key not in ("mc", "rank", "steps") or not value:
            sys.exit(f"variant {text!r}: use base, mc=W, rank=L, steps=N joined by commas")
        out[key] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory with the world model trained (e.g. runs/local)")
    parser.add_argument("--variant", action="append", default=[], help="see the module docstring (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--commit", action="store_true", help="commit the last variant's model into RUN")
    args = parser.parse_args()
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from ipr_dist.cli import _run_config
    from ipr_dist.run_layout import WORLD_MODEL_CHECKPOINT, RunLayout
    from learners.physcode import lr_at
    from learners.world_model import (build_models, critic_fit, load_checkpoint, prepare, return_ranking,
                                      save_checkpoint, within_game_spearman)
    from ipr_dist.models.world_model import WorldModel

    torch.set_num_threads(args.threads)
    cfg = _run_config(argparse.Namespace(run=args.run, set=[])).with_absolute_root()
    w = cfg.world_model
    physcode, seg = prepare(cfg)
    trained = build_models(cfg, seg, physcode.quantizer.codebook)[0]
    if load_checkpoint(RunLayout.of(cfg), WORLD_MODEL_CHECKPOINT, trained) is None:
        sys.exit(f"{args.run}: no world model checkpoint; run `ipr world-model train {args.run}` first")
    games_np = seg.game.numpy()
    trans = seg.split(seg.transitions, heldout=False)
    known = seg.rank_rows()
    held = seg.split(seg.transitions, heldout=True)
    held = held[~np.isnan(seg.returns[held])]
    results = {}
    for text in args.variant or ["base"]:
        v = parse_variant(text)
        steps = int(v.get("steps", w.critic_steps))
        torch.manual_seed(cfg.run.seed)
        fresh = WorldModel(trained.cfg, trained.codebook)  # the value branch's initialisation
        model = WorldModel(trained.cfg, trained.codebook)
        state = {k: val for k, val in trained.state_dict().items()}
        for k, val in fresh.state_dict().items():
            if k.split(".")[0] in WorldModel.VALUE_BRANCH:
                state[k] = val
        model.load_state_dict(state)
        model.cfg = type(trained.cfg)(**{**trained.cfg.__dict__, "critic_mc_weight": v.get("mc", 0.0),
                                         "critic_rank_weight": v.get("rank", 0.0)})
        params = model.freeze_dynamics()
        opt = torch.optim.AdamW(params, lr=w.critic_lr, weight_decay=0.0)
        rng = np.random.default_rng(cfg.run.seed * 1000)
        start = time.perf_counter()
        model.train()
        for step in range(steps):
            for group in opt.param_groups:  # the main job's schedule (learners/world_model.py _optimise)
                group["lr"] = lr_at(step, w.critic_lr, w.warmup, steps)
            a, kw = seg.td_batch(rng.choice(trans, w.batch), with_returns=True, n=w.td_steps, gamma=w.gamma)
            loss = model.value_loss(*a, **kw)["loss"]
            if model.cfg.critic_rank_weight:
                loss = loss + model.cfg.critic_rank_weight * model.rank_loss(*seg.rank_batch(rng.choice(known, w.batch)))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, w.grad_clip)
            opt.step()
            model.update_target()
        model.eval()
        with torch.no_grad():
            value = model.value(seg.f[torch.as_tensor(held)], seg.code[torch.as_tensor(held)]).numpy()
        observed, g_held = seg.returns[held], games_np[held]
        rho = within_game_spearman(value, observed, g_held)
        per_game = {seg.game_names[g]: {"rho": rho.get(int(g), float("nan")),
                                        "episode_ends": int(len(np.unique(seg.return_end[held][g_held == g])))}
                    for g in np.unique(g_held)}
        row = {"seconds": round(time.perf_counter() - start, 1), "steps": steps,
               "critic_rho_held_out": float(spearmanr(value, observed).statistic),
               "critic_rho_held_out_within_game": float(np.nanmean([p["rho"] for p in per_game.values()])),
               "per_game_held_out": per_game,
               **{k.removeprefix("eval/"): val for k, val in critic_fit(model, seg, seed=cfg.run.seed).items()},
               **{k.removeprefix("eval/"): val for k, val in return_ranking(model, seg, w.horizon, seed=cfg.run.seed).items()}}
        results[text] = row
        games = " ".join(f"{n.split('-')[0]} {p['rho']:+.3f}({p['episode_ends']})" for n, p in per_game.items())
        print(f"{text:>16}: held out {row['critic_rho_held_out']:+.3f} within {row['critic_rho_held_out_within_game']:+.3f} "
              f"[{games}] train within {row.get('critic/train_spearman_within_game', float('nan')):+.3f} "
              f"R^ q_sum {row.get('return/q_sum/spearman', float('nan')):+.3f} / "
              f"{row.get('return/q_sum/spearman_within_game', float('nan')):+.3f} "
              f"reward {row.get('return/reward/spearman', float('nan')):+.3f} / "
              f"{row.get('return/reward/spearman_within_game', float('nan')):+.3f} ({row['seconds']:.0f} s)", flush=True)
    if args.commit:
        save_checkpoint(RunLayout.of(cfg), WORLD_MODEL_CHECKPOINT, model, 2, steps, metrics={"critic_levers": text})
        print(f"committed {text!r} as {args.run}'s world model")
    previous = RESULTS / "critic_levers.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    runs.setdefault(str(Path(args.run).resolve()), {}).update(results)
    write_result({"benchmark": "critic_levers", "runs": runs})


if __name__ == "__main__":
    main()
