"""`ipr eval` end to end on the aligned smoke run: random, PPO and DQN (RLlib), the prompt-only VLM,
the IPR agent and its no-world-model ablation on real games; cached episodes, resume, references,
human-normalised Utility, and the held-out (G2U) checks."""

import json
import re

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, assert_picture, copy_run, run_ipr

# Whichever test comes first also pays for the module's evaluation (`evaluated_source`, about 4.5 min on 2
# idle cores, whose `ipr eval` may take 20): the suite's 600 s per test would bet on an idle machine.
pytestmark = pytest.mark.timeout(1500)

METHODS = ["random", "ipr@utility", "ipr-no-wm@utility", "ipr-random-pick@utility", "ipr-no-grpo@utility", "vlm@utility",
           "ppo@survival", "dqn@utility"]


@pytest.fixture(scope="module")
def evaluated_source(aligned_source, tmp_path_factory):
    """One evaluation of a copy of the aligned smoke run for this module; tests read it, and the ones
    that evaluate again do so on their own copy (`evaluated`)."""
    run = copy_run(aligned_source, tmp_path_factory.mktemp("evaluated"))
    proc = run_ipr("eval", str(run), "--held-out", "Hopper-Html", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc



def test_the_console_shows_a_bar_per_method_and_no_error_line_from_ray(evaluated_source):
    """What a user reads: one progress bar per method's episodes, a short result with the report's path,
    and nothing they would take for a failure: RLlib's env runners used to be created with restarts that
    Ray cannot honour for their object-store config, and Ray logged that as an error line (ray#53727)."""
    _, proc = evaluated_source
    ray_errors = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if re.search(r"\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]", line)]
    assert not ray_errors, ray_errors[:3]
    # one progress bar per method, not a line per episode (the episodes' numbers are in their cached json)
    for m in METHODS:
        assert f"{m} episodes: 100%" in proc.stdout, m
    assert not re.search(r"^  \S+ \S+ #\d+: \d+ steps", proc.stdout, re.M)
    # the result: Table 2 and the significant differences, then where the whole report is (not all of it)
    tail = proc.stdout.split("# Evaluation of")[-1]
    assert "| method | Survival mean |" in tail and "Significantly above:" in tail, tail
    assert re.search(r"IPR above random on \d of 3 games.*; above ipr-no-wm on \d \(game, level\) pairs?", tail), tail
    assert "eval/report.md" in tail.splitlines()[-1] and "## Survival per game" not in proc.stdout


@pytest.fixture
def evaluated(evaluated_source, tmp_path):
    run, proc = evaluated_source
    return copy_run(run, tmp_path / "runs"), proc


def test_report_compares_the_methods_with_numbers_traceable_to_cached_episodes(evaluated_source):
    run, proc = evaluated_source
    report = (run / "eval" / "report.md").read_text()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    games = ["Airstriker-Genesis-v0", "Bounce-Html", "Hopper-Html"]
    assert summary["games"] == games and summary["methods"] == METHODS
    for m in METHODS:
        assert re.search(rf"^\| {re.escape(m)} \|", report, re.M), m
        for g in games:
            cached = sorted((run / "eval" / "episodes" / m / g).glob("*.json"))
            assert len(cached) == 2 and len(list(cached[0].parent.glob("*.npy"))) == 2
            eps = [json.loads(p.read_text()) for p in cached]
            cell = summary["cells"][m][g]
            assert cell["episodes"] == 2
            assert cell["length"] == pytest.approx(np.mean([e["length"] for e in eps]))
            assert cell["score"] == pytest.approx(np.mean([e["score"] for e in eps]))
            refs = json.loads((run / "eval" / "references.json").read_text())
            assert cell["survival"] == pytest.approx(cell["length"] / refs[g]["step_unit"])
            assert all(0 < e["length"] <= 40 for e in eps)
            # what the method pressed: one executed control per step, summed over the episodes
            assert all(sum(e["controls"].values()) == e["length"] for e in eps)
            assert cell["controls"] == {name: sum(e["controls"].get(name, 0) for e in eps)
                                        for name in set().union(*(e["controls"] for e in eps))}
    # after random, every method's episodes stop at the game's step unit H (at most the 40-step cap)
    refs = json.loads((run / "eval" / "references.json").read_text())
    for m in METHODS[1:]:
        for g in games:
            for p in (run / "eval" / "episodes" / m / g).glob("*.json"):
                assert json.loads(p.read_text())["cap"] == min(refs[g]["step_unit"], 40)
    # 95% bootstrap intervals per cell, and IPR's paired differences against random and its ablation
    assert "## 95% intervals per game (bootstrap over episodes)" in report
    for m in METHODS:
        for g in games:
            cell = summary["cells"][m][g]
            low, high = cell["intervals"]["survival"]
            assert low - 1e-9 <= cell["survival"] <= high + 1e-9
    pairs = {(d["against"], d["game"], d["level"]) for d in summary["comparisons"]}
    assert {("random", g, "survival") for g in games} <= pairs
    assert {("ipr-no-wm@utility", g, "score") for g in games} <= pairs
    assert {("ipr-random-pick@utility", g, "survival") for g in games} <= pairs
    assert {("ipr-no-grpo@utility", g, "survival") for g in games} <= pairs
    assert "ipr-no-grpo@utility: the run has no Stage 4 policy yet, so it acts as ipr does" in proc.stdout
    assert all(d["method"] == "ipr@utility" and d["low"] <= d["diff"] <= d["high"] and d["pairs"] == 2
               for d in summary["comparisons"])
    assert "## IPR against random and against its ablations" in report and "Significantly above:" in report
    assert "Significantly below:" in report
    # same seeds for every method (common random numbers)
    seeds = {m: [json.loads(p.read_text())["seed"] for p in sorted((run / "eval/episodes" / m / games[0]).glob("*.json"))]
             for m in METHODS}
    assert len({tuple(s) for s in seeds.values()}) == 1
    # the random reference was measured for every game; no human play recorded -> Utility missing
    for g in games:
        assert f"| {g} | 2 |" in report and "missing (no human recording)" in report
    assert all(summary["cells"][m][g]["utility"] is None for m in METHODS for g in games)
    assert "Ablation (Table 3 rows present)" in report and "IPR (propose, world-model score, route)" in report
    assert "Prompt-only VLM answers that did not parse" in report
    assert "the run's own appearance encoder" in report  # the Curiosity encoder is named
    for level in ("survival", "curiosity", "utility"):
        assert_picture(run / "eval" / f"{level}.png")
    # the held-out game: proved absent from the run's data, router calibrated for it
    assert "Hopper-Html: 0 of the" in report
    assert (run / "physcode" / "calibration" / "data").is_dir()
    # RLlib baselines were trained and checkpointed per (algorithm, level, game)
    for algo in ("ppo@survival", "dqn@utility"):
        assert json.loads((run / "baselines" / algo / games[1] / "LATEST.json").read_text())["done"]


