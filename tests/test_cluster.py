"""The cluster path on this machine: the `ray up` YAMLs pass Ray's own cluster-config validation, and
`ray start --head` + `ray job submit --working-dir . -- ipr train configs/smoke.yaml` runs the whole
pipeline as a job (token authentication on) whose metrics appear on the node's metrics endpoint and
whose status the dashboard's job API reports. The job test runs the whole smoke pipeline on its own
Ray instance: marked slow (`pytest -m slow`)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, wait_for

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cluster_yamls_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before it starts a node
    assert any("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_cluster_preset_loads():
    from ipr_dist.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.policy.backend == "vllm" and cfg.ray.address == "auto" and cfg.fleet.num_envs >= 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_embedded_default_starts_its_own_ray_beside_another_cluster():
    """`ray.address: null` means a Ray instance of the command's own, even while another cluster on the
    machine is recorded as the latest (`ray start` and ray.cluster_utils.Cluster write
    /tmp/ray/ray_current_cluster): Ray would join that one and the command die when it stops, as an
    `ipr physcode train` did when two test runs shared this machine and the other's multi-node test ended."""
    script = textwrap.dedent("""
        import subprocess, sys
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            probe = ("import ray; from cluster.runtime import init_ray; from ipr_dist.config import RayConfig; "
                     "init_ray(RayConfig(num_cpus=1)); print('GCS', ray.get_runtime_context().gcs_address)")
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
            print("OTHER", cluster.address)
            print(out.stdout)
            print(out.stderr[-3000:], file=sys.stderr)
        finally:
            cluster.shutdown()
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    other = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("OTHER ")]
    own = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("GCS ")]
    assert len(other) == 1 and len(own) == 1, (out.stdout, out.stderr[-3000:])
    assert own[0] != other[0]


def test_the_embedded_default_starts_no_worker_it_cannot_use():
    """Ray prestarts workers for the first driver with the default runtime env; every task and actor of
    ours carries the setup hook, so none could use them: they cost two process starts, then exit as
    idle, and one such exit aborted inside Ray ("Mutex corrupt", SIGABRT) and put an error line on an
    `ipr eval` console. Before any task, the raylet of the command's own Ray has no worker."""
    probe = textwrap.dedent("""
        import glob, time, ray
        from cluster.runtime import init_ray
        from ipr_dist.config import RayConfig
        init_ray(RayConfig(num_cpus=2))
        time.sleep(4)  # prestarted workers would be up by now; a slower start can only hide them, never fail
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                ppid = int(open(stat).read().rsplit(")", 1)[1].split()[1])
                title = open(stat[:-4] + "cmdline", "rb").read().split(b"\\0")[0].decode()
            except (OSError, ValueError):
                continue
            if ppid == raylet:
                print("CHILD", title)
        print("DONE")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr[-3000:]
    children = [line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("CHILD ")]
    assert any(c.startswith("ray::") for c in children), children  # the raylet's agents: the probe sees its children
    assert "ray::IDLE" not in children, children


@pytest.mark.timeout(1800)
def test_ray_job_submit_runs_ipr_train_with_metrics(tmp_path):
    import shutil
    import tempfile

    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep for its temp dir.
    ray_tmp = Path(tempfile.mkdtemp(prefix="iprray-", dir="/tmp"))
    token = tmp_path / "auth_token"
    token.write_text("ipr-test-" + os.urandom(16).hex())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, metrics = free_port(), free_port(), free_port()
    head = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
                           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                           f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={free_port()}",
                           "--disable-usage-stats",
                           f"--temp-dir={ray_tmp}"], env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stderr[-3000:]
    address = f"http://127.0.0.1:{dash}"
    try:
        ray_cli = [str(BIN / "ray"), "job"]
        submit = [*ray_cli, "submit", f"--address={address}", "--no-wait", "--working-dir", ".", "--",
                  "ipr", "train", "configs/smoke.yaml", "--set", f"run.root={tmp_path / 'runs'}"]
        def submitted():  # the head's job agent comes up some time after `ray start` returns
            sub = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            return None if "No available agent" in sub.stdout + sub.stderr else sub

        # A deadline that only bounds a hang. (The repeat run's failure here was the agent never coming
        # up: its default port 52365 was held by another Ray on the machine; it now gets a free port.)
        sub = wait_for(submitted, "the Ray head's job agent to accept a job", timeout_s=900, every_s=2)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
        job_id = sub.stdout.split("Job '", 1)[1].split("'", 1)[0]
        job = subprocess.Popen([*ray_cli, "logs", f"--address={address}", "--follow", job_id], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: set[str] = set()
        wanted = {"ray_ipr_replay_ratio", "ray_ipr_grpo_loss", "ray_ipr_env_steps"}
        while job.poll() is None and seen != wanted:
            time.sleep(2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            seen |= {name for name in wanted if name in text}
        out, _ = job.communicate(timeout=900)
        status = subprocess.run([*ray_cli, "status", f"--address={address}", job_id], env=env, capture_output=True,
                                text=True, timeout=120)
        assert "succeeded" in (status.stdout + status.stderr).lower(), out[-4000:]  # "Job '...' succeeded"
        assert "imagined / real = 4.000" in out
        assert seen == wanted, f"metrics seen on the metrics endpoint: {seen}"
        req = urllib.request.Request(f"{address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token.read_text()}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            jobs = json.loads(resp.read())
        assert [j["status"] for j in jobs] == ["SUCCEEDED"]
        with pytest.raises(urllib.error.HTTPError) as denied:  # the dashboard wants the token
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
        assert denied.value.code in (401, 403)
    finally:
        stop_cluster(str(ray_tmp), f":{gcs}", str(token))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop_cluster(*marks: str) -> None:
    """Kill this test's Ray processes only (`ray stop` would also stop every other Ray on the machine)."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            # Ray renames its processes (ray::DashboardAgent): match the environment `ray start` passed on too.
            cmd = b" ".join([(proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()])
            text = cmd.replace(b"\0", b" ").decode(errors="replace")
            if any(m in text for m in marks):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cluster_yamls_bring_a_working_node_image(name):
    """The facts `ray up` depends on, read from the files: Ray's pinned image with Python >= 3.11 and
    CUDA 12.x, Ray's file-descriptor limit, a Chromium install that works in the container, the
    project with its vLLM extra, the shared filesystem mounted and passed into the container,
    every node type's CPUs (and GPUs) declared, and the Grafana dashboard installed."""
    import re

    config = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
    image = config["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu12(\d)", image)
    assert match and int(match.group(2)) >= 11, image
    import ray

    assert match.group(1) == ray.__version__  # the cluster runs the Ray the project pins
    assert "--ulimit nofile=65536:65536" in config["docker"]["run_options"]
    assert any("--volume=/mnt/shared:/mnt/shared" in o for o in config["docker"]["run_options"])
    assert any("mount" in c and "/mnt/shared" in c for c in config["initialization_commands"])
    setup = " ".join(config["setup_commands"])
    assert "playwright install --with-deps chromium" in setup and '".[vllm]"' in setup and "|| true" not in setup
    for kind, spec in config["available_node_types"].items():
        assert spec["resources"].get("CPU", 0) > 0, kind
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    head = " ".join(config["head_start_ray_commands"])
    assert "ulimit -n 65536" in head and "cluster/grafana/ipr.json" in head and "metrics/grafana/dashboards" in head
    assert "latest_dlami" not in (ROOT / "cluster" / f"{name}.yaml").read_text()
    from ipr_dist.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.run.root.startswith(("/mnt/shared/", "s3://", "gs://"))  # on storage every node reaches


def test_grafana_dashboard_is_valid_and_names_every_ray_metric_the_code_defines():
    import re

    from ipr_dist.metrics.ray_metrics import METRICS

    dashboard = json.loads((ROOT / "cluster" / "grafana" / "ipr.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    named = set()
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        for target in panel["targets"]:
            named |= set(re.findall(r"ray_(ipr_[a-z_]+?)(?:\(_total\)\?)?\"", target["expr"]))
    assert named == set(METRICS)
    # No Ray metric is made anywhere but through the registry (so the list above is the code's).
    made_elsewhere = [str(p) for d in ("actors", "learners", "serving", "ipr_dist", "cluster") for p in (ROOT / d).rglob("*.py")
                      if re.search(r"metrics\.(Gauge|Counter|Histogram)\(", p.read_text()) and p.name != "ray_metrics.py"]
    assert not made_elsewhere, made_elsewhere
    for name in METRICS:  # and docs/cluster.md lists each with its meaning
        assert f"ray_{name}" in (ROOT / "docs" / "cluster.md").read_text(), name
