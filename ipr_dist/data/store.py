"""The trajectory store: Parquet shards of TRAJECTORY_SCHEMA under `<run>/data/`.

Each chunk becomes one shard, written to `<run>/.staging/` and then renamed into `data/`, so a
crash never leaves a partial shard visible: a shard is either whole or absent. The store is a
directory or any pyarrow.fs URI (s3://, gs://, ...), read by `pyarrow.dataset` and by Ray Data.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ipr_dist.data.schema import TRAJECTORY_SCHEMA, ChunkMeta, chunk_to_table
from ipr_dist.errors import StoreError

DATA_DIR = "data"
FEATURES_DIR = "features"  # one feature shard per trajectory shard, same name (ipr_dist/data/features.py)
STAGING_DIR = ".staging"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path of a local path or a pyarrow.fs URI."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        fs, path = pafs.LocalFileSystem(), uri
    if isinstance(fs, pafs.LocalFileSystem):
        import os

        path = os.path.abspath(path)
    return fs, path.rstrip("/")


@dataclass
class GameSummary:
    game: str
    source: str
    steps: int = 0
    episodes: int = 0
    finished_episodes: int = 0
    failures: int = 0
    reward: float = 0.0


class TrajectoryStore:
    """Writes and reads the shards of one run directory (`root` is the run directory)."""

    def __init__(self, root: str, compression: str = "zstd"):
        self.uri = root
        self.fs, self.root = resolve(root)
        self.data_dir = f"{self.root}/{DATA_DIR}"
        self.features_dir = f"{self.root}/{FEATURES_DIR}"
        self.staging_dir = f"{self.root}/{STAGING_DIR}"
        self.compression = None if compression == "none" else compression

    # --- writing -------------------------------------------------------------------------------
    def open_for_writing(self) -> None:
        """Create the directories and discard staged files a crashed writer left (never committed)."""
        self.fs.create_dir(self.data_dir, recursive=True)
        self.fs.create_dir(self.staging_dir, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.staging_dir)):
            self.fs.delete_file(info.path)

    def write_chunk(self, arrays: dict, meta: ChunkMeta) -> int:
        """Commit one chunk as one shard; returns the number of steps committed."""
        table = chunk_to_table(arrays, meta)
        name = f"{meta.chunk_id}.parquet"
        final = f"{self.data_dir}/{name}"
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            raise FileExistsError(f"shard {final} already exists: chunk ids must be unique")
        staged = f"{self.staging_dir}/{name}"
        pq.write_table(table, staged, filesystem=self.fs, compression=self.compression)
        self.fs.move(staged, final)
        return table.num_rows

    # --- reading -------------------------------------------------------------------------------
    def _parquet_files(self, directory: str) -> list[str]:
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory))
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    def shard_paths(self) -> list[str]:
        return self._parquet_files(self.data_dir)

    def feature_paths(self) -> list[str]:
        """Committed feature shards, in the order of their trajectory shards."""
        return self._parquet_files(self.features_dir)

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
            if path.startswith(self.features_dir + "/"):
                raise StoreError(f"{path}: feature shard is unreadable ({why}); delete it and rerun: it will be "
                                 "extracted again") from None
            raise StoreError(f"{path}: shard is unreadable ({why}); move it out of {self.data_dir} and retry") from None

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


def open_store(path: str) -> TrajectoryStore:
    """The store of a run directory, or of a `data/` directory given directly; it must exist."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise StoreError(f"{path}: no such directory; pass a run directory such as runs/local")
    if p.endswith(f"/{DATA_DIR}"):
        path = path.rstrip("/")[: -len(DATA_DIR)] or "."
    store = TrajectoryStore(path)
    if not store.shard_paths():
        raise StoreError(f"{path}: holds no trajectory shards (expected {store.data_dir}/*.parquet); run `ipr collect` first")
    return store
