"""`ipr eval RUN`: roll out methods on games with evaluation actors in parallel, N episodes each on
fixed seeds, cache every finished episode (an interrupted evaluation resumes where it stopped), then
write `<run>/eval/report.md` (paper Table 2 / Table 3 as reports, Sec. 5.1 and 9.3 metrics).

Order: RL baselines are trained first (RLlib needs the CPUs), then each method is evaluated in turn,
random first (it is every game's reference); the references and the report come from the cache.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from contextlib import contextmanager

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from pydantic import ValidationError

from ipr_dist.config import Config, EvalConfig
from ipr_dist.errors import ConfigError
from ipr_dist.games import game_info
from ipr_dist.metrics.report import EpisodeCache, random_reference, scaling_plot, write_report
from ipr_dist.run_layout import DATA, EVAL, EVAL_EPISODES, ROUTER, RunLayout
from serving.agent import pick

ACTOR_ERRORS = (RayActorError, ActorUnavailableError)
LOCAL = ("random", "ppo", "dqn")  # whole episodes inside the evaluation actor; the others are stepped by the driver


def episode_seed(run_seed: int, game: str, index: int) -> int:
    """The same seed for every method on a game's i-th episode (common random numbers)."""
    from actors.env_fleet import derive_seed

    return derive_seed(run_seed, 0xE7A1, zlib.crc32(game.encode()), index)


def held_out_proof(cfg: Config, games: list[str]) -> dict[str, str]:
    """Proof, from the run's data, that no held-out game was trained on; a held-out game with steps
    in the run's store is refused."""
    from ipr_dist.data.store import TrajectoryStore

    layout = RunLayout.of(cfg)
    store = TrajectoryStore(layout)
    summary = store.summary() if store.shard_paths() else []
    total = sum(s.steps for s in summary)
    recorded = set(cfg.eval.held_out)
    proof = {}
    for g in games:
        rows = [s for s in summary if s.game == g]
        if rows:
            sources = ", ".join(f"{s.steps} {s.source}" for s in rows)
            raise ConfigError(f"held-out game {g} appears in the training data of {layout.uri} ({sources} steps in "
                              f"{layout.display(DATA)}); evaluate it zero-shot only on a run trained without it: "
                              f"`ipr train CONFIG --held-out {g}`")
        proof[g] = (f"0 of the {total} steps in the run's store (every training stage reads only the store); "
                    + ("recorded as held out in the run's config.yaml" if g in recorded
                       else "not listed in the run's eval.held_out"))
    return proof


def third_player_needed(players: dict[str, float]) -> bool:
    """The paper's rule (Sec. 9.2): when two players' mean scores differ by more than 1.5x, a third
    player is recorded."""
    if len(players) < 2:
        return False
    lo, hi = min(abs(v) for v in players.values()), max(abs(v) for v in players.values())
    return hi > 1.5 * lo if lo > 0 else hi > 0


