"""The GRPO learner group with M = 2 (whole replicas, and FSDP shards) against one learner.

The same groups give the same loss, the same gradient norm and the same weights after each AdamW
step whether one learner computes them or two split them (gloo on CPU); an idle FSDP learner pads
with a zero-weight group; a saved group, replicated or sharded, resumes with its version and optimizer state.
"""

import numpy as np
import pytest

from ipr_dist.config import load_config
from ipr_dist.models.policy import PhysCodePolicy
from ipr_dist.models.tiny_qwen3vl import build_tiny
from learners.learner_group import Group, LearnerGroup

K, B, L = 16, 4, 3


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    base = build_tiny(tmp_path_factory.mktemp("vlm") / "base", hidden=32)
    path = base.parent / "aligned"
    PhysCodePolicy(base, codes=K).save(path)
    return path


def groups(n: int, seed: int) -> list[Group]:
    rng = np.random.default_rng(seed)
    return [Group(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), f"goal {i}", rng.integers(0, K, (B, L)),
                  rng.normal(size=B).astype(np.float32), np.zeros(B, np.float32), 0, imagined=True)
            for i in range(n)]


def config(learners: int, fsdp: bool):
    return load_config("configs/smoke.yaml", [f"grpo.learners={learners}", f"grpo.fsdp={str(fsdp).lower()}",
                                              "grpo.lr=0.01", "grpo.cpus_per_learner=0.25"])


def train(aligned, learners: int, fsdp: bool, batches: list[list[Group]], resume_from=None):
    path = resume_from or aligned
    group = LearnerGroup(config(learners, fsdp), path, str(aligned), K, resume=resume_from is not None)
    try:
        import ray

        steps = [group.update(b) for b in batches]
        return steps, ray.get(group.weights_ref()), group
    except BaseException:
        group.shutdown()
        raise


