"""Two evaluated runs, one method: does a change to one stage (e.g. the critic's target, retrained on a
copy of the run) change what the agent achieves, episode by episode on the same seeds?

    .venv/bin/python benchmarks/compare_evals.py RUN_A RUN_B --methods ipr@survival ipr@utility

Reads each run's eval/summary.json (`ipr eval RUN`), and per (method, game, level) prints the paired
difference A − B over the seed indices both played, with its 95% paired bootstrap interval (the same
`paired_difference` as the report's IPR-against-ablation table); **bold** where it excludes 0. Two copies
of one run share the policy and the seeds, so the difference is the changed stage's alone, up to the
games' own randomness. Records the comparison in benchmarks/results/compare_evals.json under --name.
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
    parser.add_argument("a", help="evaluated run A")
    parser.add_argument("b", help="evaluated run B (the reference)")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--name", default=None, help="key of this comparison in the results file")
    args = parser.parse_args()
    from ipr_dist.metrics.report import paired_difference

    summaries = []
    for run in (args.a, args.b):
        path = Path(run) / "eval" / "summary.json"
        if not path.is_file():
            sys.exit(f"{run}: no eval/summary.json; run `ipr eval {run}` first")
        summaries.append(json.loads(path.read_text()))
    a, b = (s["cells"] for s in summaries)
    rows = []
    print("| method | game | level | A mean | B mean | A − B [95% interval] | pairs |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for method in args.methods:
        if method not in a or method not in b:
            sys.exit(f"{method}: not evaluated in both runs (A has {sorted(a)}, B has {sorted(b)})")
        for game in sorted(set(a[method]) & set(b[method])):
            for level in ("survival", "score"):
                ea, eb = a[method][game]["per_episode"][level], b[method][game]["per_episode"][level]
                d = paired_difference(ea, eb)
                if d is None:
                    continue
                mean_a, mean_b = (sum(e.values()) / len(e) for e in (ea, eb))
                cell = f"{d['diff']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"
                print(f"| {method} | {game} | {level} | {mean_a:.3f} | {mean_b:.3f} | "
                      f"{f'**{cell}**' if d['significant'] else cell} | {d['pairs']} |")
                rows.append({"method": method, "game": game, "level": level, "a": mean_a, "b": mean_b, **d})
    previous = RESULTS / "compare_evals.json"
    runs = json.loads(previous.read_text()).get("comparisons", {}) if previous.is_file() else {}
    runs[args.name or f"{args.a} vs {args.b}"] = rows
    write_result({"benchmark": "compare_evals", "comparisons": runs})


if __name__ == "__main__":
    main()