def human_players(cfg: Config, games: list[str]) -> dict[str, tuple[float | None, int, list[str], dict[str, float]]]:
    """Per game: mean score of the finished human episodes in the run's store and eval.human_stores,
    their count, the stores they came from, and each player's mean score (players from `ipr record`'s
    chunk metadata; human steps from elsewhere count as player 'unknown'). Each store is read once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ipr_dist.data.store import TrajectoryStore

    scores: dict[str, list[float]] = {g: [] for g in games}
    where: dict[str, list[str]] = {g: [] for g in games}
    by_player: dict[str, dict[str, list[float]]] = {g: {} for g in games}
    for layout in [RunLayout.of(cfg), *(RunLayout(r, cfg.run.endpoint, cfg.run.region) for r in cfg.eval.human_stores)]:
        store = TrajectoryStore(layout)
        tables = []
        for p in store.shard_paths():
            t = store.read_shard(p, ["game", "source", "episode_id", "reward", "terminated", "truncated"])
            meta = t.schema.metadata or {}
            player = json.loads(meta[b"ipr.human"]).get("player", "unknown") if b"ipr.human" in meta else "unknown"
            tables.append(t.replace_schema_metadata(None).append_column("player", pa.array([player] * t.num_rows,
                                                                                           pa.string())))
        if not tables:
            continue
        t = pa.concat_tables(tables)
        t = t.filter(pc.equal(t["source"], "human"))
        if not t.num_rows:
            continue
        t = t.append_column("ended", pc.or_(t["terminated"], t["truncated"]))
        for r in t.group_by(["game", "episode_id", "player"]).aggregate([("reward", "sum"), ("ended", "max")]).to_pylist():
            game = _catalog_game(r["game"], games)
            if game is not None and r["ended_max"]:
                scores[game].append(r["reward_sum"])
                by_player[game].setdefault(r["player"], []).append(r["reward_sum"])
                if layout.display(DATA) not in where[game]:
                    where[game].append(layout.display(DATA))
    return {g: ((float(np.mean(scores[g])) if scores[g] else None), len(scores[g]), where[g],
                {p: float(np.mean(v)) for p, v in sorted(by_player[g].items())}) for g in games}


def _catalog_game(stored: str, games: list[str]) -> str | None:
    """The evaluated game a stored game id belongs to (the store keeps stable-retro's `-v0` ids)."""
    if stored in games:
        return stored
    short = stored[: -len("-v0")] if stored.endswith("-v0") else stored
    return short if short in games else None


class CuriosityEncoder:
    def __init__(self, cfg: Config):
        from actors.feature_extractor import make_appearance

        e = cfg.eval
        if e.curiosity_encoder == "clip":
            from ipr_dist.models.encoders import ClipVisionEncoder

            self.encoder = ClipVisionEncoder(e.clip_path)
            self.name = f"the CLIP vision encoder at {e.clip_path}"
        else:
            from ipr_dist.errors import StoreError

            try:
                self.encoder = make_appearance(cfg.features, RunLayout.of(cfg))
            except StoreError:
                raise ConfigError(f"{cfg.run_dir}: the run has no appearance encoder yet (features stage not run); "
                                  "run `ipr physcode train RUN` first, or set eval.curiosity_encoder=clip with "
                                  "eval.clip_path") from None
            self.name = (f"the run's own appearance encoder ({type(self.encoder).__name__}, features.appearance="
                         f"{cfg.features.appearance}; the paper uses CLIP: set eval.curiosity_encoder=clip)")

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.encoder.encode(np.stack(frames)), np.float32)


IPR_PICKS = {"ipr": "world_model", "ipr-no-wm": "first", "ipr-random-pick": "random", "ipr-no-grpo": "world_model"}


def acting_settings(cfg: Config, method: str) -> dict:
    """What decides how an IPR method acts besides the run's checkpoints, which `--set` may change between two
    invocations on one run (empty for the other methods)."""
    if method.partition("@")[0] not in IPR_PICKS:
        return {}
    p = cfg.policy
    routing = {"physcode.routing": cfg.physcode.routing}
    if cfg.physcode.routing == "outcome":
        routing["physcode.routing_prior"] = cfg.physcode.routing_prior
    return {**routing, "policy.candidates": p.candidates, "policy.temperature": p.temperature, "policy.top_p": p.top_p,
            "policy.distinct_first_codes": p.distinct_first_codes, "policy.pick_prior_weight": p.pick_prior_weight,
            "policy.pick_uncertainty_weight": p.pick_uncertainty_weight}


def check_cached_settings(cfg: Config, cache: EpisodeCache, methods: list[str]) -> None:
    """Cached episodes are reused, so a method whose episodes (of any game) were played under other acting
    settings is refused rather than reported as if played under these (the settings are recorded while a
    method has no episode; a cache from before they were is not checked)."""
    for m in methods:
        settings = acting_settings(cfg, m)
        if not settings:
            continue
        if not cache.played(m):
            cache.put_settings(m, settings)
            continue
        before = cache.settings(m)
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before and before.get(k) != v]
        if changed:
            raise ConfigError(f"{m}: its cached episodes were played with other settings ({'; '.join(changed)}); "
                              f"evaluate a copy of the run, or remove {cache.layout.display(EVAL_EPISODES, m)} to "
                              "play them again")


