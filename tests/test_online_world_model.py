"""Stage 4's online world-model learner on a copy of the aligned smoke run (real world model, local
Ray): its critic's TD error on steps it has not trained on falls once it learns from them, and what it
learns becomes a committed version the agent starts from."""

import shutil

import numpy as np
import ray
import torch

from .conftest import committed


def test_online_learner_lowers_the_td_error_of_the_agents_steps_and_publishes(aligned_smoke_run, tmp_path,
                                                                              ray_local):
    from actors.world_model_scorer import load_world_model
    from ipr_dist.config import load_config
    from learners.online_world_model import WorldModelLearner, latest_world_model, seed_online

    run = tmp_path / aligned_smoke_run.name
    shutil.copytree(aligned_smoke_run, run, ignore=shutil.ignore_patterns("online"))
    cfg = load_config(run / "config.yaml", [f"run.root={tmp_path}", "world_model.online_publish_every=50",
                                                "world_model.online_lr=0.0003"])
    assert latest_world_model(cfg).name == "world_model/checkpoint"  # before Stage 4: Stage 2's
    seed_online(cfg)
    model = load_world_model(latest_world_model(cfg), "cpu")
    k, f_dim = model.codes, model.cfg.f_dim
    rng = np.random.default_rng(0)
    n = 48  # one game's steps: survival reward, two of them failures
    f = rng.normal(size=(n, f_dim)).astype(np.float32)
    f_next = (f + 0.1 * rng.normal(size=(n, f_dim))).astype(np.float32)
    code = rng.integers(0, k, n)
    reward = np.full(n, cfg.world_model.reward_scale, np.float32)
    done = np.zeros(n, bool)
    done[[10, 30]] = True
    learner = WorldModelLearner.remote(cfg.model_dump(), {"Game": np.ones(k, bool)})
    before = ray.get(learner.add.remote(f, code, reward, done, f_next, ["Game"] * n))
    trained = ray.get(learner.train.remote(100))
    # The same steps again: the TD error measured before it learns from them a second time.
    after = ray.get(learner.add.remote(f, code, reward, done, f_next, ["Game"] * n))
    assert after["world_model/online_td_error"] < 0.7 * before["world_model/online_td_error"], (before, after)
    assert before["world_model/online_terminal_steps"] == 2  # the two failures; the other 46 measured apart too
    assert np.isfinite(before["world_model/online_td_error_ongoing"])
    assert trained["world_model/online_updates"] == 100 and trained["world_model/online_published"] == 1
    ckpt = torch.load(committed(run, "world_model/online") / "checkpoint.pt", weights_only=False)
    assert ckpt["online_updates"] == 100 and ckpt["online_steps"] == n  # published before the second look
    assert latest_world_model(cfg).name == "world_model/online"
    again = load_world_model(latest_world_model(cfg), "cpu")  # what the scorer reloads: the learned weights
    assert not torch.allclose(again.val_head[1].weight, model.val_head[1].weight)
    ray.kill(learner)
