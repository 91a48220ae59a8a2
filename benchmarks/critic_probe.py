"""Stage 2's critic against what the features carry: does V(f, a) order a game's returns as well as a
direct regression on f does?

    .venv/bin/python benchmarks/critic_probe.py runs/local

On the run's world-model segments (`learners/world_model.py: prepare`, the same held-out episodes and
survival returns as `ipr world-model eval`), per game: the failures in the store (training / held out),
the rows whose discounted return-to-go the store shows, and Spearman's rho of the observed return with
  - the trained critic's V(f_t, a_t) (it learnt from TD targets and never saw a return),
  - a ridge regression fitted on the game's training rows' returns from f_t alone (a probe: what a
    linear read-out of the features can rank),
  - the same ridge on the world model's shared trunk output h(f_t, a_t), the input of the critic's last
    layer (what the frozen trunk passes on to the critic: if this probe ranks as well as the one on f, the
    trunk keeps the signal and the TD training is what loses it),
on training and held-out rows. A held-out rho rests on that game's held-out episode ends (often one).
`--online` probes Stage 4's latest published version of the critic (world_model/online) instead.
Records each run probed (keyed by the run and its critic's settings) in benchmarks/results/critic_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, write_result  # noqa: E402


def ridge(x, y, lam: float):
    """Fitted ridge regression (features centred, intercept unpenalised) as a function of new rows."""
    import numpy as np

    xm, ym = x.mean(0), y.mean()
    w = np.linalg.solve((x - xm).T @ (x - xm) + lam * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
    return lambda z: (z - xm) @ w + ym


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory with the world model trained (e.g. runs/local)")
    parser.add_argument("--ridge", type=float, default=1.0, help="the probe's L2 penalty")
    parser.add_argument("--online", action="store_true",
                        help="probe Stage 4's latest online version of the critic instead of Stage 2's")
    args = parser.parse_args()
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from ipr_dist.cli import _run_config
    from ipr_dist.run_layout import WORLD_MODEL_CHECKPOINT, WORLD_MODEL_ONLINE, RunLayout
    from learners.world_model import build_models, load_checkpoint, prepare

    cfg = _run_config(argparse.Namespace(run=args.run, set=[])).with_absolute_root()
    physcode, seg = prepare(cfg)
    model = build_models(cfg, seg, physcode.quantizer.codebook)[0]
    name = WORLD_MODEL_ONLINE if args.online else WORLD_MODEL_CHECKPOINT
    if load_checkpoint(RunLayout.of(cfg), name, model) is None:
        sys.exit(f"{args.run}: no {name} checkpoint; " + ("run Stage 4 (`ipr train`) first" if args.online
                 else f"run `ipr world-model train {args.run}` first"))
    model.eval()
    with torch.no_grad():
        value = model.value(seg.f, seg.code.clamp(min=0)).numpy()
        hidden = model._trunk(seg.f[:, None], seg.code.clamp(min=0)[:, None])[0][:, 0].numpy()
    f, games, returns = seg.f.numpy(), seg.game.numpy(), seg.returns
    known = ~np.isnan(returns) & (seg.code.numpy() >= 0)
    train, held = known & ~seg.heldout_rows, known & seg.heldout_rows
    ends, done = seg.return_end, seg.done.numpy()

    def rho(a, b):
        return float(spearmanr(a, b).statistic) if len(a) > 2 and np.ptp(b) > 0 and np.ptp(a) > 0 else float("nan")

    rows = {}
    for g in np.unique(games):
        name = seg.game_names[g]
        tr, te = train & (games == g), held & (games == g)
        probe = ridge(f[tr], returns[tr], args.ridge) if tr.sum() > f.shape[1] // 4 else None
        trunk = ridge(hidden[tr], returns[tr], args.ridge) if tr.sum() > hidden.shape[1] // 4 else None
        rows[name] = {
            "failures_train": int((done & ~seg.heldout_rows & (games == g)).sum()),
            "failures_held_out": int((done & seg.heldout_rows & (games == g)).sum()),
            "rows_train": int(tr.sum()), "rows_held_out": int(te.sum()),
            "held_out_episode_ends": int(len(np.unique(ends[te]))),
            "critic_rho_train": rho(value[tr], returns[tr]), "critic_rho_held_out": rho(value[te], returns[te]),
            "ridge_rho_train": rho(probe(f[tr]), returns[tr]) if probe else float("nan"),
            "ridge_rho_held_out": rho(probe(f[te]), returns[te]) if probe and te.any() else float("nan"),
            "trunk_ridge_rho_train": rho(trunk(hidden[tr]), returns[tr]) if trunk else float("nan"),
            "trunk_ridge_rho_held_out": rho(trunk(hidden[te]), returns[te]) if trunk and te.any() else float("nan"),
        }
    print("| game | failures (train / held out) | rows with a return (train / held out) | held-out episode ends "
          "| critic rho train / held out | ridge on f rho train / held out | ridge on trunk h rho train / held out |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['failures_train']} / {r['failures_held_out']} | {r['rows_train']} / {r['rows_held_out']} "
              f"| {r['held_out_episode_ends']} | {r['critic_rho_train']:+.3f} / {r['critic_rho_held_out']:+.3f} "
              f"| {r['ridge_rho_train']:+.3f} / {r['ridge_rho_held_out']:+.3f} "
              f"| {r['trunk_ridge_rho_train']:+.3f} / {r['trunk_ridge_rho_held_out']:+.3f} |")
    w = cfg.world_model
    key = (f"{args.run} (td_steps {w.td_steps}, critic_target {w.critic_target}, critic_steps {w.critic_steps}"
           f"{f', critic_rank_weight {w.critic_rank_weight}' if w.critic_rank_weight else ''})"
           f"{' online' if args.online else ''}")
    previous = RESULTS / "critic_probe.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    runs[key] = {"ridge": args.ridge, "games": rows}
    write_result({"benchmark": "critic_probe", "runs": runs})


if __name__ == "__main__":
    main()
