"""The env fleet: one Ray actor per environment, each playing chunks of K steps in a tight loop.

Data path (docs/architecture.md has the numbers):
  EnvActor.collect(K): play K steps -> write the chunk's Parquet shard to the run's filesystem
                       -> return its name and row count (a few bytes) -> driver commits the manifest
Bulk data goes from the actor that made it straight to storage; the driver sees only metadata, so
collection scales with the actors, not with the head node. An actor holds `inflight_chunks` queued
requests, so it starts the next chunk while the driver commits the last one. A crashed actor is
restarted by Ray (`max_restarts`); the chunk it was playing, or had written but not reported, is
lost with its process and never becomes visible (no manifest names it; the next start deletes it),
and the actor starts a new incarnation with fresh episode seeds. Only chunks whose manifest the
driver wrote are counted as committed, so the store's step count always equals the fleet's count.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from ipr_dist.config import EnvConfig, FleetConfig, GamesConfig
from ipr_dist.data.schema import STEP_ARRAYS, ChunkMeta
from ipr_dist.data.store import TrajectoryStore, WrittenShard
from ipr_dist.errors import EnvironmentCrashed
from ipr_dist.games.actions import RandomActions, ScriptedActions
from ipr_dist.games.browser import require_browser
from ipr_dist.games.outcome import life_lost

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from (run seed, actor, incarnation, counter): distinct streams, reproducible."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class EnvRunner:
    """Plays one environment in chunks; the plain, Ray-free core of EnvActor (testable in-process)."""

    def __init__(self, index: int, game: str, env_cfg: EnvConfig, fleet_cfg: FleetConfig, games_cfg: GamesConfig,
                 seed: int, fleet_id: str, store: TrajectoryStore):
        import cv2

        from ipr_dist.games import make_env
        from ipr_dist.games.catalog import load_annotations

        cv2.setNumThreads(1)  # one core per actor: the fleet parallelises across actors instead
        self.index, self.seed, self.fleet_id = index, seed, fleet_id
        self.fleet_cfg = fleet_cfg
        self.store = store
        annotations = load_annotations(games_cfg.annotation_files)
        self.env = make_env(game, env_cfg, annotations, games_cfg.spec_files)
        self.game = self.env.game
        self.process_token = uuid.uuid4().hex[:8]  # new in every incarnation of the actor process
        self.generation = -1
        self._start_incarnation(0)

    def _start_incarnation(self, generation: int) -> None:
        self.generation = generation
        self.token = uuid.uuid4().hex[:4]  # unique even if a crash went unnoticed by the driver
        self.episode = 0
        self.chunk_counter = 0
        cfg = self.fleet_cfg
        source_seed = derive_seed(self.seed, self.index, generation, 1 << 30)
        if cfg.action_source == "scripted":
            self.source = ScriptedActions(self.game.keys, cfg.scripted_actions, cfg.scripted_hold)
        else:
            self.source = RandomActions(self.game.keys, self.game.uses_mouse, source_seed)
        self.obs, self.info = self.env.reset(seed=derive_seed(self.seed, self.index, generation, 0))
        self.t = 0
        self.episode_reward = 0.0
        self.finished: list[tuple[int, float]] = []  # (length, reward) of episodes ended since last asked
        self.filled = 0  # agent steps waiting in the buffers for a full chunk
        self.buffers: dict[str, np.ndarray] = {}

    def _buffers(self, k: int) -> dict[str, np.ndarray]:
        if len(self.buffers.get("step", ())) != k:
            h, w, c = self.obs.shape
            n = len(self.game.keys)
            shapes = {"frame": (k, h, w, c), "next_frame": (k, h, w, c), "keys": (k, n), "mouse": (k, 2),
                      "mouse_buttons": (k, 3)}
            self.buffers = {name: np.zeros(shapes.get(name, (k,)), dtype) for name, dtype in STEP_ARRAYS.items()}
        return self.buffers

    def play_chunk(self, k: int, generation: int) -> tuple[dict[str, np.ndarray], ChunkMeta, dict[str, Any]]:
        """Play k steps; returns the chunk's arrays (reused buffers), its metadata and a few statistics."""
        if generation != self.generation:
            self._start_incarnation(generation)
        b = self._buffers(k)
        start = time.perf_counter()
        episodes_done = 0
        for i in range(k):
            if self._step(b, i, self.source(self.obs, self.info)):
                episodes_done += 1
        self.finished.clear()  # episode outcomes are reported by `play` only
        meta = self._meta(self.fleet_cfg.source_label or self.source.name)
        stats = {"seconds": time.perf_counter() - start, "episodes": episodes_done, "process": self.process_token}
        return b, meta, stats

    def collect(self, k: int, generation: int) -> tuple[WrittenShard, dict[str, Any]]:
        """Play k steps and write them as one (uncommitted) shard; returns the shard and a few statistics."""
        arrays, meta, stats = self.play_chunk(k, generation)
        start = time.perf_counter()
        shard = self.store.write_shard(arrays, meta)
        stats["write_seconds"] = time.perf_counter() - start
        return shard, stats

    def _step(self, b: dict[str, np.ndarray], i: int, action: dict) -> bool:
        """Play one action, record the step in row i of the buffers; True when an episode ended."""
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        b["frame"][i] = self.obs
        b["next_frame"][i] = next_obs
        b["keys"][i] = action["keys"]
        b["mouse"][i] = action["mouse"]
        b["mouse_buttons"][i] = action["mouse_buttons"]
        b["scroll"][i] = action["scroll"]
        b["reward"][i] = reward
        b["lives"][i] = info["lives"]
        b["score"][i] = info["score"]
        b["terminated"][i] = terminated
        b["truncated"][i] = truncated
        b["failure"][i] = info["failure"]
        b["episode"][i] = self.episode
        b["step"][i] = self.t
        b["policy_version"][i] = action.get("policy_version", -1)
        self.episode_reward += reward
        if terminated or truncated:
            self.finished.append((self.t + 1, self.episode_reward))
            self.episode += 1
            self.t, self.episode_reward = 0, 0.0
            seed = derive_seed(self.seed, self.index, self.generation, self.episode + 1)
            self.obs, self.info = self.env.reset(seed=seed)
            return True
        self.t += 1
        self.obs, self.info = next_obs, info
        return False

    def _meta(self, source: str) -> ChunkMeta:
        meta = ChunkMeta(
            chunk_id=f"{self._incarnation_id}-c{self.chunk_counter:06d}",
            episode_prefix=self._incarnation_id,
            game=self.game.id,
            game_kind=self.game.kind,
            source=source,
            key_names=self.game.keys,
        )
        self.chunk_counter += 1
        return meta

    def play(self, actions: list[dict], version: int, chunk_steps: int, trace: bool = False) -> dict[str, Any]:
        """Execute a routed PhysCode sequence (one action per step; an episode's end stops it).

        The steps go into an agent chunk of `chunk_steps` rows; a full chunk is written as a shard
        by this actor and only its name comes back (the driver commits it). `trace`: also return each
        played step's observation before it, reward, terminated and failure flags and whether it lost a life
        (the online world model learns from them)."""
        b = self._buffers(chunk_steps)
        start = time.perf_counter()
        played, ended = 0, False
        steps: dict[str, list] = {"frames": [], "reward": [], "terminated": [], "failure": [], "life_lost": []}
        for action in actions:
            if self.filled == chunk_steps:
                break
            row, lives = self.filled, self.info.get("lives", -1)
            ended = self._step(b, row, {**action, "policy_version": version})
            if trace:
                steps["frames"].append(b["frame"][row].copy())
                for key in ("reward", "terminated", "failure"):
                    steps[key].append(b[key][row].item())
                steps["life_lost"].append(life_lost(lives, int(b["lives"][row])))
            self.filled += 1
            played += 1
            if ended:
                break
        chunk = None
        if self.filled == chunk_steps:
            chunk = self.store.write_shard(b, self._meta("agent"))
            self.filled = 0
        finished, self.finished = self.finished, []
        return {"frame": self.obs, "steps": played, "episode_ended": ended, "finished": finished, "chunk": chunk,
                "seconds": time.perf_counter() - start, "process": self.process_token,
                "trace": steps if trace else None}

    def observe(self) -> np.ndarray:
        return self.obs

    def flush(self) -> WrittenShard | None:
        """The agent steps not yet in a full chunk, written as a shorter shard (end of Stage 4)."""
        if not self.filled:
            return None
        chunk = self.store.write_shard({k: v[:self.filled] for k, v in self.buffers.items()}, self._meta("agent"))
        self.filled = 0
        return chunk

    @property
    def _incarnation_id(self) -> str:
        return f"{self.fleet_id}-a{self.index:04d}-g{self.generation}{self.token}"

    def close(self) -> None:
        self.env.close()


