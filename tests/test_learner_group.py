"""The GRPO learner group with M = 2 (whole replicas, and FSDP shards) against one learner.

The same groups give the same loss, the same gradient norm and the same weights after each AdamW
step whether one learner computes them or two split them (gloo on CPU); an idle FSDP learner pads
with a zero-weight group; a saved FSDP group resumes with its version and optimizer state.
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
        if fsdp:
            # Save the sharded group, resume it in new learners: same version, and one more step gives
            # the same weights as the group that kept running (so AdamW's moments came back too).
            from ipr_dist.run_layout import CheckpointRef, RunLayout

            run = RunLayout(str(tmp_path / "run"))
            g2.save(run, "policy/grpo")  # written and committed by rank 0
            more = groups(2, 3)
            g2.update(more)
            kept = ray.get(g2.weights_ref())
            g2.shutdown()
            _, resumed, g3 = train(aligned, 2, True, [more], resume_from=CheckpointRef(run, "policy/grpo"))
            assert g3.version == len(batches) + 1
            g3.shutdown()
            assert_same(kept, resumed)
        else:
            g2.shutdown()
