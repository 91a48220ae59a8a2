"""What a user reads while `ipr train` runs (the README's main job, on the smoke preset): per stage a
progress bar and its result lines, no line of Ray Train's report echo, of its placement-group
cleaner, of the error line Ray logs for its preemption watcher, of transformers' weight-loading
bars or of the tokenizer trainer's blank ones; and every stage's curves in TensorBoard and metrics.jsonl.
The run has a desktop game (X-Moto under Xvfb) in its fleet beside the retro one, so the same run shows
the whole pipeline with a desktop game: collected, routed, and played by Stage 4."""

from .conftest import run_ipr

NOISE = ("Reporting training result", "PlacementGroupCleaner", "Loading weights", "Writing model shards", "PreemptionWatcher")


def test_ipr_train_shows_each_stage_and_logs_every_stages_curves_with_a_desktop_game(tmp_path):
    # Python's warnings as a user sees them: its default filters (the other tests hide every warning)
    proc = run_ipr("train", "configs/smoke.yaml", "--set", f"run.root={tmp_path}", "--set",
                   "fleet.games=[Xmoto-Desktop, Airstriker-Genesis]", timeout=900, env={"PYTHONWARNINGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    warnings = [line for line in console.splitlines() if "Warning: " in line]
    assert not warnings, warnings[:5]
    for noise in NOISE:
        assert console.count(noise) == 0, (noise, [line for line in console.splitlines() if noise in line][:3])
    for bar in ("collected steps", "appearance encoder steps", "feature shards", "physcode steps", "world-model steps", "align steps",
                "GRPO real steps"):
        assert f"{bar}: 100%" in console, bar
    for result in ("PhysCode: 40 steps on cpu", "world model: 60 steps on cpu", "alignment: 10 steps on cpu",
                   "GRPO: 24 real steps", "optimizer steps: "):
        assert result in proc.stdout, result
    # The tokenizer's trainer prints no bars of blank lines (it printed three). Captured as text, the next
    # bar's leading "\r" reads as one more line break, so one empty line follows, not two or more.
    lines = proc.stdout.splitlines()
    built = next(i for i, line in enumerate(lines) if line.startswith("building the embedded tiny Qwen3-VL"))
    assert any(line.strip() for line in lines[built + 1:built + 3]), lines[built:built + 5]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "smoke" / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    for tag in ("physcode/losses/total", "physcode/codes/usage", "world_model/dynamics/loss",
                "world_model/critic/loss", "world_model/critic/td_error", "policy/align/loss", "grpo/loss"):
        assert tag in tags, (tag, sorted(tags)[:20])
        assert len(board.Scalars(tag)) >= 1

    from ipr_dist.run_layout import RunLayout
    from ipr_dist.runlog import read_metrics

    rows = read_metrics(RunLayout(str(tmp_path / "smoke")))
    steps = sorted(r["step"] for r in rows if "world_model/dynamics/loss" in r)
    assert steps == [20], steps  # every logged step of the 20-step dynamics phase (one per 50, and the last)

    # The desktop game went through every stage: collected, in the router, played by Stage 4's env actors.
    import json

    from ipr_dist.data.store import TrajectoryStore

    run = tmp_path / "smoke"
    store = TrajectoryStore(str(run))
    assert {s.game for s in store.summary()} >= {"Xmoto-Desktop", "Airstriker-Genesis-v0"}
    assert "Xmoto-Desktop" in json.dumps(json.loads((run / "physcode" / "router.json").read_text()))
    table = store.dataset().to_table(columns=["game", "source"])
    agent_games = {g for g, src in zip(table["game"].to_pylist(), table["source"].to_pylist()) if src == "agent"}
    assert "Xmoto-Desktop" in agent_games, "Stage 4 did not play the desktop game"
