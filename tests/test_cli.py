"""The `ipr collect` job end to end, as a user runs it, and its user errors."""

from pathlib import Path

import pytest

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


@pytest.mark.unit
def test_serve_token_comes_from_the_file_then_the_environment_and_is_off_only_with_no_auth(tmp_path):
    from ipr_dist.cli import serve_token
    from ipr_dist.errors import ConfigError

    secret = tmp_path / "token"
    secret.write_text("  from-file\n")
    assert serve_token(str(secret), False, {"IPR_SERVE_TOKEN": "from-env"}) == "from-file"  # the file wins
    assert serve_token(None, False, {"IPR_SERVE_TOKEN": "from-env"}) == "from-env"
    assert serve_token(None, True, {"IPR_SERVE_TOKEN": "from-env"}) == "from-env"  # a token given is used
    assert serve_token(None, True, {}) is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (tmp_path / "absent", empty, tmp_path):
        with pytest.raises(ConfigError, match="--token-file .*: missing or empty; write the shared secret"):
            serve_token(str(path), False, {})
    with pytest.raises(ConfigError, match="no token: set IPR_SERVE_TOKEN or --token-file FILE .*--no-auth"):
        serve_token(None, False, {"IPR_SERVE_TOKEN": ""})


def test_serve_refuses_to_start_without_a_token_before_anything_runs(tmp_path):
    """`ipr serve` with no token source (or a missing token file) is one user error, before Ray starts."""
    env = {"IPR_SERVE_TOKEN": ""}
    assert_one_line_error(run_ipr("serve", str(tmp_path / "run"), env=env), "no token", "--no-auth")
    assert_one_line_error(run_ipr("serve", str(tmp_path / "run"), "--token-file", str(tmp_path / "nope"), env=env),
                          "--token-file", "missing or empty")


@pytest.mark.unit
def test_the_act_app_checks_the_bearer_token_and_skips_it_only_without_one():
    """The served app's check (serving/app.py): 401 with no bearer header, 403 with a wrong token, through
    with the right one; an app built with token None (`--no-auth`) lets any request through."""
    from types import SimpleNamespace

    from fastapi import HTTPException
    from starlette.requests import Request

    from serving.app import ActServer

    check = ActServer.func_or_class._authorise

    def request(header: str | None) -> Request:
        headers = [(b"authorization", header.encode())] if header is not None else []
        return Request({"type": "http", "method": "POST", "path": "/act", "headers": headers, "query_string": b""})

    app = SimpleNamespace(token="s3cret")
    for header, code in ((None, 401), ("s3cret", 401), ("Bearer wrong", 403), ("Bearer s3cre", 403)):
        with pytest.raises(HTTPException) as err:
            check(app, request(header))
        assert err.value.status_code == code
    check(app, request("Bearer s3cret"))
    open_app = SimpleNamespace(token=None)
    for header in (None, "Bearer anything"):
        check(open_app, request(header))


def test_collect_driver_killed_mid_run_leaves_whole_chunks_and_the_rerun_completes(tmp_path):
    """SIGKILL of `ipr collect` (the driver and the local Ray it started) while chunks are being
    committed: every committed shard is whole, a half-written one is never visible, and the same
    command then collects exactly what is missing."""
    import os
    import signal
    import subprocess

    import pyarrow.parquet as pq

    from .conftest import IPR, ROOT, kill_session, wait_for

    args = ["collect", "configs/smoke.yaml", "--set", f"run.root={tmp_path}", "--set", "collect.steps=8192"]
    run = tmp_path / "smoke"
    manifests = run / "data" / "_committed"
    driver = subprocess.Popen([*IPR, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        def three_commits():
            assert driver.poll() is None, "collect ended before it could be killed"
            return manifests.is_dir() and len(list(manifests.glob("*.json"))) >= 3

        wait_for(three_commits, "three committed chunks", timeout_s=300, every_s=0.02)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        kill_session(driver.pid)  # the driver and every process of the local Ray it started
    store = TrajectoryStore(str(run))
    killed_at = store.count_steps()
    assert 0 < killed_at < 8192
    for path in store.shard_paths():  # whole: each committed shard has the rows its manifest states
        name = Path(path).name
        assert pq.read_metadata(path).num_rows == store.layout.committed_meta("data", name)["rows"]
    assert store.dataset().count_rows() == killed_at

    again = run_ipr(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"committed {8192 - killed_at} steps" in again.stdout
    assert store.count_steps() == store.dataset().count_rows() == 8192
    committed = {Path(p).name for p in store.shard_paths()}
    assert {p.name for p in (run / "data").glob("*.parquet")} == committed  # the killed writer's leftovers are gone


@pytest.mark.unit
def test_counts_and_ports_outside_their_range_are_refused_before_anything_runs(capsys):
    """`ipr eval --episodes 0` once rewrote a run's report as "0 episodes per (method, game)": counts are
    whole numbers from 1, ports from 1 to 65535, refused by the parser with the range in the message."""
    from ipr_dist.cli import main

    for argv, message in ((["eval", "runs/none", "--episodes", "0"], "--episodes: 0 is out of range: use a number at least 1"),
                          (["eval", "runs/none", "--episodes", "two"], "--episodes: 'two' is not a whole number"),
                          (["physcode", "calibrate", "runs/none", "--game", "Bounce-Html", "--steps", "-5"], "--steps: -5"),
                          (["policy", "init-tiny", "/nonexistent", "--layers", "0"], "--layers: 0"),
                          (["serve", "runs/none", "--port", "70000"], "between 1 and 65535"),
                          (["record", "runs/none", "--port", "0"], "between 1 and 65535")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv
