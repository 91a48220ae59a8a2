"""Stage 1 end to end on the smoke preset (real Ray, emulator, encoders, Ray Train), resumption,
and the user errors of the stage."""

import json
import shutil

import pyarrow.parquet as pq

from .conftest import assert_one_line_error, committed, run_ipr


def test_physcode_train_inspect_and_resume(smoke_run):
    first = run_ipr("physcode", "train", str(smoke_run), "--set", "physcode.steps=20", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = run_ipr("physcode", "train", str(smoke_run), "--set", "physcode.steps=40", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming PhysCode from step 20" in proc.stdout
    # the split was written before the first step and every game with two or more episodes is in it
    assert "held out for evaluation by every stage:" in first.stdout and "held out" not in proc.stdout
    held = set(json.loads((smoke_run / "physcode" / "held_out.json").read_text())["episodes"])
    rows = [row for path in sorted((smoke_run / "features").glob("*.parquet"))
            for row in pq.read_table(path, columns=["episode_id", "game"]).to_pylist()]
    episodes = {}
    for row in rows:
        episodes.setdefault(row["game"], set()).add(row["episode_id"])
    assert all(held & eps for eps in episodes.values() if len(eps) >= 2) and held <= set().union(*episodes.values())
    assert "eval/recon_vs_copy_last" in proc.stdout and "eval/flow_off_agreement" in proc.stdout
    features = sorted((smoke_run / "features").glob("*.parquet"))
    assert len(features) == len(list((smoke_run / "data").glob("*.parquet")))
    assert (committed(smoke_run, "physcode/checkpoint") / "checkpoint.pt").is_file()

    again = run_ipr("physcode", "train", str(smoke_run), timeout=600)  # nothing left to do
    assert again.returncode == 0 and "0 to extract" in again.stdout and "already trained" in again.stdout

    report = run_ipr("physcode", "inspect", str(smoke_run), timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("report.md", "router.json", "usage.png", "codes.png"):
        assert (smoke_run / "physcode" / name).is_file(), name
    assert "Codes per game" in report.stdout and "Bounce-Html" in report.stdout


def test_physcode_user_errors(smoke_run, aligned_smoke_run, tmp_path):
    assert_one_line_error(run_ipr("physcode", "train", str(tmp_path / "nope")), "not a run directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(smoke_run / "config.yaml", empty / "config.yaml")
    assert_one_line_error(run_ipr("physcode", "train", str(empty), "--set", f"run.root={tmp_path}",
                                  "--set", "run.name=empty"), "holds no trajectory shards")

    assert_one_line_error(run_ipr("physcode", "train", str(smoke_run), "--set", "features.appearance=dinov3",
                                  "--set", "features.appearance_path=/no/such/dino"),
                          "features.appearance_path", "/no/such/dino", "not a DINOv3 checkpoint")

    broken = tmp_path / "broken"  # a run with its feature shards extracted, PhysCode not trained yet
    shutil.copytree(aligned_smoke_run, broken, ignore=shutil.ignore_patterns("physcode", "world_model", "policy",
                                                                              "ray_train"))
    shard = sorted((broken / "features").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error(run_ipr("physcode", "train", str(broken), "--set", f"run.root={tmp_path}",
                                  "--set", "run.name=broken"), shard.name, "feature shard is unreadable")


def test_a_rejected_override_leaves_the_run_config_alone(smoke_run):
    before = (smoke_run / "config.yaml").read_text()
    proc = run_ipr("physcode", "train", str(smoke_run), "--set", "features.semantics=t5",
                   "--set", "features.semantics_path=/no/such/t5")
    assert_one_line_error(proc, "features.semantics_path", "not a T5 checkpoint")
    assert (smoke_run / "config.yaml").read_text() == before


def test_router_calibration_and_every_code_routes_to_an_accepted_action(aligned_smoke_run):
    import re

    import numpy as np

    from ipr_dist.config import EnvConfig
    from ipr_dist.games import make_env
    from ipr_dist.models.router import Router

    smoke_run = aligned_smoke_run  # a copy with PhysCode and its router
    before = Router.loads((smoke_run / "physcode" / "router.json").read_text())
    proc = run_ipr("physcode", "calibrate", str(smoke_run), "--game", "Bounce-Html", "--steps", "120", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = re.search(r"router: Bounce-Html calibrated on 120 steps of random play, (\d+) labelled with (\d+) codes?",
                     proc.stdout)
    assert said, proc.stdout[-2000:]
    summary = {"labelled": int(said.group(1))}
    assert summary["labelled"] > 0 and int(said.group(2)) > 0
    router = Router.loads((smoke_run / "physcode" / "router.json").read_text())
    count = lambda r: sum(sum(c.values()) for c in r.tables["Bounce-Html"].counts.values())  # noqa: E731
    assert count(router) == count(before) + summary["labelled"]  # calibration added exactly what it labelled
    # with what followed each step (the outcomes routing by outcome reads), where the shard saw enough of it
    outcomes = lambda r: sum(n for c in r.tables["Bounce-Html"].outcomes.values() for n, *_ in c.values())  # noqa: E731
    assert outcomes(before) <= outcomes(router) <= outcomes(before) + summary["labelled"] and outcomes(router) > 0
    assert "Routing by outcome" in (smoke_run / "physcode" / "report.md").read_text()
    env = make_env("Bounce-Html", EnvConfig(frame_size=(32, 32)))
    try:
        env.reset(seed=0)
        actions = [a for how in ("mode", "outcome") for a in router.route("Bounce-Html", np.arange(len(router.codebook)),
                                                                           how, prior=10.0)]  # every code, seen or not
        for a in actions:
            a = {**a, "keys": a["keys"].astype(np.int8)}
            assert env.action_space.contains(a)
            env.step(a)
    finally:
        env.close()


def test_physcode_trains_with_two_ddp_workers(tmp_path):
    """The cluster path: two Ray Train workers in a gloo process group (DDP) on this CPU."""
    root = tmp_path / "runs"
    assert run_ipr("collect", "configs/smoke.yaml", "--set", f"run.root={root}").returncode == 0
    proc = run_ipr("physcode", "train", str(root / "smoke"), "--set", "physcode.workers=2",
                   "--set", "features.cpus_per_worker=0.5", "--set", "physcode.steps=10", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/recon_vs_copy_last" in proc.stdout
    from ipr_dist.run_layout import PHYSCODE_CHECKPOINT, RunLayout
    from learners.physcode import CHECKPOINT_FILE

    ckpt = RunLayout(str(root / "smoke")).load_torch(PHYSCODE_CHECKPOINT, CHECKPOINT_FILE)
    assert ckpt["step"] == 10 and ckpt["metrics"]["system/workers"] == 2  # trained by both workers


def test_world_model_trains_and_reports_on_the_smoke_run(aligned_smoke_run, tmp_path):
    import torch

    smoke_run = aligned_smoke_run  # its own copy, PhysCode trained: the world model trained here from scratch
    shutil.rmtree(smoke_run / "world_model")
    proc = run_ipr("world-model", "train", str(smoke_run), "--set", "world_model.workers=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| horizon | cosine (WM / copy-last / raw keys)" in proc.stdout
    folder = smoke_run / "world_model"
    ckpt = torch.load(committed(smoke_run, "world_model/checkpoint") / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["step"]) == (2, 20) and ckpt["target"] is not None
    assert "eval/critic/td_error" in ckpt["metrics"] and committed(smoke_run, "world_model/raw_keys") is not None
    again = run_ipr("world-model", "eval", str(smoke_run), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "raw keys" in (folder / "report.md").read_text()
    resumed = run_ipr("world-model", "train", str(smoke_run), "--set", "world_model.critic_steps=30", timeout=600)
    assert resumed.returncode == 0 and "resuming the world model at phase 2, step 20" in resumed.stdout
    assert torch.load(committed(smoke_run, "world_model/checkpoint") / "checkpoint.pt", weights_only=False)["step"] == 30

    # Weights trained on another codebook are refused by name, not loaded.
    copy = tmp_path / "smoke"
    shutil.copytree(smoke_run, copy, ignore=shutil.ignore_patterns("ray_train"))
    # A config asking for another shape than the checkpoint's (here more member critics): named, with the way out.
    assert_one_line_error(run_ipr("world-model", "train", str(copy), "--set", f"run.root={tmp_path}", "--set",
                                  "world_model.critic_members=7"), "critic_members", "-> 7", "retrain it from scratch")
    ckpt["model"]["codebook"] = ckpt["model"]["codebook"] + 1.0
    torch.save(ckpt, committed(copy, "world_model/checkpoint") / "checkpoint.pt")
    assert_one_line_error(run_ipr("world-model", "eval", str(copy), "--set", f"run.root={tmp_path}"),
                          "different action codebook", "ipr world-model train")
    # Feature shards from an older extraction (a column missing): named, with the way out.
    shard = sorted((copy / "features").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(shard).drop_columns(["mouse"]), shard)
    assert_one_line_error(run_ipr("world-model", "train", str(copy), "--set", f"run.root={tmp_path}"),
                          "lacks mouse", "re-run `ipr physcode train`")

def test_the_steps_that_lose_a_life_come_from_the_trajectory_shards(aligned_smoke_run):
    """learners/physcode.py load_clips(lives=True): feature shards do not carry lives, so each step's `life_lost` is read
    from the trajectory shard it was extracted from: true exactly where the game's lives fell from the previous
    step of the same episode (world_model.episodic_life ends the critic's episode there)."""
    import numpy as np
    import pyarrow as pa

    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.run_layout import RunLayout
    from learners.physcode import load_clips

    layout = RunLayout(str(aligned_smoke_run))  # feature shards extracted
    data = load_clips(layout, 2, 1, 0.1, lives=True)
    store = TrajectoryStore(layout)
    t = pa.concat_tables([store.read_shard(p, columns=["episode_id", "step", "lives"]) for p in store.shard_paths()])
    lives = {(e, s): v for e, s, v in zip(*(t[c].to_pylist() for c in ("episode_id", "step", "lives")))}
    steps = [int(s) for s in pa.concat_tables([store.read_shard(p, columns=["step"])
                                               for p in store.feature_paths()])["step"].to_pylist()]
    expected = np.array([lives.get((e, s - 1), -1) > lives[(e, s)] >= 0 for e, s in zip(data.episode, steps)])
    assert data.life_lost is not None and np.array_equal(data.life_lost, expected & data.continues)
    assert data.life_lost.any(), "the smoke collection lost no life: the check above would prove nothing"