def acting_policy(cfg: Config, method: str, out=None):
    """The policy an IPR method (`name` or `name@level`) proposes with: Stage 4's (the latest), or for
    ipr-no-grpo the aligned one (said to `out` when the run has no Stage 4 policy, so that both are the same)."""
    from learners.align import aligned_policy, grpo_policy, latest_policy

    if method.partition("@")[0] != "ipr-no-grpo":
        return latest_policy(cfg)
    if out is not None and not grpo_policy(cfg).exists():
        print(f"  {method}: the run has no Stage 4 policy yet, so it acts as ipr does", file=out, flush=True)
    return aligned_policy(cfg)


class IPRActing:
    """The IPR agent (`pick` "world_model": propose B, score each by the world model, route the best);
    its ablations: "first", one proposed candidate routed as it is (ipr-no-wm), and "random", the B
    candidates proposed as IPR's and one picked at random (ipr-random-pick: what the world model's
    ranking adds over the candidates alone); and ipr-no-grpo, IPR with the aligned policy (`policy`):
    what Stage 4's updates add."""

    def __init__(self, cfg: Config, level: str, pick: str, policy=None):
        from learners.align import goal_of
        from serving.agent import Agent

        self.cfg, self.level, self.pick = cfg, level, pick
        self.agent = Agent(cfg, policy=policy)
        self.goal_of = goal_of(cfg, level)
        self.rng = np.random.default_rng(cfg.run.seed)

    def reset(self, slot: int, game: str) -> None:
        pass

    def note_objects(self, slot: int, objects: list[dict] | None) -> None:
        pass  # the trained agent reads the frame only

    def act(self, frames: list[np.ndarray], games: list[str], slots: list[int]) -> list[tuple[list[dict], int]]:
        p = self.cfg.policy
        goals = [self.goal_of(g) for g in games]
        props = ray.get(self.agent.policy.propose.remote(frames, goals, 1 if self.pick == "first" else p.candidates,
                                                         p.temperature, p.top_p, p.distinct_first_codes))
        best = np.zeros(len(frames), np.int64)
        if self.pick == "world_model":
            f = self.agent.features(np.stack(frames))
            answers = ray.get([self.agent.scorer.score.remote(f[i], props.codes[i], members=True)
                               for i in range(len(frames))])
            best = np.array([pick(a, lp, p) for a, lp in zip(answers, props.logprobs)])
        elif self.pick == "random":
            best = self.rng.integers(0, props.codes.shape[1], len(frames))
        return [(self.agent.route(g, props.codes[i][best[i]]), 0) for i, g in enumerate(games)]

    def close(self) -> None:
        for handle in (self.agent.policy, self.agent.scorer):
            ray.kill(handle)