def _table(report: str, heading: str) -> dict[str, list[str]]:
    """The markdown table under `heading`: {first cell: the other cells}."""
    block = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}  # past the header and ---


def test_report_cells_are_the_summary_numbers(evaluated_source):
    """Every per-game cell of the report and each method's means in Table 2 are summary.json's values,
    rounded as printed (a report that drifted from the data it came from fails here)."""
    run, _ = evaluated_source
    report = (run / "eval" / "report.md").read_text()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    games, cells = summary["games"], summary["cells"]
    for heading, level, raw in (("## Survival per game", "survival", "length"),
                                ("## Curiosity per game", "curiosity", "area"), ("## Utility per game", "utility", "score")):
        table = _table(report, heading)
        assert set(table) == set(summary["methods"]), heading
        for m in summary["methods"]:
            for g, text in zip(games, table[m]):
                value, bracket = re.fullmatch(r"(\S+) \((\S+)\)", text).groups()
                expected = cells[m][g][level]
                assert value == ("missing" if expected is None else f"{expected:.3f}"), (heading, m, g, text)
                assert float(bracket) == pytest.approx(cells[m][g][raw], abs=0.006), (heading, m, g, text)
    controls = _table(report, "## Executed controls")
    for m in summary["methods"]:
        for g, text in zip(games, controls[m]):
            tally = cells[m][g]["controls"]
            top = max(tally.values())
            share, name, distinct = re.fullmatch(r"(\d+)% (.+), (\d+) controls?", text).groups()
            assert tally[name] == top and int(share) == round(100 * top / sum(tally.values())), (m, g, text)
            assert int(distinct) == len(tally), (m, g, text)
    table2 = _table(report, "## Summary (Table 2)")
    for m in summary["methods"]:
        for column, level in ((0, "survival"), (3, "curiosity")):
            mean = np.mean([cells[m][g][level] for g in games])
            assert table2[m][column] == f"{mean:.3f}", (m, level, table2[m][column], mean)


