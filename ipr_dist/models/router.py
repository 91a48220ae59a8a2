"""The router T_env: PhysCode sequences back to a game's own controls (paper Sec. 10.2, "Inference
and control routing").

Per game, a table counts how often each code co-occurred with each control in labelled
trajectories (the code assigned to step t, the control executed at t). A control is the set of keys
held, plus, for pointer games, the pointer cell on a grid and the mouse flags. `route` maps every
code of a sequence to its most frequent control; a code never seen with this game falls back to
the nearest code (in codebook space) that was. Calibration episodes add counts the same way from
fresh play, so a game with few labelled steps can be refined.

Routing by outcome keeps, per (code, control), what followed the steps (count, sum and sum of squares of
the outcomes) and leaves the collection's play only where those steps show a better control.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from ipr_dist.games.actions import POINTER_FLAGS, noop_action

GRID = 4  # pointer cells per side: a pointer control is the cell the pointer is in, not its exact position


@dataclass(frozen=True)
class Control:
    """A discretised control: keys held, pointer cell (or None), mouse flags, scroll."""

    keys: tuple[int, ...]
    cell: tuple[int, int] | None = None
    buttons: tuple[int, ...] = (0, 0, 0)
    scroll: int = 0

    def action(self, num_keys: int, grid: int) -> dict:
        """The unified action this control stands for (pointer at the centre of its cell)."""
        a = noop_action(num_keys)
        a["keys"][list(self.keys)] = 1
        if self.cell is not None:
            a["mouse"] = np.array([(self.cell[0] + 0.5) / grid, (self.cell[1] + 0.5) / grid], np.float32)
        a["mouse_buttons"] = np.array(self.buttons, np.int8)
        a["scroll"] = self.scroll
        return a

    def name(self, key_names) -> str:
        """The control in words a person reads: "UP+B", "none", "click@2,1" (pointer cell column, row)."""
        words = [str(key_names[i]) if i < len(key_names) else f"key{i}" for i in self.keys]
        words += [flag for flag, on in zip(POINTER_FLAGS, self.buttons) if on]
        words += [f"scroll{self.scroll:+d}"] if self.scroll else []
        text = "+".join(words) or "none"
        return f"{text}@{self.cell[0]},{self.cell[1]}" if self.cell is not None else text

    def key(self) -> str:
        return json.dumps([list(self.keys), list(self.cell) if self.cell else None, list(self.buttons), self.scroll])

    @classmethod
    def from_key(cls, text: str) -> Control:
        keys, cell, buttons, scroll = json.loads(text)
        return cls(tuple(keys), tuple(cell) if cell else None, tuple(buttons), scroll)


def control_of(keys, mouse, buttons, scroll, uses_mouse: bool, grid: int) -> Control:
    pressed = tuple(int(i) for i in np.flatnonzero(np.asarray(keys)))
    if not uses_mouse:
        return Control(pressed)
    cell = tuple(int(min(grid - 1, max(0, v * grid))) for v in mouse)
    return Control(pressed, cell, tuple(int(b) for b in buttons), int(scroll))


@dataclass
class GameTable:
    num_keys: int
    uses_mouse: bool
    counts: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    human: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))  # from human steps
    # code -> control key -> [steps with a known outcome, their outcomes' sum, sum of squares] (random and
    # calibration play; routers written before 2026-12-07 have no sum of squares)
    outcomes: dict[int, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(dict))

    def best(self, code: int) -> Control:
        """The code's control: from human play when a person's steps carry the code (the paper's tables
        are "learned from human trajectories and short calibration episodes"), else from the rest."""
        return Control.from_key(self._counts(code).most_common(1)[0][0])

    def draw(self, code: int, rng: np.random.Generator) -> Control:
        """A control drawn in proportion to how often it went with the code (from the same counts as `best`)."""
        counts = self._counts(code)
        weights = np.fromiter(counts.values(), np.float64, len(counts))
        return Control.from_key(list(counts)[rng.choice(len(counts), p=weights / weights.sum())])

    def best_outcome(self, code: int, prior: float, alpha: float = 1.0) -> Control | None:
        """The control whose steps with this code had the best mean outcome, each mean shrunk toward the
        code's own mean by `prior` pseudo-steps (a control seen twice does not win on luck); the most
        frequent control where a person's steps carry the code or no step of it has a known outcome.
        With `alpha` < 1, None unless that control's steps beat the code's other steps at one-sided level
        `alpha` (pooled within-code variance, Bonferroni over the code's controls): where the data do not
        show a better control, the caller keeps the collection's own play (`draw`)."""
        stats = self.outcomes.get(code)
        if self.human.get(code) or not stats:
            return self.best(code)
        n = sum(v[0] for v in stats.values())
        mean = sum(v[1] for v in stats.values()) / n
        counts = self.counts[code]
        key = max(stats, key=lambda k: ((stats[k][1] + prior * mean) / (stats[k][0] + prior), counts[k]))
        if alpha >= 1 or len(stats) == 1 or any(len(v) < 3 for v in stats.values()):
            return Control.from_key(key)  # no test asked, nothing to choose from, or no variances kept
        n_k, sum_k = stats[key][0], stats[key][1]
        n_rest = n - n_k
        var = max(0.0, (sum(v[2] for v in stats.values()) - n * mean**2) / max(1, n - 1))
        gap = sum_k / n_k - (n * mean - sum_k) / n_rest
        z = NormalDist().inv_cdf(1 - alpha / len(stats))
        return Control.from_key(key) if gap > z * (var * (1 / n_k + 1 / n_rest)) ** 0.5 else None

    def chooser(self, how: str, rng: np.random.Generator | None = None, prior: float = 0.0, alpha: float = 1.0):
        """code -> Control as `physcode.routing` says ("mode", "sample" with `rng`, "outcome" with `prior`
        and `alpha`: a code whose best control is not shown better is drawn, so it needs `rng` too)."""
        def outcome(code: int) -> Control:
            return self.best_outcome(code, prior, alpha) or self.draw(code, rng)

        choose = {"mode": self.best, "sample": lambda code: self.draw(code, rng), "outcome": outcome}.get(how)
        if choose is None or (rng is None and (how == "sample" or (how == "outcome" and alpha < 1))):
            raise ValueError(f"routing '{how}' is not one of mode, sample (with an rng), outcome (with an rng "
                             "below alpha 1)")
        return choose

    def _counts(self, code: int) -> Counter:
        return self.human[code] if self.human.get(code) else self.counts[code]

    def known_codes(self) -> set[int]:
        return {c for c, v in self.counts.items() if v} | {c for c, v in self.human.items() if v}

    def human_entries(self) -> int:
        """Entries (codes) whose control comes from human steps."""
        return sum(1 for v in self.human.values() if v)


class Router:
    def __init__(self, codebook: np.ndarray, grid: int = GRID):
        self.codebook = np.asarray(codebook, np.float32)
        self.grid = grid
        self.tables: dict[str, GameTable] = {}

    def observe(self, game: str, num_keys: int, uses_mouse: bool, codes, controls: list[Control],
                human: bool = False, outcomes=None) -> None:
        """Count (code, control) pairs of labelled, human or calibration steps; `outcomes` (one per step, NaN
        where unknown; not for human steps): what followed each step, for routing by outcome."""
        table = self.tables.setdefault(game, GameTable(num_keys, uses_mouse))
        target = table.human if human else table.counts
        for c, ctl in zip(codes, controls):
            target[int(c)][ctl.key()] += 1
        if outcomes is not None and not human:
            for c, ctl, y in zip(codes, controls, outcomes):
                if np.isfinite(y):
                    stat = table.outcomes[int(c)].setdefault(ctl.key(), [0, 0.0, 0.0])
                    stat[0] += 1
                    stat[1] += float(y)
                    if len(stat) > 2:  # a table loaded from before sums of squares were kept stays without
                        stat[2] += float(y) ** 2

    def _known(self, table: GameTable, code: int) -> int:
        known_codes = table.known_codes()
        if code in known_codes:
            return code
        known = np.array(sorted(known_codes))
        dist = ((self.codebook[known] - self.codebook[code]) ** 2).sum(1)
        return int(known[dist.argmin()])

    def route(self, game: str, codes, how: str = "mode", rng: np.random.Generator | None = None,
              prior: float = 0.0, alpha: float = 1.0) -> list[dict]:
        """One valid action of the game's own action space per code of the sequence (config `physcode.routing`):
        "mode", the code's most frequent control; "sample", one drawn from its counts with `rng`; "outcome",
        the one with the best shrunk mean outcome (`prior`: pseudo-steps at the code's mean) where it is shown
        better at level `alpha`, else one drawn as under "sample"."""
        table = self.tables.get(game)
        if table is None or not table.known_codes():
            raise KeyError(f"the router has no table for game '{game}'; calibrate it first")
        choose = table.chooser(how, rng, prior, alpha)
        out = []
        for c in np.asarray(codes).reshape(-1):
            code = int(c)
            if not 0 <= code < len(self.codebook):
                raise ValueError(f"code {code} is outside the codebook (0..{len(self.codebook) - 1})")
            out.append(choose(self._known(table, code)).action(table.num_keys, self.grid))
        return out

    def accuracy(self, game: str, codes, controls: list[Control]) -> dict:
        """How often routing each code gives back the recorded control, against the chance of always
        answering the game's most frequent control."""
        table = self.tables[game]
        routed = [table.best(self._known(table, int(c))) for c in codes]
        overall = Counter()
        for counter in [*table.counts.values(), *table.human.values()]:
            overall.update(counter)
        top = Control.from_key(overall.most_common(1)[0][0])
        n = max(1, len(controls))

        def key_match(a: Control, b: Control) -> float:  # share of the game's keys in the same state
            if table.num_keys == 0:
                return float(a == b)
            return 1.0 - len(set(a.keys) ^ set(b.keys)) / table.num_keys

        return {"accuracy": sum(r == c for r, c in zip(routed, controls)) / n,
                "most_frequent_control": sum(top == c for c in controls) / n,
                "key_accuracy": sum(key_match(r, c) for r, c in zip(routed, controls)) / n,
                "key_accuracy_most_frequent": sum(key_match(top, c) for c in controls) / n,
                "distinct_controls": len(overall), "steps": len(controls)}

    def routed_outcomes(self, game: str, codes, controls: list[Control], outcomes, prior: float,
                        alpha: float = 1.0) -> dict:
        """The mean outcome of the steps whose recorded control is the one each routing ("mode", "outcome")
        gives their code, against all steps': an offline reading of what routing by outcome buys on
        held-out play, fair where that play's controls did not depend on the frame (random play). A code that
        routing by outcome leaves to the collection's play (not shown better at `alpha`) matches all its steps."""
        table = self.tables[game]
        y = np.asarray(outcomes, np.float64)
        known = np.isfinite(y)
        out = {"outcome_all": float(y[known].mean()) if known.any() else float("nan"),
               "outcome_steps": int(known.sum())}
        code_list = np.asarray(codes).tolist()
        for how, choose in (("mode", table.best), ("outcome", lambda code: table.best_outcome(code, prior, alpha))):
            routed = {c: choose(self._known(table, int(c))) for c in set(code_list)}
            hit = np.array([ok and routed[c] in (None, ctl) for c, ctl, ok in zip(code_list, controls, known)], bool)
            out[f"outcome_{how}"] = float(y[hit].mean()) if hit.any() else float("nan")
            out[f"outcome_{how}_steps"] = int(hit.sum())
        return out

    def dumps(self) -> str:
        """The router as JSON text (stored as `<run>/physcode/router.json`)."""
        data = {"grid": self.grid, "codebook": self.codebook.tolist(),
                "games": {g: {"num_keys": t.num_keys, "uses_mouse": t.uses_mouse,
                              "counts": {str(c): dict(v) for c, v in t.counts.items()},
                              "human_counts": {str(c): dict(v) for c, v in t.human.items() if v},
                              "outcomes": {str(c): v for c, v in t.outcomes.items() if v}}
                          for g, t in self.tables.items()}}
        return json.dumps(data)

    @classmethod
    def loads(cls, text: str) -> Router:
        data = json.loads(text)
        router = cls(np.array(data["codebook"], np.float32), data["grid"])
        for g, t in data["games"].items():
            table = GameTable(t["num_keys"], t["uses_mouse"])
            for c, counts in t["counts"].items():
                table.counts[int(c)] = Counter(counts)
            for c, counts in t.get("human_counts", {}).items():
                table.human[int(c)] = Counter(counts)
            for c, stats in t.get("outcomes", {}).items():  # routers written before outcomes have none
                table.outcomes[int(c)] = {k: list(v) for k, v in stats.items()}
            router.tables[g] = table
        return router
