"""The analysis scripts under scripts/ (the measurements docs/ cite) run on the smoke run trained through
Stage 3 and print their tables. They import the project's internals directly, so a changed signature breaks
them where no other test looks: `candidate_diversity.py` failed with a TypeError for a whole session after
`probe_contexts` gained an argument."""

import re
import subprocess
import sys

import pytest

from .conftest import ROOT, committed, copy_run


@pytest.fixture(scope="module")
def run(aligned_source, tmp_path_factory):
    """One copy for the module: the scripts only read the run."""
    return copy_run(aligned_source, tmp_path_factory.mktemp("scripts"))


def script(name: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rows(out: str, game: str) -> list[list[str]]:
    """The markdown table rows of `out` that start with `game`, as cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {game}")]


GAMES = ("Airstriker-Genesis-v0", "Bounce-Html")


def test_control_effect_prints_the_explained_share_per_game_and_outcome(run):
    out = script("control_effect.py", str(run), "--horizons", "4", "--shuffles", "2")
    for game in GAMES:
        cells = rows(out, game)
        assert [c[1] for c in cells] == ["survival, 4 steps", "utility, 4 steps"]
        for c in cells:
            assert 0.0 <= float(c[3]) <= 1.0 and re.fullmatch(r"[\d.]+ ± [\d.]+", c[4])


def test_key_edges_counts_the_random_plays_presses(run):
    out = script("key_edges.py", str(run), "--game", "Airstriker-Genesis-v0", "--key", "B")
    (random,) = rows(out, "random")
    steps, held, edges = int(random[1]), float(random[2]), float(random[3])
    assert steps > 0 and 0.0 < held < 1.0 and 0.0 < edges <= 100 * held


def test_router_with_frame_says_which_games_it_cannot_measure(run):
    """The smoke store holds one episode per game, so PhysCode holds none out: the script labels every
    step with its code and says so instead of printing an empty table."""
    out = script("router_with_frame.py", str(run), "--k", "1")
    assert "codes used by two or more games (held out)" in out
    assert "not measured: Airstriker-Genesis-v0, Bounce-Html (no held-out episode" in out


def test_policy_drift_of_a_policy_against_itself_is_zero(run):
    aligned = committed(run, "policy/aligned")
    out = script("policy_drift.py", str(run), "--frames", "4", "--grpo", str(aligned))
    for game in GAMES:
        (cells,) = rows(out, game)
        assert cells[2] == "0.0000 [0.0000, 0.0000]"


def test_candidate_diversity_scores_each_games_candidates(run):
    out = script("candidate_diversity.py", str(run), "--contexts", "2")
    assert "B = 8 candidates per context" in out
    for game in GAMES:
        (cells,) = rows(out, game)
        assert int(cells[1]) == 2 and 1.0 <= float(cells[2]) <= 8.0 and 1.0 <= float(cells[3]) <= float(cells[2])
        assert float(cells[4]) >= 0.0 and cells[5].endswith("%")


def test_held_controls_plays_every_key_combination_beside_random(run):
    out = script("held_controls.py", str(run / "config.yaml"), "Bounce-Html", "--episodes", "1")
    played = [line.split("|")[1].strip() for line in out.splitlines()[2:] if line.startswith("|")]
    assert played[0] == "random play" and "none" in played and "ArrowLeft" in played
