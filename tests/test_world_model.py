"""The world model pinned to paper Eq. 18-20: causal dynamics, L1 teacher-forced and autoregressive
losses, phase (ii) with frozen dynamics, the TD target's max over next codes, a slowly updated
target network, and batched imagination equal to one candidate at a time."""

import pytest
import torch
import torch.nn.functional as F

from ipr_dist.models.world_model import WorldModel, WorldModelConfig

pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`

CFG = WorldModelConfig(f_dim=6, code_dim=4, d=16, layers=3, heads=2, horizon=5, target_tau=0.1)


def model(seed=0):
    torch.manual_seed(seed)
    m = WorldModel(CFG, torch.randn(7, 4)).eval()
    torch.nn.init.normal_(m.dyn_head[-1].weight, std=0.1)  # starts at zero (copy-last); tests need dynamics
    return m


def test_an_untrained_world_model_predicts_copy_last():
    torch.manual_seed(0)
    m = WorldModel(CFG, torch.randn(7, 4)).eval()
    f = torch.randn(2, 5, 6)
    assert torch.equal(m(f, torch.randint(0, 7, (2, 5)))[0], f)


def test_world_model_learns_code_dependent_motion_below_copy_last():
    """Learning, not just shapes: on clips where each code moves the features by its own offset, a few
    hundred AdamW steps of the Eq. 19 loss from the copy-last start bring the held-out one-step L1 error
    far below copy-last's; a model that ignored the codes could not (the offsets average to zero)."""
    torch.manual_seed(0)
    codebook = torch.randn(7, 4)
    offsets = torch.randn(7, 6)
    offsets -= offsets.mean(0)

    def clips(n):
        codes = torch.randint(0, 7, (n, 5))
        f0 = torch.randn(n, 1, 6)
        return torch.cat([f0, f0 + offsets[codes].cumsum(1)], 1), codes

    m = WorldModel(CFG, codebook)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(300):
        f, codes = clips(64)
        loss = m.dynamics_loss(f, codes)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    f, codes = clips(256)
    with torch.no_grad():
        pred, _ = m.eval()(f[:, :5], codes)
    learned, copy = (pred - f[:, 1:]).abs().mean(), (f[:, :5] - f[:, 1:]).abs().mean()
    assert learned < 0.3 * copy, (float(learned), float(copy))


def test_paper_defaults():
    c = WorldModelConfig()
    assert (c.layers, c.horizon, c.gamma, c.f_dim) == (8, 5, 0.99, 1024)


def test_dynamics_are_causal_in_time():
    m = model()
    f, codes = torch.randn(3, 5, 6), torch.randint(0, 7, (3, 5))
    pred, value = m(f, codes)
    assert pred.shape == (3, 5, 6) and value.shape == (3, 5)
    f2 = f.clone()
    f2[:, 3:] += 5.0
    pred2, value2 = m(f2, codes)
    assert torch.allclose(pred[:, :3], pred2[:, :3], atol=1e-6) and torch.allclose(value[:, :3], value2[:, :3], atol=1e-6)


def test_eq19_teacher_forced_and_autoregressive_l1():
    m = model()
    f, codes = torch.randn(4, 6, 6), torch.randint(0, 7, (4, 5))
    out = m.dynamics_loss(f, codes)
    pred, _ = m(f[:, :5], codes)
    assert torch.isclose(out["teacher_l1"], (pred - f[:, 1:]).abs().mean())
    feats = [f[:, 0]]
    for k in range(5):  # the unroll feeds back its own predictions, never the real f
        p, _ = m(torch.stack(feats, 1), codes[:, :k + 1])
        feats.append(p[:, -1])
    assert torch.isclose(out["autoregressive_l1"], (torch.stack(feats[1:], 1) - f[:, 1:]).abs().mean(), atol=1e-6)
    assert torch.isclose(out["loss"], out["teacher_l1"] + out["autoregressive_l1"])


def test_the_cached_unroll_equals_the_whole_context_run_again_each_step():
    """`unroll` runs only each step's new position (keys and values cached); with causal attention that is
    the whole growing context's last position: the same features and the same gradients, training or not."""
    for training in (True, False):
        m = model().train(training)
        f0, codes = torch.randn(3, 6, requires_grad=True), torch.randint(0, 7, (3, 5))
        feats = [f0]
        for k in range(5):
            feats.append(m.predict(torch.stack(feats, 1), codes[:, :k + 1])[:, -1])
        whole, cached = torch.stack(feats[1:], 1), m.unroll(f0, codes)
        assert torch.allclose(cached, whole, atol=1e-5)
        params = [f0, *[p for p in m.parameters() if p.requires_grad]]
        weights = torch.randn_like(whole)
        for a, b in zip(torch.autograd.grad((cached * weights).sum(), params, allow_unused=True),
                        torch.autograd.grad((whole * weights).sum(), params, allow_unused=True)):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def test_phase_two_freezes_dynamics_and_trains_only_the_critic():
    m = model().train()
    critic = m.freeze_dynamics()
    assert {id(p) for p in critic} == {id(p) for p in m.parameters() if p.requires_grad}
    assert not any(p is q for p in m.parameters() for q in m.target.parameters())  # target is separate
    f, codes = torch.randn(8, 6), torch.randint(0, 7, (8,))
    before_dyn = m(f[:, None], codes[:, None])[0].detach()
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(critic, lr=0.5)
    for _ in range(3):
        loss = m.value_loss(f, codes, torch.ones(8), torch.randn(8, 6), torch.zeros(8))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert torch.allclose(m(f[:, None], codes[:, None])[0], before_dyn)


def test_eq20_td_target_takes_the_max_over_next_codes_of_the_target_network():
    m = model()
    m.freeze_dynamics()
    with torch.no_grad():  # make the online critic differ from the target
        for p in m.val_head.parameters():
            p.add_(0.3)
    f, codes, f_next = torch.randn(5, 6), torch.randint(0, 7, (5,)), torch.randn(5, 6)
    reward, done = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5]), torch.tensor([0, 0, 1, 0, 1])
    best = torch.stack([torch.stack([m.target.value(f_next[i:i + 1], torch.tensor([a]))[0] for a in range(7)]).max()
                        for i in range(5)])
    target = reward + 0.99 * (1 - done.float()) * best
    assert torch.isclose(target[2], reward[2])  # a terminal step does not bootstrap
    out = m.value_loss(f, codes, reward, f_next, done)
    _, r_hat, cont = m.critic_outputs(f, codes)
    heads = F.huber_loss(r_hat, reward) + F.binary_cross_entropy_with_logits(cont, 1.0 - done.float())
    assert torch.isclose(out["loss"], F.huber_loss(m.value(f, codes), target) + heads, atol=1e-6)
    # Restricted to the codes a game can execute, the max ranges over those only.
    allowed = torch.zeros(5, m.codes, dtype=torch.bool)
    allowed[:, [1, 3]] = True
    some = torch.stack([torch.maximum(m.target.value(f_next[i:i + 1], torch.tensor([1])),
                                      m.target.value(f_next[i:i + 1], torch.tensor([3])))[0] for i in range(5)])
    masked = reward + 0.99 * (1 - done.float()) * some
    out = m.value_loss(f, codes, reward, f_next, done, allowed)
    assert torch.isclose(out["loss"], F.huber_loss(m.value(f, codes), masked) + heads, atol=1e-6)
    # critic_target "mean": the average over the executable codes instead of their max
    m.cfg.critic_target = "mean"
    avg = torch.stack([(m.target.value(f_next[i:i + 1], torch.tensor([1])) +
                        m.target.value(f_next[i:i + 1], torch.tensor([3])))[0] / 2 for i in range(5)])
    out = m.value_loss(f, codes, reward, f_next, done, allowed)
    mean_target = reward + 0.99 * (1 - done.float()) * avg
    assert torch.isclose(out["loss"], F.huber_loss(m.value(f, codes), mean_target) + heads, atol=1e-6)
    assert not torch.isclose(mean_target, masked).all()
    # each transition's own game: rows with different executable codes, each averaged over its own
    per_row = torch.zeros(5, m.codes, dtype=torch.bool)
    for i, row in enumerate([[0], [2, 5], [1, 3, 6], [4], [0, 1, 2, 3, 4, 5, 6]]):
        per_row[i, row] = True
    own = torch.stack([torch.stack([m.target.value(f_next[i:i + 1], torch.tensor([a]))[0]
                                    for a in per_row[i].nonzero()[:, 0].tolist()]).mean() for i in range(5)])
    own_out = m.value_loss(f, codes, reward, f_next, done, per_row)
    own_target = reward + 0.99 * (1 - done.float()) * own
    assert torch.isclose(own_out["loss"], F.huber_loss(m.value(f, codes), own_target) + heads, atol=1e-6)
    # critic_mc_weight w: (1 - w) TD target + w G_t where the observed return is known, TD alone elsewhere
    returns = torch.tensor([3.0, float("nan"), 2.0, float("nan"), 0.25])
    same = m.value_loss(f, codes, reward, f_next, done, allowed, returns)  # w = 0: the returns are ignored
    assert torch.isclose(same["loss"], out["loss"], atol=1e-6)
    m.cfg.critic_mc_weight = 0.25
    mixed = torch.where(torch.isnan(returns), mean_target, 0.75 * mean_target + 0.25 * returns.nan_to_num())
    out = m.value_loss(f, codes, reward, f_next, done, allowed, returns)
    assert torch.isclose(out["loss"], F.huber_loss(m.value(f, codes), mixed) + heads, atol=1e-6)
    assert not torch.isclose(mixed, mean_target).all() and torch.isclose(mixed[1], mean_target[1])


def test_the_ranking_loss_orders_known_returns_within_each_game_only():
    m = model()
    m.freeze_dynamics()
    f, codes = torch.randn(5, 6), torch.randint(0, 7, (5,))
    returns = torch.tensor([0.9, 0.2, 0.5, 0.5, 0.1])
    games = torch.tensor([0, 0, 0, 1, 1])
    v = m.value(f, codes)
    # game 0: pairs (0 > 1), (0 > 2), (2 > 1); game 1: (3 > 4); nothing across games
    pairs = [(0, 1), (0, 2), (2, 1), (3, 4)]
    direct = torch.stack([F.softplus(v[j] - v[i]) for i, j in pairs]).mean()
    loss = m.rank_loss(f, codes, returns, games)
    assert torch.isclose(loss, direct, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)  # the critic's branch only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.val_head.parameters())
    # no pair of one game with different returns: zero, and still a tensor that backpropagates
    none = m.rank_loss(f[:2], codes[:2], torch.tensor([0.3, 0.3]), torch.tensor([0, 0]))
    assert none.item() == 0.0 and none.requires_grad


def test_target_network_follows_slowly():
    m = model()
    m.freeze_dynamics()
    old = [p.clone() for p in m.target.parameters()]
    with torch.no_grad():
        for p in m.val_head.parameters():
            p.add_(1.0)
    m.update_target()
    for t, o, p in zip(m.target.parameters(), old, m.parameters()):
        assert torch.allclose(t, 0.9 * o + 0.1 * p)  # tau = 0.1
    head = [t for t, _ in zip(m.target.parameters(), m.parameters())][-1]
    assert not torch.allclose(head, list(m.val_head.parameters())[-1])  # still lags the online critic


def test_batched_imagination_equals_one_candidate_at_a_time():
    m = model()
    f = torch.randn(3, 6)
    seqs = torch.randint(0, 7, (3, 4, 4))  # N=3 environments, B=4 candidates, L=4 codes
    feats, ret = m.imagine(f, seqs)
    assert feats.shape == (3, 4, 5, 6) and ret.shape == (3, 4)
    for i in range(3):
        for b in range(4):
            fi, ri = m.imagine(f[i:i + 1], seqs[i:i + 1, b:b + 1])
            assert torch.allclose(fi[0, 0], feats[i, b], atol=1e-5) and torch.allclose(ri[0, 0], ret[i, b], atol=1e-5)


def test_imagined_returns_written_out_by_hand():
    """Both definitions of R^ for one candidate, step by step: the rollout's states, then
    sum_k gamma^k C_k r^_k + gamma^H C_H Q(f^_H, a_H) ("reward") and sum_k gamma^k Q(f^_k, a_k) ("q_sum")."""
    m = model()
    f, seq = torch.randn(1, 6), torch.tensor([[[2, 5, 1]]])  # L = 3 < H = 4: the last code is held
    H, gamma = m.cfg.horizon, m.cfg.gamma
    codes = [2, 5, 1, 1, 1, 1]  # a_0 .. a_H (H = 5)
    with torch.no_grad():
        states = [f[0]] + list(m.unroll(f, torch.tensor([codes[:H]]))[0])
        out = [m.critic_outputs(s[None], torch.tensor([a])) for s, a in zip(states, codes)]
    q = [float(o[0]) for o in out]
    r = [float(o[1]) for o in out]
    c = [float(torch.sigmoid(o[2])) for o in out]
    alive, reward_return = 1.0, 0.0
    for k in range(H):
        reward_return += gamma ** k * alive * r[k]
        alive *= c[k]
    reward_return += gamma ** H * alive * q[H]
    q_sum = sum(gamma ** k * q[k] for k in range(H))
    assert abs(float(m.imagine(f, seq, imagined_return="reward")[1]) - reward_return) < 1e-5
    assert abs(float(m.imagine(f, seq, imagined_return="q_sum")[1]) - q_sum) < 1e-5
    with pytest.raises(ValueError, match="imagined_return must be"):
        m.imagine(f, seq, imagined_return="mean")


def test_bad_inputs_are_clear_errors():
    m = model()
    with pytest.raises(ValueError, match="codebook vectors are 3-d but the world model expects 4"):
        WorldModel(CFG, torch.randn(7, 3))
    with pytest.raises(ValueError, match="features are 5-d but the world model was trained on 6-d"):
        m.imagine(torch.randn(2, 5), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        m.imagine(torch.randn(0, 6), torch.zeros(0, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie in 0..6"):
        m.imagine(torch.randn(1, 6), torch.full((1, 2, 4), 9))


def test_return_ranking_against_a_direct_computation_and_its_episode_ends():
    """learners/world_model.py: return_ranking on a hand-built store of two games: held-out episodes
    0-9 and 10-19 (game 0, both end in a failure) and 20-29 (game 1; its failure is row 29), training
    episode 30-39. Each held-out row's R^ is imagine() over its episode's next H codes (the last one held
    at the episode's end), its rho against the observed returns equals scipy's on those, and the report
    says how many episode ends the figure rests on (3, the fewest in one game 1)."""
    import numpy as np
    from scipy.stats import spearmanr

    from learners.world_model import Segments, partial_spearman, return_ranking, returns_to_go

    m = model()
    n, gamma = 40, m.cfg.gamma
    torch.manual_seed(1)
    code = torch.randint(0, 7, (n,))
    done = torch.zeros(n, dtype=torch.bool)
    done[[9, 19, 29, 39]] = True
    next_same = np.ones(n, bool)
    next_same[[9, 19, 29, 39]] = False
    reward = torch.ones(n)
    returns = np.full(n, np.nan, np.float32)
    for i in range(n - 1, -1, -1):
        returns[i] = 1.0 if done[i] else 1.0 + gamma * returns[i + 1]
    shard_returns, ends = returns_to_go(reward.numpy(), done.numpy(), next_same, gamma)
    assert shard_returns == pytest.approx(returns) and list(ends[[0, 9, 10, 25, 35]]) == [9, 9, 19, 29, 39]
    seg = Segments(f=torch.randn(n, 6), code=code, raw=torch.zeros(n, dtype=torch.long), raw_table=torch.zeros(1, 4),
                   game=torch.tensor([0] * 20 + [1] * 20), allowed=torch.ones(2, 7, dtype=torch.bool), reward=reward,
                   done=done, starts=np.arange(0), heldout_rows=np.arange(n) < 30, transitions=np.arange(n),
                   returns=returns, return_end=ends, next_same=next_same)
    H = m.cfg.horizon
    seg.game_names = ("A", "B")
    out = return_ranking(m, seg, H)
    assert out["eval/return/steps"] == 30 and out["eval/return/action_alternatives"] == 16
    assert out["eval/return/episode_ends"] == 3 and out["eval/return/episode_ends_fewest_in_a_game"] == 1
    rows = np.arange(30)
    idx = np.minimum(rows[:, None] + np.arange(H), (rows // 10 * 10 + 9)[:, None])  # held at the episode's end
    r_hat = m.imagine(seg.f[:30], code[torch.as_tensor(idx)][:, None], H, "q_sum")[1][:, 0].numpy()
    assert out["eval/return/q_sum/spearman"] == pytest.approx(spearmanr(r_hat, returns[:30]).statistic, abs=1e-6)
    within = np.mean([spearmanr(r_hat[:20], returns[:20]).statistic, spearmanr(r_hat[20:], returns[20:30]).statistic])
    assert out["eval/return/q_sum/spearman_within_game"] == pytest.approx(within, abs=1e-6)
    # Ranking actions: game B (held out 20-29) against 16 sequences drawn from its training codes (30-39), the
    # state's value (their mean R^) held fixed; game A has no training row to draw from, so no action ranking
    drawn = np.random.default_rng(0).choice(code[30:].numpy(), (10, 16, H))
    both = m.imagine(seg.f[20:30], torch.cat([code[torch.as_tensor(idx[20:])][:, None], torch.as_tensor(drawn)], 1),
                     H, "q_sum")[1].numpy()
    value = both[:, 1:].mean(1)
    assert out["eval/return/q_sum/action_within/B"] == pytest.approx(
        partial_spearman(both[:, 0] - value, returns[20:30], value), abs=1e-6)
    assert "eval/return/q_sum/action_within/A" not in out and "eval/return/q_sum/spearman_within/A" in out
    assert "eval/return/q_sum/action_within_interval/B" not in out  # one held-out episode: no interval over them
    # The critic's ranking loss orders the training rows whose return is known (rows 30-39 here)
    assert list(seg.rank_rows()) == list(range(30, 40))
    f, codes, observed, games = seg.rank_batch(np.array([31, 35, 39]))
    assert torch.equal(f, seg.f[[31, 35, 39]]) and observed.tolist() == pytest.approx(returns[[31, 35, 39]].tolist())
    m.freeze_dynamics()
    v = m.value(f, codes)  # one game; returns fall towards the episode's end: 31 > 35 > 39
    direct = torch.stack([F.softplus(v[j] - v[i]) for i, j in ((0, 1), (0, 2), (1, 2))]).mean()
    assert torch.isclose(m.rank_loss(f, codes, observed, games), direct, atol=1e-6)
    # What Stage 2's checkpoint keeps for the online learner: 4 of the 10 training rows, 1 held-out one
    seg.game_names = ("A", "B")
    kept = seg.rehearsal(4, seed=0)
    assert (~kept["heldout"]).sum() == 4 and kept["heldout"].sum() == 1 and set(kept["game"]) <= {"A", "B"}
    for f_row, ret in zip(kept["f"], kept["returns"]):
        row = int(np.flatnonzero((seg.f == f_row).all(1).numpy())[0])
        assert ret.item() == pytest.approx(returns[row]) and kept["game"][0] in ("A", "B")
    assert seg.rehearsal(0, seed=0) is None


def test_episode_interval_resamples_whole_episodes():
    """learners/world_model.py: episode_interval bootstraps partial_spearman over episodes, not steps.
    Eight copies of one episode give the same figure in every draw, so the interval is that figure; a
    ranking that follows the outcome on every episode lies above 0 with its figure inside; x unrelated to y
    straddles 0; one or two episodes give none."""
    import numpy as np

    from learners.world_model import episode_interval, partial_spearman

    rng = np.random.default_rng(3)
    x, y, z = rng.normal(size=(3, 12))
    copies = [np.tile(v, 8) for v in (x, y, z)]
    episodes = np.repeat(np.arange(8), 12)
    rho = partial_spearman(*copies)
    assert episode_interval(*copies, episodes) == pytest.approx([rho, rho])
    z = rng.normal(size=240)
    x = rng.normal(size=240)
    y = x + 0.5 * rng.normal(size=240) + z
    episodes = np.repeat(np.arange(20), 12)
    low, high = episode_interval(x, y, z, episodes)
    assert 0 < low < partial_spearman(x, y, z) < high
    assert episode_interval(x, y, z, episodes, seed=1) != [low, high]  # seeded, and the seed matters
    assert episode_interval(x, y, z, episodes) == [low, high]
    low, high = episode_interval(rng.normal(size=240), y, z, episodes)
    assert low < 0 < high
    assert episode_interval(x, y, z, np.zeros(240)) is None
    assert episode_interval(x, y, z, np.arange(240) % 2) is None  # two episodes: three distinct draws, no interval
    # world_model/report.md prints each game's interval beside its figure
    from learners.world_model import report

    metrics = {"eval/return/q_sum/action_within/A": 0.2, "eval/return/q_sum/action_within_interval/A": [-0.1, 0.45],
               "eval/return/reward/action_within/A": 0.1, "eval/return/q_sum/action_within/B": 0.3,
               **{f"eval/h1/world_model/{s}": 0.5 for s in ("cosine", "mse", "l1")}}
    line = next(row for row in report(metrics, 1).splitlines() if row.startswith("Ranking actions"))
    assert "A 0.200 [-0.100, +0.450]; 0.100; B 0.300; -" in line and line.endswith("(95% intervals over held-out episodes)")


def test_partial_spearman_against_the_textbook_formula():
    """learners/world_model.py: partial_spearman(x, y, z) is the partial correlation of the ranks,
    (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) from Spearman's rhos (no ties); a y that follows z
    alone has no partial rho with an x that also follows z, however high their plain rho."""
    import numpy as np
    from scipy.stats import spearmanr

    from learners.world_model import partial_spearman

    rng = np.random.default_rng(3)
    z = rng.normal(size=300)
    x, y = z + rng.normal(size=300), z + 0.5 * rng.normal(size=300)
    y_with_x = y + 0.5 * x
    for b in (y, y_with_x):
        r_xy, r_xz, r_yz = (spearmanr(u, v).statistic for u, v in ((x, b), (x, z), (b, z)))
        assert partial_spearman(x, b, z) == pytest.approx((r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2)),
                                                          abs=1e-9)
    assert spearmanr(x, y).statistic > 0.5 and abs(partial_spearman(x, y, z)) < 0.15
    assert partial_spearman(x, y_with_x, z) > 0.3
    assert partial_spearman(x[:4], y[:4], z[:4]) is None and partial_spearman(z, z, z) is None


def test_n_step_td_targets_written_out_by_hand():
    """learners/world_model.py: Segments.td_batch with n > 1 against sums written out: three steps inside
    an episode; a failure after two steps (no bootstrap); a chunk that ends (not a failure) after two
    steps (bootstrap from the last stored feature). n = 1 is Eq. 20's one-step target, and value_loss given
    that one-step target explicitly returns the same losses."""
    import numpy as np

    from learners.world_model import Segments

    n, gamma = 30, 0.9
    torch.manual_seed(2)
    reward = torch.rand(n)
    done = torch.zeros(n, dtype=torch.bool)
    done[9] = True  # a failure ends the episode of rows 0-9
    next_same = np.ones(n, bool)
    next_same[[9, 29]] = False  # row 29 ends the stored chunk; its episode went on
    seg = Segments(f=torch.randn(n, 6), code=torch.randint(0, 7, (n,)), raw=torch.zeros(n, dtype=torch.long),
                   raw_table=torch.zeros(1, 4), game=torch.zeros(n, dtype=torch.long),
                   allowed=torch.ones(1, 7, dtype=torch.bool), reward=reward, done=done, starts=np.arange(0),
                   heldout_rows=np.zeros(n, bool), transitions=np.arange(29), returns=np.full(n, np.nan),
                   return_end=np.full(n, -1), next_same=next_same)
    args, kwargs = seg.td_batch(np.array([0, 8, 27]), n=3, gamma=gamma)
    g, boot, discount = kwargs["n_step"]
    r = reward.tolist()
    expected_g = [r[0] + gamma * r[1] + gamma ** 2 * r[2], r[8] + gamma * r[9], r[27] + gamma * r[28]]
    assert torch.allclose(g, torch.tensor(expected_g), atol=1e-6)
    assert torch.allclose(discount, torch.tensor([gamma ** 3, 0.0, gamma ** 2]), atol=1e-6)
    assert torch.equal(boot[0], seg.f[3]) and torch.equal(boot[2], seg.f[29])
    one, none = seg.td_batch(np.array([0, 8, 27]), n=1, gamma=gamma)
    assert none == {} and all(torch.equal(a, b) for a, b in zip(one, args))
    m = model()
    m.freeze_dynamics()
    f, codes, rew, f_next, dn, allowed = args
    explicit = (rew, f_next, m.cfg.gamma * (1.0 - dn.float()))
    a, b = m.value_loss(*args), m.value_loss(*args, n_step=explicit)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_episodic_life_ends_the_critics_episode_at_each_life_lost():
    """world_model.episodic_life: build_segments marks the steps that lost a life as ends of the critic's
    episode (no bootstrap past them, observed returns restart after them, no dynamics segment across them),
    at both levels; off, only the failure (survival) or any termination (utility) ends it. One episode of
    12 steps, 3 lives: lives fall at rows 3 and 7, the game ends (failure) at row 11."""
    import numpy as np

    from learners.physcode import ClipData
    from learners.world_model import build_segments, returns_to_go

    n, gamma = 12, 0.9
    failure = np.zeros(n, bool)
    failure[11] = True
    lost = np.zeros(n, bool)
    lost[[3, 7, 11]] = True
    continues = np.ones(n, bool)
    continues[0] = False
    data = ClipData(f=np.zeros((n, 2), np.float32), e=np.zeros((n, 2), np.float32), u={1: np.zeros((n, 2), np.float32)},
                    f_next={1: np.zeros((n, 2), np.float32)}, clips=np.array([[11, 1]]), heldout=np.zeros(1, bool),
                    flow_grid=(1, 1), meta={}, game=np.array(["a"] * n), episode=np.array(["e"] * n),
                    continues=continues, keys=[], key_names={}, shard_rows=[n], mouse=np.zeros((n, 2), np.float32),
                    mouse_buttons=np.zeros((n, 3), np.int8), scroll=np.zeros(n, np.int8),
                    reward=np.arange(n, dtype=np.float32), terminated=failure.copy(), failure=failure, life_lost=lost)
    labels = {r: r % 3 for r in range(n)}
    for level in ("survival", "utility"):
        plain = build_segments(data, labels, 3, 2, level, gamma)
        lives = build_segments(data, labels, 3, 2, level, gamma, episodic_life=True)
        assert plain.done.nonzero().flatten().tolist() == [11]
        assert lives.done.nonzero().flatten().tolist() == [3, 7, 11]
        r = (np.ones(n) if level == "survival" else np.arange(n)).astype(np.float32)
        expected, _ = returns_to_go(r, lost, np.append(continues[1:], False), gamma)
        assert np.allclose(lives.returns, expected) and lives.returns[4] == pytest.approx(r[4] + gamma * r[5]
                                                                                            + gamma ** 2 * r[6] + gamma ** 3 * r[7])
        assert not np.allclose(plain.returns[:8], expected[:8])  # off: the return runs on to the game's end
        # a segment of H = 2 steps plus the next feature never contains a step that ended the critic's episode
        assert all(not lives.done[s:s + 2].any() for s in lives.starts) and len(lives.starts) < len(plain.starts)
    data.life_lost = None  # a store whose game has no lives: the switch changes nothing
    assert build_segments(data, labels, 3, 2, "survival", gamma, episodic_life=True).done.nonzero().flatten().tolist() == [11]


def test_member_critics_regress_the_critics_target_and_disagree_off_the_data():
    """The member critics learn the critic's own TD target (their error falls), leave the critic's gradient
    alone (their input is detached), and disagree more on states far from the data they were trained on
    than on those states: the ensemble's uncertainty marks where the critic extrapolates."""
    cfg = WorldModelConfig(f_dim=6, code_dim=4, d=16, layers=3, heads=2, horizon=5, target_tau=0.1, critic_members=5)
    torch.manual_seed(0)
    m = WorldModel(cfg, torch.randn(7, 4))
    params = m.freeze_dynamics()
    opt = torch.optim.Adam(params, lr=3e-3)
    f = 0.3 * torch.randn(256, 6)
    codes = torch.randint(0, 7, (256,))
    reward = f[:, 0] + 0.1 * codes.float()
    done = torch.ones(256)  # the target is the reward alone: a fixed regression
    first = m.value_loss(f, codes, reward, f, done)["member_td_error"]
    for _ in range(300):
        loss = m.value_loss(f, codes, reward, f, done)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    assert loss["member_td_error"] < 0.5 * first
    # the members do not move the critic: its gradient is the same with and without their loss
    m.zero_grad()
    m.value_loss(f[:32], codes[:32], reward[:32], f[:32], done[:32])["loss"].backward()
    with_members = m.val_head[-1].weight.grad.clone()
    m.zero_grad()
    v, _, _ = m.critic_outputs(f[:32], codes[:32])
    torch.nn.functional.huber_loss(v, reward[:32]).backward()
    assert torch.allclose(with_members, m.val_head[-1].weight.grad)
    with torch.no_grad():
        near = m.critic_outputs(f, codes, members=True)[3].std(1).mean()
        far = m.critic_outputs(8 * torch.randn(256, 6), codes, members=True)[3].std(1).mean()
    assert far > 2 * near, (float(far), float(near))


def test_imagine_with_members_returns_the_critics_return_first_then_each_members():
    from ipr_dist.models.world_model import member_disagreement

    cfg = WorldModelConfig(f_dim=6, code_dim=4, d=16, layers=3, heads=2, horizon=5, critic_members=3)
    torch.manual_seed(0)
    m = WorldModel(cfg, torch.randn(7, 4)).eval()
    f, seqs = torch.randn(2, 6), torch.randint(0, 7, (2, 4, 3))
    for kind in ("reward", "q_sum"):
        _, plain = m.imagine(f, seqs, imagined_return=kind)
        _, both = m.imagine(f, seqs, imagined_return=kind, members=True)
        assert both.shape == (2, 4, 4) and torch.allclose(both[..., 0], plain)
    # a member's q_sum is the critic's formula with the member in the critic's place: swap it in and compare
    swapped = WorldModel(cfg, m.codebook).eval()
    swapped.load_state_dict(m.state_dict())
    swapped.val_last, swapped.val_head = m.members.layers[1], m.members.heads[1]
    assert torch.allclose(swapped.imagine(f, seqs, imagined_return="q_sum")[1], both[..., 2], atol=1e-5)
    # disagreement ignores a member's offset over the whole group, and is 0 with one member
    r = torch.randn(4, 3).numpy()
    shifted = r + [0.0, 5.0, -2.0]
    assert abs(member_disagreement(r) - member_disagreement(shifted)).max() < 1e-9
    assert not member_disagreement(r[:, :1]).any()
    assert WorldModel(CFG, torch.randn(7, 4)).imagine(f, seqs, members=True)[1].shape == (2, 4, 1)
