"""Human play recorded into a run's store (paper Sec. 9.2): one session of one person on one game.

Retro and desktop games run server-side in the same environment the fleet uses (`EnvSession`), one
env step per call: a retro game at its native rate (one emulator frame per step at frame_skip 1), a
desktop game at its spec's frame_ms. An HTML game runs in the person's own page (`PageSession`)
under the env's virtual clock and bridge, 16 ms of virtual time per step (60 FPS); the page uploads
what the bridge answered and the server reads it as the env does. Either way frames, actions,
rewards and the unified action type are exactly the fleet's. Steps are kept in memory until a chunk is
full, then written as one shard and committed (source `human`); stopping commits the rest. A
killed server or a closed tab loses at most the unfinished chunk, and the store never holds part of
one. Each step's wall-clock time (ms since the session started) and the player id go into the
chunk's metadata; semantic tags go to data/human_tags/<session>.json, keyed by episode and step, and
are what PhysCode reads as the step's semantic cue y_t.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ipr_dist.data.schema import STEP_ARRAYS, ChunkMeta
from ipr_dist.data.store import TrajectoryStore
from ipr_dist.errors import UserError
from ipr_dist.games.outcome import step_outcome
from ipr_dist.run_layout import DATA

HUMAN_TAGS = f"{DATA}/human_tags"
THUMB_EVERY = 15  # a timeline thumbnail every this many steps (4 a second at 60 FPS)
THUMB_SIZE = 32
MAX_TAG_CHARS = 200
PLAYER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class RecordingError(UserError):
    """A request the recording session cannot honour (unknown key, tag outside the session, ...)."""


class SessionConflict(RecordingError):
    """A request that does not fit the server's state: no such session running, or one already is."""


@dataclass
class Tag:
    episode_id: str
    start: int  # first step, within the episode
    end: int  # last step, inclusive
    text: str