@ray.remote
class EnvActor:
    """One environment per process (stable-retro allows one emulator per process)."""

    def __init__(self, *args, **kwargs):
        from ipr_dist.metrics.ray_metrics import make

        self.runner = EnvRunner(*args, **kwargs)
        tags = {"game": self.runner.game.id}
        self._steps, self._episodes = make("ipr_env_steps"), make("ipr_env_episodes")
        self._rate = make("ipr_env_steps_per_second")
        for m in (self._steps, self._episodes):
            m.set_default_tags(tags)
        self._rate.set_default_tags({**tags, "actor": str(self.runner.index)})

    def game(self) -> dict[str, Any]:
        g = self.runner.game
        return {"id": g.id, "kind": g.kind, "keys": list(g.keys)}

    def pid(self) -> int:
        return os.getpid()

    def observe(self) -> tuple[np.ndarray, str]:
        """The current frame and this incarnation's process token."""
        return self.runner.observe(), self.runner.process_token

    def flush(self):
        return self.runner.flush()

    def play(self, actions: list[dict], version: int, chunk_steps: int, trace: bool = False) -> dict:
        try:
            out = self.runner.play(actions, version, chunk_steps, trace)
        except EnvironmentCrashed as exc:
            log.error("%s; restarting the environment actor", exc)
            os._exit(1)
        self._steps.inc(out["steps"])
        if out["finished"]:
            self._episodes.inc(len(out["finished"]))
        self._rate.set(out["steps"] / max(out["seconds"], 1e-9))
        return out

    def collect(self, k: int, generation: int):
        try:
            shard, stats = self.runner.collect(k, generation)
        except EnvironmentCrashed as exc:
            # A dead browser or emulator cannot be reused: end the process, so Ray restarts the actor
            # exactly as after any other crash, and the chunk is dropped whole.
            log.error("%s; restarting the environment actor", exc)
            os._exit(1)
        self._steps.inc(k)
        if stats["episodes"]:
            self._episodes.inc(stats["episodes"])
        self._rate.set(k / max(stats["seconds"], 1e-9))
        return shard, stats


