"""Stage 4: prediction-reinforced GRPO with imagination (paper Sec. 10.2 Stage 4, Eq. 21).

The driver states the algorithm; Ray actors do the work. Two loops run side by side:

  acting (a thread): for every environment at once
      f_t = encode(x_t);  B candidates a^(b) ~ pi(. | x_t, g)          (policy server, T=0.7, top-p 0.9)
      R^(b) = imagined return of a^(b) from f_t                          (world-model scorer, Eq. 4)
      execute the best candidate through the router                      (env actors)
      hand the group to the learner; insert the context into the replay  (waits on the limiter)
  learning (this thread): one GRPO update on each real step's groups, and between them the k = 4
      imagination-only updates each real step licenses: contexts sampled from the replay, fresh
      candidates from the current policy, scored by the world model, no environment involved.
      After every `sync_every` updates the learner's weights go to the policy servers with the
      new version.

Every group carries the policy version that sampled it: staleness = learner version - that version
is measured, groups beyond `max_staleness` are dropped (counted), and a version-behind group gets
the clipped ratio. The agent's own steps are stored in the run's store as chunks (source "agent",
with their policy version), written by the env actors and committed by this driver. Checkpoints
(`<run>/policy/grpo/`: weights, optimizer, limiter counters) are written by learner rank 0 as a new
version and committed by its pointer (ipr_dist/run_layout.py), so a kill at any moment resumes from
the last one, on any filesystem.
"""

from __future__ import annotations

import io
import json
import queue
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from actors.placement import Placement, wait
from ipr_dist.algos.grpo import group_noise
from ipr_dist.config import Config
from ipr_dist.errors import StoreError
from ipr_dist.run_layout import GRPO_POLICY, POLICY, RunLayout
from learners.learner_group import Group, LearnerGroup
from learners.replay import Context
from serving.agent import pick

STATE = "grpo_state.pt"
PLOT = "predicted_return.png"


def load_state(cfg: Config) -> dict | None:
    """The committed GRPO checkpoint's counters, or None."""
    return RunLayout.of(cfg).load_torch(GRPO_POLICY, STATE)


class WeightPushes:
    """When Stage 4 sends the learner's weights to the policy servers: every `sync_every` updates, and at
    the next update whenever a server is behind. Servers start from the learner's checkpoint. A proposal
    older than the push before the last one comes from a server Ray restarted (from that checkpoint;
    one sent while the last push ran carries the previous push's version), and a push a server did not
    take (it died during it) leaves it behind too: either makes the next update push again, even when
    every group of that update was too stale to learn from (else the server would keep proposing from
    old weights and every group be dropped)."""

    def __init__(self, sync_every: int, version: int):
        self.sync_every = sync_every
        self.before = self.last = version  # the versions of the push before the last one, and the last
        self.behind = False  # a server is behind: push at the next update
        self.resyncs = 0  # pushes made only because a server was behind

    def proposed(self, version: int) -> None:
        """A server answered with weights of `version`."""
        self.behind |= version < self.before

    def failed(self) -> None:
        """A push did not reach every server."""
        self.behind = True

    def due(self, updates: int, learned: bool) -> bool:
        """Whether to push after this update (`updates` counted after it; `learned`: it was an optimizer
        step, not an update whose groups were all dropped as stale)."""
        scheduled = learned and updates % self.sync_every == 0
        if self.behind and not scheduled:
            self.resyncs += 1
        return scheduled or self.behind

    def pushing(self, version: int) -> None:
        """A push of `version` starts (call before sending; `failed` after it if a server missed it)."""
        self.behind = False
        self.before, self.last = self.last, version


