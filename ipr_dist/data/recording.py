"""Human play recorded into a run's store (paper Sec. 9.2): one session of one person on one game.

The game runs server-side in the same environment the fleet uses (so frames, actions, rewards and
the unified action type are exactly the fleet's), one env step per call: a retro game at its
native rate (one emulator frame per step at frame_skip 1), an HTML game at 60 FPS of virtual time
(frame_ms 16), a desktop game at its spec's frame_ms. Steps are kept in memory until a chunk is
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
from ipr_dist.run_layout import DATA

HUMAN_TAGS = f"{DATA}/human_tags"
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
    """One person playing one game; `step` one env step at a time, `stop` commits what is left."""

    store: TrajectoryStore
    env: Any
    game: str
    player: str
    chunk_steps: int = 256
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        if not PLAYER_RE.match(self.player):
            raise RecordingError(f"player id {self.player!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
        self.info_game = self.env.game
        self.keys = list(self.info_game.keys)
        self.episode = 0
        self.steps = 0  # steps recorded in this session
        self.committed_steps = 0
        self.chunks = 0
        self.episodes_ended = 0
        self.tags: list[Tag] = []
        self._rows: list[dict[str, Any]] = []
        self._t_ms: list[int] = []
        self.obs, self.info = self.env.reset(seed=int(uuid.uuid4().int % (2**31)))
        self.t = 0  # step within the episode
        self.episode_starts = [0]  # session step at which each episode began

    @property
    def episode_id(self) -> str:
        return f"human-{self.session}-e{self.episode}"

    def action(self, pressed: list[str], mouse=(0.5, 0.5), buttons=(0, 0, 0), scroll: int = 0) -> dict[str, Any]:
        """The unified action from the page's input: key names held, pointer, buttons, scroll."""
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

    def step(self, action: dict[str, Any]) -> dict[str, Any]:
        """Play one step; returns what the page shows (frame, score, lives, step, elapsed, done)."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._rows.append({
            "frame": self.obs, "next_frame": obs, "keys": action["keys"], "mouse": action["mouse"],
            "mouse_buttons": action["mouse_buttons"], "scroll": action["scroll"], "reward": reward,
            "lives": info.get("lives", -1), "score": info.get("score", np.nan), "terminated": terminated,
            "truncated": truncated, "failure": info.get("failure", False), "episode": self.episode, "step": self.t,
            "policy_version": -1})
        self._t_ms.append(int((time.monotonic() - self.started) * 1000))
        self.steps += 1
        self.t += 1
        done = terminated or truncated
        if done:
            self.episodes_ended += 1
            self.episode += 1
            self.episode_starts.append(self.steps)
            self.t = 0
            obs, info = self.env.reset(seed=int(uuid.uuid4().int % (2**31)))
        self.obs, self.info = obs, info
        if len(self._rows) >= self.chunk_steps:
            self._commit()
        return {"step": self.steps, "episode_step": self.t, "episode": self.episode, "score": float(info.get("score", 0.0)),
                "lives": int(info.get("lives", -1)), "done": bool(done), "elapsed_s": round(time.monotonic() - self.started, 2)}

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
                         game=self.info_game.id, game_kind=self.info_game.kind, source="human",
                         key_names=tuple(self.keys))
        extra = {"ipr.human": json.dumps({"player": self.player, "session": self.session, "t_ms": self._t_ms})}
        self.committed_steps += self.store.write_chunk(arrays, meta, extra)
        self.chunks += 1
        self._rows, self._t_ms = [], []

    def _write_tags(self) -> None:
        self.store.layout.write_json(f"{HUMAN_TAGS}/{self.session}.json", {
            "session": self.session, "game": self.info_game.id, "player": self.player,
            "tags": [t.__dict__ for t in self.tags]})


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
