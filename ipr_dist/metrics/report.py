"""Evaluation results on disk and the report built from them.

Every number in `<run>/eval/report.md` is computed from the cached episodes under
`<run>/eval/episodes/<method>/<game>/<seed index>.json` (+ `.npy`, the episode's frame embeddings
for Curiosity) and the per-game references in `<run>/eval/references.json`:
  random_mean_length, step_unit (H, Eq. 10), random_score, t_max (Curiosity's fixed scale interval)
  from the random policy's episodes; human_score from recorded human play, or null (missing).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ipr_dist.metrics.magnitude import convergence_scale, magnitude_area
from ipr_dist.metrics.ranking import rank_methods
from ipr_dist.metrics.survival import step_unit, survival_score
from ipr_dist.metrics.utility import human_normalised_score
from ipr_dist.models.router import GRID
from ipr_dist.run_layout import CONFIG, EVAL, EVAL_EPISODES, RunLayout

EVAL_DIR = EVAL
LEVELS = ("survival", "curiosity", "utility")
ABLATION = {"vlm": "VLM (pretrained, prompt-only)", "ipr-no-wm": "VLM + PhysCode + GRPO, no world model (first candidate)",
            "ipr-random-pick": "VLM + PhysCode + GRPO, B candidates, one picked at random",
            "ipr-no-grpo": "VLM + PhysCode + world model, no GRPO (the aligned policy of Stage 3)",
            "ipr": "IPR (propose, world-model score, route)"}
IPR_ABLATIONS = ("ipr-no-wm", "ipr-random-pick", "ipr-no-grpo")  # what IPR is paired with, per game and level


SETTINGS = "settings.json"  # per method folder: the acting settings its episodes were played with


class EpisodeCache:
    """One JSON summary and one embedding array per finished evaluation episode, under
    `<run>/eval/episodes/<method>/<game>/`. The embedding is written first and the JSON, one whole
    object, last: the JSON is the episode's manifest, so a killed writer leaves only an embedding no
    reader looks at (rewritten when the episode is played again)."""

    def __init__(self, layout: RunLayout):
        self.layout = layout

    def _name(self, method: str, game: str, seed_index: int, suffix: str) -> str:
        return f"{EVAL_EPISODES}/{method}/{game}/{seed_index:04d}{suffix}"

    def has(self, method: str, game: str, seed_index: int) -> bool:
        return self.layout.is_file(self._name(method, game, seed_index, ".json"))

    def put(self, summary: dict, embedding: np.ndarray) -> str:
        method, game, index = summary["method"], summary["game"], summary["seed_index"]
        buf = io.BytesIO()
        np.save(buf, np.asarray(embedding, np.float32))
        self.layout.write_bytes(self._name(method, game, index, ".npy"), buf.getvalue())
        return self.layout.write_json(self._name(method, game, index, ".json"), summary)  # last: the manifest

    def episodes(self, method: str, game: str) -> list[dict]:
        folder = f"{EVAL_EPISODES}/{method}/{game}"
        return [self.layout.read_json(folder, n) for n in self.layout.list_names(folder) if n.endswith(".json")]

    def embedding(self, method: str, game: str, seed_index: int) -> np.ndarray:
        return np.load(io.BytesIO(self.layout.read_bytes(self._name(method, game, seed_index, ".npy"))))

    def played(self, method: str) -> bool:
        """Whether any episode of `method`, of any game, is cached."""
        folder = f"{EVAL_EPISODES}/{method}"
        return any(n.endswith(".json") for g in self.layout.list_names(folder) if g != SETTINGS
                   for n in self.layout.list_names(folder, g))

    def settings(self, method: str) -> dict | None:
        """The acting settings `method`'s episodes were played with (None: not recorded)."""
        name = f"{EVAL_EPISODES}/{method}/{SETTINGS}"
        return self.layout.read_json(name) if self.layout.is_file(name) else None

    def put_settings(self, method: str, settings: dict) -> None:
        self.layout.write_json(f"{EVAL_EPISODES}/{method}/{SETTINGS}", settings)


def random_reference(cache: EpisodeCache, game: str, scale_target: float) -> dict:
    """The random policy's reference figures of one game, from its cached episodes."""
    eps = cache.episodes("random", game)
    if not eps:
        raise ValueError(f"{game}: no random episodes cached")
    mean_len = float(np.mean([e["length"] for e in eps]))
    t_conv = [convergence_scale(cache.embedding("random", game, e["seed_index"]), scale_target) for e in eps]
    return {"random_episodes": len(eps), "random_mean_length": mean_len, "step_unit": step_unit(mean_len),
            "random_score": float(np.mean([e["score"] for e in eps])), "t_max": float(np.median(t_conv))}