class Timer:
    """Seconds spent per named part of a loop (the benchmark's wall-time shares)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - start
        return now


def collected_shards(store) -> dict[str, list[str]]:
    """The store's trajectory shards per game, the agent's own left out (a shard is one chunk of one game:
    its footer names both)."""
    per_game: dict[str, list[str]] = defaultdict(list)
    for path in store.shard_paths():
        chunk = json.loads(store.shard_metadata(path)[b"ipr.chunk"])
        if chunk["source"] != "agent":
            per_game[chunk["game"]].append(path)
    return per_game


def probe_contexts(cfg: Config, agent, goal, n: int) -> list[Context]:
    """n fixed contexts from the run's stored trajectories, spread evenly over its games and their
    steps (the same ones on every resume), to compare the policy's predicted return over training."""
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.data.store import TrajectoryStore

    if n == 0:
        return []
    store = TrajectoryStore(RunLayout.of(cfg))
    shape = store.frame_shape()
    per_game = collected_shards(store)
    games = sorted(g for g in per_game if g in agent.router.tables)
    out = []
    for gi, game in enumerate(games):
        take = n // len(games) + (gi < n % len(games))
        paths = per_game[game]
        for j in range(take):
            path = paths[(j * len(paths)) // max(take, 1)]
            table = store.read_shard(path, columns=["frame"])
            frame = decode_frames(table["frame"].slice(len(table) // 2, 1), shape)[0]
            f = agent.features(frame[None])[0]
            out.append(Context(frame, f, goal(game), game, -1))
    return out


def stage4_roles(cfg: Config) -> list:
    """Stage 4's actors as placement roles (actors/placement.py): the accelerator roles reserved in
    placement groups (learners packed on one node where they fit, for their all-reduce), the env
    actors only checked (many, cheap, restartable, placed by Ray as they come)."""
    from actors.placement import Role
    from learners.learner_group import ROLE
    from serving import server_bundle

    grpo, policy, wm = cfg.grpo, cfg.policy, cfg.world_model
    envs = grpo.num_envs or cfg.fleet.num_envs
    return [Role("policy servers", "policy.servers x policy.num_gpus / policy.cpus_per_server", policy.servers,
                 server_bundle(cfg)),
            Role(ROLE, "grpo.learners x grpo.gpus_per_learner / cpus_per_learner / learner_resources", grpo.learners,
                 {"CPU": grpo.cpus_per_learner, "GPU": grpo.gpus_per_learner, **grpo.learner_resources}, pack=True),
            Role("world-model scorer", "world_model.scorer_gpus / scorer_cpus", 1,
                 {"CPU": wm.scorer_cpus, "GPU": wm.scorer_gpus}),
            *([Role("world-model learner", "world_model.online_cpus / online_gpus", 1,
                    {"CPU": wm.online_cpus, "GPU": wm.online_gpus})] if wm.online else []),
            Role("env actors", "grpo.num_envs x grpo.cpus_per_env / fleet.resources", envs,
                 {"CPU": grpo.cpus_per_env or cfg.fleet.cpus_per_env, **cfg.fleet.resources}, reserve=False)]


def games_to_learn(cfg: Config, out=sys.stdout) -> set[str] | None:
    """The games whose groups GRPO learns from under `grpo.min_critic_rank` (None: every game): those where
    Stage 2's critic orders held-out real outcomes within the game (`grpo.min_critic_rank_of`) with rho above
    it, measured over at least `grpo.min_critic_rank_episodes` episode ends. Says which and why."""
    from learners.world_model import METRICS_FILE, critic_rank_per_game, interval_text

    threshold = cfg.grpo.min_critic_rank
    if threshold is None:
        return None
    ranks = critic_rank_per_game(cfg)
    if ranks is None:
        layout = RunLayout.of(cfg)
        raise StoreError(f"{layout.uri}: grpo.min_critic_rank reads the critic's held-out ranking per game from "
                         f"{layout.display('world_model', METRICS_FILE)}, which this run lacks (evaluated before it "
                         f"was recorded, or before it ranked actions: grpo.min_critic_rank_of); run "
                         f"`ipr world-model eval {layout.uri}` once, or unset grpo.min_critic_rank")
    fewest = cfg.grpo.min_critic_rank_episodes
    learn = {game for game, (rho, ends, _) in ranks.items() if rho is not None and rho > threshold and ends >= fewest}
    words = "; ".join(f"{game} {'not measured' if rho is None else f'{rho:+.3f}'}{interval_text(interval)}"
                      f" ({ends} episode ends{', too few' if rho is not None and ends < fewest else ''})"
                      for game, (rho, ends, interval) in ranks.items()) or "no held-out step with an observed return"
    what = ("of actions (the state's value held fixed)" if cfg.grpo.min_critic_rank_of == "action"
            else "of imagined returns")
    print(f"GRPO learns on {', '.join(sorted(learn)) or 'no game'}: the critic's held-out ranking {what} against "
          f"real outcomes within each game (above {threshold}, from at least {fewest} episode ends"
          + ("; 95% intervals over held-out episodes" if any(i for _, _, i in ranks.values()) else "")
          + f"): {words}", file=out)
    return learn


class Stage4:
    def __init__(self, cfg: Config, state: dict | None, out=sys.stdout):
        from actors.env_fleet import EnvFleet
        from ipr_dist.data.store import TrajectoryStore
        from learners.align import aligned_policy, goal_of, latest_policy
        from learners.replay import ReplayBuffer
        from serving import make_policy_server
        from serving.agent import Agent

        self.cfg, self.grpo, self.out = cfg, cfg.grpo, out
        self.state = state
        self.learn_on = games_to_learn(cfg, out)  # None: every game
        # The policy is prompted with the goal of the level its critic values (world_model.level), the prompt
        # evaluation gives that level, so what GRPO learns is what `ipr@<level>` plays.
        level = cfg.world_model.level
        self.goal_of = goal_of(cfg, level)
        print(f"GRPO prompts the policy with the {level} goal: \"{self.goal_of(cfg.training_games[0])}\""
              + (" (each game's annotated goal)" if level == "utility" else ""), file=out)
        # Every role checked against the cluster, then the accelerator roles' bundles reserved: a request
        # that can never be placed fails here, one that waits too long fails naming what is pending.
        self.placement = Placement(stage4_roles(cfg), cfg.ray.placement_timeout_s, "Stage 4")
        self.wm_learner = None
        try:
            if cfg.world_model.online:  # the scorer watches the versions the online learner publishes
                from learners.online_world_model import seed_online

                seed_online(cfg)
            # Checks the earlier stages' outputs; builds the first policy server and the scorer in their bundles.
            agent = self.agent = Agent(cfg, placement=self.placement)
            policy = latest_policy(cfg)
            self.servers = [agent.policy] + [
                make_policy_server(cfg, policy, agent.codes, agent.length, **self.placement.options("policy servers", i))
                for i in range(1, cfg.policy.servers)]
            wait([s.version.remote() for s in self.servers] + [agent.scorer.stats.remote()], cfg.ray.placement_timeout_s,
                 "policy servers and world-model scorer")
            self.learners = LearnerGroup(cfg, policy, aligned_policy(cfg), agent.codes, resume=self.state is not None,
                                         placement=self.placement)
            self.wm_learner = self._world_model_learner() if cfg.world_model.online else None
        except BaseException:
            self.placement.remove()
            raise
        self.sync_keys = {f"server-{i}": s for i, s in enumerate(self.servers)}  # each joins at the first push
        self.push_failures = 0
        limiter = self.state["limiter"] if self.state else None
        self.replay = ReplayBuffer.options(num_cpus=0).remote(self.grpo.replay_capacity, self.grpo.imagined_per_real,
                                                              self.grpo.tolerance, limiter, cfg.run.seed)
        fleet_cfg = cfg.fleet.model_copy(update={"num_envs": self.grpo.num_envs or cfg.fleet.num_envs,
                                                 "cpus_per_env": self.grpo.cpus_per_env or cfg.fleet.cpus_per_env})
        self.layout = RunLayout.of(cfg)
        self.store = TrajectoryStore(self.layout, cfg.store.compression)
        self.store.open_for_writing()
        # Seeds apart from collection's (run.seed), so Stage 4 plays episodes of its own.
        self.fleet = EnvFleet(cfg.training_games, cfg.env, fleet_cfg, cfg.run.seed + 1, cfg.games, self.store)
        self.games = self.fleet.game_ids
        for game in set(filter(None, self.games)):
            if game not in agent.router.tables:
                raise StoreError(f"{game}: the router has no table for it (it was not in the PhysCode data); "
                                 "collect it and train PhysCode again, or take it out of fleet.games")
        self.groups: queue.Queue[list[Group]] = queue.Queue(maxsize=4)
        self.real_steps = (limiter or {}).get("inserts", 0)
        self.acting_done = threading.Event()
        self.acting_error: BaseException | None = None
        self.acting_time, self.learning_time = Timer(), Timer()
        self.episodes: list[tuple[int, float]] = []
        self.rounds = 0
        self.dropped_stale = (self.state or {}).get("dropped_stale", 0)
        self.gated_groups = (self.state or {}).get("gated_groups", 0)
        self.pushes = WeightPushes(self.grpo.sync_every, self.learners.version)
        self.probe = probe_contexts(cfg, agent, self.goal_of, self.grpo.probe_contexts)
        if self.grpo.probe_contexts and not self.probe:
            print("no collected trajectories of the router's games in the store, so no probe contexts: the plot "
                  "shows the real steps' imagined return only and no KL from the aligned policy is measured "
                  "(the collection's shards were removed from this run)", file=out)
        self.started_at = (self.state or {}).get("started_at", time.time())  # kept on resume: the plot's start
        self.updates = (self.state or {}).get("updates", 0)
        self.wm_pending: list = []  # the online world-model learner's calls not yet read
        self.wm_lock = threading.Lock()  # appended by the acting thread, read by the learning one
        self.executed: dict[int, np.ndarray] = {}
        # Optimizer steps on real groups (the rest of `updates` are imagined): 1 : k like the contexts.
        self.real_updates = (self.state or {}).get("real_updates", 0)

    def _world_model_learner(self):
        from learners.online_world_model import WorldModelLearner

        wm, tables = self.cfg.world_model, self.agent.router.tables
        allowed = {}
        for game, table in tables.items():  # the codes the router can execute in each game
            mask = np.zeros(self.agent.codes, bool)
            mask[[c for c in table.counts if 0 <= c < self.agent.codes]] = True
            allowed[game] = mask if mask.any() else np.ones(self.agent.codes, bool)
        learner = WorldModelLearner.options(num_cpus=wm.online_cpus, num_gpus=wm.online_gpus,
                                            **self.placement.options("world-model learner", 0)).remote(
            self.cfg.model_dump(), allowed)
        wait([learner.train.remote(0)], self.cfg.ray.placement_timeout_s, "world-model learner")
        return learner

    def learn_world_model(self, live: list[int], played: dict) -> None:
        """The round's real steps to the online world-model learner (features of every step's frame on
        the scorer's device), then its optimizer steps; neither is waited for here. Each environment's
        steps form a stream in time order for the learner's n-step targets: the stream is cut where the
        episode ended and broken where the environment failed."""
        wm = self.cfg.world_model
        survival = wm.level == "survival"
        frames, nexts, codes, rewards, dones, games, streams, cut, broken = [], [], [], [], [], [], [], [], []
        for i in live:
            res = played[i]
            trace = res.get("trace")
            if res["failed"] or not trace or not trace["frames"]:
                broken.append(i)  # the environment starts over: its next steps are another episode's
                continue
            n, first = len(trace["frames"]), len(streams)
            for k in range(n):
                done = bool(trace["failure"][k] if survival else trace["terminated"][k])
                done |= wm.episodic_life and bool(trace["life_lost"][k])
                if k == n - 1 and res["episode_ended"] and not done:
                    continue  # truncated by a time limit: the next frame is another episode's first
                frames.append(trace["frames"][k])
                nexts.append(trace["frames"][k + 1] if k < n - 1 else res["frame"])  # the frame after this step
                codes.append(int(self.executed[i][k]))
                rewards.append((1.0 if survival else float(trace["reward"][k])) * wm.reward_scale)
                dones.append(done)
                games.append(self.games[i])
                streams.append(i)
                cut.append(False)
            if res["episode_ended"]:  # the environment's next steps start another episode
                if len(streams) > first:
                    cut[-1] = True
                else:
                    broken.append(i)
        if not frames:
            if broken:
                with self.wm_lock:
                    self.wm_pending.append(self.wm_learner.add.remote(
                        np.zeros((0, 0)), np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros((0, 0)), [], [], [],
                        broken))
            return
        # One features call for both sides of every transition (the step's frame and the one after it).
        feats = self.agent.features(np.stack(frames + nexts))
        f, f_next = feats[:len(frames)], feats[len(frames):]
        refs = [self.wm_learner.add.remote(f, np.array(codes), np.array(rewards), np.array(dones), f_next, games,
                                           streams, cut, broken),
                self.wm_learner.train.remote(wm.online_updates)]
        with self.wm_lock:
            self.wm_pending += refs

    def log_world_model(self, log, wait: bool = False) -> None:
        """Log what the online learner reported since the last call, one row per finished call (an acting
        round's TD errors, a training round's losses) at the real steps played so far, whether or not GRPO
        updated: with every game gated off the critic still learns. `wait`: for every pending call first."""
        import ray

        with self.wm_lock:
            if wait and self.wm_pending:
                ray.wait(self.wm_pending, num_returns=len(self.wm_pending))
            done = [r for r in self.wm_pending if ray.wait([r], timeout=0)[0]]
            self.wm_pending = [r for r in self.wm_pending if r not in done]
        for metrics in ray.get(done):
            if metrics:
                log.log(self.learners.version, **{k: float(v) for k, v in metrics.items()},
                        **{"grpo/real_steps": self.real_steps})

    # --- acting ---------------------------------------------------------------------------------
    def act(self) -> None:
        try:
            self._act()
        except BaseException as exc:  # surfaced by the learning loop, which then stops
            self.acting_error = exc
        finally:
            self.acting_done.set()

    def _act(self) -> None:
        """Real steps: propose for every live env at once, score, play the best through the fleet
        (which stores the agent's steps and handles crashed actors), hand the groups to the learner."""
        import ray

        agent, grpo, policy = self.agent, self.grpo, self.cfg.policy
        fleet, timer = self.fleet, self.acting_time
        frames = {i: fleet.observe(i) for i in fleet.live()}
        while self.real_steps < grpo.real_steps:
            live = [i for i in fleet.live() if frames.get(i) is not None][:grpo.real_steps - self.real_steps]
            if not live:
                raise RuntimeError("every environment failed: " + "; ".join(fleet.report.failed_envs.values()))
            goals = [self.goal_of(self.games[i]) for i in live]
            batch = np.stack([frames[i] for i in live])
            mark = time.perf_counter()
            server = self.servers[self.rounds % len(self.servers)]
            self.rounds += 1
            props = ray.get(server.propose.remote(list(batch), goals, policy.candidates, policy.temperature,
                                                   policy.top_p))
            self.pushes.proposed(props.version)
            mark = timer.add("propose", mark)
            features = agent.features(batch)
            answers = ray.get([agent.scorer.score.remote(features[j], props.codes[j], members=True)
                               for j in range(len(live))])
            mark = timer.add("score", mark)
            best = {i: pick(answers[j], props.logprobs[j], policy) for j, i in enumerate(live)}
            self.executed = {i: props.codes[j][best[i]] for j, i in enumerate(live)}
            played = fleet.play({i: agent.route(self.games[i], self.executed[i]) for i in live},
                                props.version, self.cfg.fleet.chunk_steps, trace=self.wm_learner is not None)
            if self.wm_learner is not None:
                self.learn_world_model(live, played)
            contexts, groups = [], []
            for j, i in enumerate(live):
                res = played[i]
                frames[i] = res["frame"]
                self.episodes.extend(res["finished"])
                if res["failed"]:
                    continue  # the env died with this call: this step never reaches the learner
                contexts.append(Context(batch[j], features[j], goals[j], self.games[i], props.version))
                groups.append(Group(batch[j], goals[j], props.codes[j], answers[j][:, 0], props.logprobs[j], props.version,
                                    imagined=False, noise=self.noise(answers[j]), game=self.games[i]))
            mark = timer.add("env", mark)
            if groups:
                # The round's groups as optimizer steps of update_batch groups, like the imagined ones, so
                # real and imagined steps keep 1 : k (and a 256-env round is not one backward pass).
                for first in range(0, len(groups), grpo.update_batch):
                    self.groups.put(groups[first:first + grpo.update_batch])
                ray.get(self.replay.insert.remote(contexts))
                self.real_steps += len(contexts)
            timer.add("insert_wait", mark)
        fleet.flush()  # the last, partial chunks

    # --- learning -------------------------------------------------------------------------------
    def imagined_groups(self, n: int) -> list[Group] | None:
        """n contexts from the replay (waiting on the limiter), fresh candidates, imagined returns."""
        import ray

        policy, agent, timer = self.cfg.policy, self.agent, self.learning_time
        mark = time.perf_counter()
        contexts = ray.get(self.replay.sample.remote(n, 1.0))
        mark = timer.add("sample_wait", mark)
        if contexts is None:  # the limiter licensed nothing within the timeout: the caller asks again
            return None
        learned = [c for c in contexts if self.learns(c.game)]
        self.gated_groups += len(contexts) - len(learned)
        if not self.anchoring:  # the others' candidates are not even proposed
            contexts = learned
        if not learned:  # a step of anchors alone is not taken (said in Stage 4's result line)
            return None
        server = self.servers[self.updates % len(self.servers)]
        props = ray.get(server.propose.remote([c.frame for c in contexts], [c.goal for c in contexts],
                                              policy.candidates, policy.temperature, policy.top_p))
        self.pushes.proposed(props.version)
        mark = timer.add("propose", mark)
        scored = [j for j, c in enumerate(contexts) if self.learns(c.game)]  # an anchor needs no returns
        answers = dict(zip(scored, ray.get([agent.scorer.score.remote(contexts[j].features, props.codes[j],
                                                                       members=True) for j in scored])))
        timer.add("score", mark)
        groups = []
        for j, c in enumerate(contexts):
            returns = answers[j][:, 0] if j in answers else np.zeros(len(props.codes[j]), np.float32)
            groups.append(Group(c.frame, c.goal, props.codes[j], returns, props.logprobs[j], props.version,
                                imagined=True, noise=self.noise(answers[j]) if j in answers else 0.0,
                                game=c.game, anchor=j not in answers))
        return groups

    def learns(self, game: str) -> bool:
        """Whether GRPO learns from this game's groups (`grpo.min_critic_rank`)."""
        return self.learn_on is None or game in self.learn_on

    @property
    def anchoring(self) -> bool:
        """Whether the groups of games not learned on hold the policy at pi_0 (`grpo.anchor_unlearned`)."""
        return bool(self.grpo.anchor_unlearned and self.learn_on)

    def noise(self, answer: np.ndarray) -> float:
        """A group's floor of its std from the critic's uncertainty (grpo.advantage_noise_weight times the
        members' disagreement); answer (B, 1 + E) from the scorer."""
        weight = self.grpo.advantage_noise_weight
        return weight * group_noise(answer[:, 1:]) if weight else 0.0

    def update(self, groups: list[Group]) -> dict:
        """One GRPO step on the groups that are fresh enough; then, every `sync_every` (or at once when
        a restarted server answered with old weights), new weights to the servers."""

        timer = self.learning_time
        lag = [self.learners.version - x.version for x in groups]
        fresh = [x for x, s in zip(groups, lag) if s <= self.grpo.max_staleness]
        self.dropped_stale += len(groups) - len(fresh)
        learned = [x for x in fresh if self.learns(x.game)]
        self.gated_groups += len(fresh) - len(learned)
        if not learned:
            fresh = []
        elif self.anchoring:  # the other games' groups only hold the policy at pi_0 there
            fresh = [x if self.learns(x.game) else replace(x, anchor=True) for x in fresh]
        else:
            fresh = learned
        if not fresh:
            if self.pushes.due(self.updates, learned=False):
                self.push_weights()
            return {}
        mark = time.perf_counter()
        metrics = self.learners.update(fresh)
        mark = timer.add("update", mark)
        self.updates += 1
        self.real_updates += not groups[0].imagined
        if self.pushes.due(self.updates, learned=True):
            self.push_weights()
            timer.add("sync", mark)
        metrics["staleness"] = float(np.mean(lag))
        metrics["staleness_max"] = int(max(lag))
        return metrics

    @property
    def imagined_updates(self) -> int:
        return self.updates - self.real_updates

    def push_weights(self) -> None:
        """The learner's weights to every policy server with the new version: a broadcast from learner
        rank 0 (servers new or restarted since they joined join first), or the object store's copy."""
        import ray

        version = self.learners.version
        self.pushes.pushing(version)
        if self.grpo.weight_sync == "object_store":
            weights = self.learners.weights_ref()
            ray.get([s.update_weights.remote(weights, version) for s in self.servers])
            return
        failed = self.learners.push(self.sync_keys, version)
        if failed:  # a server died during the push: it rejoins and gets the weights at the next update
            self.push_failures += len(failed)
            self.pushes.failed()

    def probe_return(self) -> dict:
        """Mean and best predicted return of the current policy's proposals on the fixed probe contexts."""
        import ray

        policy, agent = self.cfg.policy, self.agent
        probe = list(self.probe)
        props = ray.get(self.servers[0].propose.remote([c.frame for c in probe], [c.goal for c in probe],
                                                       policy.candidates, policy.temperature, policy.top_p))
        scores = np.stack(ray.get([agent.scorer.score.remote(c.features, props.codes[j]) for j, c in enumerate(probe)]))
        out = {"grpo/probe_return": float(scores.mean()), "grpo/probe_best_return": float(scores.max(1).mean()),
               "grpo/probe_version": props.version}
        kl = self.learners.drift([c.frame for c in probe], [c.goal for c in probe])
        for game in sorted({c.game for c in probe}):  # the mean of the B proposals on each game's contexts
            out[f"grpo/probe_return/{game}"] = float(np.mean([s for c, s in zip(probe, scores) if c.game == game]))
            out[f"grpo/probe_kl/{game}"] = float(np.mean([k for c, k in zip(probe, kl) if c.game == game]))
        if self.wm_learner is not None:  # the same proposals under Stage 2's critic, which nothing moves
            fixed = np.stack(ray.get([agent.scorer.score_reference.remote(c.features, props.codes[j])
                                      for j, c in enumerate(probe)]))
            out["grpo/probe_return_stage2"] = float(fixed.mean())
            for game in sorted({c.game for c in probe}):
                out[f"grpo/probe_return_stage2/{game}"] = float(np.mean([s for c, s in zip(probe, fixed)
                                                                         if c.game == game]))
        return out

    def checkpoint(self) -> None:
        """Policy, optimizer and counters into `<run>/policy/grpo/`, swapped in whole."""
        import ray

        start = time.perf_counter()
        limiter = ray.get(self.replay.state.remote())
        counters = {"limiter": limiter, "version": self.learners.version, "updates": self.updates,
                    "real_updates": self.real_updates,
                    "dropped_stale": self.dropped_stale, "gated_groups": self.gated_groups, "started_at": self.started_at,
                    "metrics": self.summary(limiter)}
        self.learners.save(self.layout, GRPO_POLICY, {STATE: counters})  # written and committed by rank 0
        if self.wm_learner is not None:  # the world model as learned so far, a version of its own
            ray.get(self.wm_learner.publish.remote())
        self.learning_time.add("checkpoint", start)

    def summary(self, limiter: dict) -> dict:
        real, imagined = limiter["inserts"], limiter["samples"]
        return {"real_steps": real, "imagined_updates": imagined, "ratio": imagined / max(real, 1),
                "real_optimizer_steps": self.real_updates, "imagined_optimizer_steps": self.imagined_updates,
                "optimizer_step_ratio": self.imagined_updates / max(self.real_updates, 1),
                "insert_wait_s": limiter["insert_wait_s"], "sample_wait_s": limiter["sample_wait_s"],
                "version": self.learners.version, "updates": self.updates, "dropped_stale": self.dropped_stale,
                "gated_groups": self.gated_groups}

    def run(self) -> dict:
        import ray
        from tqdm import tqdm

        from ipr_dist.runlog import MetricsLog

        grpo = self.grpo
        log = MetricsLog(self.layout, tensorboard=True)
        bar = tqdm(total=grpo.real_steps, initial=self.real_steps, desc="GRPO real steps", file=self.out,
                   mininterval=2.0, dynamic_ncols=True)
        start = time.perf_counter()
        next_checkpoint = (self.real_steps // grpo.checkpoint_every + 1) * grpo.checkpoint_every
        if self.probe:  # the policy before this run's first update (the aligned one on a fresh run)
            first = self.probe_return()
            log.log(self.learners.version, **first, **{"grpo/real_steps": self.real_steps})
        actor = threading.Thread(target=self.act, name="acting", daemon=True)
        actor.start()
        try:
            while True:
                try:
                    groups = self.groups.get(timeout=0.05)
                except queue.Empty:
                    if self.acting_error:
                        raise self.acting_error
                    owed = ray.get(self.replay.owed.remote())
                    if self.acting_done.is_set() and self.groups.empty():
                        if owed <= 0:
                            break
                        groups = self.imagined_groups(min(owed, grpo.update_batch))  # drain: the ratio ends at k
                    elif owed + grpo.tolerance >= 1 and grpo.imagined_per_real:
                        groups = self.imagined_groups(min(owed + grpo.tolerance, grpo.update_batch))
                    else:
                        continue
                    if not groups:
                        continue
                metrics = self.update(groups)
                if metrics:
                    kind = "imagined" if groups[0].imagined else "real"
                    values = {f"grpo/{k}": v for k, v in metrics.items() if k not in ("version", "groups")}
                    values[f"grpo/imagined_return_{kind}"] = metrics["imagined_return"]
                    values.update(self.progress(start))
                    if self.probe and self.updates % grpo.probe_every == 0:
                        values.update(self.probe_return())
                    log.log(metrics["version"], **values)
                    bar.set_postfix(ratio=f"{values['replay/ratio']:.2f}", version=metrics["version"],
                                    ret=f"{metrics['imagined_return']:.3f}", refresh=False)
                if self.wm_learner is not None:
                    self.log_world_model(log)
                bar.update(self.real_steps - bar.n)
                if self.real_steps >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint += grpo.checkpoint_every
            actor.join()
            if self.acting_error:
                raise self.acting_error
            if self.wm_learner is not None:
                self.log_world_model(log, wait=True)
            self.checkpoint()
            last = {}
            if self.probe:
                last = self.probe_return()
                log.log(self.learners.version, **last, **{"grpo/real_steps": self.real_steps})
        finally:
            bar.close()
            ray.get(self.replay.close.remote())
            log.close()
        limiter = ray.get(self.replay.state.remote())
        fleet = self.fleet.report
        devices = {"learner rank 0": ray.get(self.learners.actors[0].device_stats.remote()),
                   "world-model scorer": ray.get(self.agent.scorer.stats.remote())}
        if self.cfg.policy.backend == "transformers":
            devices["policy server 0"] = ray.get(self.servers[0].stats.remote())
        result = self.summary(limiter) | {"seconds": time.perf_counter() - start, "env_steps": fleet.played_steps,
                                          "stored_agent_steps": fleet.committed_steps,
                                          "lost_agent_steps": fleet.lost_steps, "env_restarts": fleet.restarts,
                                          "acting_seconds": dict(self.acting_time.seconds),
                                          "learning_seconds": dict(self.learning_time.seconds),
                                          "probe_kl": {k.split("/", 2)[2]: v for k, v in last.items()
                                                       if k.startswith("grpo/probe_kl/")},
                                          "devices": {role: {k: v for k, v in stats.items() if k.startswith("system/")}
                                                      for role, stats in devices.items()}}
        return result

    def progress(self, start: float) -> dict:
        import ray

        replay = ray.get(self.replay.stats.remote())
        wall = max(time.perf_counter() - start, 1e-9)
        out = {"replay/ratio": replay["ratio"], "replay/size": replay["size"],
               "replay/insert_wait_s": replay["insert_wait_s"],
               "replay/sample_wait_s": replay["sample_wait_s"], "grpo/real_steps": self.real_steps,
               "grpo/dropped_stale": self.dropped_stale, "grpo/gated_groups": self.gated_groups,
               "env/steps_per_s": self.fleet.report.played_steps / wall,
               "env/restarts": self.fleet.report.restarts, "grpo/weight_resyncs": self.pushes.resyncs,
               "grpo/weight_push_failures": self.push_failures,
               "updates/real_steps": self.real_updates, "updates/imagined_steps": self.imagined_updates,
               "updates/step_ratio": self.imagined_updates / max(self.real_updates, 1)}
        rounds = max(self.rounds, 1)  # acting rounds: one propose and one score call each
        out["time/propose_ms"] = 1000 * self.acting_time.seconds["propose"] / rounds
        out["time/score_ms"] = 1000 * self.acting_time.seconds["score"] / rounds
        if self.episodes:
            lengths, rewards = zip(*self.episodes[-20:])
            out["env/episode_length"], out["env/episode_reward"] = float(np.mean(lengths)), float(np.mean(rewards))
        return out

    def shutdown(self) -> None:
        import ray

        self.fleet.shutdown()
        self.learners.shutdown()
        for actor in [self.replay, self.agent.scorer, *self.servers, *filter(None, [self.wm_learner])]:
            ray.kill(actor)
        self.placement.remove()


def train(cfg: Config, out=sys.stdout) -> dict:
    """Stage 4 on the run directory: GRPO until `grpo.real_steps` real steps, resuming from the last
    checkpoint; prints the real-to-imagined ratio and plots the policy's predicted return."""
    from ipr_dist.runlog import save_config

    given, cfg = cfg, cfg.with_absolute_root()
    state = load_state(cfg)
    if state and state["limiter"]["inserts"] >= cfg.grpo.real_steps:
        print(f"GRPO already finished ({state['limiter']['inserts']} real steps): "
              f"{RunLayout.of(cfg).checkpoint_display(GRPO_POLICY)}", file=out)
        return state["metrics"]
    if state:
        print(f"resuming GRPO from real step {state['limiter']['inserts']} (policy version {state['version']}, "
              f"{state['limiter']['samples']} imagined updates)", file=out)
    stage = Stage4(cfg, state, out)  # checks the run and the settings first
    try:
        save_config(given)  # the run keeps the settings its Stage 4 ran with (`--set` included), as Stages 1-3 do
        result = stage.run()
    finally:
        stage.shutdown()
    plot_predicted_return(cfg, stage.started_at)
    k = cfg.grpo.imagined_per_real
    print(f"GRPO: {result['real_steps']} real steps, {result['imagined_updates']} imagined updates: "
          f"imagined / real = {result['ratio']:.3f} (k = {k}, limiter bound +-{cfg.grpo.tolerance} updates = "
          f"+-{cfg.grpo.tolerance / max(result['real_steps'], 1):.3f}); waits: real steps "
          f"{result['insert_wait_s']:.1f} s, imagined updates {result['sample_wait_s']:.1f} s; "
          f"{result['dropped_stale']} stale groups dropped; "
          + (f"{result['gated_groups']} groups of games not learned on (grpo.min_critic_rank"
             + ("; with no advantage they held the policy at the aligned one there, grpo.anchor_unlearned"
                if stage.anchoring else "") + "); "
             if cfg.grpo.min_critic_rank is not None else "")
          + f"policy version {result['version']}", file=out)
    print(f"optimizer steps: {result['real_optimizer_steps']} on real groups, {result['imagined_optimizer_steps']} on "
          f"imagined ones: imagined / real = {result['optimizer_step_ratio']:.3f} (grpo.update_batch = "
          f"{cfg.grpo.update_batch} groups per step" + ("; an imagined step whose groups were all of games not learned "
                                                        "on is not taken" if cfg.grpo.min_critic_rank is not None else "")
          + ")", file=out)
    if result["probe_kl"]:
        moved = ", ".join(f"{game} {kl:.3f}" + ("" if stage.learns(game) else " (not learned on)")
                          for game, kl in result["probe_kl"].items())
        print("how far the policy moved from the aligned one on the probe contexts (first code's KL at the "
              f"sampling temperature): {moved}", file=out)
    print(f"environments: {result['env_steps']} steps played, {result['stored_agent_steps']} stored as agent "
          f"trajectories, {result['lost_agent_steps']} lost with {result['env_restarts']} crashed actors; "
          f"{result['env_steps'] / result['seconds']:.1f} env steps/s", file=out)
    line = online_critic_line(cfg, stage.started_at) if cfg.world_model.online else None
    if line:
        print(line, file=out)
    print(f"plot of the predicted return: {RunLayout.of(cfg).display(POLICY, PLOT)}", file=out)
    return result


def online_critic_line(cfg: Config, since: float = 0.0) -> str | None:
    """The online critic's TD error on the agent's new steps, before it learns from them, per quarter of the
    rounds since `since`, beside Stage 2's frozen critic on the same steps (the plot's right panel in numbers);
    None without four rounds."""
    from ipr_dist.runlog import read_metrics

    rows = [r for r in read_metrics(RunLayout.of(cfg)) if r["time"] >= since and "world_model/online_td_error" in r]
    if len(rows) < 4:
        return None
    quarters = np.array_split(np.arange(len(rows)), 4)

    def means(key: str) -> str:
        return " / ".join(f"{np.mean([rows[i][key] for i in q]):.3f}" for q in quarters)

    return (f"online critic: TD error on the agent's new steps before learning from them, per quarter of {len(rows)} "
            f"rounds: {means('world_model/online_td_error')}; Stage 2's critic, frozen, on the same steps: "
            f"{means('world_model/online_td_error_stage2')}")


def plot_predicted_return(cfg: Config, since: float = 0.0) -> str | None:
    """From the metrics.jsonl rows written since `since` (the run's first start, so a resumed run's plot
    covers the whole run and an earlier one is left out), over the real steps played: the world-model-predicted
    return of the policy's proposals, on the fixed probe contexts and on the real steps; per training game, also
    under Stage 2's frozen critic where the critic learns online, so the policy's own progress shows apart from the
    critic's; and the online critic's TD error on the agent's steps before it learns from them, beside Stage
    2's frozen critic's on the same steps (and its ranking of Stage 2's held-out returns, where it rehearses
    them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ipr_dist.runlog import read_metrics

    layout = RunLayout.of(cfg)
    names = {"probe": "grpo/probe_return", "probe_best": "grpo/probe_best_return", "real": "grpo/imagined_return_real"}
    points: dict[str, list[tuple[int, float]]] = defaultdict(list)
    fixed: dict[str, list[tuple[int, float]]] = defaultdict(list)  # per game, scored by Stage 2's frozen critic
    online: list[tuple[int, float]] = []
    ongoing: list[tuple[int, float]] = []  # the same without the steps that ended an episode
    frozen: list[tuple[int, float]] = []  # Stage 2's critic, never trained online, on the same steps
    ranked: list[tuple[int, float]] = []  # the online critic's within-game rho on Stage 2's held-out returns
    for row in read_metrics(layout):
        if row["time"] < since:
            continue
        # x: real steps played, which go on whether or not the policy updates (every game gated off: version 0)
        played = row.get("grpo/real_steps", row["step"])
        for kind, key in names.items():
            if key in row:
                points[kind].append((played, row[key]))
        for key in row:
            if key.startswith("grpo/probe_return/"):
                points[key.rsplit("/", 1)[1]].append((played, row[key]))
            elif key.startswith("grpo/probe_return_stage2/"):
                fixed[key.rsplit("/", 1)[1]].append((played, row[key]))
        for series, key in ((online, "online_td_error"), (frozen, "online_td_error_stage2"),
                            (ongoing, "online_td_error_ongoing"), (ranked, "online_rank_heldout_spearman")):
            if f"world_model/{key}" in row:
                series.append((played, row[f"world_model/{key}"]))
    if not points["probe"] and not points["real"]:
        return None
    games = sorted(k for k in points if k not in names)
    panels = 1 + bool(games) + bool(online)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    if points["real"]:
        x, y = map(np.asarray, zip(*sorted(points["real"])))
        w = max(1, len(y) // 20)
        ax.plot(x, y, color="C7", alpha=0.25)
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color="C7",
                label=f"real steps' contexts (moving mean of {w})")
    for kind, label, color in (("probe", "fixed probe contexts: mean of the B proposals", "C0"),
                               ("probe_best", "fixed probe contexts: best of the B proposals", "C1")):
        if points[kind]:
            x, y = map(np.asarray, zip(*sorted(points[kind])))
            ax.plot(x, y, "o-", color=color, label=label)
    ax.set_xlabel("real steps played (agent decisions)")
    ax.set_ylabel("mean predicted return of the B proposals")
    ax.set_title(f"Stage 4 on {cfg.run.name}: world-model-predicted return of the policy's proposals", fontsize=10)
    ax.legend()
    if games:
        right = axes[0, 1]
        for i, game in enumerate(games):
            x, y = map(np.asarray, zip(*sorted(points[game])))
            right.plot(x, y, "o-", ms=3, color=f"C{i}", label=f"{game}: the critic of the moment")
            if fixed[game]:
                x, y = map(np.asarray, zip(*sorted(fixed[game])))
                right.plot(x, y, "--", color=f"C{i}", label=f"{game}: Stage 2's critic, frozen")
        right.set_xlabel("real steps played (agent decisions)")
        right.set_ylabel("mean predicted return of the B proposals")
        right.set_title("fixed probe contexts, per training game", fontsize=10)
        right.legend(fontsize=7)
    if online:
        ax = axes[0, panels - 1]
        x, y = map(np.asarray, zip(*sorted(online)))
        w = max(1, len(y) // 20)
        ax.plot(x, y, color="C3", alpha=0.25)
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color="C3",
                label=f"all new steps, moving mean of {w}")
        if ongoing:
            x, y = map(np.asarray, zip(*sorted(ongoing)))
            ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y[w - 1:],
                    color="C4", label="steps that did not end an episode")
        if frozen:
            x, y = map(np.asarray, zip(*sorted(frozen)))
            ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y[w - 1:],
                    "--", color="C7", label="Stage 2's critic (frozen) on the same steps")
        ax.set_xlabel("real steps played (agent decisions)")
        ax.set_ylabel("critic TD error on the agent's new steps")
        ax.set_title("online world model: TD error before learning from each round", fontsize=10)
        handles = ax.get_legend_handles_labels()
        if ranked:
            twin = ax.twinx()
            x, y = map(np.asarray, zip(*sorted(ranked)))
            twin.plot(x, y, "s-", ms=3, color="C2", label="right axis: critic's rho, Stage 2's held-out returns")
            twin.set_ylabel("within-game Spearman rho with observed returns")
            handles = [a + b for a, b in zip(handles, twin.get_legend_handles_labels())]
        ax.legend(*handles, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    layout.write_bytes(f"{POLICY}/{PLOT}", buf.getvalue())
    return layout.display(POLICY, PLOT)
