"""The trajectory store: Parquet shards of TRAJECTORY_SCHEMA under `<run>/data/`.

Each chunk becomes one shard, written whole under its unique chunk id and made visible by a manifest
written after it (ipr_dist/run_layout.py): a shard is either committed whole or invisible, on a local
disk and on an object store alike. Shards are written by the process that played them (an env
actor); whoever counts steps commits them (`commit_shard`), so the count and the store never
disagree. Read by `pyarrow.dataset` and by Ray Data.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ipr_dist.data.schema import TRAJECTORY_SCHEMA, ChunkMeta, chunk_to_table
from ipr_dist.errors import StoreError
from ipr_dist.run_layout import COMMITTED, DATA, FEATURES, RunLayout


@dataclass
class GameSummary:
    game: str
    source: str
    steps: int = 0
    episodes: int = 0
    finished_episodes: int = 0
    failures: int = 0
    reward: float = 0.0


@dataclass(frozen=True)
class WrittenShard:
    """What a writer hands back instead of the data: the shard's name and row count."""
    name: str
    rows: int
    game: str


class TrajectoryStore:
    """Writes and reads the shards of one run (a RunLayout, or a run directory / URI)."""

    def __init__(self, layout: RunLayout | str, compression: str = "zstd"):
        self.layout = layout if isinstance(layout, RunLayout) else RunLayout(layout)
        self.uri = self.layout.uri
        self.fs = self.layout.fs
        self.data_dir = self.layout.path(DATA)
        self.features_dir = self.layout.path(FEATURES)
        self.compression = None if compression == "none" else compression

    # --- writing -------------------------------------------------------------------------------
    def open_for_writing(self) -> int:
        """Create the data directory and delete shards a killed writer left uncommitted; returns how
        many. Only when no writer runs (the start of collection or Stage 4)."""
        self.layout.makedirs(DATA)
        return self.layout.clean_uncommitted(DATA)

    def write_shard(self, arrays: dict, meta: ChunkMeta, extra_metadata: dict[str, str] | None = None) -> WrittenShard:
        """Write one chunk as one shard, not yet visible; `commit_shard` makes it so. `extra_metadata`
        joins the table's metadata (a human recording's player and step times)."""
        table = chunk_to_table(arrays, meta)
        if extra_metadata:
            table = table.replace_schema_metadata({**table.schema.metadata, **extra_metadata})
        name = f"{meta.chunk_id}.parquet"
        if self.layout.exists(DATA, COMMITTED, f"{name}.json"):
            raise FileExistsError(f"shard {name} is already committed: chunk ids must be unique")
        pq.write_table(table, self.layout.path(DATA, name), filesystem=self.fs, compression=self.compression)
        return WrittenShard(name, table.num_rows, meta.game)

    def commit_shard(self, shard: WrittenShard) -> int:
        self.layout.commit(DATA, shard.name, {"rows": shard.rows, "game": shard.game})
        return shard.rows

    def write_chunk(self, arrays: dict, meta: ChunkMeta, extra_metadata: dict[str, str] | None = None) -> int:
        """Write and commit one chunk; returns the number of steps committed."""
        return self.commit_shard(self.write_shard(arrays, meta, extra_metadata))

    # --- reading -------------------------------------------------------------------------------
    def shard_paths(self) -> list[str]:
        """Committed trajectory shards (filesystem paths), sorted."""
        return [self.layout.path(DATA, n) for n in self.layout.committed(DATA)]

    def feature_paths(self) -> list[str]:
        """Committed feature shards, in the order of their trajectory shards."""
        return [self.layout.path(FEATURES, n) for n in self.layout.committed(FEATURES) if n.endswith(".parquet")]

    def dataset(self) -> ds.Dataset:
        """All committed shards as one pyarrow dataset with the trajectory schema."""
        return ds.dataset(self.shard_paths(), schema=TRAJECTORY_SCHEMA, format="parquet", filesystem=self.fs)

    @contextmanager
    def _reading(self, path: str):
        """Turn a damaged shard into one clear error naming it and what to do."""
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            why = str(exc).splitlines()[0]
            name = path.rsplit("/", 1)[-1]
            if path.startswith(self.features_dir + "/"):
                raise StoreError(f"{path}: feature shard is unreadable ({why}); delete it and "
                                 f"{self.layout.display(FEATURES, COMMITTED, name + '.json')} and rerun: it will "
                                 "be extracted again") from None
            raise StoreError(f"{path}: shard is unreadable ({why}); delete its manifest "
                             f"{self.layout.display(DATA, COMMITTED, name + '.json')} and retry") from None

    def read_shard(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One trajectory or feature shard; a damaged one raises StoreError naming it."""
        with self._reading(path):
            return pq.read_table(path, columns=columns, filesystem=self.fs)

    def shard_metadata(self, path: str) -> dict[bytes, bytes]:
        with self._reading(path):
            return pq.read_schema(path, filesystem=self.fs).metadata or {}

    def check_readable(self, paths: list[str]) -> int:
        """Read every shard's footer (cheap); returns the rows, raises StoreError on a damaged shard."""
        total = 0
        for path in paths:
            with self._reading(path):
                total += pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows
        return total

    def count_steps(self) -> int:
        """Committed steps, from the shards' footers (cheap: no column is read)."""
        return self.check_readable(self.shard_paths())

    def key_names(self) -> dict[str, list[str]]:
        """Key names of every game in the store (the order of the `keys` vector), from shard metadata."""
        names: dict[str, list[str]] = {}
        for path in self.shard_paths():
            meta = self.shard_metadata(path)
            chunk = json.loads(meta.get(b"ipr.chunk", b"{}"))
            if chunk.get("game"):
                names.setdefault(chunk["game"], chunk["key_names"])
        return names

    def frame_shape(self) -> tuple[int, ...] | None:
        paths = self.shard_paths()
        if not paths:
            return None
        meta = self.shard_metadata(paths[0])
        return tuple(json.loads(meta[b"ipr.frame_shape"]))

    def summary(self) -> list[GameSummary]:
        """Steps, episodes, finished episodes, failures and total reward per (game, source)."""
        columns = ["game", "source", "episode_id", "terminated", "truncated", "failure", "reward"]
        tables = [self.read_shard(p, columns) for p in self.shard_paths()]
        if not tables:
            return []
        t = pa.concat_tables(tables)
        t = t.append_column("finished", pc.or_(t["terminated"], t["truncated"]))
        agg = t.group_by(["game", "source"]).aggregate(
            [
                ("reward", "count"),
                ("episode_id", "count_distinct"),
                ("finished", "sum"),
                ("failure", "sum"),
                ("reward", "sum"),
            ]
        ).to_pylist()
        out = [
            GameSummary(r["game"], r["source"], r["reward_count"], r["episode_id_count_distinct"],
                        int(r["finished_sum"]), int(r["failure_sum"]), float(r["reward_sum"]))
            for r in agg
        ]
        return sorted(out, key=lambda s: (s.game, s.source))


def open_store(path: RunLayout | str) -> TrajectoryStore:
    """The store of a run (a layout, a run directory or URI, or its `data/` directory); it must exist."""
    if not isinstance(path, RunLayout):
        path = path.rstrip("/")
        if path.endswith(f"/{DATA}") or path == DATA:
            path = path[: -len(DATA)].rstrip("/") or "."
        path = RunLayout(path)
    if not path.exists():
        raise StoreError(f"{path.uri}: no such run directory; pass a run directory such as runs/local")
    store = TrajectoryStore(path)
    if not store.shard_paths():
        raise StoreError(f"{path.uri}: holds no trajectory shards (expected committed shards in "
                         f"{path.display(DATA)}); run `ipr collect` first")
    return store