@dataclass
class RecordingSession:
    """One person playing one game: the steps, their commits in chunks, the tags. `EnvSession` steps a
    server-side env; `PageSession` takes steps played in the person's own page."""

    store: TrajectoryStore
    game_info: Any  # GameInfo of the game played
    player: str
    chunk_steps: int = 256
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        if not PLAYER_RE.match(self.player):
            raise RecordingError(f"player id {self.player!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
        self.game = self.game_info.id
        self.keys = list(self.game_info.keys)
        self.episode = 0
        self.steps = 0  # steps recorded in this session
        self.committed_steps = 0
        self.chunks = 0
        self.episodes_ended = 0
        self.tags: list[Tag] = []
        self.seeds: list[int] = []  # each episode's reset seed, in order
        self._rows: list[dict[str, Any]] = []
        self._t_ms: list[int] = []
        self.t = 0  # step within the episode
        self.episode_starts = [0]  # session step at which each episode began
        self.obs: np.ndarray | None = None
        self.info: dict[str, Any] = {}
        self.thumbnails: list[tuple[int, np.ndarray]] = []  # (session step, small frame): the session's timeline

    @property
    def episode_id(self) -> str:
        return f"human-{self.session}-e{self.episode}"

    def new_seed(self) -> int:
        """A fresh reset seed for the next episode (kept in the chunk metadata: a recording can be replayed)."""
        self.seeds.append(int(uuid.uuid4().int % (2**31)))
        return self.seeds[-1]

    def action(self, pressed: list[str], mouse=(0.5, 0.5), buttons=(0, 0, 0), scroll: int = 0) -> dict[str, Any]:
        """The unified action from the page's input: key names held, pointer, buttons, scroll."""
        if not isinstance(pressed, list):
            raise RecordingError("keys must be a list of key names")
        unknown = [k for k in pressed if k not in self.keys]
        if unknown:
            raise RecordingError(f"keys {unknown} are not controls of {self.game} (its keys: {self.keys})")
        mouse = np.clip(np.asarray(mouse, np.float32).reshape(2), 0.0, 1.0)
        buttons = np.asarray(buttons, np.int8).reshape(3).clip(0, 1)
        if int(scroll) not in (-1, 0, 1):
            raise RecordingError("scroll must be -1, 0 or 1")
        keys = np.zeros(len(self.keys), np.int8)
        for k in pressed:
            keys[self.keys.index(k)] = 1
        return {"keys": keys, "mouse": mouse, "mouse_buttons": buttons, "scroll": int(scroll)}

    def _record(self, action: dict[str, Any], obs: np.ndarray, reward: float, terminated: bool, truncated: bool,
                info: dict[str, Any], t_ms: int) -> bool:
        """Keep one played step (its frame is the last observation); commit a full chunk. True when it
        ended the episode (the caller starts the next one)."""
        self._rows.append({
            "frame": self.obs, "next_frame": obs, "keys": action["keys"], "mouse": action["mouse"],
            "mouse_buttons": action["mouse_buttons"], "scroll": action["scroll"], "reward": reward,
            "lives": info.get("lives", -1), "score": info.get("score", np.nan), "terminated": terminated,
            "truncated": truncated, "failure": info.get("failure", False), "episode": self.episode, "step": self.t,
            "policy_version": -1})
        self._t_ms.append(int(t_ms))
        if self.steps % THUMB_EVERY == 0:
            h, w = self.obs.shape[:2]
            ys, xs = np.linspace(0, h - 1, THUMB_SIZE).astype(int), np.linspace(0, w - 1, THUMB_SIZE).astype(int)
            self.thumbnails.append((self.steps, self.obs[ys][:, xs].copy()))
        self.steps += 1
        self.t += 1
        self.obs, self.info = obs, info
        done = bool(terminated or truncated)
        if done:
            self.episodes_ended += 1
            self.episode += 1
            self.episode_starts.append(self.steps)
            self.t = 0
        if len(self._rows) >= self.chunk_steps:
            self._commit()
        return done

    def _shown(self, done: bool) -> dict[str, Any]:
        """What the page shows after a step."""
        return {"step": self.steps, "episode_step": self.t, "episode": self.episode,
                "score": float(self.info.get("score", 0.0)), "lives": int(self.info.get("lives", -1)), "done": done,
                "elapsed_s": round(time.monotonic() - self.started, 2)}

    @property
    def timeline(self) -> str:
        """`frames`: one step per game frame (the game waits for the person: retro, HTML, frame-stepped
        desktop games); `wall`: the game ran on the wall clock and steps were taken when the page asked
        (real-time desktop games), so their spacing is the t_ms; `ipr data preprocess` resamples those."""
        return "frames"

    def close(self) -> None:
        """Release what the session holds (its env); the steps are committed by `stop`."""


    def tag(self, start: int, end: int, text: str) -> Tag:
        """Tag session steps start..end (inclusive, counted from 0 over the whole session) with a text;
        a tag may not cross an episode boundary and must name steps already played."""
        text = " ".join(str(text).split())
        if not text or len(text) > MAX_TAG_CHARS:
            raise RecordingError(f"a tag is 1-{MAX_TAG_CHARS} characters of text")
        if not (0 <= start <= end < self.steps):
            raise RecordingError(f"tag steps {start}-{end} are outside the {self.steps} steps played so far")
        ep_start, ep = self._episode_of(start)
        ep_end, ep2 = self._episode_of(end)
        if ep != ep2:
            raise RecordingError(f"tag steps {start}-{end} cross an episode's end; tag each episode apart")
        tag = Tag(f"human-{self.session}-e{ep}", start - ep_start, end - ep_start, text)
        self.tags.append(tag)
        self._write_tags()
        return tag

    def _episode_of(self, session_step: int) -> tuple[int, int]:
        """(session step at which its episode began, episode number) of a session step."""
        ep = max(i for i, s in enumerate(self.episode_starts) if s <= session_step)
        return self.episode_starts[ep], ep

    def stop(self) -> dict[str, Any]:
        """Commit what is left: an unfinished episode's last step is marked truncated (the person
        stopped), so it counts as a whole episode of human play."""
        if self._rows and not (self._rows[-1]["terminated"] or self._rows[-1]["truncated"]):
            self._rows[-1]["truncated"] = True
            self.episodes_ended += 1
        self._commit()
        return {"session": self.session, "game": self.game, "player": self.player, "steps": self.committed_steps,
                "chunks": self.chunks, "episodes": self.episodes_ended, "tags": len(self.tags)}

    def _commit(self) -> None:
        if not self._rows:
            return
        arrays = {k: np.stack([np.asarray(r[k]) for r in self._rows]).astype(dt) for k, dt in STEP_ARRAYS.items()}
        meta = ChunkMeta(chunk_id=f"human-{self.session}-c{self.chunks:05d}", episode_prefix=f"human-{self.session}",
                         game=self.game_info.id, game_kind=self.game_info.kind, source="human",
                         key_names=tuple(self.keys))
        extra = {"ipr.human": json.dumps({"player": self.player, "session": self.session, "t_ms": self._t_ms,
                                          "reset_seeds": self.seeds, "timeline": self.timeline})}
        self.committed_steps += self.store.write_chunk(arrays, meta, extra)
        self.chunks += 1
        self._rows, self._t_ms = [], []

    def _write_tags(self) -> None:
        self.store.layout.write_json(f"{HUMAN_TAGS}/{self.session}.json", {
            "session": self.session, "game": self.game_info.id, "player": self.player,
            "tags": [t.__dict__ for t in self.tags]})


@dataclass
class EnvSession(RecordingSession):
    """The game runs in a server-side env (the fleet's), one step per call from the page."""

    env: Any = None

    def __post_init__(self):
        super().__post_init__()
        self.obs, self.info = self.env.reset(seed=self.new_seed())

    def step(self, action: dict[str, Any]) -> dict[str, Any]:
        """Play one step; returns what the page shows (score, lives, step, elapsed, done)."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = self._record(action, obs, reward, terminated, truncated, info,
                            int((time.monotonic() - self.started) * 1000))
        if done:
            self.obs, self.info = self.env.reset(seed=self.new_seed())
        return self._shown(done)

    @property
    def timeline(self) -> str:
        realtime = getattr(getattr(self.env, "game_spec", None), "mode", None) == "realtime"
        return "wall" if realtime else "frames"

    def close(self) -> None:
        self.env.close()


@dataclass
class PageSession(RecordingSession):
    """An HTML game played in the person's own page: the page runs the game under the env's virtual
    clock and bridge (clock.js, bridge.js) and uploads what each step's bridge call answered, in
    batches; here the answers are read as the env reads them (`HtmlReadout`) and the reward and the
    episode's end are decided as the env decides them (`step_outcome`). The server decides: when an
    episode ends, the rest of that batch, and any later batch of the ended episode, are dropped, and
    the page is told the next episode's seed."""

    readout: Any = None  # HtmlReadout of the game
    failure_on: str = "game_over"
    max_episode_steps: int = 14_400

    def __post_init__(self):
        super().__post_init__()
        self.new_seed()
        self._begun = False  # the current episode's reset observation has arrived
        self._score, self._lives = 0.0, -1

    def page_seed(self) -> int | None:
        """The current episode's `?seed=` value, as the env would give its page (None: the game is unseeded)."""
        from ipr_dist.games.html_env import page_seed

        return page_seed(self.seeds[-1]) if self.readout.spec.seed_param else None

    def upload(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Take one batch from the page: {episode, first, reset (the reset call's answer, first batch of
        an episode only), steps: [{keys, mouse, buttons, scroll, t_ms, answer}]}. Returns how many
        steps were kept, and, when the episode ended, the next one's number and seed."""
        episode, first, steps = int(batch["episode"]), int(batch["first"]), batch["steps"]
        if not isinstance(steps, list):
            raise RecordingError("steps must be a list")
        if episode < self.episode:  # played after its episode ended: dropped
            return {**self._shown(False), "kept": 0, "dropped": len(steps), "next": self._next()}
        if episode > self.episode:
            raise RecordingError(f"episode {episode} has not begun (the session is at episode {self.episode})")
        if first != self.t:
            raise RecordingError(f"batch starts at step {first} of episode {episode}; the next step is {self.t}")
        if not all(isinstance(item, dict) for item in steps):
            raise RecordingError("each step must be a JSON object")
        # Read the whole batch before keeping any of it: a batch with one bad step is refused whole.
        reset = None
        score, lives = self._score, self._lives
        if not self._begun:
            if not isinstance(batch.get("reset"), dict):
                raise RecordingError(f"episode {episode}'s first batch must carry its reset answer")
            frame, vars = self.readout.observe(batch["reset"])
            reset = (frame, self.readout.info(vars, 0, 0.0))
            score, lives = reset[1]["score"], reset[1]["lives"]
        played = []
        for i, item in enumerate(steps):
            t = self.t + i + 1
            action = self.action(item.get("keys", []), item.get("mouse", (0.5, 0.5)), item.get("buttons", (0, 0, 0)),
                                 int(item.get("scroll", 0)))
            obs, vars = self.readout.observe(item["answer"])
            info = self.readout.info(vars, t, score)
            reward, terminated, truncated = step_outcome(info, score, lives, self.failure_on, t, self.max_episode_steps)
            score, lives = info["score"], info["lives"]
            played.append((action, obs, reward, terminated, truncated, info, int(item.get("t_ms", 0))))
            if terminated or truncated:
                break
        if reset is not None:
            self.obs, self.info = reset
            self._begun = True
        done = False
        for action, obs, reward, terminated, truncated, info, t_ms in played:
            done = self._record(action, obs, reward, terminated, truncated, info, t_ms)
        self._score, self._lives = score, lives
        if done:
            self.new_seed()
            self._begun = False
        kept = len(played)
        return {**self._shown(done), "kept": kept, "dropped": len(steps) - kept, "next": self._next() if done else None}

    def _next(self) -> dict[str, Any]:
        return {"episode": self.episode, "seed": self.page_seed()}


def load_tags(store: TrajectoryStore) -> dict[tuple[str, int], str]:
    """(episode_id, step) -> tag text, from every recording session of the run."""
    layout = store.layout
    out: dict[tuple[str, int], str] = {}
    if not layout.exists(HUMAN_TAGS):
        return out
    for name in sorted(layout.list_names(HUMAN_TAGS)):
        if name.endswith(".json"):
            for t in layout.read_json(HUMAN_TAGS, name).get("tags", []):
                for s in range(int(t["start"]), int(t["end"]) + 1):
                    out[(t["episode_id"], s)] = t["text"]
    return out
