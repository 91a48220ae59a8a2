"""Does the control matter once the code is known? On a run with a trained PhysCode: every step labelled
with its code as `ipr physcode inspect` does, and its outcome as routing by outcome reads it (`step_outcomes`:
survival, 1 per step until a failure or a life lost; utility, the game's reward; over a few horizons). Per
game, the share of the outcome's variance within codes that the executed control explains (eta squared: the
spread of the per-(code, control) means around their code's mean), against the same share with each code's
controls shuffled among its steps. A share at its shuffled value says that, given the code, which control was
pressed tells nothing about what followed: no table from codes to controls (mode, draw or outcome) can then
choose controls that do better. Prints a markdown table.

    .venv/bin/python scripts/control_effect.py runs/local [--horizons 4 16] [--shuffles 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def explained(y: np.ndarray, code: np.ndarray, control: np.ndarray) -> float:
    """Between-(code, control) sum of squares over the within-code sum of squares of `y`."""
    between = total = 0.0
    for c in np.unique(code):
        yc, kc = y[code == c], control[code == c]
        total += ((yc - yc.mean()) ** 2).sum()
        for k in np.unique(kc):
            between += (kc == k).sum() * (yc[kc == k].mean() - yc.mean()) ** 2
    return between / total if total > 0 else float("nan")


def shuffled_within(code: np.ndarray, control: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = control.copy()
    for c in np.unique(code):
        rows = np.flatnonzero(code == c)
        out[rows] = control[rng.permutation(rows)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--horizons", type=int, nargs="+", default=[4, 16], help="steps of outcome")
    parser.add_argument("--shuffles", type=int, default=20, help="within-code shuffles per cell")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = parser.parse_args()

    from ipr_dist.cli import _run_config
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.models.router import control_of
    from ipr_dist.run_layout import RunLayout
    from learners.physcode import load_clips, load_model
    from learners.physcode_inspect import label_codes, step_outcomes

    cfg = _run_config(argparse.Namespace(run=args.run, set=args.set)).with_absolute_root()
    layout = RunLayout.of(cfg)
    model, ckpt = load_model(layout)
    data = load_clips(layout, model.cfg.clip_len, ckpt["flow_pool_grid"], cfg.physcode.holdout, lives=True)
    data.standardise(ckpt["norm"])
    labels = label_codes(model, data, model.cfg.clip_len)
    annotations = load_annotations(cfg.games.annotation_files)
    rows = np.array(sorted(labels))
    code = np.array([labels[r] for r in rows])
    games = data.game[rows].astype(str)
    mouse = {g: game_info(g, annotations, cfg.games.spec_files).uses_mouse for g in np.unique(games)}
    control = np.array([control_of(data.keys[r], data.mouse[r], data.mouse_buttons[r], data.scroll[r],
                                   mouse[str(data.game[r])], 4).key() for r in rows])
    rng = np.random.default_rng(cfg.run.seed)
    print("| game | outcome | steps | explained by the control | shuffled (mean ± sd) | z |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for level in ("survival", "utility"):
        for h in args.horizons:
            y_all = step_outcomes(data, level, cfg.world_model.gamma, h)[rows]
            for g in sorted(mouse):
                m = (games == g) & np.isfinite(y_all)
                y, c, k = y_all[m], code[m], control[m]
                real = explained(y, c, k)
                null = np.array([explained(y, c, shuffled_within(c, k, rng)) for _ in range(args.shuffles)])
                z = (real - null.mean()) / null.std() if null.std() > 0 else float("nan")
                print(f"| {g} | {level}, {h} steps | {m.sum()} | {real:.4f} | {null.mean():.4f} ± {null.std():.4f} | "
                      f"{z:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