class VLMActing:
    """The prompt-only VLM: one menu action per step from its JSON answer (no-op when invalid)."""

    def __init__(self, cfg: Config, level: str):
        from ipr_dist.games import game_info
        from ipr_dist.games.catalog import load_annotations
        from learners.align import base_policy, ensure_base, goal_of
        from serving.prompt_vlm import PromptVLMServer

        self.cfg, self.level = cfg, level
        path = cfg.eval.vlm_path or (ensure_base(cfg) if not cfg.policy.model_path else base_policy(cfg))
        e = cfg.eval
        self.server = PromptVLMServer.options(num_cpus=e.vlm_cpus, num_gpus=e.vlm_gpus).remote(
            path, e.vlm_max_new_tokens)
        annotations = load_annotations(cfg.games.annotation_files)
        self.info = lambda g: game_info(g, annotations, cfg.games.spec_files)
        self.goal_of = goal_of(cfg, level)
        self.state: dict[int, dict] = {}

    def reset(self, slot: int, game: str) -> None:
        from ipr_dist.games.discrete import action_menu

        self.state[slot] = {"menu": action_menu(self.info(game)), "history": [], "memory": "", "objects": None}

    def note_objects(self, slot: int, objects: list[dict] | None) -> None:
        """A desktop game's detector boxes for the next step's context (paper Sec. 9.1)."""
        self.state[slot]["objects"] = objects

    def act(self, frames, games, slots):
        from serving.prompt_vlm import build_prompt, parse_answer

        prompts = []
        for g, s in zip(games, slots):
            st = self.state[s]
            prompts.append(build_prompt(self.info(g), [n for n, _ in st["menu"]],
                                        self.goal_of(g), st["history"], st["memory"],
                                        st["objects"]))
        answers = ray.get(self.server.answer.remote(frames, prompts))
        out = []
        for s, text in zip(slots, answers):
            st = self.state[s]
            parsed = parse_answer(text, [n for n, _ in st["menu"]])
            index = parsed.action if parsed.action is not None else 0
            st["memory"] = parsed.memory or st["memory"]
            st["history"] = (st["history"] + [st["menu"][index][0]])[-self.cfg.eval.vlm_history:]
            out.append(([st["menu"][index][1]], int(parsed.action is None)))
        return out

    def close(self) -> None:
        ray.kill(self.server)


