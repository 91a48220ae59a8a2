"""Trajectory store: schema, atomic shards, readers (pyarrow.dataset and Ray Data), inspection."""

import numpy as np
import pytest

from ipr_dist.data.schema import STEP_ARRAYS, TRAJECTORY_SCHEMA, ChunkMeta, decode_frames
from ipr_dist.data.store import TrajectoryStore, open_store
from ipr_dist.errors import StoreError

from .conftest import assert_one_line_error, run_ipr


def make_chunk(k=5, chunk="c0", game="G-Test", keys=("A", "B", "LEFT"), shape=(4, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((k,), dtype) for name, dtype in STEP_ARRAYS.items()}
    arrays["frame"] = rng.integers(0, 256, (k, *shape), dtype=np.uint8)
    arrays["next_frame"] = rng.integers(0, 256, (k, *shape), dtype=np.uint8)
    arrays["keys"] = rng.integers(0, 2, (k, len(keys)), dtype=np.int8)
    arrays["mouse"] = rng.random((k, 2), dtype=np.float32)
    arrays["mouse_buttons"] = rng.integers(0, 2, (k, 3), dtype=np.int8)
    arrays["step"] = np.arange(k, dtype=np.int32)
    arrays["reward"] = np.arange(k, dtype=np.float32)
    arrays["lives"] = np.array([3] * (k - 1) + [-1], np.int32)
    arrays["score"] = np.array([np.nan] + [10.0] * (k - 1))
    arrays["terminated"][-1] = True
    arrays["failure"][-1] = True
    arrays["policy_version"][:] = -1
    meta = ChunkMeta(chunk, f"{chunk}-ep", game, "retro", "random", keys)
    return arrays, meta


def test_chunk_round_trips_through_a_shard(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    arrays, meta = make_chunk()
    assert store.write_chunk(arrays, meta) == 5
    table = store.dataset().to_table()
    assert table.schema.remove_metadata() == TRAJECTORY_SCHEMA
    assert np.array_equal(decode_frames(table["frame"], store.frame_shape()), arrays["frame"])
    assert np.array_equal(decode_frames(table["next_frame"], (4, 6, 3)), arrays["next_frame"])
    assert table["keys"].to_pylist() == arrays["keys"].tolist()
    assert table["lives"].to_pylist() == [3, 3, 3, 3, None]  # unknown is null, not a number
    assert table["score"].to_pylist()[0] is None
    assert table["episode_id"].to_pylist() == ["c0-ep-e0"] * 5
    assert store.key_names() == {"G-Test": ["A", "B", "LEFT"]}
    assert store.count_steps() == 5


def test_uncommitted_leftovers_are_discarded_and_never_visible(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    (tmp_path / "run/data/half-written.parquet").write_bytes(b"PAR1 partial")  # a writer killed mid-shard
    store.write_shard(*make_chunk())  # and one killed after its shard, before the commit
    assert store.shard_paths() == [] and store.count_steps() == 0
    assert store.open_for_writing() == 2  # a new writer cleans what a crashed one left
    assert list((tmp_path / "run/data").glob("*.parquet")) == []


def test_chunk_ids_are_never_overwritten(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    store.write_chunk(*make_chunk())
    with pytest.raises(FileExistsError):
        store.write_chunk(*make_chunk(seed=1))
    assert store.count_steps() == 5


def test_summary_groups_by_game_and_source(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    store.write_chunk(*make_chunk(chunk="a"))
    store.write_chunk(*make_chunk(chunk="b", game="H-Test"))
    store.write_chunk(*make_chunk(chunk="c", game="H-Test"))
    rows = {(s.game, s.source): s for s in store.summary()}
    assert rows[("H-Test", "random")].steps == 10
    assert rows[("H-Test", "random")].episodes == 2
    assert rows[("H-Test", "random")].failures == 2
    assert rows[("G-Test", "random")].reward == sum(range(5))


def test_ray_data_reads_the_store(tmp_path, ray_local):
    import ray

    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    for i in range(3):
        store.write_chunk(*make_chunk(chunk=f"c{i}", seed=i))
    store.write_shard(*make_chunk(chunk="uncommitted"))  # written, never committed: Ray Data must not see it
    data = ray.data.read_parquet(store.shard_paths(), filesystem=store.fs)
    assert data.count() == 15
    batch = data.take_batch(15, batch_format="pyarrow")
    assert set(batch["chunk_id"].to_pylist()) == {"c0", "c1", "c2"}


def test_truncated_shard_is_a_clear_error(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    store.write_chunk(*make_chunk())
    shard = store.shard_paths()[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard is unreadable"):
        store.summary()
    proc = run_ipr("data", "inspect", str(tmp_path / "run"))
    assert_one_line_error(proc, shard, "unreadable")


def test_inspect_cli(tmp_path):
    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    store.write_chunk(*make_chunk())
    proc = run_ipr("data", "inspect", str(tmp_path / "run" / "data"))
    assert proc.returncode == 0, proc.stderr
    assert "G-Test" in proc.stdout and "1 shards" in proc.stdout
    for bad in (tmp_path / "nothing-here", tmp_path):
        with pytest.raises(StoreError):
            open_store(str(bad))
    assert_one_line_error(run_ipr("data", "inspect", str(tmp_path / "nothing-here")), "no such run directory")


@pytest.mark.unit
def test_a_shard_caught_mid_write_is_invisible_until_committed(tmp_path, monkeypatch):
    """Observed directly, not inferred: a writer is held halfway through a shard's bytes (half the file
    is on disk), then between the finished shard and its commit; at both points readers see no rows and
    no path, and another writer's shard beside it stays readable; after the commit every row is there."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ipr_dist.data import store as store_module

    halfway, resume = threading.Event(), threading.Event()
    real_write = pq.write_table

    def slow_write(table, where, filesystem=None, **kw):  # the same bytes, in two halves with a pause
        sink = pa.BufferOutputStream()
        real_write(table, sink, **kw)
        data = sink.getvalue().to_pybytes()
        with open(where, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            halfway.set()
            assert resume.wait(60), "the test never let the writer go on"
            f.write(data[len(data) // 2:])

    store = TrajectoryStore(str(tmp_path / "run"))
    store.open_for_writing()
    store.write_chunk(*make_chunk(chunk="done", seed=1))  # a committed neighbour
    monkeypatch.setattr(store_module.pq, "write_table", slow_write)
    written = []
    writer = threading.Thread(target=lambda: written.append(store.write_shard(*make_chunk(k=400, chunk="busy"))))
    writer.start()
    assert halfway.wait(60), "the writer never started"
    partial = tmp_path / "run/data/busy.parquet"
    assert partial.is_file() and partial.stat().st_size > 0  # caught with half a shard on disk
    reader = TrajectoryStore(str(tmp_path / "run"))
    assert [p.rsplit("/", 1)[1] for p in reader.shard_paths()] == ["done.parquet"]
    assert reader.count_steps() == 5 and reader.dataset().count_rows() == 5
    resume.set()
    writer.join(60)
    assert written and partial.stat().st_size > 0
    assert reader.count_steps() == 5  # written whole but not committed: still invisible
    store.commit_shard(written[0])
    assert reader.count_steps() == 405 and reader.dataset().count_rows() == 405


@pytest.mark.unit
def test_a_killed_writers_temporary_is_pruned_once_surely_dead(tmp_path):
    """`write_bytes` on a local root writes `<name>.<id>.tmp` and renames it; a process killed in between
    leaves the temporary. `prune_temporaries` deletes it once an hour old (a live writer's lives for one
    small write), keeps a fresh one, and never touches other files, `.tmp` ones included."""
    import os
    import time

    from ipr_dist.run_layout import RunLayout

    layout = RunLayout(str(tmp_path / "run"))
    layout.write_json("stage/LATEST.json", {"dir": "v-1"})
    dead = tmp_path / "run/stage/LATEST.json.0badc0de.tmp"
    fresh = tmp_path / "run/data/_committed/s.parquet.json.12345678.tmp"
    other = tmp_path / "run/stage/notes.tmp"
    for path in (dead, fresh, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"dir": "v-')
    hour_ago = time.time() - 3700
    for path in (dead, other):
        os.utime(path, (hour_ago, hour_ago))
    assert layout.prune_temporaries() == 1
    assert not dead.exists() and fresh.exists() and other.exists()
    assert layout.read_json("stage/LATEST.json") == {"dir": "v-1"}
    assert RunLayout(str(tmp_path / "nowhere")).prune_temporaries() == 0
