"""The `ipr collect` job end to end, as a user runs it, and its user errors."""

from pathlib import Path

from ipr_dist.data.store import TrajectoryStore

from .conftest import assert_one_line_error, run_ipr


def test_collect_stores_summarises_and_resumes(tmp_path):
    root = f"run.root={tmp_path}"
    proc = run_ipr("collect", "configs/smoke.yaml", "--set", root)
    assert proc.returncode == 0, proc.stderr
    assert "Airstriker-Genesis-v0" in proc.stdout and "committed 512 steps" in proc.stdout
    run = tmp_path / "smoke"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert TrajectoryStore(str(run)).count_steps() == 512

    again = run_ipr("collect", "configs/smoke.yaml", "--set", root)  # nothing missing: nothing played
    assert again.returncode == 0 and "store holds 512 steps" in again.stdout and "committed" not in again.stdout

    more = run_ipr("collect", "configs/smoke.yaml", "--set", root, "--set", "collect.steps=600")
    assert more.returncode == 0, more.stderr
    assert "committed 88 steps" in more.stdout
    assert TrajectoryStore(str(run)).count_steps() == 600


def test_user_errors_are_one_line_and_keep_the_store(tmp_path):
    root = f"run.root={tmp_path}"
    ok = run_ipr("collect", "configs/smoke.yaml", "--set", root, "--set", "collect.steps=64")
    assert ok.returncode == 0, ok.stderr
    shards = sorted(Path(tmp_path / "smoke" / "data").iterdir())

    assert_one_line_error(run_ipr("collect", "configs/smoke.yaml", "--set", root, "--set", "fleet.games=[NoSuchGame-Nes]"),
                          "unknown game 'NoSuchGame-Nes'", "ipr games list")
    assert_one_line_error(run_ipr("collect", "configs/smoke.yaml", "--set", root, "--set", "fleet.games=[SuperMarioBros-Nes]"),
                          "ROM of 'SuperMarioBros-Nes-v0' is not installed", "import-roms")
    assert_one_line_error(run_ipr("collect", "configs/smoke.yaml", "--set", root, "--set", "fleet.cpus_per_env=-1"),
                          "fleet.cpus_per_env", "greater than 0")
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  failure_on: sometimes\n")
    assert_one_line_error(run_ipr("collect", str(bad)), str(bad), "env.failure_on", "'game_over' or 'life_lost'")
    assert_one_line_error(run_ipr("collect", str(tmp_path / "absent.yaml")), "not found")

    assert sorted(Path(tmp_path / "smoke" / "data").iterdir()) == shards
    assert TrajectoryStore(str(tmp_path / "smoke")).count_steps() == 64


def test_train_checks_every_model_path_at_job_start(tmp_path):
    """The cluster preset reads its models from paths: a missing one stops `ipr train` before Ray
    starts, in one sentence naming the key and the path."""
    from .conftest import assert_one_line_error, run_ipr

    missing = tmp_path / "nothing-here"
    for key, extra in (("policy.model_path", []), ("features.appearance_path", ["features.appearance=dinov3"]),
                       ("features.semantics_path", ["features.semantics=t5"])):
        sets = [f"run.root={tmp_path / 'runs'}", f"{key}={missing}", *extra]
        proc = run_ipr("train", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)])
        assert_one_line_error(proc, key, str(missing), "docs/cluster.md")
    assert not (tmp_path / "runs").exists()