def test_interrupted_evaluation_resumes_from_the_cache_and_refuses_other_acting_settings(evaluated):
    run, _ = evaluated
    gone = run / "eval/episodes/random/Bounce-Html/0001.json"
    kept = run / "eval/episodes/ipr@utility/Bounce-Html/0000.json"
    before = kept.read_text()
    gone.unlink()
    proc = run_ipr("eval", str(run), "--methods", "random", "ipr@utility", "--games", "Bounce-Html", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== random: 1 episodes" in proc.stdout and "ipr@utility:" not in proc.stdout.split("# Evaluation")[0]
    assert gone.is_file() and kept.read_text() == before
    # the cached IPR episodes were played routing by outcome: another routing is refused, not mixed into the report
    report = (run / "eval" / "report.md").read_text()
    proc = run_ipr("eval", str(run), "--methods", "random", "ipr@utility", "--games", "Bounce-Html",
                   "--set", "physcode.routing=sample")
    assert_one_line_error(proc, "ipr@utility: its cached episodes were played with other settings",
                          "physcode.routing outcome -> sample", "evaluate a copy of the run")
    assert kept.read_text() == before and (run / "eval" / "report.md").read_text() == report


def test_human_recordings_give_hns(evaluated, tmp_path):
    """Episodes labelled `human` in a store (here played by the fleet's scripted source and labelled
    human: no person plays in a test) become the human reference, and Utility is HNS."""
    run, _ = evaluated
    root = tmp_path / "humans"
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={root}", "--set", "fleet.games=[Bounce-Html]",
                   "--set", "fleet.source_label=human", "--set", "fleet.num_envs=1", "--set", "env.max_episode_steps=30",
                   "--set", "collect.steps=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_ipr("eval", str(run), "--methods", "random", "ppo@survival", "--games", "Bounce-Html",
                   "--set", f"eval.human_stores=[{root / 'smoke'}]", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = json.loads((run / "eval" / "references.json").read_text())["Bounce-Html"]
    assert refs["human_score"] is not None and refs["human_episodes"] >= 1
    cell = json.loads((run / "eval" / "summary.json").read_text())["cells"]["ppo@survival"]["Bounce-Html"]
    expected = (cell["score"] - refs["random_score"]) / (refs["human_score"] - refs["random_score"] + 1e-8)
    assert cell["utility"] == pytest.approx(expected)


def test_held_out_game_in_the_training_data_is_refused(aligned_smoke_run):
    proc = run_ipr("eval", str(aligned_smoke_run), "--held-out", "Bounce-Html", "--methods", "random")
    assert_one_line_error(proc, "held-out game Bounce-Html appears in the training data", "--held-out Bounce-Html")


def test_unknown_method_is_refused(aligned_smoke_run):
    proc = run_ipr("eval", str(aligned_smoke_run), "--methods", "random", "sac@utility")
    assert_one_line_error(proc, "unknown method 'sac@utility'")


def test_train_held_out_keeps_games_out_of_collection(tmp_path):
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={tmp_path}", "--set",
                   "fleet.games=[Airstriker-Genesis, Bounce-Html]", "--set", "eval.held_out=[Bounce-Html]",
                   "--set", "collect.steps=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Bounce-Html" not in proc.stdout.split("collected")[-1]
    assert "held_out:\n  - Bounce-Html" in (tmp_path / "smoke" / "config.yaml").read_text()
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={tmp_path}", "--set", "fleet.games=[Bounce-Html]",
                   "--set", "eval.held_out=[Bounce-Html]")
    assert_one_line_error(proc, "eval.held_out keeps every game of fleet.games out of training")


class KillAfterFirstEpisodeCall:
    """The real worker's handle; its first `play_episode` call is submitted, then the worker process is
    SIGKILLed, so that call is in flight when the process dies."""

    def __init__(self, handle, pid: int):
        self.handle, self.pid, self.killed = handle, pid, False

    @property
    def play_episode(self):
        outer = self

        class Method:
            @staticmethod
            def remote(*args):
                ref = outer.handle.play_episode.remote(*args)
                if not outer.killed:
                    import os
                    import signal

                    os.kill(outer.pid, signal.SIGKILL)
                    outer.killed = True
                return ref

        return Method()

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_evaluation_actor_killed_mid_episode_replays_it(aligned_smoke_run, ray_local):
    """SIGKILL of an evaluation actor with an episode call in flight (killed right after the driver
    submits its first episode: an observable point, not a timer): Ray restarts it, the driver plays
    the lost episode again from its seed, every episode is cached exactly once."""
    import io

    import ray

    from cluster.evaluate import Evaluation
    from ipr_dist.config import load_config

    run = aligned_smoke_run
    cfg = load_config(run / "config.yaml", ["eval.max_episode_steps=600", "eval.num_envs=1", "eval.episodes=2",
                                            f"run.root={run.parent}"]).with_absolute_root()
    method = "random-killtest"
    ev = Evaluation(cfg, [method], ["Bounce-Html"], {}, io.StringIO())
    try:
        pid = ray.get(ev.workers[0].pid.remote())
        worker = ev.workers[0]
        ev.workers = [KillAfterFirstEpisodeCall(worker, pid)]
        ev.run_local(method, ev.missing(method), {})
        assert ev.workers[0].killed
        out = ev.out.getvalue()
        ev.workers = [worker]
    finally:
        ev.shutdown()
    assert "lost with its actor" in out, out
    cached = sorted((run / "eval" / "episodes" / method / "Bounce-Html").glob("*.json"))
    assert [p.stem for p in cached] == ["0000", "0001"]
    assert all(json.loads(p.read_text())["length"] > 0 for p in cached)
