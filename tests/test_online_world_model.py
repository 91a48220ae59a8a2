"""Stage 4's online world-model learner on a copy of the aligned smoke run (real world model, local
Ray): its critic's TD error on steps it has not trained on falls once it learns from them (3-step
targets), what it learns becomes a committed version the agent starts from, and the layers the critic
shares with the dynamics stay as Stage 2 left them."""

import shutil

import numpy as np
import pytest
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
                                                "world_model.online_lr=0.0003", "world_model.td_steps=3",
                                                "world_model.online_learning_starts=40"])
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
    cut = np.arange(n) == n - 1  # one environment's stream, cut where the steps end
    early = ray.get(learner.add.remote(f[:30], code[:30], reward[:30], done[:30], f_next[:30], ["Game"] * 30,
                                       [0] * 30, np.zeros(30, bool)))
    assert ray.get(learner.train.remote(5)) == {}  # fewer ready steps than online_learning_starts: measured only
    # Nothing learnt yet: the online critic is Stage 2's, so is its error on the same steps
    assert early["world_model/online_td_error"] == pytest.approx(early["world_model/online_td_error_stage2"])
    # one game here: its own figures are the round's (per game, Stage 4 tells where its play leaves the critic)
    assert early["world_model/online_td_error/Game"] == pytest.approx(early["world_model/online_td_error"])
    assert early["world_model/online_td_error_stage2/Game"] == pytest.approx(early["world_model/online_td_error_stage2"])
    before = ray.get(learner.add.remote(f[30:], code[30:], reward[30:], done[30:], f_next[30:], ["Game"] * (n - 30),
                                        [0] * (n - 30), cut[30:]))
    trained = ray.get(learner.train.remote(100))
    # The same steps again: the TD error measured before it learns from them a second time.
    after = ray.get(learner.add.remote(f, code, reward, done, f_next, ["Game"] * n, [0] * n, cut))
    assert after["world_model/online_td_error"] < 0.7 * after["world_model/online_td_error_stage2"], after
    assert early["world_model/online_terminal_steps"] + before["world_model/online_terminal_steps"] == 2  # failures
    assert np.isfinite(before["world_model/online_td_error_ongoing"])
    assert trained["world_model/online_updates"] == 100 and trained["world_model/online_published"] == 1
    # Another environment's first two steps wait for their third; its restart makes them ready as they are.
    two = ray.get(learner.add.remote(f[:2], code[:2], reward[:2], np.zeros(2, bool), f_next[:2], ["Game"] * 2,
                                     [1, 1], [False, False]))
    assert "world_model/online_td_error" not in two and two["world_model/online_steps"] == 2 * n + 2
    flushed = ray.get(learner.add.remote(np.zeros((0, f_dim)), np.zeros(0), np.zeros(0), np.zeros(0, bool),
                                         np.zeros((0, f_dim)), [], [], [], [1]))
    assert np.isfinite(flushed["world_model/online_td_error"]) and flushed["world_model/online_terminal_steps"] == 0
    ckpt = torch.load(committed(run, "world_model/online") / "checkpoint.pt", weights_only=False)
    assert ckpt["online_updates"] == 100 and ckpt["online_steps"] == n  # published before the second look
    assert latest_world_model(cfg).name == "world_model/online"
    again = load_world_model(latest_world_model(cfg), "cpu")  # what the scorer reloads: the learned weights
    assert not torch.allclose(again.val_head[1].weight, model.val_head[1].weight)
    # The dynamics' own last layer learnt; the layers the critic shares with it did not (online_train_shared off)
    assert not torch.allclose(again.dyn_last.linear1.weight, model.dyn_last.linear1.weight)
    assert torch.equal(again.embed.weight, model.embed.weight)
    assert all(torch.equal(a, b) for a, b in zip(again.trunk.parameters(), model.trunk.parameters()))
    ray.kill(learner)


