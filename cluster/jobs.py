"""Job entry points behind the `ipr` commands that run on Ray (locally or with `ray job submit`)."""

from __future__ import annotations

import sys
import time

from ipr_dist.config import Config
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.errors import GameError
from ipr_dist.games import game_info
from ipr_dist.games.browser import require_browser
from ipr_dist.games.catalog import load_annotations, require_installed
from ipr_dist.run_layout import ROUTER, RunLayout
from ipr_dist.runlog import MetricsLog, save_config


def collect(cfg: Config, out=sys.stdout) -> dict:
    """Play the configured games with the env fleet until the run's store holds `collect.steps`
    steps, and return the store's summary. A rerun collects only what is missing."""
    from actors.env_fleet import EnvFleet
    from cluster.runtime import init_ray

    annotations = load_annotations(cfg.games.annotation_files)
    # Unknown games, missing ROMs and bad specs fail here, before Ray starts.
    games = [game_info(g, annotations, cfg.games.spec_files) for g in cfg.training_games]
    for g in games:
        require_installed(g)
    if not games:
        raise GameError("fleet.games is empty; name at least one game (see `ipr games list`)")
    require_browser(cfg.training_games, cfg.games.spec_files, cfg.env.browser)

    save_config(cfg)  # also fails here, in one sentence, when the run root cannot be written
    layout = RunLayout.of(cfg)
    store = TrajectoryStore(layout, cfg.store.compression)
    cleaned = store.open_for_writing()
    have = store.count_steps()
    missing = cfg.collect.steps - have
    print(f"run {layout.uri}: store holds {have} steps, target {cfg.collect.steps}"
          + (f" ({cleaned} uncommitted shards of an interrupted run deleted)" if cleaned else ""), file=out)
    report = None
    if missing > 0:
        from tqdm import tqdm

        init_ray(cfg.ray)
        metrics = MetricsLog(layout)
        fleet = EnvFleet(cfg.training_games, cfg.env, cfg.fleet, cfg.run.seed, cfg.games, store)
        bar = tqdm(total=missing, desc="collected steps", file=out, mininterval=2.0, dynamic_ncols=True)
        last = [0.0]

        def progress(r) -> None:
            bar.set_postfix(steps_per_s=f"{r.steps_per_second:,.0f}", restarts=r.restarts, refresh=False)
            bar.update(min(r.committed_steps, missing) - bar.n)
            now = time.monotonic()
            if now - last[0] >= 2.0 or r.committed_steps >= missing:
                last[0] = now
                metrics.log(have + r.committed_steps, **{"fleet/steps_per_s": r.steps_per_second,
                                                       "fleet/restarts": r.restarts,
                                                       "fleet/dropped_chunks": r.dropped_chunks})

        try:
            report = fleet.run(missing, cfg.store.writer_threads, progress)
            progress(report)  # the bar ends where the store is
        finally:
            bar.close()
            fleet.shutdown()
            metrics.close()
        print(f"committed {report.committed_steps} steps in {report.committed_chunks} chunks "
              f"({report.steps_per_second:,.0f} steps/s); {report.restarts} actor restarts, "
              f"{report.dropped_chunks} chunks dropped", file=out)
        for why in report.failed_envs.values():
            print(f"  environment given up: {why}", file=out)
    print_summary(store, out)
    return {"report": report, "steps": store.count_steps()}


def print_summary(store: TrajectoryStore, out=sys.stdout) -> None:
    rows = store.summary()
    header = f"{'game':32} {'source':9} {'steps':>9} {'episodes':>9} {'finished':>9} {'failures':>9} {'reward':>10}"
    print(header, file=out)
    for s in rows:
        print(f"{s.game:32} {s.source:9} {s.steps:>9} {s.episodes:>9} {s.finished_episodes:>9} {s.failures:>9} "
              f"{s.reward:>10.1f}", file=out)
    print(f"{'total':32} {'':9} {sum(s.steps for s in rows):>9} {sum(s.episodes for s in rows):>9}", file=out)


def check_model_paths(cfg: Config) -> None:
    """Every model the config reads from a path is there: one clear error naming the key and the path
    (docs/cluster.md, "Models": how to stage them)."""
    from actors.feature_extractor import check_model_paths as check_feature_models
    from ipr_dist.errors import ConfigError
    from pathlib import Path

    check_feature_models(cfg.features)
    path = cfg.policy.model_path
    if path and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"policy.model_path: {path} is not a Qwen3-VL checkpoint directory (no config.json there); "
                          "stage the model there first (docs/cluster.md, \"Models\") or unset it for the embedded tiny one")


def train(cfg: Config, out=sys.stdout) -> dict:
    """The whole IPR pipeline on one run directory, in order: collect trajectories, features and
    PhysCode (Stage 1) with its router, world model and critic (Stage 2), alignment (Stage 3), GRPO
    with imagination (Stage 4). A stage whose output is complete is skipped; an interrupted one
    resumes from its last checkpoint, so rerunning the same command after any stop finishes the job."""
    from cluster.runtime import init_ray
    from learners import align, grpo, physcode, world_model
    from learners.physcode_inspect import inspect

    check_model_paths(cfg)  # models staged where the config reads them, before anything starts
    layout = RunLayout.of(cfg)
    init_ray(cfg.ray)
    stages = [
        ("collect trajectories", lambda: collect(cfg, out)),
        ("Stage 1: features and PhysCode", lambda: physcode.train(cfg, out)),
        ("Stage 1: router", lambda: None if layout.is_file(ROUTER) else inspect(cfg, out=out)),
        ("Stage 2: world model and critic", lambda: world_model.train(cfg, out)),
        ("Stage 3: alignment", lambda: align.train(cfg, out)),
        ("Stage 4: GRPO with imagination", lambda: grpo.train(cfg, out)),
    ]
    results, seconds = {}, {}
    for i, (name, run) in enumerate(stages, 1):
        print(f"== [{i}/{len(stages)}] {name}", file=out, flush=True)
        start = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - start
    print("== done: " + ", ".join(f"{name.split(': ')[-1]} {s / 60:.1f} min" for name, s in seconds.items()) +
          f"; total {sum(seconds.values()) / 60:.1f} min", file=out)
    return {"results": results, "seconds": seconds}