BOOTSTRAP_DRAWS = 2000
INTERVAL_LEVELS = (("survival", "Survival (L / H)"), ("curiosity", "Curiosity (area / random's)"),
                   ("score", "raw score"))


@dataclass
class Cell:
    """One (method, game): mean raw values and the normalised scores of the three levels, each
    episode's values by seed index (for intervals and paired differences) and 95% bootstrap intervals."""
    episodes: int
    length: float
    score: float
    area: float
    survival: float
    curiosity: float
    utility: float | None
    invalid_rate: float
    controls: dict | None = None  # steps per executed control over the episodes that recorded them
    per_episode: dict | None = None  # level -> {seed index: value}
    intervals: dict | None = None  # level -> [low, high]


def bootstrap_interval(values, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of `values` (episodes resampled with replacement)."""
    v = np.asarray(list(values), np.float64)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    means = v[np.random.default_rng(seed).integers(0, len(v), (draws, len(v)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_difference(a: dict, b: dict, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict | None:
    """Mean of a - b over the episodes both played (same seed index: common random numbers) with its 95%
    paired bootstrap interval; significant when the interval excludes 0. None with fewer than 2 pairs."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    d = np.array([a[k] - b[k] for k in keys], np.float64)
    low, high = bootstrap_interval(d, draws, seed)
    return {"diff": float(d.mean()), "low": low, "high": high, "pairs": len(keys),
            "significant": bool(low > 0 or high < 0)}


def cells(cache: EpisodeCache, methods: list[str], games: list[str], refs: dict, scales: int,
          utility_clip=None) -> dict[str, dict[str, Cell]]:
    out: dict[str, dict[str, Cell]] = {}
    areas: dict[tuple[str, str], float] = {}
    for game in games:
        ref = refs[game]
        grid = np.linspace(0.0, ref["t_max"], scales)
        for method in methods:
            eps = cache.episodes(method, game)
            if not eps:
                continue
            ep_areas = {e["seed_index"]: magnitude_area(cache.embedding(method, game, e["seed_index"]), grid)
                        for e in eps}
            area = float(np.mean(list(ep_areas.values())))
            areas[method, game] = area
            score = float(np.mean([e["score"] for e in eps]))
            steps = sum(e["length"] for e in eps)
            out.setdefault(method, {})[game] = Cell(
                episodes=len(eps), length=float(np.mean([e["length"] for e in eps])), score=score, area=area,
                survival=survival_score([e["length"] for e in eps], ref["step_unit"]), curiosity=float("nan"),
                utility=(human_normalised_score(score, ref["random_score"], ref.get("human_score"), clip=utility_clip)
                         if ref.get("has_score", True) else None),
                invalid_rate=sum(e.get("invalid_actions", 0) for e in eps) / max(steps, 1),
                controls=executed_controls(eps),
                per_episode={"survival": {e["seed_index"]: e["length"] / ref["step_unit"] for e in eps},
                             "curiosity": ep_areas, "score": {e["seed_index"]: float(e["score"]) for e in eps}})
    for method, row in out.items():
        for game, c in row.items():
            base = areas.get(("random", game))
            c.curiosity = c.area / base if base else float("nan")
            c.per_episode["curiosity"] = {k: (v / base if base else float("nan"))
                                          for k, v in c.per_episode["curiosity"].items()}
            c.intervals = {level: bootstrap_interval(c.per_episode[level].values()) for level, _ in INTERVAL_LEVELS}
    return out


def executed_controls(episodes: list[dict]) -> dict[str, int] | None:
    """Steps per executed control summed over the episodes (None where none recorded them: cached
    before the tally existed), most frequent first."""
    recorded = [Counter(e["controls"]) for e in episodes if e.get("controls")]
    total = sum(recorded, Counter())
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))) if recorded else None


def control_cell(controls: dict[str, int] | None) -> str:
    """"62% LEFT+B, 5 controls": the most frequent control's share of the steps, and how many were used."""
    if not controls:
        return "-"
    top, n = next(iter(controls.items()))
    used = len(controls)
    return f"{100 * n / sum(controls.values()):.0f}% {top}, {used} control{'s' if used > 1 else ''}"


