"""Would a router that also sees the frame recover the controls the per-code table loses? On a run with
a trained PhysCode: every step labelled with its code as `ipr physcode inspect` does, then, on the
held-out episodes of each game, the control predicted by
  - the router's table (the code's most frequent control in the game's training steps),
  - the k nearest training steps of the same game and code by appearance f_t (p(control | f_t, code, game)),
  - the k nearest by f_t alone, ignoring the code (random play's controls do not depend on the frame),
against always answering the game's most frequent control; and the code itself predicted from the k nearest
training steps by f_t (how much of the code the frame tells, which bounds what alignment can learn) against the
game's most frequent code. Prints a markdown table and the codes shared by two or more games (a code used by a
game labels at least 1% of its held-out steps).

    .venv/bin/python scripts/router_with_frame.py runs/local [--k 1 8 32] [--set physcode.centre_per_game=all]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vote(labels: list[str], rows: np.ndarray) -> str:
    return Counter(labels[i] for i in rows).most_common(1)[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 8, 32], help="neighbours voting")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    args = parser.parse_args()

    from ipr_dist.cli import _run_config
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations
    from ipr_dist.models.router import control_of
    from ipr_dist.run_layout import RunLayout
    from learners.physcode import load_clips, load_model
    from learners.physcode_inspect import label_codes

    cfg = _run_config(argparse.Namespace(run=args.run, set=args.set)).with_absolute_root()
    layout = RunLayout.of(cfg)
    model, ckpt = load_model(layout)
    data = load_clips(layout, model.cfg.clip_len, ckpt["flow_pool_grid"], cfg.physcode.holdout)
    data.standardise(ckpt["norm"])
    labels = label_codes(model, data, model.cfg.clip_len)
    annotations = load_annotations(cfg.games.annotation_files)
    held = set(data.clips[data.heldout, 0].tolist())
    steps: dict[str, dict[str, list]] = defaultdict(lambda: {"train": [], "test": []})
    infos = {}
    for r in sorted(labels):
        game = str(data.game[r])
        info = infos.setdefault(game, game_info(game, annotations, cfg.games.spec_files))
        control = control_of(data.keys[r], data.mouse[r], data.mouse_buttons[r], data.scroll[r], info.uses_mouse, 4)
        steps[game]["test" if r in held else "train"].append((r, labels[r], control.key()))

    used: dict[int, set[str]] = defaultdict(set)
    for game, parts in steps.items():
        counts = Counter(code for _, code, _ in parts["test"])
        for code, n in counts.items():
            if n >= 0.01 * len(parts["test"]):
                used[code].add(game)
    shared = sum(len(games) > 1 for games in used.values())
    print(f"{args.run} {' '.join(args.set)}: {shared} of {len(used)} codes used by two or more games (held out)")
    columns = ["table", *[f"code + f, k {k}" for k in args.k], *[f"f alone, k {k}" for k in args.k],
               "most frequent code", *[f"code from f, k {k}" for k in args.k]]
    print("| game | held-out steps | most frequent | " + " | ".join(columns) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |")
    unmeasured = []
    for game, parts in sorted(steps.items()):
        train, test = parts["train"], parts["test"]
        if not train or not test:
            unmeasured.append(game)
            continue
        f = data.f[[r for r, _, _ in train]]
        codes = np.array([code for _, code, _ in train])
        controls = [control for _, _, control in train]
        top = Counter(controls).most_common(1)[0][0]
        code_list = codes.tolist()
        top_code = Counter(code_list).most_common(1)[0][0]
        table = {code: vote(controls, np.flatnonzero(codes == code)) for code in np.unique(codes)}
        hits = Counter()
        for r, code, control in test:
            hits["most frequent"] += control == top
            hits["table"] += table.get(code, top) == control
            hits["most frequent code"] += code == top_code
            order = np.argsort(((f - data.f[r]) ** 2).sum(1))
            same = order[codes[order] == code]
            for k in args.k:
                hits[f"code + f, k {k}"] += vote(controls, same[:k] if len(same) else order[:k]) == control
                hits[f"f alone, k {k}"] += vote(controls, order[:k]) == control
                hits[f"code from f, k {k}"] += vote(code_list, order[:k]) == code
        n = len(test)
        print(f"| {game} | {n} | {hits['most frequent'] / n:.3f} | "
              + " | ".join(f"{hits[c] / n:.3f}" for c in columns) + " |")
    if unmeasured:  # PhysCode holds out whole episodes: a game stored as one episode has none held out
        print(f"not measured: {', '.join(unmeasured)} (no held-out episode, or none left to train on; collect "
              "more episodes of it)")


if __name__ == "__main__":
    main()
