"""Placement of the GPU roles: every request checked against the cluster before anything starts, and
placement groups whose waits end in an error naming what is pending.

The Ray part runs a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, token
authentication on) whose CPU nodes advertise GPUs, as Ray allows, in a subprocess of its own (the
other modules share one local Ray instance in this process)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from actors.placement import Offer, Role, check
from ipr_dist.config import load_config
from ipr_dist.errors import ConfigError
from learners.grpo import stage4_roles

from .conftest import ROOT

NODE_8GPU = {"CPU": 96.0, "GPU": 8.0, "memory": 1e12, "node:10.0.0.1": 1.0}


def test_cluster_preset_fits_two_8_gpu_nodes_and_not_one():
    roles = stage4_roles(load_config("configs/cluster.yaml"))
    assert {r.name: r.request.get("GPU", 0) * r.count for r in roles} == {
        "policy servers": 4, "GRPO learners": 4, "world-model scorer": 0.5, "world-model learner": 0.5,
        "env actors": 0}  # the scorer and the online world-model learner share one GPU
    check(roles, Offer([NODE_8GPU, NODE_8GPU, {"CPU": 64.0}]), "Stage 4")
    with pytest.raises(ConfigError) as err:  # 9 GPUs on one 8-GPU node: can never be placed
        check(roles, Offer([NODE_8GPU, {"CPU": 64.0}, {"CPU": 64.0}]), "Stage 4")
    msg = str(err.value)
    assert "\n" not in msg and "grpo.learners" in msg and "policy.servers" in msg and "GPU: 8" in msg, msg


def test_a_bundle_no_node_offers_fails_naming_the_setting_even_when_the_cluster_can_grow():
    cfg = load_config("configs/cluster.yaml", ["policy.num_gpus=16"])
    offer = Offer([{"CPU": 8.0}], node_types={"gpu_worker": {"CPU": 96.0, "GPU": 8.0}})
    with pytest.raises(ConfigError, match=r"policy servers: each asks for \{CPU: 1, GPU: 16\}.*policy.num_gpus"):
        check(stage4_roles(cfg), offer, "Stage 4")
    # The autoscaler may add 8-GPU nodes: the preset itself passes even with no GPU node up yet.
    check(stage4_roles(load_config("configs/cluster.yaml")), offer, "Stage 4")


def test_custom_resources_count_and_cpu_only_roles_check_cpus():
    role = Role("GRPO learners", "grpo.learner_resources", 2, {"CPU": 1, "GPU": 1, "learner_node": 0.01})
    with pytest.raises(ConfigError, match="learner_node"):
        check([role], Offer([{"CPU": 8.0, "GPU": 8.0}]), "Stage 4")
    check([role], Offer([{"CPU": 8.0, "GPU": 8.0, "learner_node": 100.0}]), "Stage 4")
    local = stage4_roles(load_config("configs/smoke.yaml", ["grpo.num_envs=8", "grpo.cpus_per_env=1"]))
    with pytest.raises(ConfigError, match="env actors"):
        check(local, Offer([{"CPU": 2.0}]), "Stage 4")


SCRIPT = textwrap.dedent("""
    import json, time, ray, torch
    from ray.cluster_utils import Cluster
    from actors.placement import Placement, PlacementTimeout, Role, cluster_offer, check
    from ipr_dist.errors import ConfigError
    from learners.distributed import scaling_config, train_role

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=2)   # CPU nodes that advertise GPUs
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, logging_level="error")
    out = {}

    @ray.remote
    class Probe:
        def where(self):
            return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    roles = [Role("GRPO learners", "grpo.learners x grpo.gpus_per_learner", 2, {"CPU": 0.5, "GPU": 1}, pack=True),
             Role("world-model scorer", "world_model.scorer_gpus", 1, {"CPU": 0.5, "GPU": 0.5})]
    placement = Placement(roles, 60, "Stage 4")
    learners = [Probe.options(num_cpus=0.5, num_gpus=1, **placement.options("GRPO learners", r)).remote() for r in range(2)]
    scorer = Probe.options(num_cpus=0.5, num_gpus=0.5, **placement.options("world-model scorer", 0)).remote()
    out["learners"] = ray.get([a.where.remote() for a in learners])
    out["scorer"] = ray.get(scorer.where.remote())

    try:  # a 10-minute wait allowed: the refusal must come from the check, before any waiting
        Placement([Role("policy servers", "policy.servers x policy.num_gpus", 1, {"CPU": 1, "GPU": 4})], 600, "Stage 4")
    except ConfigError as exc:
        out["impossible"] = str(exc)

    try:  # the GPUs are held by the first placement: this one waits, then names what is pending
        Placement([Role("policy servers", "policy.servers x policy.num_gpus", 2, {"CPU": 0.5, "GPU": 1})], 3, "Stage 4")
    except PlacementTimeout as exc:
        out["timeout"] = str(exc)
    placement.remove()

    # A stage's Ray Train workers ask for the GPUs of their config section and get them.
    from ray.train.torch import TorchConfig, TorchTrainer
    import ray.train, tempfile

    seen = tempfile.mkdtemp()

    def loop(config):  # each worker writes what Ray gave it (Ray Train V2 keeps no reported metrics)
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['seen']}/{rank}.json", "w") as f:
            json.dump([str(g) for g in ray.get_gpu_ids()], f)

    role = train_role("PhysCode", "physcode.workers x physcode.gpus_per_worker", 2, 0.5, 1.0, {})
    check([role], cluster_offer(), "physcode")
    # gloo: these GPUs are advertised by CPU nodes, and this torch has no NCCL
    TorchTrainer(loop, train_loop_config={"seen": seen}, scaling_config=scaling_config(role),
                 torch_config=TorchConfig(backend="gloo"), run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp())).fit()
    out["train"] = [json.load(open(f"{seen}/{rank}.json")) for rank in range(2)]
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
""")


def test_gpu_roles_get_their_bundles_impossible_fails_fast_waits_time_out_on_a_multi_node_cluster():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[0][len("RESULT "):])
    (node_a, gpus_a), (node_b, gpus_b) = out["learners"]
    assert node_a == node_b and len(gpus_a) == len(gpus_b) == 1 and gpus_a != gpus_b  # packed, one GPU each
    assert len(out["scorer"][1]) == 1  # a fraction of a GPU is still a GPU id
    message = out["impossible"]  # a ConfigError (not PlacementTimeout): refused before any waiting
    assert "policy servers" in message and "policy.num_gpus" in message and "GPU: 4" in message
    assert "policy servers" in out["timeout"] and "3 s" in out["timeout"] and "ray.placement_timeout_s" in out["timeout"]
    assert [len(gpus) for gpus in out["train"]] == [1, 1]  # each Ray Train worker got the GPU its role asks for


def test_node_types_read_from_the_ray_up_bootstrap_config(tmp_path, ray_local):
    """On a `ray up` cluster the head holds its config: node types with resources let Stage 4 wait for
    the autoscaler; a type whose resources are left to the provider is not held against a request."""
    from actors.placement import cluster_offer

    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text("available_node_types:\n  head: {resources: {CPU: 8}, max_workers: 0}\n"
                    "  gpu_worker: {resources: {CPU: 96, GPU: 8}, max_workers: 4}\n")
    offer = cluster_offer(str(path))
    assert offer.node_types == {"gpu_worker": {"CPU": 96.0, "GPU": 8.0}} and offer.can_grow
    check(stage4_roles(load_config("configs/cluster.yaml")), offer, "Stage 4")
    with pytest.raises(ConfigError, match="GPU: 16"):
        check(stage4_roles(load_config("configs/cluster.yaml", ["policy.num_gpus=16"])), offer, "Stage 4")
    path.write_text("available_node_types:\n  gpu_worker: {resources: {}, max_workers: 4}\n")
    check(stage4_roles(load_config("configs/cluster.yaml", ["policy.num_gpus=16"])), cluster_offer(str(path)), "Stage 4")
