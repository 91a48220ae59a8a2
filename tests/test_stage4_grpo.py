"""Stage 4 end to end on the smoke run (real env actors, policy server, world-model scorer, replay,
learner): `ipr policy grpo` keeps imagined updates / real steps at k = 4, resumes with its counters,
stores the agent's trajectories, and finishes after SIGKILL of an env actor, of the scorer and of
the driver itself."""

import json
import os
import re
import signal
import subprocess
import time

import pyarrow.compute as pc
import pytest
import torch

from .conftest import IPR, ROOT, assert_one_line_error, assert_picture, committed, kill_session, run_ipr


def agent_rows(run):
    from ipr_dist.data.store import TrajectoryStore

    table = TrajectoryStore(str(run)).dataset().to_table(columns=["source", "episode_id", "step", "chunk_id",
                                                                  "policy_version"])
    return table.filter(pc.equal(table["source"], "agent"))


def assert_no_duplicates(rows):
    keys = list(zip(rows["episode_id"].to_pylist(), rows["step"].to_pylist()))
    assert len(keys) == len(set(keys)), "an agent step was stored twice"


def test_grpo_ratio_resume_metrics_and_agent_trajectories(aligned_smoke_run):
    run = aligned_smoke_run
    first = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=8", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    first_state = torch.load(committed(run, "policy/grpo") / "grpo_state.pt", weights_only=False)
    assert first_state["limiter"]["inserts"] == 8 and first_state["limiter"]["samples"] == 32
    assert "8 real steps, 32 imagined updates: imagined / real = 4.000" in first.stdout  # and the user is told
    # prompted as `ipr@survival` is evaluated: the goal of the level the critic values
    assert 'GRPO prompts the policy with the survival goal: "Stay alive as long as possible' in first.stdout
    # Optimizer steps keep 1 : k too: real rounds are split into update_batch groups like imagined ones.
    real, imagined = map(int, re.search(r"optimizer steps: (\d+) on real groups, (\d+) on imagined", first.stdout).groups())
    assert real >= 8 // 2 and abs(imagined - 4 * real) <= 4, (real, imagined)
    from ipr_dist.runlog import read_metrics
    from ipr_dist.run_layout import RunLayout

    last = [row for row in read_metrics(RunLayout(str(run))) if "updates/step_ratio" in row][-1]
    assert last["updates/real_steps"] >= 1 and last["updates/imagined_steps"] >= 1 and "replay/ratio" in last
    more = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=16", timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming GRPO from real step 8" in more.stdout and "32 imagined updates" in more.stdout
    assert "16 real steps, 64 imagined updates: imagined / real = 4.000" in more.stdout
    assert re.search(r"online critic: TD error on the agent's new steps .* per quarter of \d+ rounds: [\d.]+ / "
                     r"[\d.]+ / [\d.]+ / [\d.]+; Stage 2's critic, frozen", more.stdout), more.stdout
    done = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=16")
    assert done.returncode == 0 and "GRPO already finished (16 real steps)" in done.stdout

    grpo = committed(run, "policy/grpo")  # written by learner rank 0, committed by its pointer
    state = torch.load(grpo / "grpo_state.pt", weights_only=False)
    assert state["limiter"]["inserts"] == 16 and state["limiter"]["samples"] == 64
    meta = json.loads((grpo / "physcode_tokens.json").read_text())
    assert meta["version"] == state["version"] > 0  # the served policy resumes at the learner's version
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("grpo/loss", "grpo/kl", "grpo/imagined_return_real", "grpo/imagined_return_imagined", "replay/ratio",
                "replay/insert_wait_s", "grpo/staleness", "env/steps_per_s", "time/propose_ms", "time/score_ms"):
        assert any(key in r for r in rows), key
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the world model kept learning from the agent's steps: versions of world_model/online, its TD error
    # on each round's new steps logged, and the agent of `ipr eval` / `ipr serve` starts from the latest
    online = committed(run, "world_model/online")
    ckpt = torch.load(online / "checkpoint.pt", weights_only=False)
    assert ckpt["online_updates"] > 0 and ckpt["online_steps"] > 0 and ckpt["target"] is not None
    assert sum("world_model/online_td_error" in r for r in rows) >= 2
    assert sum("world_model/online_td_error_stage2" in r for r in rows) >= 2  # the frozen reference, same steps
    assert any(k.startswith("world_model/online_td_error_stage2/") for r in rows for k in r)  # and per game
    assert any("grpo/probe_return_stage2" in r for r in rows)  # the policy under Stage 2's critic
    from ipr_dist.config import load_config
    from learners.online_world_model import latest_world_model

    assert latest_world_model(load_config(run / "config.yaml", [f"run.root={run.parent}"])).name == "world_model/online"
    # three panels: the predicted return, per training game, and the online critic's TD error
    assert_picture(run / "policy" / "predicted_return.png", min_size=(3 * 600, 350))

    agent = agent_rows(run)
    versions = agent["policy_version"].to_pylist()
    assert len(agent) > 0 and min(versions) >= 0 and max(versions) > 0  # new weights reached the servers
    assert_no_duplicates(agent)
    played = sum(int(line.split(" steps played")[0].rsplit(" ", 1)[1]) for line in
                 (first.stdout + more.stdout).splitlines() if line.startswith("environments:"))
    assert len(agent) == played  # every step the agent played is stored once (no actor crashed here)

    # `ipr policy fork`: Stage 4 again on a copy of the trained run, from its start
    fork = run.parent / "fork"
    forked = run_ipr("policy", "fork", str(run), str(fork))
    shards = len(set(agent["chunk_id"].to_pylist()))  # one chunk per shard
    assert forked.returncode == 0, forked.stderr[-3000:]
    assert f"{shards} agent trajectory shards" in forked.stdout, forked.stdout
    assert len(agent_rows(fork)) == 0 and not (fork / "policy" / "grpo").exists()
    assert not (fork / "world_model" / "online").exists() and (fork / "policy" / "aligned" / "LATEST.json").exists()
    again = run_ipr("policy", "grpo", str(fork), "--set", "grpo.real_steps=4", timeout=600)
    assert again.returncode == 0 and "resuming" not in again.stdout, again.stderr[-3000:]
    assert "4 real steps, 16 imagined updates" in again.stdout and len(agent_rows(fork)) > 0
    assert "real_steps: 4\n" in (fork / "config.yaml").read_text()  # the fork keeps what its Stage 4 ran with
    assert committed(run, "policy/grpo") == grpo  # the source run untouched
    assert_one_line_error(run_ipr("policy", "fork", str(run), str(fork)), "already exists")
    assert_one_line_error(run_ipr("policy", "fork", str(run), str(run.parent / "fork2"), "--set", "grpo.lr=1e-5"),
                          "grpo.lr=1e-5", "ipr policy grpo")
    assert not (run.parent / "fork2").exists()
    assert "no probe contexts" not in first.stdout + again.stdout

    # a run whose collection shards are gone still trains, and says its probe (plot, KL line) is off
    from ipr_dist.data.store import TrajectoryStore
    from learners.grpo import collected_shards

    bare = run.parent / "bare"
    assert run_ipr("policy", "fork", str(run), str(bare)).returncode == 0
    for path in (p for paths in collected_shards(TrajectoryStore(str(bare))).values() for p in paths):
        name = os.path.basename(path)
        for kind in ("data", "features"):  # each shard with its manifest, and its features
            for gone in (bare / kind / name, bare / kind / "_committed" / f"{name}.json"):
                gone.unlink(missing_ok=True)
    alone = run_ipr("policy", "grpo", str(bare), "--set", "grpo.real_steps=4", timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "no probe contexts: the plot shows the real steps' imagined return only" in alone.stdout
    assert "how far the policy moved" not in alone.stdout


def test_member_critics_floor_the_advantages_and_lower_uncertain_picks_end_to_end(aligned_smoke_run):
    """Stage 2 with member critics, then Stage 4 with the uncertainty floor and the lower-confidence pick:
    the report measures the members, GRPO counts the groups the floor changed, the online learner follows
    the members' spread on the agent's steps. The same weights on a world model without members are one
    clear error."""
    import shutil

    from ipr_dist.run_layout import RunLayout
    from ipr_dist.runlog import read_metrics

    from .conftest import assert_one_line_error

    run = aligned_smoke_run
    weights = ["--set", "grpo.advantage_noise_weight=1", "--set", "policy.pick_uncertainty_weight=1"]
    members = ["--set", "world_model.critic_members=2"]
    assert_one_line_error(run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=4", *weights),
                          "critic_members >= 2")  # the config alone is refused
    refused = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=4", *weights, *members, timeout=600)
    assert_one_line_error(refused, "critic_members")  # the config asks for members its world model lacks
    assert "critic_members: 2" not in (run / "config.yaml").read_text()  # a refused Stage 4 saves no setting
    shutil.rmtree(run / "world_model")
    trained = run_ipr("world-model", "train", str(run), *members, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = (run / "world_model" / "report.md").read_text()
    assert "eval/critic/member_spread" in report  # (the smoke store holds no held-out return to rank)
    proc = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=8", *weights, *members, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(RunLayout(str(run)))
    assert any("grpo/noisy_groups" in row for row in rows)
    assert any("world_model/online_member_spread" in row for row in rows)


def metrics_kind(run) -> str:
    """The run's `world_model.imagined_return` (the key its per-game rho is recorded under)."""
    import yaml

    return (yaml.safe_load((run / "config.yaml").read_text()).get("world_model") or {}).get("imagined_return", "q_sum")


def test_games_whose_critic_cannot_rank_are_not_learned_on(aligned_smoke_run):
    """grpo.min_critic_rank on the smoke run, whose store holds no held-out observed return: no game's
    ranking is measured, so Stage 4 plays and imagines but learns on no game (the policy stays the
    aligned one) and says so; with one game's ranking above the threshold it learns on that one and holds
    the other at the aligned policy; without Stage 2's metrics.json it is one clear error."""
    from .conftest import assert_one_line_error

    run = aligned_smoke_run
    proc = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=4", "--set", "grpo.min_critic_rank=0",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GRPO learns on no game" in proc.stdout
    gated = int(re.search(r"(\d+) groups of games not learned on", proc.stdout).group(1))
    assert gated >= 4  # at least the 4 real steps' groups
    state = torch.load(committed(run, "policy/grpo") / "grpo_state.pt", weights_only=False)
    assert state["version"] == 0 and state["gated_groups"] == gated
    # the policy stood still, the online critic did not: its rounds are logged all the same (they were not)
    from ipr_dist.run_layout import RunLayout
    from ipr_dist.runlog import read_metrics

    rows = [r for r in read_metrics(RunLayout(str(run))) if "world_model/online_td_error" in r]
    assert rows and all(r["grpo/real_steps"] <= 4 for r in rows), rows
    # One game learned on, the other not (its ranking written into Stage 2's metrics.json as `ipr world-model
    # eval` records it): the other game's groups reach the learner as anchors, with no advantage, so only the
    # KL holds the shared policy at the aligned one there (grpo.anchor_unlearned); the drift is reported per game.
    from ipr_dist.models.router import Router

    learned, held = sorted(Router.loads((run / "physcode" / "router.json").read_text()).tables)
    metrics_file = run / "world_model" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics.update({f"eval/return/episode_ends/{learned}": 5, f"eval/return/episode_ends/{held}": 5,
                    f"eval/return/{metrics_kind(run)}/action_within/{learned}": 0.5,
                    f"eval/return/{metrics_kind(run)}/action_within/{held}": 0.0})
    metrics_file.write_text(json.dumps(metrics))
    proc = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=12", "--set", "grpo.min_critic_rank=0.15",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"GRPO learns on {learned}:" in proc.stdout and "held the policy at the aligned one there" in proc.stdout
    assert re.search(rf"first code's KL at the sampling temperature\): .*{held} [0-9.]+ \(not learned on\)",
                     proc.stdout), proc.stdout
    rows = read_metrics(RunLayout(str(run)))
    assert sum(r.get("grpo/anchored_groups", 0) for r in rows) > 0
    assert any(f"grpo/probe_kl/{held}" in r and f"grpo/probe_kl/{learned}" in r for r in rows)
    assert torch.load(committed(run, "policy/grpo") / "grpo_state.pt", weights_only=False)["version"] > 0
    metrics_file.unlink()
    assert_one_line_error(run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=16", "--set",
                                  "grpo.min_critic_rank=0"), "ipr world-model eval")


def test_groups_older_than_max_staleness_are_dropped_and_training_goes_on(aligned_smoke_run):
    """grpo.max_staleness = 0: a real step's group, proposed while imagined updates moved the learner on,
    is too old and is dropped (counted, not learned from); the 1 : 4 ratio and the run itself go on."""
    run = aligned_smoke_run
    proc = run_ipr("policy", "grpo", str(run), "--set", "grpo.real_steps=8", "--set", "grpo.max_staleness=0",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(committed(run, "policy/grpo") / "grpo_state.pt", weights_only=False)
    assert state["limiter"]["inserts"] == 8 and state["limiter"]["samples"] == 32
    assert state["dropped_stale"] > 0
    from ipr_dist.run_layout import RunLayout
    from ipr_dist.runlog import read_metrics

    rows = [r for r in read_metrics(RunLayout(str(run))) if "grpo/dropped_stale" in r]
    assert rows[-1]["grpo/dropped_stale"] == state["dropped_stale"]
    # what was learned from was never behind the learner (the dropped groups leave no update row)
    assert max(r["grpo/staleness_max"] for r in rows) == 0


def ray_pids(name, session):
    """Processes of the Ray actor class `name` started under the driver's session (not the test's own Ray)."""
    out = subprocess.run(["pgrep", "-f", f"ray::{name}"], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            if os.getsid(pid) == session:
                pids.append(pid)
        except ProcessLookupError:
            pass
    return pids


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def checkpointed_steps(run):
    folder = committed(run, "policy/grpo")  # only a committed checkpoint is ever read: never half-written
    return torch.load(folder / "grpo_state.pt", weights_only=False)["limiter"]["inserts"] if folder else 0


def test_grpo_survives_sigkill_of_env_actor_scorer_policy_server_and_driver(aligned_smoke_run, tmp_path):
    run = aligned_smoke_run
    start = checkpointed_steps(run)
    target = start + 48
    args = ["policy", "grpo", str(run), "--set", f"grpo.real_steps={target}", "--set", "grpo.checkpoint_every=8"]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([*IPR, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        wait_for(lambda: checkpointed_steps(run) > start, 300, "a first Stage 4 checkpoint")
        env_pid = wait_for(lambda: ray_pids("EnvActor", driver.pid), 30, "the env actors")[0]
        os.kill(env_pid, signal.SIGKILL)
        scorer_pid = wait_for(lambda: ray_pids("WorldModelScorer", driver.pid), 30, "the scorer")[0]
        os.kill(scorer_pid, signal.SIGKILL)
        server_pid = wait_for(lambda: ray_pids("TransformersPolicyServer", driver.pid), 30, "the policy server")[0]
        os.kill(server_pid, signal.SIGKILL)
        # All come back (Ray restarts them; the server from its checkpoint, then the learner's weights are
        # pushed again) and training goes on to the next checkpoint.
        wait_for(lambda: [p for p in ray_pids("WorldModelScorer", driver.pid) if p != scorer_pid], 120, "the scorer's restart")
        wait_for(lambda: [p for p in ray_pids("TransformersPolicyServer", driver.pid) if p != server_pid], 120,
                 "the policy server's restart")
        before = checkpointed_steps(run)
        wait_for(lambda: checkpointed_steps(run) > before, 300, "a checkpoint after the actor kills")
        killed_at = checkpointed_steps(run)
        assert killed_at < target
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(30)
    finally:
        kill_session(driver.pid)  # and any of Ray's processes outside the driver's process group
        log.close()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("env/restarts", 0) for r in metrics) >= 1
    rows_before = len(agent_rows(run))

    resumed = run_ipr(*args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming GRPO from real step {killed_at}" in resumed.stdout
    assert f"{target} real steps, {4 * target} imagined updates: imagined / real = 4.000" in resumed.stdout
    agent = agent_rows(run)
    assert len(agent) > rows_before
    assert_no_duplicates(agent)  # nothing stored twice across the kills and the resume