def comparisons(table: dict[str, dict[str, Cell]], games: list[str]) -> list[dict]:
    """Each IPR variant against random and against its ablations (IPR_ABLATIONS) at the same level, per
    game and per level of INTERVAL_LEVELS: paired differences with 95% bootstrap intervals."""
    out = []
    for method in table:
        name, _, level = method.partition("@")
        if name != "ipr":
            continue
        others = ["random"] + [f"{ablation}@{level}" if level else ablation for ablation in IPR_ABLATIONS]
        for other in others:
            if other not in table:
                continue
            for game in games:
                a, b = table[method].get(game), table[other].get(game)
                if a is None or b is None:
                    continue
                for lv, _ in INTERVAL_LEVELS:
                    d = paired_difference(a.per_episode[lv], b.per_episode[lv])
                    if d is not None:
                        out.append({"method": method, "against": other, "game": game, "level": lv, **d})
    return out


def must_show_counts(diffs: list[dict], games: list[str]) -> str:
    """Issue 19's two play counts from the paired differences: the games where an IPR variant is significantly
    above random play at Survival or raw score, and the (game, level) pairs where `ipr@level` is significantly
    above `ipr-no-wm@level` at either (Curiosity not counted)."""
    def above(against) -> list[tuple[str, str]]:
        return sorted({(d["game"], d["method"].partition("@")[2]) for d in diffs
                       if against(d["against"]) and d["level"] in ("survival", "score") and d["significant"]
                       and d["diff"] > 0})

    over_random = sorted({g for g, _ in above(lambda a: a == "random")}, key=games.index)
    over_no_wm = above(lambda a: a.partition("@")[0] == "ipr-no-wm")
    pairs = [f"{g} @{lv}" if lv else g for g, lv in over_no_wm]
    return (f"Counted at Survival or raw score: IPR above random on {len(over_random)} of {len(games)} games"
            + (f" ({', '.join(over_random)})" if over_random else "")
            + f"; above ipr-no-wm on {len(pairs)} (game, level) pair{'' if len(pairs) == 1 else 's'}"
            + (f" ({', '.join(pairs)})" if pairs else "") + ".")


def level_tables(table: dict[str, dict[str, Cell]], games: list[str]):
    """Per level: the per-method summary (mean normalised, average rank, Ratio@Top-3). Ranks are
    taken on the raw per-game values (same order as the normalised ones, and defined even where a
    game lacks a human reference); means are over the normalised scores that exist."""
    summaries, all_ranks = {}, {m: [] for m in table}
    for level in LEVELS:
        raw = {g: {m: _raw(table[m][g], level) for m in table if g in table[m]} for g in games}
        summary, ranks = rank_methods(raw)
        for m in table:
            vals = [getattr(table[m][g], level) for g in games if g in table[m]]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            s = summary.get(m)
            summaries.setdefault(level, {})[m] = {
                "mean": float(np.mean(vals)) if vals else None, "avg_rank": s.avg_rank if s else None,
                "top3": s.top3 if s else None, "games_with_value": len(vals)}
            all_ranks[m] += ranks.get(m, [])
    overall = {m: float(np.mean(r)) if r else None for m, r in all_ranks.items()}
    return summaries, overall


def _raw(c: Cell, level: str) -> float:
    return {"survival": c.length, "curiosity": c.area, "utility": c.score}[level]


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "missing"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def ablation_rows(summaries: dict, methods: list[str]) -> list[tuple[str, list]]:
    """Table 3's rows for the methods present: each level read from the variant optimised for it
    (`name@level`) when evaluated, otherwise from the first variant of the name."""
    rows = []
    for name, label in ABLATION.items():
        variants = [m for m in methods if m.partition("@")[0] == name]
        if not variants:
            continue
        vals = []
        for level in LEVELS:
            m = f"{name}@{level}" if f"{name}@{level}" in variants else variants[0]
            vals.append(summaries[level][m]["mean"])
        rows.append((label, vals))
    return rows


