"""The `ipr` command line. User errors end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from ipr_dist.errors import UserError


def _at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; anything else is refused with the bounds in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use a number {bounds}")
        return value

    return parse


POSITIVE = _at_least(1)
PORT = _at_least(1, 65535)


def _config(args):
    from ipr_dist.config import load_config

    return load_config(args.config, args.set or [])


def cmd_collect(args) -> int:
    from cluster.jobs import collect

    collect(_config(args))
    return 0


def cmd_train(args) -> int:
    from cluster.jobs import train

    cfg = _config(args)
    if args.held_out:
        held = list(dict.fromkeys([*cfg.eval.held_out, *args.held_out]))
        cfg = _config(argparse.Namespace(config=args.config, set=[*(args.set or []), f"eval.held_out={json.dumps(held)}"]))
    train(cfg)
    return 0


def cmd_eval(args) -> int:
    from cluster.evaluate import evaluate

    evaluate(_run_config(args), methods=args.methods, games=args.games, held_out=args.held_out,
             episodes=args.episodes, scaling=args.scaling)
    return 0


def cmd_policy_grpo(args) -> int:
    from learners.grpo import train

    cfg = _run_config(args)
    _start_ray(cfg)
    train(cfg)
    return 0


def cmd_policy_fork(args) -> int:
    from ipr_dist.run_layout import RunLayout
    from learners.fork import fork

    other = [o for o in args.set or [] if o.partition("=")[0].strip() not in ("run.endpoint", "run.region")]
    if other:  # the fork copies the run's config as it is: a setting given here would be dropped unsaid
        raise UserError(f"ipr policy fork copies the run's config as it is and takes only --set run.endpoint / "
                        f"run.region (given: {', '.join(other)}); give Stage 4's settings to `ipr policy grpo "
                        f"{args.new} --set ...`")
    cfg = _run_config(args)
    src = RunLayout.of(cfg)  # a new run on an object store takes the same endpoint and region
    fork(src, RunLayout(args.new, src.endpoint, src.region))
    return 0


def _start_ray(cfg) -> None:
    """The `ipr` commands are the job entry points: they start (or join) Ray, library code never does."""
    from cluster.runtime import init_ray

    init_ray(cfg.ray)


def cmd_games_list(args) -> int:
    from ipr_dist.games import list_games
    from ipr_dist.games.catalog import load_annotations

    games = list_games(load_annotations(args.annotations or []), tuple(args.spec or []))
    if args.installed:
        games = [g for g in games if g.installed]
    if args.platform:
        games = [g for g in games if g.platform.lower() == args.platform.lower()]
    if args.kind:
        games = [g for g in games if g.kind == args.kind]
    if args.json:
        for g in games:
            print(json.dumps({"id": g.id, "kind": g.kind, "platform": g.platform, "keys": list(g.keys),
                              "mouse": g.uses_mouse,
                              "installed": g.installed, "variables": list(g.variables),
                              "annotated": g.annotation is not None}))
        return 0
    print(f"{'game':44} {'platform':10} {'rom':4} {'ann':4} {'controls':44} variables")
    for g in games:
        controls = " ".join(g.keys) + (" +mouse" if g.uses_mouse else "")
        print(f"{g.id:44} {g.platform:10} {'yes' if g.installed else '-':4} {'yes' if g.annotation else '-':4} "
              f"{controls.strip():44} {' '.join(g.variables)}")
    installed = sum(g.installed for g in games)
    print(f"{len(games)} game(s), {installed} playable (ROM or game files present; import ROMs with "
          "`ipr games import-roms DIR`)")
    return 0


def cmd_games_import(args) -> int:
    from ipr_dist.games.catalog import import_roms

    report = import_roms(args.dir)
    for label, game in report.imported:
        print(f"imported  {label} -> {game}")
    for label, game in report.already:
        print(f"present   {label} -> {game} (identical ROM already installed)")
    for label, why in report.unmatched:
        print(f"no match  {label}: {why}")
    matched = len(report.imported) + len(report.already)
    print(f"{len(report.imported)} imported, {len(report.already)} already installed, {len(report.unmatched)} unmatched")
    if report.unmatched:
        raise UserError(
            f"{len(report.unmatched)} file(s) in {args.dir} matched no game and were not imported"
            f" ({matched} matched); see the 'no match' lines above"
        )
    if not matched:
        raise UserError(f"{args.dir}: holds no files; put your ROM files (or zip archives of them) there")
    return 0


def cmd_data_preprocess(args) -> int:
    from ipr_dist.data.preprocess import preprocess
    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.run_layout import RunLayout

    cfg = _run_config(args)
    report = preprocess(TrajectoryStore(RunLayout.of(cfg), cfg.store.compression), cfg.preprocess)
    lines = report.lines()
    layout = RunLayout.of(cfg)
    layout.write_text("data/preprocess_report.md", "# Human play preprocessing\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {layout.display('data', 'preprocess_report.md')}")
    return 0


def cmd_data_inspect(args) -> int:
    from cluster.jobs import print_summary
    from ipr_dist.data.store import open_store

    store = open_store(args.path)  # an object-store endpoint: AWS_ENDPOINT_URL
    print(f"{store.uri}: {len(store.shard_paths())} shards, frames {store.frame_shape()}")
    print_summary(store)
    return 0


def _run_config(args):
    """The config saved in a run directory (a local path or an s3:// / gs:// URI), with `--set`
    overrides; the run is the one given, wherever it has been moved or copied since (not the root and
    name it was created with). An object-store endpoint comes from `--set run.endpoint=...` or
    AWS_ENDPOINT_URL."""
    import tempfile

    import yaml

    from ipr_dist.config import load_config
    from ipr_dist.errors import StoreError
    from ipr_dist.run_layout import CONFIG, RunLayout

    sets = {k.strip(): v for k, _, v in (o.partition("=") for o in args.set or [])}
    layout = RunLayout(args.run, yaml.safe_load(sets.get("run.endpoint", "")) or None,
                       yaml.safe_load(sets.get("run.region", "")) or None)
    try:
        saved = layout.read_text(CONFIG) if layout.is_file(CONFIG) else None
    except OSError as exc:
        raise StoreError(f"{args.run}: cannot read the run ({str(exc).splitlines()[0]}); check the URI, the "
                         "credentials and run.endpoint") from None
    if saved is None:
        raise StoreError(f"{args.run}: not a run directory (no config.yaml); run `ipr collect CONFIG` first")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(saved)
        f.flush()
        cfg = load_config(f.name, args.set or [])
    root, _, name = layout.uri.rpartition("/")
    cfg.run.root, cfg.run.name = root, name
    if not layout.local:
        cfg.run.endpoint, cfg.run.region = layout.endpoint or cfg.run.endpoint, layout.region or cfg.run.region
    return cfg


def cmd_physcode_train(args) -> int:
    from learners.physcode import train

    cfg = _run_config(args)
    _start_ray(cfg)
    metrics = train(cfg)
    keys = ["eval/recon_mse", "eval/copy_last_mse", "eval/recon_vs_copy_last", "eval/code_usage", "eval/perplexity",
            "eval/flow_off_agreement", "eval/gate_f", "eval/gate_u", "eval/gate_e"]
    for k in keys:
        if k in metrics:
            print(f"{k:28} {metrics[k]:.4f}")
    return 0


def cmd_physcode_inspect(args) -> int:
    from learners.physcode_inspect import inspect

    inspect(_run_config(args))
    return 0


def cmd_physcode_calibrate(args) -> int:
    from learners.physcode_inspect import calibrate

    calibrate(_run_config(args), args.game, args.steps)
    return 0


def cmd_world_model_train(args) -> int:
    from learners.world_model import report, train

    cfg = _run_config(args)
    _start_ray(cfg)
    print(report(train(cfg), cfg.world_model.horizon))
    return 0


def cmd_world_model_eval(args) -> int:
    from ipr_dist.errors import StoreError
    from ipr_dist.run_layout import RAW_KEYS_CHECKPOINT, WORLD_MODEL_CHECKPOINT, RunLayout
    from learners.world_model import build_models, evaluate, load_checkpoint, prepare, write_report

    cfg = _run_config(args).with_absolute_root()
    layout = RunLayout.of(cfg)
    if layout.checkpoint(WORLD_MODEL_CHECKPOINT) is None:
        raise StoreError(f"{args.run}: no world-model checkpoint ({layout.display(WORLD_MODEL_CHECKPOINT)}); "
                         "run `ipr world-model train` first")
    physcode, seg = prepare(cfg)
    model, raw = build_models(cfg, seg, physcode.quantizer.codebook)
    load_checkpoint(layout, WORLD_MODEL_CHECKPOINT, model)
    if layout.checkpoint(RAW_KEYS_CHECKPOINT) is not None:
        load_checkpoint(layout, RAW_KEYS_CHECKPOINT, raw)
    else:
        raw = None
    print(write_report(cfg, evaluate(model, seg, model.cfg.horizon, raw)))
    return 0


def cmd_policy_init_tiny(args) -> int:
    from pathlib import Path

    from ipr_dist.errors import ConfigError
    from ipr_dist.models.tiny_qwen3vl import build_tiny

    path = Path(args.path)
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path}: exists and is not empty; give a new directory for the tiny model")
    build_tiny(path, hidden=args.hidden, layers=args.layers)
    print(f"tiny Qwen3-VL written to {path} (load it with policy.model_path: {path})")
    return 0


def cmd_policy_align(args) -> int:
    from learners.align import train

    cfg = _run_config(args)
    _start_ray(cfg)
    metrics = train(cfg)
    for key, value in metrics.items():
        print(f"{key:30s} {value:.4f}" if isinstance(value, float) else f"{key:30s} {value}")
    return 0


def _token_file(name: str) -> str:
    """The shared secret in file `name` (`--token-file`), or one ConfigError saying what to do."""
    from pathlib import Path

    from ipr_dist.errors import ConfigError

    path = Path(name)
    text = path.read_text().strip() if path.is_file() else ""
    if not text:
        raise ConfigError(f"--token-file {path}: missing or empty; write the shared secret into it")
    return text


def serve_token(token_file: str | None, no_auth: bool, environ) -> str | None:
    """`ipr serve`'s token: --token-file first, then $IPR_SERVE_TOKEN; None only with --no-auth."""
    from ipr_dist.errors import ConfigError

    if token_file:
        return _token_file(token_file)
    if environ.get("IPR_SERVE_TOKEN"):
        return environ["IPR_SERVE_TOKEN"]
    if not no_auth:
        raise ConfigError("no token: set IPR_SERVE_TOKEN or --token-file FILE (or --no-auth for local use only)")
    return None


def cmd_record(args) -> int:
    import secrets

    cfg = _run_config(args)
    token = _token_file(args.token_file) if args.token_file else secrets.token_urlsafe(18)
    import uvicorn

    from serving.record_app import build_record_app

    games = args.games or cfg.record.games or cfg.training_games
    app = build_record_app(cfg, games, token, args.player)
    print(f"recording into {cfg.run_dir}: open http://127.0.0.1:{args.port}/?token={token} in a browser; "
          "Ctrl-C stops (a running session is saved)", flush=True)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        app.state.shutdown()
    return 0


def cmd_serve(args) -> int:
    import os

    token = serve_token(args.token_file, args.no_auth, os.environ)
    cfg = _run_config(args)
    from ray import serve

    from cluster.runtime import init_ray
    from serving.app import build_app

    init_ray(cfg.ray)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(cfg, token), name="ipr", route_prefix="/")
    print(f"serving {cfg.run_dir} on http://{args.host}:{args.port} (POST /act, GET /healthz); Ctrl-C stops", flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipr", description="ipr-dist: distributed Interactive Physical Reasoner")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML preset, e.g. configs/local.yaml")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set fleet.num_envs=4 (repeatable)")

    c = sub.add_parser("collect", help="play the configured games with the env fleet and store the trajectories")
    with_config(c)
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train", help="the whole pipeline: collect, PhysCode, world model, alignment, GRPO "
                                     "(skips finished stages, resumes the interrupted one)")
    with_config(t)
    t.add_argument("--held-out", nargs="+", metavar="GAME", help="G2U split: keep these games out of every "
                   "training stage (recorded in the run's config.yaml as eval.held_out)")
    t.set_defaults(func=cmd_train)

    games = sub.add_parser("games", help="the game catalog").add_subparsers(dest="games_command", required=True)
    gl = games.add_parser("list", help="every game: id, platform, ROM installed, buttons, variables")
    gl.add_argument("--installed", action="store_true", help="only games whose ROM is installed")
    gl.add_argument("--platform", help="only this platform (Genesis, Nes, Snes, ...)")
    gl.add_argument("--json", action="store_true", help="one JSON object per line")
    gl.add_argument("--kind", choices=["retro", "html", "desktop"], help="only this kind of game")
    gl.add_argument("--annotations", action="append", metavar="FILE", help="extra annotation YAML file")
    gl.add_argument("--spec", action="append", metavar="FILE", help="also list the HTML game of this spec")
    gl.set_defaults(func=cmd_games_list)
    gi = games.add_parser("import-roms", help="import your ROM files through stable-retro's hash matching")
    gi.add_argument("dir")
    gi.set_defaults(func=cmd_games_import)

    def on_run(group, name: str, func, text: str):
        """A stage command on a run directory, with the run's config and `--set` overrides."""
        sp = group.add_parser(name, help=text)
        sp.add_argument("run", help="run directory, e.g. runs/local")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of the run's config")
        sp.set_defaults(func=func)
        return sp

    pc = sub.add_parser("physcode", help="stage 1: the PhysCode latent action vocabulary").add_subparsers(
        dest="physcode_command", required=True)
    on_run(pc, "train", cmd_physcode_train, "extract features (what is missing) and train PhysCode")
    on_run(pc, "inspect", cmd_physcode_inspect, "code usage, codes per game, frame pairs per code")
    cal = on_run(pc, "calibrate", cmd_physcode_calibrate, "refine the router with short calibration episodes of a game")
    cal.add_argument("--game", required=True, help="game id (or HTML spec path) to calibrate")
    cal.add_argument("--steps", type=POSITIVE, default=256, help="steps of calibration play")

    wm = sub.add_parser("world-model", help="stage 2: the world model with its critic").add_subparsers(
        dest="world_model_command", required=True)
    on_run(wm, "train", cmd_world_model_train, "train dynamics (Eq. 19), then the critic (Eq. 20)")
    on_run(wm, "eval", cmd_world_model_eval, "Table 1 metrics per horizon vs copy-last; critic quality")

    pol = sub.add_parser("policy", help="stage 3: the vision-language policy with PhysCode tokens").add_subparsers(
        dest="policy_command", required=True)
    tiny = pol.add_parser("init-tiny", help="build a small Qwen3-VL (local tokenizer, random weights) at PATH")
    tiny.add_argument("path")
    tiny.add_argument("--hidden", type=POSITIVE, default=64, help="text width (default 64)")
    tiny.add_argument("--layers", type=POSITIVE, default=2, help="text layers (default 2)")
    tiny.set_defaults(func=cmd_policy_init_tiny)
    on_run(pol, "align", cmd_policy_align, "teach the VLM to answer a frame and goal with PhysCode tokens")
    on_run(pol, "grpo", cmd_policy_grpo, "stage 4: GRPO with imagined returns, 1 real step : k imagined updates")
    fk = on_run(pol, "fork", cmd_policy_fork, "copy a trained run without its Stage 4 (GRPO policy, online world "
                "model, agent play, IPR evaluations), to run Stage 4 again on it with `ipr policy grpo NEW`")
    fk.add_argument("new", help="the new run directory (a local path or an s3:// / gs:// URI; must not exist)")

    sv = on_run(sub, "serve", cmd_serve, "serve the run's agent over HTTP with Ray Serve (POST /act, GET /healthz)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=PORT, default=8000)
    sv.add_argument("--token-file", help="file holding the shared secret (default: $IPR_SERVE_TOKEN)")
    sv.add_argument("--no-auth", action="store_true", help="accept requests without a token (local use only)")

    rec = on_run(sub, "record", cmd_record, "a local web page to play the run's games and tag what happens; "
                 "steps go to the run's store as human play")
    rec.add_argument("--port", type=PORT, default=8765)
    rec.add_argument("--player", default="player", help="player id stored with the steps (the page can change it)")
    rec.add_argument("--games", nargs="+", metavar="GAME", help="games offered (default: record.games, else the "
                     "run's training games)")
    rec.add_argument("--token-file", help="file holding the page's token (default: a new random token, printed)")

    ev = on_run(sub, "eval", cmd_eval, "Survival, Curiosity and Utility of methods on games; writes RUN/eval/report.md")
    ev.add_argument("--methods", nargs="+", metavar="METHOD", help="e.g. random ipr@survival ppo@utility vlm "
                    "(default: eval.methods)")
    ev.add_argument("--games", nargs="+", metavar="GAME", help="default: eval.games, else the fleet's and held-out games")
    ev.add_argument("--held-out", nargs="+", metavar="GAME", help="evaluate these games zero-shot; refused when the "
                    "run's data holds any of their steps")
    ev.add_argument("--episodes", type=POSITIVE, help="episodes per (method, game) (default: eval.episodes)")
    ev.add_argument("--scaling", nargs="+", metavar="RUN", help="other evaluated runs: plot zero-shot score against "
                    "the number of training games (RUN/eval/scaling.png)")

    data = sub.add_parser("data", help="trajectory stores").add_subparsers(dest="data_command", required=True)
    di = data.add_parser("inspect", help="steps and episodes per game and source")
    di.add_argument("path", help="run directory (or its data/ directory)")
    di.set_defaults(func=cmd_data_inspect)
    on_run(data, "preprocess", cmd_data_preprocess, "human play: drop non-interactive segments, thin idle windows, "
           "remove flicks and pointer jitter (paper Sec. 9.2); a second run changes nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"ipr: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ipr: interrupted; committed shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
