
"""PhysCode pinned to paper Sec. 10.1: shapes, Eq. 14 gates under flow dropout, Eq. 17 stop-gradients,
EMA codebook updates and dead-code restarts."""

import pytest
import torch


pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`
from ipr_dist.models.physcode import PhysCode, PhysCodeConfig, code_usage, gate_weights

SMALL = dict(f_dim=12, u_dim=8, e_dim=6, d=16, gate_hidden=8, layers=2, heads=2, clip_len=4, codes=10)


def batch(b=5, cfg=None, seed=0):
    cfg = cfg or PhysCodeConfig(**SMALL)
    g = torch.Generator().manual_seed(seed)
    T = cfg.clip_len
    return (torch.randn(b, T, cfg.f_dim, generator=g), torch.randn(b, T, cfg.u_dim, generator=g),
            torch.randn(b, T, cfg.e_dim, generator=g), torch.randn(b, cfg.f_dim, generator=g))


def test_paper_defaults():
    c = PhysCodeConfig()
    assert (c.d, c.layers, c.heads, c.clip_len, c.codes, c.window) == (512, 6, 8, 8, 256, 4)
    assert (c.flow_dropout, c.beta, c.gamma, c.f_dim, c.e_dim) == (0.5, 0.25, 0.25, 1024, 768)
    assert c.codebook_update == "ema"


def test_shapes_and_losses():
    torch.manual_seed(0)
    model = PhysCode(PhysCodeConfig(**SMALL)).train()
    f, u, e, fn = batch()
    out = model(f, u, e, fn)
    assert out["loss"].shape == () and out["codes"].shape == (5,) and out["gates"].shape == (5, 4, 3)
    assert int(out["codes"].max()) < 10
    assert torch.isclose(out["copy_last"], ((f[:, -1] - fn) ** 2).mean())
    emb = model.action_embedding(torch.tensor([[1, 2, 3, 4]]))
    assert torch.allclose(emb[0], model.quantizer.codebook[[1, 2, 3, 4]].mean(0))


def test_gates_renormalise_over_f_and_e_when_flow_is_dropped():
    alpha = torch.tensor([[0.3, 2.0, -1.0], [0.3, 2.0, -1.0]])
    w = gate_weights(alpha, torch.tensor([True, False]))
    assert torch.allclose(w[0], torch.softmax(alpha[0], -1))  # Eq. 14 over {f, u, e}
    assert w[1, 1] == 0  # w_u = 0
    assert torch.allclose(w[1, [0, 2]], torch.softmax(alpha[1, [0, 2]], -1))  # renormalised over {f, e}
    model = PhysCode(PhysCodeConfig(**SMALL)).eval()
    f, u, e, _ = batch()
    _, gates = model.fuse(f, u, e, torch.tensor([True, False, True, False, False]))
    assert torch.all(gates[[1, 3, 4], :, 1] == 0) and torch.allclose(gates.sum(-1), torch.ones(5, 4))


def test_flow_dropout_rate_and_inference_closes_the_flow_gate():
    torch.manual_seed(1)
    model = PhysCode(PhysCodeConfig(**SMALL)).train()
    f, u, e, fn = batch(b=400)
    out = model(f, u, e, fn)
    assert 0.4 < out["flow_on"].float().mean() < 0.6  # p = 0.5
    model.eval()
    closed = model.codes_for(f, e)  # no flow given: w_u = 0
    explicit = model.quantizer.assign(model.encode(f, u * 100, e, torch.zeros(400, dtype=torch.bool))[0])
    assert torch.equal(closed, explicit)  # the flow values cannot matter once the gate is closed


def test_stop_gradients_of_eq17():
    torch.manual_seed(2)
    model = PhysCode(PhysCodeConfig(**SMALL, codebook_update="loss")).train()
    f, u, e, fn = batch()
    on = torch.ones(5, dtype=torch.bool)
    out = model(f, u, e, fn, flow_on=on)
    enc_param = model.encoder.layers[0].linear1.weight
    # commitment: gamma ||z - sg[z^]||^2 moves the encoder, never the codebook
    g_enc, g_cb = torch.autograd.grad(out["commit"], [enc_param, model.quantizer.codebook], allow_unused=True)
    assert g_enc is not None and g_enc.abs().sum() > 0 and (g_cb is None or g_cb.abs().sum() == 0)
    # codebook: beta ||sg[z] - z^||^2 moves the codebook, never the encoder
    out = model(f, u, e, fn, flow_on=on)
    g_enc, g_cb = torch.autograd.grad(out["codebook"], [enc_param, model.quantizer.codebook], allow_unused=True)
    assert (g_enc is None or g_enc.abs().sum() == 0) and g_cb.abs().sum() > 0
    # reconstruction reaches the encoder through the straight-through estimator
    out = model(f, u, e, fn, flow_on=on)
    (g_enc,) = torch.autograd.grad(out["recon"], [enc_param])
    assert g_enc.abs().sum() > 0


def test_ema_update_moves_codes_toward_their_latents_and_restarts_dead_codes():
    cfg = PhysCodeConfig(**SMALL, ema_decay=0.5, dead_code_usage=0.2)
    vq = PhysCode(cfg).quantizer
    assert not isinstance(vq.codebook, torch.nn.Parameter)  # EMA: not trained by gradients
    z = torch.randn(64, cfg.d)
    idx = torch.zeros(64, dtype=torch.long)  # everything assigned to code 0
    before = vq.codebook[0].clone()
    for _ in range(20):
        vq.ema_update(z, idx)
    assert (vq.codebook[0] - z.mean(0)).norm() < 0.05 * (before - z.mean(0)).norm()
    assert int(vq.restarts) > 0  # the other codes went unused and were restarted on batch latents
    fresh = PhysCode(PhysCodeConfig(**SMALL, ema_decay=0.5, dead_code_usage=0.6)).quantizer
    fresh.ema_update(z, idx)  # one step: unused codes' EMA usage 1 -> 0.5 < 0.6, so they restart
    assert int(fresh.restarts) == cfg.codes - 1
    assert all(any(torch.equal(code, zz) for zz in z) for code in fresh.codebook[1:])


def test_code_usage_and_perplexity():
    frac, ppl = code_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert frac == 0.5 and abs(ppl - 4.0) < 1e-5
    assert code_usage(torch.tensor([5, 5, 5]), 8) == (0.125, 1.0)


def test_each_game_holds_out_its_share_of_episodes_counted_and_at_least_one():
    """Held out, game by game: `share` of the game's episodes, rounded, the lowest hashes first, and at
    least one in a game with two or more (a game of a few long episodes would otherwise be missing from
    every held-out metric). Counted, not drawn: two games of the same size hold out the same number."""
    import numpy as np

    from learners.physcode import _episode_hash, held_out_episodes

    many = [f"a-{i}" for i in range(400)]
    others = [f"e-{i}" for i in range(400)]
    few = ["b-0", "b-1", "b-2"]
    assert not any(_episode_hash(e) < 0.02 for e in few)  # none of b's hashes below the share by itself
    episode = np.array([*many, *others, *few, "c-0"])
    game = np.array(["a"] * 400 + ["e"] * 400 + ["b"] * 3 + ["c"])
    held = held_out_episodes(episode, game, 0.02)
    assert {e for e in held if e.startswith("a-")} == set(sorted(many, key=_episode_hash)[:8])
    assert len({e for e in held if e.startswith("e-")}) == 8
    assert sum(_episode_hash(e) < 0.02 for e in others) != 8  # drawn one by one, the two games would differ
    assert held & set(few) == {min(few, key=_episode_hash)}
    assert "c-0" not in held  # a game's only episode stays in training
    assert held_out_episodes(episode, game, 0.0) == set()
    # at least half of a game's steps stay in training: of one long and one 4-step episode the short one
    # is held out, whatever their hashes: the lower-hash long one does not fit and is passed over
    long, short = ("d-1", "d-0") if _episode_hash("d-1") < _episode_hash("d-0") else ("d-0", "d-1")
    episode, game = np.array([long] * 500 + [short] * 4), np.array(["d"] * 504)
    assert held_out_episodes(episode, game, 0.02) == {short}
    assert held_out_episodes(episode, game, 1.0) == {short}  # both wanted; only the short one fits


def test_per_game_centring_subtracts_each_games_training_mean_from_physcodes_inputs_only():
    """physcode.centre_per_game ("appearance"): PhysCode's batches see f (and f_{t+D}) minus the game's mean over the
    training rows; the arrays themselves, which the world model and the policy read, are untouched;
    statistics given back (a checkpoint's) bring the same offsets; a game they never saw gets its own."""
    import numpy as np

    from learners.physcode import ClipData

    rng = np.random.default_rng(0)
    n = 12
    game = np.array(["a"] * 6 + ["b"] * 6)
    f = rng.normal(size=(n, 3)).astype(np.float32) + np.where(game == "a", 5.0, -5.0)[:, None].astype(np.float32)

    def data(games=game):
        return ClipData(f=f.copy(), e=np.ones((n, 2), np.float32), u={1: np.zeros((n, 2), np.float32)},
                        f_next={1: np.roll(f, -1, 0).copy()}, clips=np.array([[r, 1] for r in range(1, n - 1)]),
                        heldout=np.zeros(n - 2, bool), flow_grid=(1, 1), meta={}, game=games.copy(),
                        episode=games.copy(), continues=np.ones(n, bool), keys=[], key_names={}, shard_rows=[n],
                        mouse=np.zeros((n, 2)), mouse_buttons=np.zeros((n, 3)), scroll=np.zeros(n),
                        reward=np.zeros(n), terminated=np.zeros(n, bool), failure=np.zeros(n, bool))

    plain, centred = data(), data()
    plain.standardise()
    centred.standardise(per_game="appearance")
    assert np.array_equal(plain.f, centred.f)  # what the world model and the policy read: unchanged
    idx = np.arange(len(plain.clips))
    (fp, _, ep, np_), (fc, _, ec, nc) = plain.batch(idx, 2), centred.batch(idx, 2)
    rows = plain.clips[:, 0]
    means = centred.norm["game_mean"]
    off = np.stack([means[g]["f"] for g in game[rows]])
    assert torch.allclose(fc[:, -1], fp[:, -1] - torch.from_numpy(off), atol=1e-6)
    assert torch.allclose(nc, np_ - torch.from_numpy(off), atol=1e-6)  # the target moves with f_t
    assert torch.equal(ec, ep)  # the semantic cue stays (centre_semantics off)
    assert abs(float(fc[game[rows] == "a"][:, -1].mean())) < abs(float(fp[game[rows] == "a"][:, -1].mean()))
    again = data()
    again.standardise(centred.norm)  # a checkpoint's statistics
    assert torch.equal(again.batch(idx, 2)[0], fc)
    other = data(np.array(["a"] * 6 + ["c"] * 6))  # "c": never in the statistics, centred on its own rows
    other.standardise(centred.norm)
    out = other.batch(np.arange(6, len(other.clips)), 2)[0][:, -1]
    assert abs(float(out.mean())) < 1.0
    both = data()
    both.standardise(per_game="all")  # the semantic cue is centred too
    e_means = np.stack([both.norm["game_mean"][g]["e"] for g in game[rows]])
    assert torch.allclose(both.batch(idx, 2)[2][:, -1], ep[:, -1] - torch.from_numpy(e_means), atol=1e-6)


def test_the_semantic_head_makes_the_code_carry_the_executed_control():
    """physcode.semantic_weight: a head predicts e_t (the control's text embedding) from the quantised code and
    adds weight x its MSE to Eq. 17. On clips whose future depends on the scene only (four appearance clusters
    moving each its own way) and whose control (one of three texts) changes nothing, the codes learnt with the
    head name the control: each code labels one control. Weight 0 builds no head (checkpoints written before
    it load as they were) and leaves Eq. 17's loss as it is."""
    cfg = dict(SMALL, codes=16, flow_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    scenes, texts = torch.randn(4, SMALL["f_dim"], generator=g) * 3, torch.randn(3, SMALL["e_dim"], generator=g)
    drift = torch.randn(4, SMALL["f_dim"], generator=g)

    def clips(n):
        s, c = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
        T = SMALL["clip_len"]
        f = scenes[s][:, None].expand(n, T, -1) + 0.1 * torch.randn(n, T, SMALL["f_dim"], generator=g)
        e = texts[c][:, None].expand(n, T, -1).contiguous()
        u = torch.randn(n, T, SMALL["u_dim"], generator=g)
        return f, u, e, f[:, -1] + drift[s], c

    def trained(weight):
        torch.manual_seed(0)
        model = PhysCode(PhysCodeConfig(**cfg, semantic_weight=weight)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(1000):
            f, u, e, fn, _ = clips(64)
            out = model(f, u, e, fn)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        return model.eval(), out

    def purity(model):  # share of steps whose code's most common control is theirs
        f, _, e, _, control = clips(600)
        codes = model.codes_for(f, e)
        return sum(int(torch.bincount(control[codes == k], minlength=3).max()) for k in codes.unique()) / len(codes)

    def eq17(out):  # with the temporal head and the gate penalty, at the default weights
        return (out["recon"] + 0.25 * out["codebook"] + 0.25 * out["commit"] + out["temporal"]
                + 1e-4 * out["gate_penalty"])

    plain, out = trained(0.0)
    assert plain.semantic_head is None and out["semantic"] == 0
    assert torch.isclose(out["loss"], eq17(out))  # Eq. 17 as it was
    model, out = trained(1.0)
    assert torch.isclose(out["loss"], eq17(out) + out["semantic"])  # plus weight x the head's MSE
    assert purity(plain) < 0.7  # without the head the scene, not the control, picks the code
    assert purity(model) > 0.95  # with it each code's steps share one control


def test_every_stage_reads_the_recorded_split_and_older_runs_keep_their_drawn_one(tmp_path):
    """`held_out_split`: the run's physcode/held_out.json when it has one (episodes added since are
    training ones); a run whose PhysCode trained before splits were recorded keeps the split it trained
    with (drawn episode by episode); a new run splits by count."""
    import numpy as np

    from ipr_dist.errors import StoreError
    from ipr_dist.run_layout import HELD_OUT, PHYSCODE_CHECKPOINT, RunLayout
    from learners.physcode import _drawn_held_out, _episode_hash, held_out_episodes, held_out_split

    episode = np.array([f"a-{i}" for i in range(400)] + [f"b-{i}" for i in range(3)])
    game = np.array(["a"] * 400 + ["b"] * 3)
    layout = RunLayout(str(tmp_path / "run"))
    counted = held_out_episodes(episode, game, 0.1)
    assert held_out_split(layout, episode, game, 0.1) == counted
    assert held_out_split(layout, episode, game, 0.0) == set()
    with layout.new_checkpoint(PHYSCODE_CHECKPOINT) as version:  # trained before splits were recorded
        (version / "checkpoint.pt").write_bytes(b"")
    drawn = _drawn_held_out(episode, game, 0.1)
    assert held_out_split(layout, episode, game, 0.1) == drawn != counted
    assert {e for e in drawn if e.startswith("a-")} == {f"a-{i}" for i in range(400) if _episode_hash(f"a-{i}") < 0.1}
    layout.write_json(HELD_OUT, {"share": 0.1, "episodes": ["a-1", "b-2"]})
    more = np.array([*episode, *(f"a-{i}" for i in range(400, 800))])  # the store gained episodes since
    more_game = np.array([*game, *["a"] * 400])
    assert held_out_split(layout, more, more_game, 0.1) == {"a-1", "b-2"}
    layout.write_bytes(HELD_OUT, b'{"share": 0.1, "epis')  # damaged: one error naming the file and the way out
    with pytest.raises(StoreError, match="held_out.json: unreadable.*restore it"):
        held_out_split(layout, episode, game, 0.1)