def test_online_learner_keeps_ranking_stage_2s_steps_with_known_returns(aligned_smoke_run, tmp_path, ray_local):
    """With online_rank_weight > 0 (here 1) the online learner ranks Stage 2's kept steps (their checkpoint's
    `rehearsal` rows) beside its TD target. The smoke store has no failure, so the rows here are built:
    two games, each return a function of f the critic starts out not knowing; after 200 updates on TD
    steps that say nothing of it, the critic orders held-out rows by that return (Spearman within each game)."""
    from ipr_dist.run_layout import WORLD_MODEL_CHECKPOINT, RunLayout
    from ipr_dist.config import load_config
    from learners.online_world_model import STATE_FILE, WorldModelLearner, seed_online

    run = tmp_path / aligned_smoke_run.name
    shutil.copytree(aligned_smoke_run, run, ignore=shutil.ignore_patterns("online"))
    cfg = load_config(run / "config.yaml", [f"run.root={tmp_path}", "world_model.online_publish_every=200",
                                                "world_model.online_lr=0.001", "world_model.online_rank_weight=1.0",
                                                "world_model.online_learning_starts=32"])
    layout = RunLayout.of(cfg)
    ckpt = layout.load_torch(WORLD_MODEL_CHECKPOINT, STATE_FILE)
    f_dim, k = ckpt["config"]["f_dim"], ckpt["model"]["codebook"].shape[0]
    rng = np.random.default_rng(1)
    n = 400
    f = torch.as_tensor(rng.normal(size=(n, f_dim)), dtype=torch.float32)
    ckpt["rehearsal"] = {"f": f, "code": torch.as_tensor(rng.integers(0, k, n)),
                         "returns": f[:, 0] + 0.1 * torch.as_tensor(rng.normal(size=n), dtype=torch.float32),
                         "game": ["A" if i % 2 else "B" for i in range(n)], "heldout": torch.arange(n) >= 300}
    layout.save_torch(WORLD_MODEL_CHECKPOINT, STATE_FILE, ckpt, phase=2, step=ckpt["step"] + 1)
    seed_online(cfg)
    online = layout.load_torch("world_model/online", STATE_FILE)
    assert online["rehearsal"] is None  # the scorer's versions stay small: the learner reads Stage 2's
    learner = WorldModelLearner.remote(cfg.model_dump(), {"Game": np.ones(k, bool)})
    before = ray.get(learner.rank_heldout_spearman.remote())["world_model/online_rank_heldout_spearman"]
    m = 48
    steps = rng.normal(size=(m, f_dim)).astype(np.float32)
    ray.get(learner.add.remote(steps, rng.integers(0, k, m), np.full(m, 0.01, np.float32), np.zeros(m, bool),
                               steps, ["Game"] * m, [0] * m, np.arange(m) == m - 1))
    trained = ray.get(learner.train.remote(200))
    after = trained["world_model/online_rank_heldout_spearman"]
    assert after > 0.5 and after > before + 0.3, (before, after)
    assert np.isfinite(trained["world_model/online_rank_loss"])
    ray.kill(learner)


@pytest.mark.unit
def test_n_step_streams_against_a_direct_computation():
    """learners/online_world_model.py NStepStreams, n = 3: two environments' steps interleaved and split
    across rounds; stream 0's episode fails at its step 4, stream 1 is cut after its step 2 (a time
    limit) and its next steps start another episode, whose pending steps a restart flushes. Each step's
    (G, f_boot, discount) equals the sum written out over its own episode, and a step is ready only once
    its window is known."""
    from learners.online_world_model import NStepStreams

    gamma, streams = 0.9, NStepStreams(3, 0.9)
    r = {0: [1.0, 2.0, 3.0, 4.0, 5.0], 1: [10.0, 20.0, 30.0], 2: [7.0, 8.0]}  # 2: stream 1's next episode
    step = {e: [(f"f{e}{t}", t, r[e][t], e == 0 and t == 4, f"f{e}{t + 1}") for t in range(len(r[e]))] for e in r}
    ready = []
    ready += streams.push(0, step[0][0]) + streams.push(1, step[1][0]) + streams.push(0, step[0][1])
    assert ready == []  # neither has its 3 next steps yet
    ready += streams.push(0, step[0][2])  # stream 0's step 0 now has its window of 3
    assert [s[0] for s in ready] == ["f00"]
    ready += streams.push(1, step[1][1]) + streams.push(1, step[1][2], cut=True)  # all of stream 1 ready
    ready += streams.push(0, step[0][3]) + streams.push(0, step[0][4])  # the failure: the rest are ready
    ready += streams.push(1, step[2][0]) + streams.push(1, step[2][1])
    assert len(ready) == 8
    ready += streams.flush(1)  # the environment restarted: its episode's two steps, bootstrapped where it broke
    got = {s[0]: s[-3:] for s in ready}
    assert len(got) == 10

    def direct(e, t, ends_episode):
        window = r[e][t:t + 3]
        g = sum(gamma ** j * x for j, x in enumerate(window))
        last = t + len(window) - 1
        return g, f"f{e}{last + 1}", 0.0 if ends_episode and last == len(r[e]) - 1 else gamma ** len(window)

    for e in r:
        for t in range(len(r[e])):
            g, boot, discount = got[f"f{e}{t}"]
            want = direct(e, t, e == 0)
            assert (g, boot, discount) == (pytest.approx(want[0]), want[1], pytest.approx(want[2])), (e, t)
    one = NStepStreams(1, gamma)  # n = 1: Eq. 20's target, every step ready at once
    assert one.push(5, ("f", 0, 2.0, False, "f'"))[0][-3:] == (2.0, "f'", pytest.approx(gamma))
    assert one.push(5, ("f", 0, 2.0, True, "f'"))[0][-3:] == (2.0, "f'", 0.0)
