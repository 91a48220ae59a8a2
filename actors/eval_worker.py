"""Evaluation episodes: one environment per actor process, whole episodes on fixed seeds.

Methods whose policy is small and local (random, the RLlib baselines) play a whole episode inside
the actor in one call (`play_episode`); methods served by shared actors (the IPR agent, the
prompt-only VLM) are stepped by the driver in lockstep across actors (`begin` / `advance`), so their
proposals are batched across environments. Either way the actor returns one EpisodeRecord.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray

from ipr_dist.config import EnvConfig, GamesConfig
from ipr_dist.models.router import GRID, control_of

log = logging.getLogger(__name__)


@dataclass
class EpisodeRecord:
    game: str
    method: str
    seed_index: int
    seed: int
    length: int = 0  # steps played
    failure: bool = False  # ended by an irreversible failure (Survival's event)
    truncated: bool = False  # reached the evaluation cap alive
    cap: int = 0  # the episode's own step cap (0: the env's max_episode_steps only)
    score: float = 0.0  # in-game score gained: the sum of the game's rewards (Utility's m)
    invalid_actions: int = 0  # prompt-only VLM outputs that did not parse (played as no-ops)
    controls: dict = field(default_factory=dict)  # steps per executed control ("UP+B", "click@2,1")
    seconds: float = 0.0
    frames: list = field(default_factory=list, repr=False)  # subsampled frames, dropped before caching

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("frames")
        return d


class FrameSampler:
    """Keeps between `cap` and 2 x `cap` frames evenly spaced over an episode of unknown length:
    every `stride`-th frame, the stride doubling (and every other kept frame dropped) when full."""

    def __init__(self, cap: int):
        self.cap, self.stride, self.t = cap, 1, 0
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        if self.t % self.stride == 0:
            self.frames.append(np.array(frame, copy=True))  # environments may reuse their frame buffer
            if len(self.frames) == 2 * self.cap:
                self.frames = self.frames[::2]
                self.stride *= 2
        self.t += 1


class EpisodePlayer:
    """The plain, Ray-free core of EvalWorker."""

    def __init__(self, env_cfg: EnvConfig, games_cfg: GamesConfig, frames_per_episode: int):
        import cv2

        cv2.setNumThreads(1)
        self.env_cfg, self.games_cfg, self.cap = env_cfg, games_cfg, frames_per_episode
        self.env, self.game_id = None, None
        self._policies: dict[str, Any] = {}

    def _env_for(self, game: str):
        from ipr_dist.games import make_env
        from ipr_dist.games.catalog import load_annotations

        if self.game_id != game:
            if self.env is not None:
                self.env.close()  # stable-retro: one emulator per process
                self.env = None
            self.env = make_env(game, self.env_cfg, load_annotations(self.games_cfg.annotation_files),
                                self.games_cfg.spec_files)
            self.game_id = game
        return self.env

    def begin(self, game: str, method: str, seed_index: int, seed: int, cap: int = 0) -> np.ndarray:
        env = self._env_for(game)
        self.record = EpisodeRecord(game=game, method=method, seed_index=seed_index, seed=seed, cap=cap)
        self.sampler = FrameSampler(self.cap)
        self.started = time.perf_counter()
        self.obs, self.info = env.reset(seed=seed)
        self.sampler.add(self.obs)
        self.done = False
        return self.obs

    def _step(self, action: dict) -> None:
        self.obs, reward, terminated, truncated, self.info = self.env.step(action)
        r = self.record
        game = self.env.game
        name = control_of(action["keys"], action["mouse"], action["mouse_buttons"], action["scroll"], game.uses_mouse,
                          GRID).name(game.keys)
        r.controls[name] = r.controls.get(name, 0) + 1
        r.length += 1
        r.score += float(reward)
        self.sampler.add(self.obs)
        truncated = truncated or (r.cap > 0 and r.length >= r.cap)
        if terminated or truncated:
            self.done = True
            r.failure = bool(self.info.get("failure", terminated))
            r.truncated = bool(truncated and not r.failure)

    def advance(self, actions: list[dict], invalid: int = 0) -> dict[str, Any]:
        """Play a routed action sequence (stops at the episode's end)."""
        self.record.invalid_actions += invalid
        for action in actions:
            self._step(action)
            if self.done:
                break
        return {"frame": self.obs, "done": self.done, "record": self.finish() if self.done else None,
                "objects": self.info.get("objects")}

    def finish(self) -> EpisodeRecord:
        r = self.record
        r.seconds = time.perf_counter() - self.started
        idx = np.unique(np.linspace(0, len(self.sampler.frames) - 1, min(self.cap, len(self.sampler.frames)))
                        .round().astype(int))
        r.frames = [self.sampler.frames[i] for i in idx]
        return r

    def play_episode(self, game: str, method: str, seed_index: int, seed: int, checkpoint=None,
                     cap: int = 0) -> EpisodeRecord:
        """A whole episode of a local policy: uniform random controls, or a greedy RLlib baseline."""
        from ipr_dist.games.actions import RandomActions
        from ipr_dist.games.discrete import action_menu

        self.begin(game, method, seed_index, seed, cap)
        if checkpoint is None:
            policy = RandomActions(self.env.game.keys, self.env.game.uses_mouse, seed)
            act = lambda: policy(self.obs, self.info)
        else:
            from learners.baselines import GreedyPolicy

            if checkpoint not in self._policies:
                self._policies[checkpoint] = GreedyPolicy(checkpoint)
            greedy, menu = self._policies[checkpoint], action_menu(self.env.game)
            act = lambda: menu[greedy(self.obs)][1]
        while not self.done:
            self._step(act())
        return self.finish()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


@ray.remote(max_restarts=-1, max_task_retries=0)
class EvalWorker:
    def __init__(self, *args):
        import torch

        torch.set_num_threads(1)
        self.player = EpisodePlayer(*args)

    def _guarded(self, fn, *args):
        from ipr_dist.errors import EnvironmentCrashed

        try:
            return fn(*args)
        except EnvironmentCrashed as exc:
            # A dead browser or emulator cannot be reused: end the process so Ray restarts the actor;
            # the driver plays the episode again from its seed.
            log.error("%s; restarting the evaluation actor", exc)
            os._exit(1)

    def pid(self) -> int:
        return os.getpid()

    def begin(self, *args) -> np.ndarray:
        return self._guarded(self.player.begin, *args)

    def advance(self, actions: list[dict], invalid: int = 0) -> dict:
        return self._guarded(self.player.advance, actions, invalid)

    def play_episode(self, *args) -> EpisodeRecord:
        return self._guarded(self.player.play_episode, *args)
