"""Runs on object storage, on a multi-node Ray cluster started on this machine.

A local S3-compatible server (moto in server mode, on 127.0.0.1) holds the run root; a Ray cluster of
a head and two worker nodes (`ray start` processes, token authentication on) runs the smoke pipeline
with the env actors and feature extractors pinned to one worker node and the Ray Train workers and
GRPO learners to the other (custom resources). The test proves:
  - `ipr train configs/smoke.yaml --set run.root=s3://...` finishes, and `ipr data inspect`, `ipr eval`
    and `ipr serve` work on the s3:// run;
  - a SIGKILL of an env actor on a worker node and of the driver during collection, then the same
    command: committed steps equal the printed count, no (game, episode, step) twice, no partial
    object visible; a SIGKILL of the driver during GRPO resumes checkpoint and limiter from s3://;
  - nothing of the run is written to any local path (its name appears nowhere on the local disk
    outside Ray's temp dir).
The commit protocol itself (manifests, pointers, cleaning) is checked on a local root and on S3.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from .conftest import IPR, ROOT, assert_one_line_error
from .test_cluster import BIN, free_port, stop_cluster

BUCKET = "ipr-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (in memory) with one bucket; yields its endpoint URL."""
    port = free_port()
    env = {**os.environ, **CREDENTIALS}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield endpoint
    server.kill()
    server.wait()


def s3_fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", access_key="testing",
                             secret_key="testing", region="us-east-1")


