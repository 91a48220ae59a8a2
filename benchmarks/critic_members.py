"""How uncertain the critic is about the candidates it ranks, by its member critics' disagreement.

    .venv/bin/python benchmarks/critic_members.py runs/local --name e9_members5

For a run whose Stage 2 world model has member critics (`world_model.critic_members` >= 2): on held-out
states of each game, groups of B candidates (random sequences of the codes that game's steps were
labelled with, H long) are imagined once; per game it reports the median std of the critic's R^ in a
group, the median of the members' disagreement on the group's order (`ipr_dist.algos.grpo.group_noise`,
the floor `grpo.advantage_noise_weight` scales), how often that noise exceeds the group's std and the
preset's fixed floor, the median per-candidate disagreement (what `policy.pick_uncertainty_weight`
multiplies) and how often the critic and the members' mean pick the same candidate. With the held-out
evaluation of Stage 2 (learners/world_model.py: evaluate): whether the members' spread on a step marks the
critic's error there, and how the members' mean ranks observed returns beside the critic.
Records in benchmarks/results/critic_members.json under --name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory whose world model has member critics (e.g. runs/local)")
    parser.add_argument("--name", required=True, help="the entry's name in the results file")
    parser.add_argument("--groups", type=int, default=60, help="held-out states per game")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import numpy as np
    import torch

    from actors.world_model_scorer import run_settings
    from ipr_dist.algos.grpo import group_noise
    from ipr_dist.cli import _run_config
    from ipr_dist.models.world_model import member_disagreement
    from ipr_dist.run_layout import WORLD_MODEL_CHECKPOINT, RunLayout
    from learners.world_model import build_models, evaluate, load_checkpoint, prepare

    torch.set_num_threads(1)
    cfg = _run_config(argparse.Namespace(run=args.run, set=[])).with_absolute_root()
    physcode, seg = prepare(cfg)
    model = build_models(cfg, seg, physcode.quantizer.codebook)[0]
    ckpt = load_checkpoint(RunLayout.of(cfg), WORLD_MODEL_CHECKPOINT, model)
    if ckpt is None:
        sys.exit(f"{args.run}: no world model checkpoint; run `ipr world-model train {args.run}` first")
    if model.members is None or model.cfg.critic_members < 2:
        sys.exit(f"{args.run}: its world model has no member critics; train one with world_model.critic_members >= 2")
    for key, value in run_settings(cfg.world_model).items():
        setattr(model.cfg, key, value)
    model.eval()
    rng = np.random.default_rng(args.seed)
    starts = seg.split(seg.starts, heldout=True)
    games, codes = seg.game.numpy(), seg.code.numpy()
    floor = cfg.grpo.advantage_std_floor
    per_game = {}
    for g in np.unique(games[starts]):
        rows = rng.permutation(starts[games[starts] == g])[:args.groups]
        allowed = np.unique(codes[(games == g) & (codes >= 0)])
        seqs = torch.as_tensor(rng.choice(allowed, (len(rows), args.candidates, model.cfg.horizon)))
        with torch.no_grad():
            ret = model.imagine(seg.f[torch.as_tensor(rows)], seqs, members=True)[1].numpy()  # (N, B, 1 + E)
        std = ret[..., 0].std(-1)
        noise = np.array([group_noise(x[:, 1:]) for x in ret])
        per_game[seg.game_names[g] if g < len(seg.game_names) else str(g)] = {
            "groups": int(len(rows)), "std_median": float(np.median(std)), "noise_median": float(np.median(noise)),
            "noise_over_std": float(np.mean(noise > std)), "noise_over_floor": float(np.mean(noise > floor)),
            "candidate_disagreement_median": float(np.median(member_disagreement(ret[..., 1:]))),
            "same_pick_as_member_mean": float(np.mean(ret[..., 0].argmax(-1) == ret[..., 1:].mean(-1).argmax(-1)))}
    held = evaluate(model, seg, model.cfg.horizon, seed=cfg.run.seed)
    heldout = {k.removeprefix("eval/"): v for k, v in held.items()
               if k.startswith(("eval/critic/member", "eval/return/q_sum", "eval/return/reward"))}
    for game, row in per_game.items():
        print(f"{game:22s} R^ std {row['std_median']:.4f}  noise {row['noise_median']:.4f}  noise > std "
              f"{row['noise_over_std']:.2f}  noise > floor {floor} {row['noise_over_floor']:.2f}  same pick as the "
              f"members' mean {row['same_pick_as_member_mean']:.2f}")
    print(json.dumps(heldout, indent=1))
    path = RESULTS / "critic_members.json"
    results = json.loads(path.read_text()) if path.exists() else {"benchmark": "critic_members", "runs": {}}
    results["runs"][args.name] = {"run": str(args.run), "members": model.cfg.critic_members,
                                  "candidates": args.candidates, "per_game": per_game, "heldout": heldout}
    write_result(results)


if __name__ == "__main__":
    main()