class Evaluation:
    def __init__(self, cfg: Config, methods: list[str], games: list[str], held_out: dict[str, str], out):
        from actors.eval_worker import EvalWorker

        self.cfg, self.methods, self.games, self.held_out, self.out = cfg, methods, games, held_out, out
        self.layout = RunLayout.of(cfg)
        self.cache = EpisodeCache(self.layout)
        e = cfg.eval
        env_cfg = cfg.env.model_copy(update={"max_episode_steps": e.max_episode_steps})
        self.workers = [EvalWorker.options(num_cpus=e.cpus_per_env).remote(env_cfg, cfg.games, e.frames_per_episode)
                        for _ in range(e.num_envs)]
        self.embed = CuriosityEncoder(cfg)
        self.retries: dict[tuple[str, int], int] = {}
        self.caps: dict[str, int] = {}  # game -> step cap of every method after random (eval.cap_at_step_unit)
        self.bar = None  # the current method's episodes bar

    def missing(self, method: str) -> list[tuple[str, int]]:
        return [(g, i) for g in self.games for i in range(self.cfg.eval.episodes) if not self.cache.has(method, g, i)]

    def _store(self, record) -> None:
        summary = record.summary()
        self.cache.put(summary, self.embed(record.frames))
        if self.bar is not None:  # one bar per method; every episode's numbers are in its cached json
            self.bar.set_postfix_str(f"last {summary['game']} #{summary['seed_index']}: {summary['length']} steps, "
                                     f"score {summary['score']:.1f}", refresh=False)
            self.bar.update(1)

    @contextmanager
    def episodes_bar(self, method: str, total: int):
        """The progress bar of one method's episodes while they are played (`_store` advances it)."""
        from tqdm import tqdm

        with tqdm(total=total, desc=f"{method} episodes", file=self.out, mininterval=2.0, dynamic_ncols=True) as bar:
            self.bar = bar
            try:
                yield bar
            finally:
                self.bar = None

    def _lost(self, task: tuple[str, int], exc: Exception, tasks: list) -> None:
        """An evaluation actor died mid-episode (Ray restarts it): the episode is played again from
        its seed, up to 3 times."""
        self.retries[task] = self.retries.get(task, 0) + 1
        if self.retries[task] > 3:
            raise RuntimeError(f"episode {task[1]} of {task[0]} failed 3 times; last error: {exc}") from exc
        message = f"  episode {task[1]} of {task[0]} lost with its actor ({type(exc).__name__}); playing it again"
        if self.bar is not None:
            self.bar.write(message, file=self.out)
        else:
            print(message, file=self.out, flush=True)
        tasks.append(task)

    def run_local(self, method: str, tasks: list[tuple[str, int]], checkpoints: dict) -> None:
        idle, pending = list(self.workers), {}
        while tasks or pending:
            while tasks and idle:
                game, i = task = tasks.pop(0)
                w = idle.pop()
                ref = w.play_episode.remote(game, method, i, episode_seed(self.cfg.run.seed, game, i),
                                            checkpoints.get(game), self.cap(method, game))
                pending[ref] = (w, task)
            done, _ = ray.wait(list(pending), num_returns=1)
            w, task = pending.pop(done[0])
            idle.append(w)
            try:
                record = ray.get(done[0])
            except ACTOR_ERRORS as exc:
                self._lost(task, exc, tasks)
                continue
            self._store(record)

    def run_served(self, method: str, tasks: list[tuple[str, int]], acting) -> None:
        active: dict[int, dict] = {}  # slot -> {"task", "frame"}
        while tasks or active:
            for slot in range(len(self.workers)):
                if slot not in active and tasks:
                    game, i = task = tasks.pop(0)
                    try:
                        frame = ray.get(self.workers[slot].begin.remote(game, method, i,
                                                                        episode_seed(self.cfg.run.seed, game, i),
                                                                        self.cap(method, game)))
                    except ACTOR_ERRORS as exc:
                        self._lost(task, exc, tasks)
                        continue
                    acting.reset(slot, game)
                    active[slot] = {"task": task, "frame": frame}
            if not active:
                continue
            slots = sorted(active)
            decisions = acting.act([active[s]["frame"] for s in slots], [active[s]["task"][0] for s in slots], slots)
            refs = [self.workers[s].advance.remote(actions, invalid) for s, (actions, invalid) in zip(slots, decisions)]
            for s, ref in zip(slots, refs):
                try:
                    r = ray.get(ref)
                except ACTOR_ERRORS as exc:
                    self._lost(active.pop(s)["task"], exc, tasks)
                    continue
                if r["done"]:
                    self._store(r["record"])
                    del active[s]
                else:
                    active[s]["frame"] = r["frame"]
                    acting.note_objects(s, r.get("objects"))

    def cap(self, method: str, game: str) -> int:
        return 0 if method == "random" else self.caps.get(game, 0)

    def set_caps(self) -> None:
        """Each game's cap for the methods after random: its step unit H from the random reference,
        at most eval.max_episode_steps (when random lives to that cap, H is larger and the cap stays)."""
        if not self.cfg.eval.cap_at_step_unit:
            return
        refs = self.references()
        self.caps = {g: min(refs[g]["step_unit"], self.cfg.eval.max_episode_steps) for g in self.games}
        print("  episode caps after random (step unit H): " + ", ".join(f"{g} {c}" for g, c in self.caps.items()),
              file=self.out, flush=True)

    def references(self) -> dict:
        path = f"{EVAL}/references.json"
        refs = self.layout.read_json(path) if self.layout.is_file(path) else {}
        humans = human_players(self.cfg, self.games)
        for g in self.games:
            eps = len(self.cache.episodes("random", g))
            if g not in refs or refs[g]["random_episodes"] != eps:
                refs[g] = random_reference(self.cache, g, self.cfg.eval.scale_target)
            human, n, where, players = humans[g]
            refs[g].update(human_score=human, human_episodes=n, human_stores=where, human_players=players,
                           third_player_needed=third_player_needed(players),
                           has_score="score" in game_info(g, None, self.cfg.games.spec_files).variables)
        self.layout.write_json(path, refs)
        return refs

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