# --- the commit protocol, on a local root and on S3 ---------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path, monkeypatch):
    from ipr_dist.run_layout import RunLayout

    if request.param == "local":
        return RunLayout(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3")
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    return RunLayout(f"s3://{BUCKET}/unit/{uuid.uuid4().hex[:8]}", endpoint)


def test_shards_are_visible_only_once_committed_and_leftovers_are_cleaned(layout):
    import numpy as np

    from ipr_dist.data.schema import STEP_ARRAYS, ChunkMeta
    from ipr_dist.data.store import TrajectoryStore

    store = TrajectoryStore(layout)
    store.open_for_writing()
    k = 8
    shapes = {"frame": (k, 4, 4, 3), "next_frame": (k, 4, 4, 3), "keys": (k, 2), "mouse": (k, 2), "mouse_buttons": (k, 3)}
    arrays = {n: np.zeros(shapes.get(n, (k,)), d) for n, d in STEP_ARRAYS.items()}
    arrays["step"] = np.arange(k)

    def meta(i):
        return ChunkMeta(chunk_id=f"f-a0000-g0x-c{i:06d}", episode_prefix="f-a0000-g0x", game="G", game_kind="retro",
                         source="random", key_names=["A", "B"])
    written = store.write_shard(arrays, meta(0))
    assert layout.exists("data", written.name)  # the object is there ...
    assert store.shard_paths() == [] and store.count_steps() == 0  # ... but no reader sees it
    assert store.commit_shard(written) == k
    assert store.count_steps() == k and store.summary()[0].steps == k
    store.write_shard(arrays, meta(1))  # a writer killed before its commit
    with layout.fs.open_output_stream(layout.path("data", "torn.parquet")) as f:
        f.write(b"PAR1 half a shard")  # and one killed mid-write
    assert store.count_steps() == k
    assert store.open_for_writing() == 2  # both leftovers deleted at the next start, the committed shard kept
    assert layout.list_names("data") == ["_committed", written.name]
    with pytest.raises(FileExistsError):
        store.write_shard(arrays, meta(0))


def test_checkpoints_commit_by_pointer_and_keep_the_previous_version(layout):
    from ipr_dist.run_layout import CheckpointRef

    assert layout.checkpoint("stage/ckpt") is None and layout.load_torch("stage/ckpt", "c.pt") is None
    layout.save_torch("stage/ckpt", "c.pt", {"step": 1}, step=1)
    with pytest.raises(RuntimeError):  # a writer that fails halfway commits nothing
        with layout.new_checkpoint("stage/ckpt", step=2) as folder:
            (folder / "c.pt").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert layout.load_torch("stage/ckpt", "c.pt") == {"step": 1} and layout.checkpoint("stage/ckpt")["step"] == 1
    for step in (2, 3):
        layout.save_torch("stage/ckpt", "c.pt", {"step": step}, step=step)
    assert layout.load_torch("stage/ckpt", "c.pt") == {"step": 3}
    versions = [n for n in layout.list_names("stage/ckpt") if n.startswith("v-")]
    assert len(versions) == 2  # the committed one and the one before it; older and failed ones deleted
    with CheckpointRef(layout, "stage/ckpt").open() as folder:
        assert (folder / "c.pt").is_file()


def test_a_write_cut_short_leaves_the_previous_object_whole(s3, monkeypatch):
    """A pointer rewritten on S3 by a process that stops mid-write (an exception, or Ray telling an actor
    to exit: the third repeated suite run of 2026-12-04 found an empty world_model/online/LATEST.json after
    the driver was killed) keeps its previous content: pyarrow completes an output stream it closes on
    the way out of a `with`, so the name is only ever written by a copy of a whole object."""
    from ipr_dist.run_layout import RunLayout

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    layout = RunLayout(f"s3://{BUCKET}/unit/{uuid.uuid4().hex[:8]}", s3)
    with layout.new_checkpoint("model") as folder:
        (folder / "weights.bin").write_bytes(b"1")
    pointer = layout.checkpoint("model")
    real = layout.fs

    class CutShort:  # the store as it is, but every write stops half-way, as an exiting process would
        def __getattr__(self, name):
            return getattr(real, name)

        def open_output_stream(self, path, *args, **kwargs):
            stream = real.open_output_stream(path, *args, **kwargs)

            class Half:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return stream.__exit__(*exc)  # pyarrow's own exit: it closes the stream

                def write(self, data):
                    stream.write(bytes(data)[:len(data) // 2])
                    raise KeyboardInterrupt

            return Half()

    layout.fs = CutShort()
    with pytest.raises(KeyboardInterrupt):
        layout.write_json("model/LATEST.json", {"dir": "v-never-written"})
    layout.fs = real
    assert layout.checkpoint("model") == pointer  # not empty, not half of the new one
    assert layout.list_names("model") == sorted([pointer["dir"], "LATEST.json"])  # the cut write's object lies apart
    assert len(layout.list_names("_tmp")) == 1
    assert layout.prune_temporaries() == 0  # it may still be a live writer's: kept until an hour old
    assert layout.prune_temporaries(min_age_s=0) == 1 and layout.list_names("_tmp") == []
    assert layout.checkpoint("model") == pointer
    with layout.new_checkpoint("model") as folder:
        (folder / "weights.bin").write_bytes(b"2")
    assert layout.read_checkpoint_file("model", "weights.bin") == b"2"


def test_metrics_without_append(layout):
    from ipr_dist.runlog import MetricsLog, read_metrics

    for run in range(2):  # two processes (or two runs of one stage) writing metrics
        log = MetricsLog(layout, tensorboard=True, flush_s=0.0)
        for step in range(3):
            log.log(step, **{"losses/x": float(run * 10 + step)})
        log.close()
    rows = read_metrics(layout)
    assert [r["losses/x"] for r in rows] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert any(n.startswith("events.out.tfevents") for n in layout.list_names("tensorboard"))
    if not layout.local:
        assert not layout.exists("metrics.jsonl") and len(layout.list_names("metrics")) == 2


def test_a_fork_keeps_stages_1_to_3_and_leaves_out_stage_4(layout):
    """`ipr policy fork`'s copy on a local root and on S3: Stage 4's policy, online world model, agent shards,
    IPR episodes, rebuilt report, TensorBoard file and metrics rows from its start are left out, the rest is
    copied with its manifests and pointers; an existing destination and a run with no aligned policy are refused."""
    import numpy as np
    import torch

    from ipr_dist.data.schema import STEP_ARRAYS, ChunkMeta
    from ipr_dist.data.store import TrajectoryStore
    from ipr_dist.errors import StoreError
    from ipr_dist.run_layout import RunLayout
    from ipr_dist.runlog import read_metrics
    from learners.fork import fork

    store = TrajectoryStore(layout)
    store.open_for_writing()
    arrays = {n: np.zeros({"frame": (4, 4, 4, 3), "next_frame": (4, 4, 4, 3), "keys": (4, 2), "mouse": (4, 2),
                           "mouse_buttons": (4, 3)}.get(n, (4,)), d) for n, d in STEP_ARRAYS.items()}
    arrays["step"] = np.arange(4)
    for i, source in enumerate(("random", "agent")):
        store.write_chunk(arrays, ChunkMeta(chunk_id=f"{source}-a0000-g0x-c{i:06d}", episode_prefix=f"{source}-a0000-g0x",
                                            game="G", game_kind="retro", source=source, key_names=["A", "B"]))
    started = 1_800_000_000.0
    for name, file, value in (("policy/aligned", "weights.pt", {"w": 1}), ("policy/grpo", "grpo_state.pt",
                              {"started_at": started}), ("world_model/checkpoint", "checkpoint.pt", {"w": 2}),
                              ("world_model/online", "checkpoint.pt", {"w": 3})):
        with layout.new_checkpoint(name) as folder:
            torch.save(value, folder / file)
    for rel in ("config.yaml", "eval/references.json", "eval/report.md", "eval/survival.png",
                "eval/episodes/random/G/0.json", "eval/episodes/ipr@survival/G/0.json",
                "eval/episodes/ipr-no-grpo@survival/G/0.json", "policy/predicted_return.png",
                f"tensorboard/events.out.tfevents.{int(started) - 60}.host.1.0",
                f"tensorboard/events.out.tfevents.{int(started) + 1}.host.1.1", "physcode/router.json.0123abcd.tmp"):
        layout.write_text(rel, "x")
    rows = "".join(f'{{"time": {started + dt}, "step": 0, "x": {dt}}}\n' for dt in (-2, -1, 0, 5))
    layout.write_text("metrics.jsonl" if layout.local else "metrics/segment.jsonl", rows)

    dst = RunLayout(layout.uri + "-fork", layout.endpoint)
    out = io.StringIO()
    done = fork(layout, dst, out)
    assert done["agent_shards"] == 1 and done["metrics_rows"] == 2 and done["metrics_dropped"] == 2
    assert "1 agent trajectory shards" in out.getvalue() and f"ipr policy grpo {dst.uri}" in out.getvalue()
    assert [p.rsplit("/", 1)[-1] for p in TrajectoryStore(dst).shard_paths()] == ["random-a0000-g0x-c000000.parquet"]
    assert dst.load_torch("policy/aligned", "weights.pt") == {"w": 1}
    assert dst.load_torch("world_model/checkpoint", "checkpoint.pt") == {"w": 2}
    assert not dst.exists("policy", "grpo") and not dst.exists("world_model", "online")
    assert dst.list_names("eval") == ["episodes", "references.json"] and dst.list_names("eval", "episodes") == ["random"]
    assert dst.list_names("policy") == ["aligned"] and dst.is_file("config.yaml") and not dst.exists("physcode")
    assert dst.list_names("tensorboard") == [f"events.out.tfevents.{int(started) - 60}.host.1.0"]
    assert [r["x"] for r in read_metrics(dst)] == [-2, -1]
    assert layout.load_torch("policy/grpo", "grpo_state.pt") == {"started_at": started}  # the source untouched
    before = dst.list_names("data", "_committed")
    with pytest.raises(StoreError, match="already exists"):
        fork(layout, dst, io.StringIO())
    assert dst.list_names("data", "_committed") == before  # nothing written over
    with pytest.raises(StoreError, match="no aligned policy"):
        fork(dst.sub("eval"), RunLayout(layout.uri + "-fork2", layout.endpoint), io.StringIO())


def test_unreachable_or_unwritable_run_roots_fail_in_one_sentence(s3, tmp_path):
    env = {**os.environ, **CREDENTIALS, "PYTHONWARNINGS": "ignore"}
    missing = subprocess.run([*IPR, "collect", "configs/smoke.yaml", "--set", "run.root=s3://no-such-bucket/runs",
                              "--set", f"run.endpoint={s3}"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert_one_line_error(missing, "s3://no-such-bucket/runs/smoke", "cannot write there")
    bad_keys = subprocess.run([*IPR, "collect", "configs/smoke.yaml", "--set", f"run.root=s3://{BUCKET}/runs",
                               "--set", "run.endpoint=http://127.0.0.1:1"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
    assert_one_line_error(bad_keys, f"s3://{BUCKET}/runs/smoke", "cannot write there")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.access(readonly, os.W_OK):
        pytest.skip("running as a user who may write anywhere (root): the read-only case cannot be made here")
    ro = subprocess.run([*IPR, "collect", "configs/smoke.yaml", "--set", f"run.root={readonly}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert_one_line_error(ro, str(readonly), "cannot write there")


# --- the multi-node cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head and two worker nodes on this machine: `env_node` runs the env actors and feature
    extractors, `learner_node` the Ray Train workers and GRPO learners. Yields the driver's env."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="iprray-", dir="/tmp"))  # Ray's socket paths must stay short
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text("ipr-test-" + os.urandom(16).hex())
    env = {**os.environ, **CREDENTIALS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    nodes = [["--head", f"--port={gcs}", "--num-cpus=2", "--resources={\"head_node\": 1}",
              "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
             [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--resources={\"env_node\": 100}"],
             [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--resources={\"learner_node\": 100}"]]
    try:
        for args in nodes:
            # each node's dashboard agent on a port of its own: the default (52365) is taken by any other
            # Ray on the machine, and then the agent dies and no job can be submitted
            proc = subprocess.run([str(BIN / "ray"), "start", *args, f"--dashboard-agent-listen-port={free_port()}",
                                   "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                                  env=env, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"env": env, "address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "ray_tmp": ray_tmp,
               "endpoint": s3}
    finally:
        stop_cluster(str(ray_tmp), f":{gcs}", str(token))
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def pinned_settings(cluster: dict, root: str, name: str) -> list[str]:
    return ["--set", f"run.root={root}", "--set", f"run.name={name}", "--set", f"run.endpoint={cluster['endpoint']}",
            "--set", f"ray.address={cluster['address']}",
            "--set", "fleet.resources={env_node: 1}", "--set", "features.resources={env_node: 1}",
            "--set", "ray.train_resources={learner_node: 1}", "--set", "grpo.learner_resources={learner_node: 1}"]


def ray_pids(cls: str, marker: str) -> list[int]:
    """PIDs of this cluster's Ray worker processes running an actor of class `cls`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::{cls}") and marker in environ:
            out.append(int(proc.name))
    return out


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def committed_rows(fs, run: str) -> list[tuple]:
    """(game, episode, step) of every committed step; every committed shard must read whole."""
    rows = []
    manifests = fs.get_file_info(pafs.FileSelector(f"{run}/data/_committed", allow_not_found=True))
    for info in (m for m in manifests if m.base_name.endswith(".json")):  # as TrajectoryStore lists them
        name = info.base_name[:-len(".json")]
        table = pq.read_table(f"{run}/data/{name}", columns=["game", "episode_id", "step"], filesystem=fs)
        with fs.open_input_stream(info.path) as f:
            assert json.loads(f.read())["rows"] == table.num_rows
        rows += list(zip(*(table[c].to_pylist() for c in ("game", "episode_id", "step"))))
    return rows


def actor_nodes(cluster: dict, cls: str) -> set[str]:
    """The custom resources naming the nodes every (living or dead) actor of class `cls` ran on, from
    the cluster's state API (in a subprocess: the client reads its token settings at import)."""
    script = f"""
import json
from ray.util.state import list_actors, list_nodes
nodes = {{n.node_id: n.resources_total for n in list_nodes(address={cluster['dashboard']!r}, detail=True)}}
actors = list_actors(address={cluster['dashboard']!r}, filters=[("class_name", "=", {cls!r})], detail=True, limit=10000)
print(json.dumps([sorted(nodes[a.node_id]) for a in actors]))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert placed, f"no {cls} actor in the cluster's history"
    return {next(k for k in ("head_node", "env_node", "learner_node") if k in resources) for resources in placed}


@pytest.mark.timeout(2400)
def test_smoke_pipeline_on_s3_across_nodes_survives_kills_and_leaves_no_local_trace(cluster):
    env, endpoint = cluster["env"], cluster["endpoint"]
    name = f"s3run{uuid.uuid4().hex[:10]}"
    root = f"s3://{BUCKET}/runs"
    run = f"{root}/{name}"
    settings = pinned_settings(cluster, root, name)
    fs = s3_fs(endpoint)
    bucket_run = f"{BUCKET}/runs/{name}"
    marker = env["RAY_AUTH_TOKEN_PATH"]  # in the environment of every process of this cluster

    # 1. Collection, killed twice: an env actor on the worker node, then the driver.
    collect = [*IPR, "collect", "configs/smoke.yaml", *settings, "--set", "collect.steps=1536"]
    driver = subprocess.Popen(collect, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: len(committed_rows(fs, bucket_run)) >= 128, 300, "the first committed chunks", driver)
    victim = wait_until(lambda: ray_pids("EnvActor", marker), 60, "an env actor", driver)[0]
    os.kill(victim, signal.SIGKILL)
    before = len(committed_rows(fs, bucket_run))
    wait_until(lambda: len(committed_rows(fs, bucket_run)) >= before + 128, 300, "chunks after the actor's restart",
               driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = committed_rows(fs, bucket_run)
    assert len(set(killed_at)) == len(killed_at)
    again = subprocess.run(collect, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    have = int(re.search(r"store holds (\d+) steps", again.stdout).group(1))
    added = int(re.search(r"^committed (\d+) steps", again.stdout, re.M).group(1))
    rows = committed_rows(fs, bucket_run)
    assert have == len(killed_at) and have + added == len(rows) == 1536  # the store's steps = the printed count
    assert len(set(rows)) == len(rows)  # no (game, episode, step) twice
    leftovers = [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket_run}/data"))
                 if i.type == pafs.FileType.File and i.base_name + ".json" not in
                 {m.base_name for m in fs.get_file_info(pafs.FileSelector(f"{bucket_run}/data/_committed"))}]
    assert leftovers == []  # a killed writer's uncommitted shards were deleted at the restart
    assert actor_nodes(cluster, "EnvActor") == {"env_node"}

    # 2. The whole pipeline, the driver killed during GRPO after its first checkpoint, then resumed.
    train = [*IPR, "train", "configs/smoke.yaml", *settings, "--set", "collect.steps=1536",
             "--set", "grpo.real_steps=48", "--set", "grpo.checkpoint_every=8"]
    driver = subprocess.Popen(train, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grpo_pointer = f"{bucket_run}/policy/grpo/LATEST.json"
    wait_until(lambda: fs.get_file_info(grpo_pointer).type == pafs.FileType.File, 1200, "a GRPO checkpoint", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming GRPO from real step" in done.stdout and "PhysCode already trained" in done.stdout
    assert "imagined / real = 4.000" in done.stdout
    assert actor_nodes(cluster, "FeatureExtractor") == {"env_node"}
    assert actor_nodes(cluster, "RayTrainWorker") == {"learner_node"}
    assert actor_nodes(cluster, "GRPOLearner") == {"learner_node"}
    rows = committed_rows(fs, bucket_run)
    assert len(set(rows)) == len(rows)

    # 3. Inspect, evaluate and serve the s3:// run (the endpoint from the standard variable).
    user_env = {**env, "AWS_ENDPOINT_URL": endpoint}
    inspect = subprocess.run([*IPR, "data", "inspect", run], cwd=ROOT, env=user_env, capture_output=True, text=True,
                             timeout=300)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert f"{run}:" in inspect.stdout and "agent" in inspect.stdout and "total" in inspect.stdout
    ev = subprocess.run([*IPR, "eval", run, "--methods", "random", "ipr", "--episodes", "1"], cwd=ROOT, env=user_env,
                        capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    with fs.open_input_stream(f"{bucket_run}/eval/summary.json") as f:
        summary = json.loads(f.read())
    assert set(summary["cells"]) == {"random", "ipr"}
    port = free_port()
    serve = subprocess.Popen([*IPR, "serve", run, "--port", str(port)], cwd=ROOT,
                             env={**user_env, "IPR_SERVE_TOKEN": "s3cret"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        from PIL import Image
        import numpy as np

        buf = io.BytesIO()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/act?game=Airstriker-Genesis-v0", data=buf.getvalue(),
                                     headers={"Content-Type": "image/png", "Authorization": "Bearer s3cret"})

        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True).start()
        # `ipr serve` prints its address once the application is deployed and answering.
        wait_until(lambda: any(line.startswith(f"serving {run} on") for line in lines), 300,
                   "the served application", serve)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"/act answered {err.code}: {err.read()[:500]}; log: {''.join(lines)[-3000:]}") from None
        assert body["game"] == "Airstriker-Genesis-v0" and body["actions"] and body["candidates"]
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()

    # 4. Nothing of the run on the local disk (outside Ray's temp dir).
    found = []
    skip = ("/proc", "/sys", "/dev", str(cluster["ray_tmp"]), "/tmp/ray")
    for top, dirs, files in os.walk("/"):
        if top.startswith(skip):
            dirs[:] = []
            continue
        found += [os.path.join(top, n) for n in dirs + files if name in n]
    assert found == []
