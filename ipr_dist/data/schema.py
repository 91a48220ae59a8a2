"""The one trajectory schema: a row per step (x_t, a_t, r_t, x_{t+1}) of paper Eq. 9.

A chunk is what an environment actor returns: a dict of fixed-shape numpy arrays (STEP_ARRAYS)
for K consecutive steps of one game, plus a few scalars (ChunkMeta). `chunk_to_table` turns it into
an Arrow table with TRAJECTORY_SCHEMA; frames are stored as raw HxWx3 uint8 bytes whose shape is
in the table's metadata, so readers decode them without guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

SOURCES = ("human", "random", "scripted", "agent")

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("game", pa.string(), nullable=False),
        pa.field("game_kind", pa.string(), nullable=False),  # retro | html | desktop
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),  # index of x_t within its episode
        pa.field("frame", pa.binary(), nullable=False),  # x_t
        pa.field("next_frame", pa.binary(), nullable=False),  # x_{t+1}
        pa.field("keys", pa.list_(pa.int8()), nullable=False),  # a_t: multi-hot over the game's keys
        pa.field("mouse", pa.list_(pa.float32(), 2), nullable=False),  # a_t: pointer in [0,1]^2
        pa.field("mouse_buttons", pa.list_(pa.int8(), 3), nullable=False),  # a_t: left, right, hold
        pa.field("scroll", pa.int8(), nullable=False),  # a_t: -1, 0, +1
        pa.field("reward", pa.float32(), nullable=False),  # r_t
        pa.field("lives", pa.int32()),  # after the step; null where the game exposes none
        pa.field("score", pa.float64()),  # after the step; null where the game exposes none
        pa.field("terminated", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("failure", pa.bool_(), nullable=False),  # irreversible failure happened at this step
        pa.field("source", pa.string(), nullable=False),  # human | random | scripted | agent
        pa.field("policy_version", pa.int64(), nullable=False),  # -1 when no learned policy acted
        pa.field("chunk_id", pa.string(), nullable=False),
    ]
)

# Per-step arrays of a chunk, with their dtype; the leading dimension is the chunk length K.
STEP_ARRAYS = {
    "frame": np.uint8,
    "next_frame": np.uint8,
    "keys": np.int8,
    "mouse": np.float32,
    "mouse_buttons": np.int8,
    "scroll": np.int8,
    "reward": np.float32,
    "lives": np.int32,  # -1: unknown
    "score": np.float64,  # NaN: unknown
    "terminated": np.bool_,
    "truncated": np.bool_,
    "failure": np.bool_,
    "episode": np.int64,  # episode counter of the actor incarnation that played the step
    "step": np.int32,
    "policy_version": np.int64,
}


@dataclass(frozen=True)
class ChunkMeta:
    """What is constant over a chunk."""

    chunk_id: str  # unique in the store: fleet, actor, incarnation, chunk counter
    episode_prefix: str  # episode_id = f"{episode_prefix}-e{episode}"
    game: str
    game_kind: str
    source: str
    key_names: tuple[str, ...]


def _binary_column(frames: np.ndarray) -> pa.Array:
    """Fixed-size frames as an Arrow binary array without copying the pixel buffer."""
    n = len(frames)
    flat = np.ascontiguousarray(frames).reshape(n, -1)
    size = flat.shape[1]
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * size).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(flat)])


def _fixed_list(values: np.ndarray, type_: pa.DataType, size: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=type_), size)


def chunk_to_table(arrays: dict[str, np.ndarray], meta: ChunkMeta) -> pa.Table:
    """Arrow table (TRAJECTORY_SCHEMA) of one chunk; the frame shape and key names go in its metadata."""
    n = len(arrays["step"])
    keys = arrays["keys"]
    episode_ids = [f"{meta.episode_prefix}-e{int(e)}" for e in arrays["episode"]]
    lives = arrays["lives"]
    score = arrays["score"]
    columns = {
        "game": pa.array([meta.game] * n, pa.string()),
        "game_kind": pa.array([meta.game_kind] * n, pa.string()),
        "episode_id": pa.array(episode_ids, pa.string()),
        "step": pa.array(arrays["step"], pa.int32()),
        "frame": _binary_column(arrays["frame"]),
        "next_frame": _binary_column(arrays["next_frame"]),
        "keys": pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * keys.shape[1]), pa.array(keys.reshape(-1), pa.int8())
        ),
        "mouse": _fixed_list(arrays["mouse"], pa.float32(), 2),
        "mouse_buttons": _fixed_list(arrays["mouse_buttons"], pa.int8(), 3),
        "scroll": pa.array(arrays["scroll"], pa.int8()),
        "reward": pa.array(arrays["reward"], pa.float32()),
        "lives": pa.array(lives, pa.int32(), mask=lives < 0),
        "score": pa.array(score, pa.float64(), mask=np.isnan(score)),
        "terminated": pa.array(arrays["terminated"], pa.bool_()),
        "truncated": pa.array(arrays["truncated"], pa.bool_()),
        "failure": pa.array(arrays["failure"], pa.bool_()),
        "source": pa.array([meta.source] * n, pa.string()),
        "policy_version": pa.array(arrays["policy_version"], pa.int64()),
        "chunk_id": pa.array([meta.chunk_id] * n, pa.string()),
    }
    metadata = {
        "ipr.frame_shape": json.dumps(list(arrays["frame"].shape[1:])),
        "ipr.chunk": json.dumps({**asdict(meta), "key_names": list(meta.key_names)}),
    }
    return pa.Table.from_pydict(columns, schema=TRAJECTORY_SCHEMA.with_metadata(metadata))


def decode_frames(column: pa.ChunkedArray | pa.Array, frame_shape: tuple[int, ...]) -> np.ndarray:
    """Frames of a `frame` / `next_frame` column as an (N, H, W, 3) uint8 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    size = int(np.prod(frame_shape))
    if len(column) == 0:
        return np.zeros((0, *frame_shape), np.uint8)
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], np.uint8)
    if not np.all(np.diff(offsets) == size):
        raise ValueError(f"frames are not all of shape {frame_shape}")
    return data[offsets[0] : offsets[-1]].reshape(len(column), *frame_shape)