def evaluate(cfg: Config, methods: list[str] | None = None, games: list[str] | None = None,
             held_out: list[str] | None = None, episodes: int | None = None, scaling: list[str] | None = None,
             out=sys.stdout) -> str:
    from cluster.runtime import init_ray
    from ipr_dist.games import game_info
    from ipr_dist.games.catalog import load_annotations, require_installed
    from learners import baselines

    if episodes is not None:  # through the config's own checks (model_copy alone would skip them)
        try:
            cfg = cfg.model_copy(update={"eval": EvalConfig.model_validate({**cfg.eval.model_dump(), "episodes": episodes})})
        except ValidationError as err:
            raise ConfigError(f"episodes: {err.errors()[0]['msg']} (got {episodes})") from None
    cfg = cfg.with_absolute_root()
    e = cfg.eval
    methods = list(methods or e.methods)
    try:
        EvalConfig(methods=methods)  # the config's own checks
    except ValidationError as err:
        raise ConfigError("--methods: " + err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    methods = ["random"] + [m for m in methods if m != "random"]  # every game's reference comes first
    annotations = load_annotations(cfg.games.annotation_files)
    resolve = lambda g: game_info(g, annotations, cfg.games.spec_files)
    held = list(dict.fromkeys(resolve(g).id for g in [*e.held_out, *(held_out or [])]))
    games = list(dict.fromkeys(resolve(g).id for g in (games or e.games or [*cfg.fleet.games, *held])))
    for g in games:
        require_installed(resolve(g))
    proof = held_out_proof(cfg, [g for g in games if g in held])
    layout = RunLayout.of(cfg)
    layout.check_writable()
    check_cached_settings(cfg, EpisodeCache(layout), methods)
    init_ray(cfg.ray)
    start = time.perf_counter()
    checkpoints: dict[str, dict] = {}
    for m in methods:
        name, _, level = m.partition("@")
        if name in ("ppo", "dqn"):
            checkpoints[m] = {g: baselines.train(cfg, name, level or "utility", g, out) for g in games}
    ev = Evaluation(cfg, methods, games, proof, out)
    try:
        for m in methods:
            tasks = ev.missing(m)
            if m != "random" and not ev.caps:
                ev.set_caps()
            if not tasks:
                continue
            print(f"== {m}: {len(tasks)} episodes", file=out, flush=True)
            name, _, level = m.partition("@")
            if name in LOCAL:
                with ev.episodes_bar(m, len(tasks)):
                    ev.run_local(m, tasks, checkpoints.get(m, {}))
                continue
            if name in IPR_PICKS:
                _calibrate_router(cfg, games, out)
                acting = IPRActing(cfg, level, IPR_PICKS[name], acting_policy(cfg, m, out))
            else:
                acting = VLMActing(cfg, level)
            try:
                with ev.episodes_bar(m, len(tasks)):
                    ev.run_served(m, tasks, acting)
            finally:
                acting.close()
        refs = ev.references()
    finally:
        ev.shutdown()
    caps = (f"random's capped at {e.max_episode_steps} steps, every other method's at the game's step unit H "
            f"({', '.join(f'{g} {c}' for g, c in ev.caps.items())})" if ev.caps
            else f"capped at {e.max_episode_steps} steps")
    settings = (f"{e.episodes} episodes per (method, game) on the same seeds (run seed {cfg.run.seed}), {caps}; "
                f"games: {', '.join(games)}; evaluation took "
                f"{(time.perf_counter() - start) / 60:.1f} min in this invocation.")
    report, brief = write_report(layout, methods, games, refs, e.scales, ev.embed.name, proof, settings,
                                 e.utility_clip)
    if scaling:
        scaling_plot([layout, *(RunLayout(r, cfg.run.endpoint, cfg.run.region) for r in scaling)], layout)
    print(f"# Evaluation of {layout.name}: {settings}\n\n{brief}\n\nreport (per game, intervals, controls, "
          f"ablations): {report}", file=out)
    return report


def _calibrate_router(cfg: Config, games: list[str], out) -> None:
    """A game the router has no table for (a held-out game) gets one from calibration play first."""
    from learners.physcode_inspect import calibrate
    from ipr_dist.models.router import Router

    layout = RunLayout.of(cfg)
    if not layout.is_file(ROUTER):
        raise ConfigError(f"{layout.uri}: no router ({layout.display(ROUTER)}); train the run first (`ipr train CONFIG`)")
    tables = Router.loads(layout.read_text(ROUTER)).tables
    for g in games:
        if g not in tables:
            print(f"  router: calibrating {g} ({cfg.eval.calibration_steps} steps of random play)", file=out)
            calibrate(cfg, g, cfg.eval.calibration_steps, out)