def write_report(layout: RunLayout, methods: list[str], games: list[str], refs: dict, scales: int,
                 encoder_name: str, held_out: dict[str, str], settings: str, utility_clip=None) -> tuple[str, str]:
    """report.md, summary.json and one bar chart per level under <run>/eval/; returns the report's path and
    its summary for the console (Table 2 and the significant differences)."""
    cache = EpisodeCache(layout)
    methods = [m for m in methods if any(cache.has(m, g, 0) for g in games)]
    table = cells(cache, methods, games, refs, scales, utility_clip)
    summaries, overall = level_tables(table, games)
    lines = [f"# Evaluation of {layout.name}", "", settings, "",
             f"Curiosity embeds frames with {encoder_name}; areas under the magnitude function on {scales} scales "
             "from 0 to the game's t_max (fixed from the random policy's episodes), normalised by the random "
             "policy's mean area (random = 1). Survival is Eq. 11 (mean length / H). Utility is HNS (Eq. 12): "
             "missing where the game has no human reference. Ranks are over methods per game, on raw values.",
             "", "## Summary (Table 2)", ""]
    table2 = ["| method | Survival mean | avg rank | top-3 % | Curiosity mean | avg rank | top-3 % | "
              "Utility mean | avg rank | top-3 % | overall rank |", "| --- |" + " ---: |" * 10]
    for m in methods:
        row = [m]
        for level in LEVELS:
            s = summaries[level][m]
            row += [_fmt(s["mean"]), _fmt(s["avg_rank"]), _fmt(s["top3"], pct=True)]
        table2.append("| " + " | ".join(row + [_fmt(overall[m])]) + " |")
    lines += table2
    brief = list(table2)  # the console's summary: Table 2, then the significant differences
    lines += ["", "## References per game", "",
              "| game | random episodes | L_rand | H | random score | human score | t_max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in games:
        r = refs[g]
        human = (f"{r['human_score']:.2f} ({r['human_episodes']} episodes)" if r.get("human_score") is not None
                 else "missing (no human recording)")
        if r.get("human_players") and len(r["human_players"]) > 1:
            human += "; players " + ", ".join(f"{p} {v:.2f}" for p, v in r["human_players"].items())
            if r.get("third_player_needed"):
                human += " (gap over 1.5x: record a third player, paper Sec. 9.2)"
        if not r.get("has_score", True):
            human = "none: the game has no readable score (Survival and Curiosity only)"
        lines.append(f"| {g} | {r['random_episodes']} | {r['random_mean_length']:.1f} | {r['step_unit']} | "
                     f"{r['random_score']:.2f} | {human} | {r['t_max']:.4g} |")
    for level, attr, raw_name in (("survival", "survival", "mean length"), ("curiosity", "curiosity", "area"),
                                  ("utility", "utility", "mean score")):
        lines += ["", f"## {level.capitalize()} per game (normalised; raw {raw_name} in brackets)", "",
                  "| method | " + " | ".join(games) + " |", "| --- |" + " ---: |" * len(games)]
        for m in methods:
            vals = []
            for g in games:
                c = table[m].get(g)
                vals.append("-" if c is None else f"{_fmt(getattr(c, attr))} ({_raw(c, level):.2f})")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", "## 95% intervals per game (bootstrap over episodes)", "",
              "Mean [2.5%, 97.5%] of the per-episode values, 2,000 resamples."]
    for level, title in INTERVAL_LEVELS:
        lines += ["", f"### {title}", "", "| method | " + " | ".join(games) + " |", "| --- |" + " ---: |" * len(games)]
        for m in methods:
            vals = []
            for g in games:
                c = table[m].get(g)
                if c is None:
                    vals.append("-")
                    continue
                mean = float(np.mean(list(c.per_episode[level].values())))
                low, high = c.intervals[level]
                vals.append(f"{mean:.3g} [{low:.3g}, {high:.3g}]")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if any(c.controls for row in table.values() for c in row.values()):
        lines += ["", "## Executed controls", "",
                  "The most frequent control's share of the steps and the number of distinct controls used (keys "
                  f"held; pointer games: the {GRID} x {GRID} cell and the buttons): a method whose play collapses "
                  "onto a few controls shows it here. Counts per control: summary.json.", "",
                  "| method | " + " | ".join(games) + " |", "| --- |" + " ---: |" * len(games)]
        lines += [f"| {m} | " + " | ".join(control_cell(table[m][g].controls) if g in table[m] else "-" for g in games)
                  + " |" for m in methods]
    diffs = comparisons(table, games)
    if diffs:
        lines += ["", "## IPR against random and against its ablations (paired by episode seed)", "",
                  "Difference of means over the episodes both played on the same seeds, 95% paired bootstrap "
                  "interval; **bold** where the interval excludes 0 (significant).", "",
                  "| IPR variant | against | game | level | difference [95% interval] | pairs |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        for d in diffs:
            cell = f"{d['diff']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"
            lines.append(f"| {d['method']} | {d['against']} | {d['game']} | {d['level']} | "
                         f"{f'**{cell}**' if d['significant'] else cell} | {d['pairs']} |")
        for word, sign in (("above", 1), ("below", -1)):
            found = sorted((d["method"], d["against"], d["game"], d["level"]) for d in diffs
                           if d["significant"] and sign * d["diff"] > 0)
            lines += ["", f"Significantly {word}: " + ("; ".join(f"{m} {word} {a} on {g} ({lv})" for m, a, g, lv in found)
                                                       or "nowhere") + "."]
            brief += lines[-2:]
        lines += ["", must_show_counts(diffs, games)]
        brief += lines[-2:]
    rows = ablation_rows(summaries, methods)
    if rows:
        lines += ["", "## Ablation (Table 3 rows present)", "", "| variant | Survival | Curiosity | Utility |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |" for label, vals in rows]
    invalid = {m: np.mean([c.invalid_rate for c in table[m].values()]) for m in methods if m.startswith("vlm")}
    if invalid:
        lines += ["", "Prompt-only VLM answers that did not parse to a listed action (played as no-op): " +
                  ", ".join(f"{m} {100 * v:.1f}% of steps" for m, v in invalid.items()) + "."]
    if held_out:
        lines += ["", "## Held-out games (zero-shot)", ""] + [f"- {g}: {why}" for g, why in held_out.items()]
    lines += ["", "## Provenance", "", "Episodes behind every number: `eval/episodes/<method>/<game>/*.json` "
              "(length, failure, score, seed) with `.npy` frame embeddings; references in `eval/references.json`.",
              "", "| method | " + " | ".join(games) + " |", "| --- |" + " ---: |" * len(games)]
    lines += [f"| {m} | " + " | ".join(str(table[m][g].episodes) if g in table[m] else "0" for g in games) + " |"
              for m in methods]
    lines += ["", "Plots: survival.png, curiosity.png, utility.png (normalised score per game and method)."]
    layout.write_text(f"{EVAL}/report.md", "\n".join(lines) + "\n")
    summary = {"methods": methods, "games": games, "held_out": held_out, "levels": summaries, "overall_rank": overall,
               "cells": {m: {g: vars(c) for g, c in row.items()} for m, row in table.items()},
               "comparisons": diffs}
    layout.write_text(f"{EVAL}/summary.json", json.dumps(summary, indent=1, default=lambda v: None))
    _bar_charts(layout, table, methods, games)
    return layout.display(EVAL, "report.md"), "\n".join(brief)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return buf.getvalue()


def _bar_charts(layout: RunLayout, table, methods: list[str], games: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(methods), 1)
    for level in LEVELS:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(games)), 3.5))
        for i, m in enumerate(methods):
            vals = [getattr(table[m][g], level) if g in table[m] else None for g in games]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(np.arange(len(games)) + i * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(games)) + 0.4 - width / 2, games, fontsize=8)
        ax.set_ylabel({"survival": "L / H", "curiosity": "area / random area", "utility": "HNS"}[level])
        ax.set_title(f"{level.capitalize()} per game (missing bars: no reference)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        layout.write_bytes(f"{EVAL}/{level}.png", _png(fig))
        plt.close(fig)


def scaling_plot(runs: list[RunLayout], out: RunLayout, method: str = "ipr") -> str:
    """Zero-shot score on held-out games against the number of training games, one point per run
    (each run evaluated with `ipr eval`); variants of `method` averaged per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    points = {level: [] for level in LEVELS}
    for run in runs:
        summary = run.read_json(EVAL, "summary.json")
        cfg = yaml.safe_load(run.read_text(CONFIG))
        held = set(cfg.get("eval", {}).get("held_out", []))
        n_train = len([g for g in cfg["fleet"]["games"] if g not in held])
        for level in LEVELS:
            vals = [c[level] for m, row in summary["cells"].items() if m.partition("@")[0] == method
                    for g, c in row.items() if g in held and c[level] is not None]
            if vals:
                points[level].append((n_train, float(np.mean(vals))))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for level, pts in points.items():
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=level)
    ax.set_xlabel("training games")
    ax.set_ylabel("zero-shot normalised score (held-out games)")
    ax.legend()
    fig.tight_layout()
    out.write_bytes(f"{EVAL}/scaling.png", _png(fig))
    plt.close(fig)
    return out.display(EVAL, "scaling.png")


__all__ = ["EpisodeCache", "random_reference", "scaling_plot", "write_report"]
