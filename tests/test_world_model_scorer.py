"""The scorer actor on local Ray: batched answers equal in-process imagination, bad requests fail
alone with a clear message, and new weights are picked up from the checkpoint file."""

import numpy as np
import pytest
import torch

from actors.world_model_scorer import WorldModelScorer, load_world_model
from ipr_dist.models.world_model import WorldModel, WorldModelConfig

CFG = WorldModelConfig(f_dim=6, code_dim=4, d=16, layers=2, heads=2, horizon=4)


CODEBOOK = torch.randn(9, 4, generator=torch.Generator().manual_seed(5))


def save(path, seed, codebook=CODEBOOK):
    torch.manual_seed(seed)
    m = WorldModel(CFG, codebook)
    torch.nn.init.normal_(m.dyn_head[-1].weight, std=0.1)
    torch.save({"model": m.state_dict(), "config": CFG.__dict__, "phase": 2, "step": 0}, path)
    return m.eval()


def test_scorer_batches_requests_and_matches_direct_imagination(tmp_path, ray_local):
    import ray

    path = tmp_path / "checkpoint.pt"
    model = save(path, 0)
    # A window far longer than the test (it only bounds a hang) and a batch of 12: the 12 concurrent
    # requests are answered by one imagine call, however fast or slow they arrive.
    batching = WorldModelScorer.options(num_cpus=0.5).remote(str(path), CODEBOOK.numpy(), window_ms=600_000.0,
                                                             max_batch=12)
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(12, 6)).astype(np.float32)
    cands = rng.integers(0, 9, (12, 8, 3))
    out = np.stack(ray.get([batching.score.remote(f, c) for f, c in zip(fs, cands)]))
    _, direct = model.imagine(torch.from_numpy(fs), torch.from_numpy(cands))
    assert np.allclose(out, direct.numpy(), atol=1e-5)
    assert ray.get(batching.stats.remote())["batches"] == 1  # the 12 requests were answered together
    ray.kill(batching)
    scorer = WorldModelScorer.options(num_cpus=0.5).remote(str(path), CODEBOOK.numpy(), window_ms=0.0, reload_check_s=0.0)
    bad = scorer.score.remote(np.zeros(5, np.float32), cands[0])
    with pytest.raises(ray.exceptions.RayTaskError, match="features must be one 6-d vector"):
        ray.get(bad)
    with pytest.raises(ray.exceptions.RayTaskError, match="codes must lie in 0..8"):
        ray.get(scorer.score.remote(fs[0], np.full((2, 3), 20)))
    with pytest.raises(ray.exceptions.RayTaskError, match="non-empty"):
        ray.get(scorer.score.remote(fs[0], np.zeros((0, 3), np.int64)))
    assert np.allclose(ray.get(scorer.score.remote(fs[0], cands[0])), out[0], atol=1e-5)  # still serving

    newer = save(path, 1)  # a new checkpoint appears: the next batch uses it
    _, expected = newer.imagine(torch.from_numpy(fs[:1]), torch.from_numpy(cands[:1]))
    assert np.allclose(ray.get(scorer.score.remote(fs[0], cands[0])), expected.numpy()[0], atol=1e-5)
    assert load_world_model(str(path), "cpu").codes == 9

    save(path, 2, codebook=torch.randn(9, 4))  # weights from another codebook: refused, old ones kept
    assert np.allclose(ray.get(scorer.score.remote(fs[0], cands[0])), expected.numpy()[0], atol=1e-5)
    assert "different action codebook" in ray.get(scorer.stats.remote())["reload_error"]
    ray.kill(scorer)
    # A reference checkpoint (Stage 4 gives Stage 2's): scored with on request, never reloaded
    fixed, online = tmp_path / "reference.pt", tmp_path / "online.pt"
    reference, newer = save(fixed, 3), save(online, 1)
    probe = WorldModelScorer.options(num_cpus=0.5).remote(str(online), CODEBOOK.numpy(), window_ms=0.0,
                                                          reload_check_s=0.0, reference=str(fixed))
    _, want = reference.imagine(torch.from_numpy(fs[:1]), torch.from_numpy(cands[:1]))
    assert np.allclose(ray.get(probe.score_reference.remote(fs[0], cands[0])), want.numpy()[0], atol=1e-5)
    assert np.allclose(ray.get(probe.score.remote(fs[0], cands[0])), expected.numpy()[0], atol=1e-5)
    save(fixed, 4)
    assert np.allclose(ray.get(probe.score_reference.remote(fs[0], cands[0])), want.numpy()[0], atol=1e-5)
    with pytest.raises(ray.exceptions.RayTaskError, match="codes must lie in 0..8"):
        ray.get(probe.score_reference.remote(fs[0], np.full((2, 3), 20)))
    ray.kill(probe)
    stranger = WorldModelScorer.options(num_cpus=0.5).remote(str(path), CODEBOOK.numpy())
    with pytest.raises(ray.exceptions.RayActorError, match="different action codebook"):
        ray.get(stranger.stats.remote())


def test_scorer_answers_with_the_critic_members_returns_on_request(tmp_path, ray_local):
    """A world model with member heads: `score` stays the critic's R^ (B,), `score(members=True)` gives
    (B, 1 + E) with the critic's first and each member's after, as in-process imagination does."""
    import ray

    cfg = WorldModelConfig(**{**CFG.__dict__, "critic_members": 3})
    torch.manual_seed(0)
    model = WorldModel(cfg, CODEBOOK).eval()
    path = tmp_path / "members.pt"
    torch.save({"model": model.state_dict(), "config": cfg.__dict__, "phase": 2, "step": 0}, path)
    scorer = WorldModelScorer.options(num_cpus=0.5).remote(str(path), CODEBOOK.numpy(), window_ms=0.0)
    rng = np.random.default_rng(1)
    f, cands = rng.normal(size=6).astype(np.float32), rng.integers(0, 9, (8, 3))
    _, direct = model.imagine(torch.from_numpy(f[None]), torch.from_numpy(cands[None]), members=True)
    both = ray.get(scorer.score.remote(f, cands, members=True))
    assert both.shape == (8, 4) and np.allclose(both, direct.numpy()[0], atol=1e-5)
    assert np.allclose(ray.get(scorer.score.remote(f, cands)), both[:, 0], atol=1e-6)
    ray.kill(scorer)
