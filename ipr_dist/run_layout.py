"""The run layout: every path of a run and the filesystem its root lives on.

A run root is a local directory, a shared POSIX mount, or an object-store URI (`s3://bucket/runs`,
`gs://bucket/runs`) reached through pyarrow.fs. Every read and write of a run goes through a
`RunLayout`, so no stage builds paths by hand and every stage works on every filesystem.

Three commit rules, the same on every filesystem:
  - small objects (config, pointers, manifests, reports, plots) appear whole or not at all: written to
    a temporary object (beside them on a local disk, under `<run>/_tmp/` on an object store), then moved
    over them (`os.replace`; a server-side copy). Not one PUT straight to the name: pyarrow closes, and so completes,
    an output stream that an exception or an exiting process leaves, which published an empty
    LATEST.json when Ray stopped an actor mid-write. A temporary a killed writer left is deleted once
    it is an hour old (`prune_temporaries`, at the next `ipr train`);
  - object sets (trajectory and feature shards, cached eval episodes): an object is written under a
    unique name, then a manifest `<dir>/_committed/<name>.json` naming it is written last; readers
    list manifests, never the objects, and a writer killed in between leaves an unnamed object that
    `clean_uncommitted` deletes later;
  - checkpoints: a new version is written under `<name>/v-<time>-<id>/` by the process that holds
    the weights, then the pointer `<name>/LATEST.json` is written last; resume reads the pointer.
    Versions other than the pointer's and the one before it are deleted after each commit.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ipr_dist.errors import StoreError

# The names of a run's parts, relative to its root; only this module joins them to a root.
CONFIG = "config.yaml"
DATA = "data"
FEATURES = "features"
PHYSCODE = "physcode"
WORLD_MODEL = "world_model"
POLICY = "policy"
EVAL = "eval"
BASELINES = "baselines"
TENSORBOARD = "tensorboard"
RAY_TRAIN = "ray_train"
METRICS = "metrics.jsonl"  # local roots: one appended file
METRIC_SEGMENTS = "metrics"  # object stores (no append): one rewritten segment per writing process
COMMITTED = "_committed"
POINTER = "LATEST.json"
TEMPORARY = "_tmp"  # object stores: small objects are written here, then moved to their names
LOCAL_TEMPORARY = re.compile(r"\.[0-9a-f]{8}\.tmp$")  # local roots: `<name>.<id>.tmp` beside the name
# Checkpoints (directories of versions under a pointer) and the files inside them.
PHYSCODE_CHECKPOINT = f"{PHYSCODE}/checkpoint"
ROUTER = f"{PHYSCODE}/router.json"
HELD_OUT = f"{PHYSCODE}/held_out.json"  # the episodes every stage holds out for evaluation
CALIBRATION = f"{PHYSCODE}/calibration"  # a small run of its own (data/, features/)
APPEARANCE_ENCODER = f"{FEATURES}/appearance_encoder"
WORLD_MODEL_CHECKPOINT = f"{WORLD_MODEL}/checkpoint"
RAW_KEYS_CHECKPOINT = f"{WORLD_MODEL}/raw_keys"
WORLD_MODEL_ONLINE = f"{WORLD_MODEL}/online"  # Stage 4's versions of the world model (learned online)
BASE_POLICY = f"{POLICY}/base"
ALIGNED_POLICY = f"{POLICY}/aligned"
GRPO_POLICY = f"{POLICY}/grpo"
EVAL_EPISODES = f"{EVAL}/episodes"


def _filesystem(uri: str, endpoint: str | None, region: str | None) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path on it, is_local) for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri).rstrip("/"), True
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest).rstrip("/"), True
    if scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {}
    if endpoint:  # "http://host:port" -> the host and the scheme pyarrow wants separately
        ep_scheme, _, host = endpoint.rpartition("://")
        options.update(endpoint_override=host, scheme=ep_scheme or "https")
    try:
        if scheme == "s3":
            fs = pafs.S3FileSystem(**options, **({"region": region} if region else {}))
        elif scheme in ("gs", "gcs"):
            fs = pafs.GcsFileSystem(**options)
        else:
            fs, rest = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreError(f"run root {uri}: cannot open its filesystem ({str(exc).splitlines()[0]}); check the URI "
                         "and run.endpoint / run.region") from None
    return fs, rest.rstrip("/"), False


class RunLayout:
    """The paths and filesystem of one run (`uri` is the run directory: `<run.root>/<run.name>`)."""

    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None):
        self.uri, self.endpoint, self.region = uri.rstrip("/"), endpoint, region
        self.fs, self.root, self.local = _filesystem(self.uri, endpoint, region)
        self.name = self.root.rsplit("/", 1)[-1]
        if self.local:
            self.uri = self.root

    @classmethod
    def of(cls, cfg) -> RunLayout:
        """The layout of a config's run."""
        return cls(cfg.run_dir, cfg.run.endpoint, cfg.run.region)

    def sub(self, rel: str) -> RunLayout:
        """A part of the run laid out as a run of its own (the calibration episodes)."""
        return RunLayout(self.display(rel), self.endpoint, self.region)

    def __reduce__(self):  # actors on other nodes rebuild the filesystem from the settings
        return RunLayout, (self.uri, self.endpoint, self.region)

    def __repr__(self) -> str:
        return f"RunLayout({self.uri!r})"

    # --- paths ----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of a part of the run (for pyarrow calls on `self.fs`)."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def display(self, *parts: str) -> str:
        """The same, as a user reads it (a local path or a URI)."""
        return "/".join([self.uri, *(p.strip("/") for p in parts if p)])

    # --- small objects --------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def read_json(self, *parts: str):
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole object in one step (never visible half-written); returns its path."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:  # the temporary apart from every listed directory (TensorBoard reads any name with "tfevents")
            tmp = self.path(TEMPORARY, f"{uuid.uuid4().hex}.tmp")
            with self.fs.open_output_stream(tmp) as f:  # an interruption completes only the temporary object
                f.write(data)
            self.fs.move(tmp, path)  # copied whole by the store, then the temporary one deleted
        return path

    def prune_temporaries(self, min_age_s: float = 3600.0) -> int:
        """Delete temporary objects that writers cut short left behind (a killed process's `write_bytes`),
        older than `min_age_s`; returns how many. A live writer's temporary lives for one small write
        (well under a second), so the age tells a dead one from a concurrent one without a lease."""
        cutoff = time.time() - min_age_s
        if self.local:
            stale = [p for p in Path(self.root).rglob("*.tmp") if LOCAL_TEMPORARY.search(p.name)
                     and p.is_file() and p.stat().st_mtime < cutoff] if os.path.isdir(self.root) else []
            for p in stale:
                p.unlink(missing_ok=True)
            return len(stale)
        path = self.path(TEMPORARY)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return 0
        stale = [i for i in self.fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File
                 and i.mtime is not None and i.mtime.timestamp() < cutoff]
        for info in stale:
            self.fs.delete_file(info.path)
        return len(stale)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, value) -> str:
        return self.write_bytes(rel, json.dumps(value, indent=1).encode())

    def list_names(self, *parts: str) -> list[str]:
        """Names of the entries of a directory (empty when it does not exist)."""
        path = self.path(*parts)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(path)))

    def delete(self, *parts: str) -> None:
        path = self.path(*parts)
        kind = self.fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(path)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def check_writable(self) -> None:
        """Fail at start, in one sentence, when the run root cannot be reached or written."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            self.makedirs()
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except (pa.ArrowException, OSError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(f"run root {self.uri}: cannot write there ({why}); check that it exists, the "
                             "credentials (AWS_ACCESS_KEY_ID / GOOGLE_APPLICATION_CREDENTIALS) and run.endpoint") from None

    # --- object sets: write the object, then its manifest -----------------------------------------
    def commit(self, directory: str, name: str, meta: dict | None = None) -> None:
        """Make `<directory>/<name>` (already written whole) visible to readers."""
        self.write_json(f"{directory}/{COMMITTED}/{name}.json", {"object": name, **(meta or {})})

    def committed(self, directory: str) -> list[str]:
        """Names of the committed objects of a directory, sorted."""
        return sorted(n[:-5] for n in self.list_names(directory, COMMITTED) if n.endswith(".json"))

    def committed_meta(self, directory: str, name: str) -> dict:
        return self.read_json(directory, COMMITTED, f"{name}.json")

    def clean_uncommitted(self, directory: str) -> int:
        """Delete objects no manifest names (a killed writer's leftovers); returns how many. Call it
        only when no writer of the directory is running (at a stage's start)."""
        keep = set(self.committed(directory))
        path = self.path(directory)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return 0
        stale = [i for i in self.fs.get_file_info(pafs.FileSelector(path))
                 if i.type == pafs.FileType.File and i.base_name not in keep]
        for info in stale:  # files only: checkpoints kept beside the set (directories) are not its objects
            self.fs.delete_file(info.path)
        return len(stale)

    # --- checkpoints: a version directory, then the pointer ---------------------------------------
    def checkpoint(self, name: str) -> dict | None:
        """The committed pointer of a checkpoint (`dir`: its version directory, and the meta saved
        with it), or None."""
        try:
            return self.read_json(name, POINTER) if self.is_file(name, POINTER) else None
        except (json.JSONDecodeError, OSError) as exc:
            raise StoreError(f"{self.display(name, POINTER)}: unreadable ({exc}); delete {self.display(name)} to "
                             "train that stage again") from None

    def checkpoint_path(self, name: str) -> str | None:
        """The committed version's directory, as `self.path` gives it (None: no checkpoint)."""
        pointer = self.checkpoint(name)
        return self.path(name, pointer["dir"]) if pointer else None

    def checkpoint_display(self, name: str) -> str:
        pointer = self.checkpoint(name)
        return self.display(name, pointer["dir"]) if pointer else self.display(name)

    @contextmanager
    def new_checkpoint(self, name: str, **meta):
        """Write a checkpoint version into the yielded local directory; on a clean exit it is uploaded
        (object stores) and committed by writing the pointer. An exception commits nothing."""
        version = f"v-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if self.local:
            folder = self.path(name, version)
            os.makedirs(folder)
            try:
                yield Path(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        else:
            folder = tempfile.mkdtemp(prefix="ipr-checkpoint-")
            try:
                yield Path(folder)
                self.upload_dir(folder, f"{name}/{version}")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        previous = self.checkpoint(name)
        self.write_json(f"{name}/{POINTER}", {**meta, "time": time.time(), "dir": version})
        keep = {version, POINTER} | ({previous["dir"]} if previous else set())
        for other in self.list_names(name):  # older versions and a killed writer's leftovers
            if other.startswith("v-") and other not in keep:
                self.delete(name, other)

    @contextmanager
    def open_checkpoint(self, name: str):
        """A local directory holding the committed version (None when there is none): the version
        itself on a local root, a temporary download on an object store (deleted afterwards)."""
        pointer = self.checkpoint(name)
        if pointer is None:
            yield None
            return
        if self.local:
            yield Path(self.path(name, pointer["dir"]))
            return
        folder = tempfile.mkdtemp(prefix="ipr-checkpoint-")
        try:
            self.download_dir(f"{name}/{pointer['dir']}", folder)
            yield Path(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def read_checkpoint_file(self, name: str, file: str) -> bytes | None:
        """One file of the committed version (None: no checkpoint)."""
        pointer = self.checkpoint(name)
        return self.read_bytes(name, pointer["dir"], file) if pointer else None

    def upload_dir(self, local: str, rel: str, whole: bool = False) -> None:
        """Copy a local directory's files under `rel`, each streamed straight to its name: a stream cut
        short leaves a partial file, harmless in a checkpoint version, which only its pointer (written
        after every file) makes readable. `whole`: each file through `write_bytes` instead, for files
        read without a pointer (TensorBoard's events, rewritten at every flush)."""
        base = Path(local)
        for path in sorted(base.rglob("*")):
            if path.is_file():
                name = f"{rel}/{path.relative_to(base).as_posix()}"
                if whole:
                    self.write_bytes(name, path.read_bytes())
                    continue
                with open(path, "rb") as src, self.fs.open_output_stream(self.path(name)) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)

    def download_dir(self, rel: str, local: str) -> None:
        base = self.path(rel)
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type == pafs.FileType.File:
                target = Path(local) / info.path[len(base) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)

    # --- torch objects ----------------------------------------------------------------------------
    def save_torch(self, name: str, file: str, value, **meta) -> None:
        """A single-file checkpoint (torch.save) as a new committed version."""
        import torch

        with self.new_checkpoint(name, **meta) as folder:
            torch.save(value, folder / file)

    def load_torch(self, name: str, file: str):
        """The committed version's file (torch.load on the CPU), or None."""
        import torch

        data = self.read_checkpoint_file(name, file)
        return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class CheckpointRef:
    """A model directory to load: a committed checkpoint of a run, or a local directory the user gave
    (`policy.model_path`). Picklable, so an actor on any node opens it itself."""

    def __init__(self, layout: RunLayout | None, name: str):
        self.layout, self.name = layout, name

    def exists(self) -> bool:
        return self.layout.checkpoint(self.name) is not None if self.layout else Path(self.name).is_dir()

    @contextmanager
    def open(self):
        """The local directory (a temporary download for an object-store run); None if absent."""
        if self.layout is None:
            yield Path(self.name) if Path(self.name).is_dir() else None
            return
        with self.layout.open_checkpoint(self.name) as folder:
            yield folder

    def __str__(self) -> str:
        return self.layout.checkpoint_display(self.name) if self.layout else self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, CheckpointRef) and (other.layout and other.layout.uri, other.name) == \
            (self.layout and self.layout.uri, self.name)

    def __hash__(self) -> int:
        return hash((self.layout and self.layout.uri, self.name))


def as_ref(source: CheckpointRef | str | Path) -> CheckpointRef:
    """A run's checkpoint as it is, or a local checkpoint directory given by path."""
    return source if isinstance(source, CheckpointRef) else CheckpointRef(None, str(source))