@dataclass
class FleetReport:
    committed_steps: int = 0
    committed_chunks: int = 0
    dropped_chunks: int = 0  # chunks lost to a crashed actor (never stored)
    lost_steps: int = 0  # agent steps (`play`) lost with a crashed actor's partial chunk
    played_steps: int = 0  # agent steps played (`play`), stored or not
    restarts: int = 0
    episodes: int = 0
    failed_envs: dict[int, str] = field(default_factory=dict)  # actor index -> why it was given up
    seconds: float = 0.0
    steps_per_game: dict[str, int] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.committed_steps / self.seconds if self.seconds else 0.0


ShardCommit = Callable[[WrittenShard], int]


class EnvFleet:
    """Creates the env actors and drives them; `run` commits the shards they write until a step
    budget is committed."""

    def __init__(self, games: list[str], env_cfg: EnvConfig, fleet_cfg: FleetConfig, seed: int,
                 games_cfg: GamesConfig | None, store: TrajectoryStore):
        from ipr_dist.metrics.ray_metrics import make

        self.cfg = fleet_cfg
        self.fleet_id = uuid.uuid4().hex[:8]
        # Spec and annotation paths are made absolute here: actor processes need not share our cwd.
        games_cfg = (games_cfg or GamesConfig()).model_copy(update={
            "annotation_files": [_absolute(p) for p in (games_cfg.annotation_files if games_cfg else [])],
            "html_specs": [_absolute(p) for p in (games_cfg.html_specs if games_cfg else [])],
            "desktop_specs": [_absolute(p) for p in (games_cfg.desktop_specs if games_cfg else [])],
        })
        games = [_absolute(g) if g.endswith((".yaml", ".yml")) else g for g in games]
        # HTML games with no usable browser stop the fleet here, in one sentence, not one actor at a time.
        require_browser(games, games_cfg.spec_files, env_cfg.browser)
        self.games = [games[i % len(games)] for i in range(fleet_cfg.num_envs)]
        options = {"num_cpus": fleet_cfg.cpus_per_env, "max_restarts": fleet_cfg.max_restarts, "max_task_retries": 0,
                   "resources": dict(fleet_cfg.resources)}
        self.store = store
        self.actors = [
            EnvActor.options(**options).remote(i, g, env_cfg, fleet_cfg, games_cfg, seed, self.fleet_id, store)
            for i, g in enumerate(self.games)
        ]
        self.generation = [0] * len(self.actors)
        self.alive = [True] * len(self.actors)
        self.process = [None] * len(self.actors)  # the incarnation token each actor last reported
        self.failures_in_a_row = [0] * len(self.actors)
        self.game_ids: list[str | None] = [None] * len(self.actors)  # per actor; None: did not start
        self.unstored = [0] * len(self.actors)  # agent steps each env played that no committed shard holds yet
        self.report = FleetReport()
        self._restart_metric = make("ipr_env_actor_restarts")
        self._check_started()

    def _check_started(self) -> None:
        """Environments that cannot start are reported by game and left out; the rest keep running."""
        for i, actor in enumerate(self.actors):
            try:
                self.game_ids[i] = ray.get(actor.game.remote())["id"]
            except (RayActorError, ray.exceptions.RayTaskError) as exc:
                self._give_up(i, _cause(exc))
        if not any(self.alive):
            raise RuntimeError("no environment of the fleet could start: " + "; ".join(self.report.failed_envs.values()))

    def _give_up(self, i: int, why: str) -> None:
        self.alive[i] = False
        ray.kill(self.actors[i], no_restart=True)
        self.report.failed_envs[i] = f"{self.games[i]}: {why}"
        log.error("environment %d (%s) was given up: %s", i, self.games[i], why)

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def run(self, steps: int, writer_threads: int = 2,
            progress: Callable[[FleetReport], None] | None = None) -> FleetReport:
        """Play until `steps` more steps are committed (manifests written on `writer_threads` threads).

        All accounting happens on this thread; a step counts as committed only once its manifest is
        written, so an interrupted run never over-reports what is stored."""
        k_max = self.cfg.chunk_steps
        report = self.report
        target = report.committed_steps + steps
        scheduled = 0  # steps requested or being written, not yet committed or lost
        pending: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # ref -> (actor, generation, k)
        writes: dict[Future, tuple[int, str]] = {}  # future -> (k, game)
        start = time.perf_counter()

        def submit(i: int) -> None:
            nonlocal scheduled
            k = min(k_max, target - report.committed_steps - scheduled)
            if k > 0 and self.alive[i]:
                ref = self.actors[i].collect.remote(k, self.generation[i])
                pending[ref] = (i, self.generation[i], k)
                scheduled += k

        def reap(block: bool) -> None:
            nonlocal scheduled
            done = [f for f in writes if f.done()]
            if block and not done:
                done = list(wait(list(writes), return_when=FIRST_COMPLETED).done)
            for f in done:
                k, game = writes.pop(f)
                n = f.result()  # a failed write (full disk, permissions) stops the run with its error
                scheduled -= k
                report.committed_steps += n
                report.committed_chunks += 1
                report.steps_per_game[game] = report.steps_per_game.get(game, 0) + n

        with ThreadPoolExecutor(writer_threads, thread_name_prefix="shard-writer") as pool:
            for _ in range(self.cfg.inflight_chunks):
                for i in range(len(self.actors)):
                    submit(i)
            while pending or writes:
                reap(block=not pending)
                if not pending:
                    continue
                [ref], _ = ray.wait(list(pending), num_returns=1)
                i, gen, k = pending.pop(ref)
                try:
                    shard, stats = ray.get(ref)
                except RayTaskError as exc:  # the game itself failed (e.g. a JavaScript error): give it up
                    scheduled -= k
                    report.dropped_chunks += 1
                    if self.alive[i]:
                        self._give_up(i, _cause(exc))
                except ActorUnavailableError:
                    # Ray says the actor is restarting: the chunk is lost whole; ask again shortly.
                    # This is not a failure of its own (the death that caused it was counted).
                    scheduled -= k
                    report.dropped_chunks += 1
                    if gen == self.generation[i]:
                        self.generation[i] += 1
                    time.sleep(0.2)
                    submit(i)
                except RayActorError as exc:
                    # The process died: the chunk is lost whole. Calls made for the same incarnation
                    # fail alike, so only the first bumps the generation.
                    scheduled -= k
                    report.dropped_chunks += 1
                    self.failures_in_a_row[i] += 1
                    if gen == self.generation[i]:
                        self.generation[i] += 1
                    if getattr(exc, "actor_init_failed", False) or self.failures_in_a_row[i] > self.cfg.max_failures_in_a_row:
                        if self.alive[i]:
                            self._give_up(i, _cause(exc))
                    else:
                        log.warning("environment actor %d (%s) died (%s); Ray restarts it", i, self.games[i],
                                    type(exc).__name__)
                        submit(i)
                else:
                    self._on_chunk(i, stats)
                    writes[pool.submit(self.store.commit_shard, shard)] = (k, shard.game)
                    submit(i)
                    if progress:
                        report.seconds = time.perf_counter() - start
                        progress(report)
                if not any(self.alive):
                    raise RuntimeError("every environment failed: " + "; ".join(report.failed_envs.values()))
        report.seconds = time.perf_counter() - start
        return report

    def _on_chunk(self, i: int, stats: dict[str, Any]) -> None:
        self.report.episodes += stats["episodes"]
        self.failures_in_a_row[i] = 0
        self._heard_from(i, stats["process"])

    def _heard_from(self, i: int, process: str) -> bool:
        """An answer from a process we have not heard from before means the actor was restarted (the
        one place restarts are counted, for collection and for play alike); True if it was."""
        restarted = self.process[i] is not None and process != self.process[i]
        if restarted:
            self._restarted(i)
        self.process[i] = process
        return restarted

    def _restarted(self, i: int) -> None:
        """Count a restart of env i; the agent steps its dead incarnation held in an unfinished
        chunk died with it."""
        self.report.restarts += 1
        self._restart_metric.inc(1, tags={"game": self.games[i]})
        self._lost_partial(i)

    def _lost_partial(self, i: int) -> None:
        self.report.lost_steps += self.unstored[i]
        self.unstored[i] = 0

    # --- acting: Stage 4 and evaluation play routed actions through the same actors ------------------
    def live(self) -> list[int]:
        return [i for i, alive in enumerate(self.alive) if alive]

    def observe(self, i: int, tries: int = 120) -> np.ndarray | None:
        """The current frame of env i, waiting for Ray to restart a crashed actor; an env that does
        not come back is given up (None)."""
        for _ in range(tries):
            try:
                frame, process = ray.get(self.actors[i].observe.remote())
            except (ActorUnavailableError, RayActorError):
                time.sleep(0.5)
                continue
            self._heard_from(i, process)
            return frame
        self._give_up(i, "did not come back after a crash")
        return None

    def play(self, moves: dict[int, list[dict]], version: int, chunk_steps: int,
             trace: bool = False) -> dict[int, dict]:
        """Each env i plays its actions `moves[i]` (one Ray call per env, all at once; an episode's
        end stops it). Returns per env: `frame` (the next observation; after a crash the restarted
        env's first one, None if it was given up), `steps`, `finished` episodes ((length, reward)) and
        `lost` (the actor died: its unstored steps are counted in `report.lost_steps`). Full chunks
        the actors wrote are committed here, so the store holds every step counted as committed."""
        refs = {i: self.actors[i].play.remote(actions, version, chunk_steps, trace) for i, actions in moves.items()}
        out = {}
        for i, ref in refs.items():
            try:
                res = ray.get(ref)
            except (ActorUnavailableError, RayActorError):
                # The process died with its partial chunk: those steps never reach the store (dropped
                # whole, as in collection). Ray restarts the actor; it begins a fresh episode.
                self._restarted(i)
                self.process[i] = None  # the next answer comes from a new process, already counted here
                out[i] = {"frame": self.observe(i), "steps": 0, "finished": [], "lost": True, "failed": True}
                continue
            # A restart between two calls: this call already ran in the new process.
            lost = self._heard_from(i, res["process"])
            self.unstored[i] += res["steps"]
            self.report.played_steps += res["steps"]
            self.report.episodes += len(res["finished"])
            if res["chunk"] is not None:
                self._commit_agent(i, res["chunk"])
            out[i] = {"frame": res["frame"], "steps": res["steps"], "finished": res["finished"], "lost": lost,
                      "failed": False, "episode_ended": res["episode_ended"], "trace": res.get("trace")}
        return out

    def flush(self) -> None:
        """Write and commit the agent steps not yet in a full chunk (the end of Stage 4)."""
        for i in self.live():
            try:
                shard = ray.get(self.actors[i].flush.remote())
            except (ActorUnavailableError, RayActorError):
                self._lost_partial(i)
                continue
            if shard is not None:
                self._commit_agent(i, shard)

    def _commit_agent(self, i: int, shard: WrittenShard) -> None:
        self.unstored[i] -= shard.rows
        self.report.committed_steps += self.store.commit_shard(shard)
        self.report.committed_chunks += 1
        self.report.steps_per_game[shard.game] = self.report.steps_per_game.get(shard.game, 0) + shard.rows

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def _cause(exc: BaseException) -> str:
    """The user-facing cause of an actor failure: the original exception's message when there is one."""
    cause = getattr(exc, "cause", None) or exc
    inner = getattr(cause, "cause", None)
    if isinstance(inner, BaseException):
        cause = inner
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