def assert_same(a: dict, b: dict, tol: float = 1e-3):
    """Weights equal up to a tenth of one step (lr 0.01): AdamW divides by sqrt(v), which turns the
    float rounding of near-zero gradient entries (summed in another order) into up to ~lr/30."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < tol, worst


def test_two_learners_replicated_or_sharded_step_like_one(ray_local, aligned, tmp_path):
    # 3 groups (shares of 2 and 1), then 1 group (the second learner idles: zero grads, or an FSDP pad)
    batches = [groups(3, 0), groups(1, 1), groups(2, 2)]
    one, w1, g1 = train(aligned, 1, False, batches)
    g1.shutdown()
    start = PhysCodePolicy(aligned, K).state()
    assert max(float((w1[k] - start[k]).abs().max()) for k in start) > 1e-3  # the steps moved the policy
    for fsdp in (False, True):
        two, w2, g2 = train(aligned, 2, fsdp, batches)
        for a, b in zip(one, two):
            assert a["version"] == b["version"] and a["groups"] == b["groups"]
            for k in ("loss", "kl", "policy_gradient", "grad_norm"):
                assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (fsdp, k, a[k], b[k])
        assert_same(w1, w2)
        import ray

        held = ray.get([a.held_elements.remote() for a in g2.actors])
        full = sum(v.numel() for v in start.values() if v.is_floating_point())
        if fsdp:  # each learner holds about half of the policy
            assert sum(held) == pytest.approx(full, rel=0.01) and max(held) < 0.6 * full, (held, full)
        else:
            assert held == [full, full]
        # Save the group (replicated: rank 0's full state; sharded: gathered), resume it in new learners:
        # same version, and one more step gives the same weights as the group that kept running (so
        # AdamW's moments came back too).
        from ipr_dist.run_layout import CheckpointRef, RunLayout

        run = RunLayout(str(tmp_path / f"run-{fsdp}"))
        g2.save(run, "policy/grpo")  # written and committed by rank 0
        more = groups(2, 3)
        g2.update(more)
        kept = ray.get(g2.weights_ref())
        g2.shutdown()
        _, resumed, g3 = train(aligned, 2, fsdp, [more], resume_from=CheckpointRef(run, "policy/grpo"))
        assert g3.version == len(batches) + 1
        g3.shutdown()
        assert_same(kept, resumed)


def test_micro_batched_update_equals_the_full_batch_update(ray_local, aligned):
    """grpo.micro_batch: gradients accumulated over passes of 1 or 2 groups give the same step as one
    pass over all 5 groups (loss, gradient norm, weights after AdamW), with 1 learner, 2 replicas and 2
    FSDP shards (which reduce-scatter once, after the last pass)."""
    batch = groups(5, 7)
    full, w_full, g = train(aligned, 1, False, [batch])
    g.shutdown()
    for learners, micro, fsdp in ((1, 1, False), (1, 2, False), (2, 1, False), (2, 2, True)):
        cfg = config(learners, fsdp).model_copy()
        cfg.grpo.micro_batch = micro
        group = LearnerGroup(cfg, aligned, str(aligned), K, resume=False)
        try:
            import ray

            step = group.update(batch)
            weights = ray.get(group.weights_ref())
        finally:
            group.shutdown()
        for k in ("loss", "kl", "policy_gradient", "grad_norm", "imagined_return"):
            assert abs(step[k] - full[0][k]) <= 1e-5 * max(1.0, abs(full[0][k])), (learners, micro, fsdp, k, step[k])
        assert_same(w_full, weights, tol=1e-5 if learners == 1 else 1e-3)


def test_broadcast_reaches_every_server_and_a_killed_server_rejoins(ray_local, aligned):
    """Weight sync by a gloo broadcast from learner rank 0: both servers end with the learner's weights
    and the new version, their proposals' log-probabilities change; a SIGKILLed server is restarted by
    Ray, rejoins its group at the next push and gets those weights too."""
    import os
    import signal

    import ray

    from serving.transformers_backend import TransformersPolicyServer

    group = LearnerGroup(config(1, False), aligned, str(aligned), K, resume=False)
    servers = {f"server-{i}": TransformersPolicyServer.options(num_cpus=0.25, max_restarts=-1, max_task_retries=-1)
               .remote(str(aligned), K, L) for i in range(2)}
    try:
        frame = groups(1, 0)[0].frame
        before = ray.get(servers["server-0"].propose.remote([frame], ["goal"], 4, 0.0))
        for version in (1, 2):
            group.update(groups(2, version))
            assert group.push(servers, group.version) == {}
        learner = ray.get(group.weights_ref())
        for server in servers.values():
            assert ray.get(server.version.remote()) == group.version == 2
            assert_same(learner, ray.get(server.weights.remote()), tol=1e-7)
        after = ray.get(servers["server-0"].propose.remote([frame], ["goal"], 4, 0.0))
        assert after.version == 2 and abs(float(after.logprobs[0, 0]) - float(before.logprobs[0, 0])) > 1e-6

        pid = ray.get(servers["server-1"].pid.remote())
        os.kill(pid, signal.SIGKILL)
        group.update(groups(2, 3))
        failed = group.push(servers, group.version)  # the dead server cannot take it, or rejoins at once
        if failed:
            assert list(failed) == ["server-1"], failed
            assert group.push(servers, group.version) == {}
        assert ray.get(servers["server-1"].pid.remote()) != pid  # Ray restarted it
        assert ray.get(servers["server-1"].version.remote()) == 3
        assert_same(ray.get(group.weights_ref()), ray.get(servers["server-1"].weights.remote()), tol=1e-7)
    finally:
        group.shutdown()
        for server in servers.values():
            ray.kill(server)


@pytest.mark.unit
def test_push_schedule_pushes_on_schedule_and_again_when_a_server_is_behind():
    """WeightPushes (Stage 4's push decisions), by events: a push every sync_every updates; a proposal
    from a server behind the push before the last makes the next update push off schedule (counted),
    also when that update's groups were all too stale to learn from; a proposal carrying the previous
    push's version (sent while the last push ran) does not; a failed push makes the next update push."""
    from learners.grpo import WeightPushes

    s = WeightPushes(sync_every=2, version=0)
    assert [s.due(u, learned=True) for u in (1, 2, 3)] == [False, True, False]
    for version in (2, 4):  # two scheduled pushes: the servers hold 4, the push before it was 2
        s.pushing(version)
    s.proposed(2)  # answered while the push of 4 ran: not behind
    s.proposed(4)
    assert not s.due(5, learned=True) and not s.due(5, learned=False) and s.resyncs == 0
    s.proposed(0)  # Ray restarted a server from the checkpoint of version 0
    assert s.due(5, learned=True) and s.resyncs == 1  # pushed off schedule, counted
    s.pushing(5)
    assert not s.due(7, learned=True) and s.resyncs == 1
    s.proposed(0)  # behind again, and this time every group of the update is dropped as stale
    assert s.due(7, learned=False) and s.resyncs == 2
    s.pushing(7)
    s.failed()  # a server died during that push
    assert s.due(9, learned=True) and s.resyncs == 3
    s.pushing(9)
    assert not s.due(9, learned=False) and s.due(10, learned=True) and s.resyncs == 3


def test_a_server_restarted_from_an_older_checkpoint_gets_the_weights_at_the_next_update(ray_local, aligned):
    """The resync path alone (outside Stage 4): a learner that pushed versions 2 and 4 to its server on
    schedule (sync_every 2); the server is SIGKILLed and Ray restarts it from the older checkpoint it was
    built from (version 0). Its next proposal says version 0, so the next update (5, off schedule)
    pushes: the server then serves version 5 with the learner's weights."""
    import os
    import signal

    import ray

    from learners.grpo import WeightPushes
    from serving.transformers_backend import TransformersPolicyServer

    group = LearnerGroup(config(1, False), aligned, str(aligned), K, resume=False)
    server = TransformersPolicyServer.options(num_cpus=0.25, max_restarts=-1, max_task_retries=-1).remote(
        str(aligned), K, L)
    servers = {"server-0": server}
    pushes = WeightPushes(sync_every=2, version=group.version)
    frame = groups(1, 0)[0].frame

    def update(seed: int) -> None:
        group.update(groups(2, seed))
        if pushes.due(group.version, learned=True):
            pushes.pushing(group.version)
            if group.push(servers, group.version):
                pushes.failed()

    try:
        for seed in range(1, 5):
            update(seed)
        assert ray.get(server.version.remote()) == 4 and pushes.resyncs == 0
        pid = ray.get(server.pid.remote())
        os.kill(pid, signal.SIGKILL)
        props = ray.get(server.propose.remote([frame], ["goal"], 4, 0.7, 0.9))  # answered by the restarted server
        assert ray.get(server.pid.remote()) != pid
        assert props.version == 0
        pushes.proposed(props.version)
        update(5)
        assert pushes.resyncs == 1
        assert ray.get(server.version.remote()) == 5
        assert_same(ray.get(group.weights_ref()), ray.get(server.weights.remote()), tol=1e-7)
    finally:
        group.shutdown()
        ray.kill(server)
