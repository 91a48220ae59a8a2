"""The policy (stage 3) on the embedded tiny Qwen3-VL: real transformers model code, a tokenizer
trained here, PIL image preprocessing; the transformers policy server on local Ray."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ipr_dist.errors import ConfigError
from ipr_dist.models.policy import PHYSCODE_TOKENS, PhysCodePolicy, chat_prompt, physcode_token, sampling_logprobs
from ipr_dist.models.tiny_qwen3vl import build_tiny

K, L = 16, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = build_tiny(tmp_path_factory.mktemp("vlm") / "base", hidden=32)
    policy = PhysCodePolicy(base, codes=K)
    aligned = base.parent / "with_tokens"
    policy.save(aligned)
    return base, aligned


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.unit
def test_tiny_checkpoint_has_the_real_format_and_physcode_tokens(tiny):
    base, aligned = tiny
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (base / name).is_file(), name
    assert json.loads((base / "config.json").read_text())["model_type"] == "qwen3_vl"
    meta = json.loads((aligned / PHYSCODE_TOKENS).read_text())
    policy = PhysCodePolicy(aligned, codes=K)
    assert meta["codes"] == K and policy.tokenizer.convert_tokens_to_ids(physcode_token(3)) == meta["token_ids"][3]
    assert policy.model.get_input_embeddings().weight.shape[0] == len(policy.tokenizer)
    text = chat_prompt(policy.tokenizer, "keep the ball in play")
    assert "<|vision_start|><|image_pad|><|vision_end|>Goal: keep the ball in play" in text
    with pytest.raises(ConfigError, match="K=16 codes but the run's codebook has 32"):
        PhysCodePolicy(aligned, codes=32)
    with pytest.raises(ConfigError, match="not a Qwen3-VL checkpoint"):
        PhysCodePolicy(base.parent / "nothing-here", codes=K)


@pytest.mark.unit
def test_proposals_are_drawn_from_the_distribution_the_learner_computes(tiny):
    """2,000 one-code proposals for one frame: their frequencies match sampling_logprobs of the
    teacher-forced logits (T = 0.7 inside a 0.6 nucleus) within sampling noise, and no code outside
    the nucleus is ever drawn."""
    policy = PhysCodePolicy(tiny[1], codes=K)
    # spread the PhysCode output rows so the distribution over codes is far from uniform
    with torch.no_grad():
        head = policy.model.get_output_embeddings().weight
        head[policy.token_ids] += 0.5 * torch.randn(K, head.shape[1], generator=torch.Generator().manual_seed(0))
    fs, goals = frames(1), ["survive"]
    props = policy.propose(fs, goals, candidates=2000, length=1, temperature=0.7, top_p=0.6, seed=3)
    with torch.no_grad():
        dist = sampling_logprobs(policy.code_logits(policy.inputs(fs, goals), torch.zeros(1, 1, dtype=torch.long)),
                                 0.7, 0.6)[0, 0].exp().numpy()
    freq = np.bincount(props.codes[0, :, 0], minlength=K) / 2000
    assert np.abs(freq - dist).sum() / 2 < 0.05  # total variation
    assert freq[dist == 0].sum() == 0 and (dist == 0).any()
    assert np.allclose(props.logprobs[0], np.log(dist[props.codes[0, :, 0]]), atol=1e-4)


@pytest.mark.unit
def test_proposals_are_exactly_l_valid_codes_with_the_policys_own_logprobs(tiny):
    policy = PhysCodePolicy(tiny[1], codes=K)
    fs, goals = frames(3), ["survive", "break every brick", "aim for the target"]
    props = policy.propose(fs, goals, candidates=8, length=L, temperature=0.7, top_p=0.9, seed=1)
    assert props.codes.shape == (3, 8, L) and props.logprobs.shape == (3, 8)
    assert props.codes.min() >= 0 and props.codes.max() < K
    batch = policy.repeat(policy.inputs(fs, goals), 8)
    codes = torch.as_tensor(props.codes.reshape(-1, L))
    with torch.no_grad():  # the learner's teacher-forced recomputation, at the sampling temperature and top-p
        logp = sampling_logprobs(policy.code_logits(batch, codes), 0.7, 0.9)
    again = logp.gather(-1, codes[..., None])[..., 0].sum(-1).view(3, 8)
    assert np.allclose(again.numpy(), props.logprobs, atol=1e-4)
    # gradients reach the model through the log-probabilities GRPO and alignment use
    policy.sequence_logprobs(policy.inputs(fs[:1], goals[:1]), torch.as_tensor(props.codes[0, :1])).sum().backward()
    assert policy.model.get_output_embeddings().weight.grad is not None
    greedy = [policy.propose(fs, goals, 1, L, temperature=0.0).codes for _ in range(2)]
    assert np.array_equal(*greedy)


def test_transformers_server_batches_versions_and_takes_new_weights(tiny, ray_local):
    import ray

    from serving.transformers_backend import TransformersPolicyServer

    # A window far longer than the test (it only bounds a hang) and batches of 4: the 4 concurrent
    # requests share one generate call, however fast or slow they arrive.
    batching = TransformersPolicyServer.options(num_cpus=0.5).remote(str(tiny[1]), K, L, window_ms=600_000.0,
                                                                     max_batch=4)
    fs = frames(4, seed=2)
    before = ray.get([batching.propose.remote([f], ["survive"], 8, 0.0, 1.0) for f in fs])
    assert all(p.version == 0 and p.codes.shape == (1, 8, L) for p in before)
    assert ray.get(batching.stats.remote())["generate_calls"] == 1  # the concurrent requests shared a generate
    ray.kill(batching)
    server = TransformersPolicyServer.options(num_cpus=0.5).remote(str(tiny[1]), K, L, window_ms=0.0)
    state = PhysCodePolicy(tiny[1], codes=K).state()
    head = state["lm_head.weight"]
    ids = json.loads((tiny[1] / PHYSCODE_TOKENS).read_text())["token_ids"]
    head[ids] = torch.randn(len(ids), head.shape[1]) * 5.0  # a different policy over the codes
    assert ray.get(server.update_weights.remote(state, 7)) == 7
    after = [ray.get(server.propose.remote([f], ["survive"], 8, 0.0, 1.0)) for f in fs]
    assert all(p.version == 7 for p in after)
    assert any(not np.array_equal(a.codes, b.codes) for a, b in zip(after, before))
    with pytest.raises(ray.exceptions.RayTaskError, match="one goal per frame"):
        ray.get(server.propose.remote(fs, ["only one"], 8))
    assert ray.get(server.version.remote()) == 7  # still serving
    ray.kill(server)


@pytest.mark.unit
def test_distinct_first_codes_are_drawn_without_replacement_and_scored_at_t(tiny):
    """propose(distinct_first=True): each frame's B candidates start with B different codes; the first
    code's frequencies over 600 draws of B = 4 follow sampling without replacement from the first code's
    T-distribution (no nucleus): the most likely code is first far more often than the least likely,
    and every code's inclusion rate is at least its single-draw probability; each log-probability is the
    first code's at T plus the rest's under the sampling distribution (teacher-forced, computed here)."""
    policy = PhysCodePolicy(tiny[1], codes=K)
    with torch.no_grad():
        head = policy.model.get_output_embeddings().weight
        head[policy.token_ids] += 0.5 * torch.randn(K, head.shape[1], generator=torch.Generator().manual_seed(0))
    fs, goals = frames(2), ["survive", "score"]
    props = policy.propose(fs, goals, candidates=4, length=3, temperature=0.7, top_p=0.6, seed=5,
                           distinct_first=True)
    assert props.codes.shape == (2, 4, 3)
    assert all(len(set(props.codes[i, :, 0].tolist())) == 4 for i in range(2))
    batch = policy.repeat(policy.inputs(fs, goals), 4)
    codes = torch.as_tensor(props.codes.reshape(8, 3))
    with torch.no_grad():
        logits = policy.code_logits(batch, codes)
    first = torch.log_softmax(logits[:, 0] / 0.7, -1).gather(-1, codes[:, :1])[:, 0]
    rest = sampling_logprobs(logits[:, 1:], 0.7, 0.6).gather(-1, codes[:, 1:, None])[..., 0].sum(-1)
    assert np.allclose(props.logprobs.reshape(8), (first + rest).numpy(), atol=1e-4)

    many = policy.propose(fs[:1] * 600, goals[:1] * 600, candidates=4, length=1, temperature=0.7, seed=6,
                          distinct_first=True).codes[:, :, 0]
    p = torch.softmax(logits[0, 0] / 0.7, -1).numpy()
    included = np.array([(many == k).any(1).mean() for k in range(K)])
    assert (included >= p - 0.05).all() and included.sum() == pytest.approx(4.0)
    lead = np.bincount(many[:, 0], minlength=K) / 600  # the first draw is an ordinary draw
    assert np.abs(lead - p).sum() / 2 < 0.08


@pytest.mark.unit
def test_vllm_distinct_first_codes_keep_first_occurrences_no_engine():
    """vLLM cannot run on this CPU machine: the backend's choice of B distinct first codes from i.i.d.
    one-token draws (first occurrences, in order, with their log-probabilities; repeated when fewer)."""
    from serving.vllm_backend import first_occurrences

    assert first_occurrences([5, 5, 7, 5, 9, 7, 2], [-1.0, -1.0, -2.0, -1.0, -3.0, -2.0, -4.0], 3) == \
        [(5, -1.0), (7, -2.0), (9, -3.0)]
    assert first_occurrences([5, 5, 7], [-0.1, -0.1, -2.5], 4) == [(5, -0.1), (7, -2.5), (5, -0.1), (7, -2.5)]


@pytest.mark.unit
def test_vllm_sampling_request_is_physcode_only_exactly_l_tokens_no_engine():
    """vLLM cannot run on this CPU machine: this checks the request the vLLM backend builds, not an engine."""
    from serving.vllm_backend import VLLM_VERSION, sampling_kwargs

    kw = sampling_kwargs([101, 102, 103], candidates=8, length=L, temperature=0.7, top_p=0.9)
    assert kw["allowed_token_ids"] == [101, 102, 103] and kw["min_tokens"] == kw["max_tokens"] == L
    assert kw["n"] == 8 and kw["logprobs"] == 0 and VLLM_VERSION.count(".") == 2
    assert kw["top_k"] == 0 and kw["repetition_penalty"] == 1.0  # only the whitelist, T and top-p shape sampling
    assert sampling_kwargs([1], 1, L, 0.0, 0.5)["top_p"] == 1.0  # greedy ignores top-p
    # SamplingParams refuses n > 1 without sampling: greedy draws one sequence, the server repeats it B times
    assert sampling_kwargs([1], 8, L, 0.0, 0.9)["n"] == 1


@pytest.mark.unit
def test_vllm_engine_arguments_admit_one_image_no_video_and_the_nccl_weight_transfer_no_engine():
    """vLLM cannot run on this CPU machine: this checks the engine arguments the backend builds."""
    from serving.vllm_backend import engine_kwargs

    kw = engine_kwargs("/models/aligned", 2, 0.85, 4096, 0)
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kw["weight_transfer_config"] == {"backend": "nccl"} and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["distributed_executor_backend"] == "mp" and kw["tensor_parallel_size"] == 2
    assert engine_kwargs("/m", 1, 0.85, 4096, 0)["distributed_executor_backend"] is None


@pytest.mark.unit
def test_a_dead_vllm_engine_ends_its_actor_process_stand_in_exception():
    """vLLM cannot run here, so a stand-in exception class named like vLLM's EngineDeadError is raised
    in a child process: the server's handler ends the process (exit 1, so Ray restarts the actor);
    any other error is left to the caller."""
    import subprocess
    import sys

    code = ("from serving.vllm_backend import exit_if_engine_dead\n"
            "class EngineDeadError(RuntimeError): pass\n"
            "exit_if_engine_dead(ValueError('a bad request'))\n"
            "exit_if_engine_dead(EngineDeadError('engine core died'))\n"
            "print('still alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "still alive" not in proc.stdout, proc.stderr
    assert "vLLM engine died" in proc.stderr and "Ray restarts" in proc.stderr


@pytest.mark.unit
def test_physcode_tokens_never_shrink_a_padded_embedding_and_start_at_the_trained_mean(tmp_path):
    """A released checkpoint pads its embedding past the tokenizer (Qwen3-VL-8B: 151,936 rows for
    151,669 tokens): adding K tokens must keep every row and put the PhysCode tokens, which land on
    padding rows, at the trained rows' mean, not leave them at the padding's untrained values."""
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from ipr_dist.models.tiny_qwen3vl import build_tiny

    base = build_tiny(tmp_path / "base", hidden=32)
    vocab = len(AutoTokenizer.from_pretrained(base))
    model = Qwen3VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(vocab + K + 40)  # padding rows, as released checkpoints have
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = 50.0  # untrained padding: far from every real row
        model.get_output_embeddings().weight[vocab:] = 50.0
    model.save_pretrained(base)
    policy = PhysCodePolicy(base, codes=K)
    rows = policy.model.get_input_embeddings().weight
    assert rows.shape[0] == vocab + K + 40  # not shrunk to the tokenizer's length
    assert policy.token_ids.tolist() == list(range(vocab, vocab + K))  # on the padding rows
    for table in (rows.detach(), policy.model.get_output_embeddings().weight.detach()):
        mean = table[:vocab].mean(0)
        assert float((table[policy.token_ids] - mean).abs().max()) < 0.1 * float(table[:vocab].std(0).max())
        assert float((table[policy.token_ids][0] - table[policy.token_ids][1]).abs().max()) > 0  # distinct
    policy.save(tmp_path / "aligned")  # a whole Qwen3-VL directory: vLLM builds its processor from it
    assert (tmp_path / "aligned" / "video_preprocessor_config.json").is_file()


@pytest.mark.unit
def test_alignment_prompts_every_goal_the_agent_is_given():
    """Examples carry the game's annotated goal or a level's goal text, so the policy has seen the prompt
    of every evaluation level and of Stage 4 (which prompts with its critic's level goal)."""
    from ipr_dist.config import load_config
    from learners.align import example_goals, goal_of

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    annotated = goal_of(cfg)("Airstriker-Genesis-v0")
    assert annotated.startswith("Fly the ship") and goal_of(cfg, "utility")("Airstriker-Genesis-v0") == annotated
    assert goal_of(cfg, "survival")("Airstriker-Genesis-v0") == cfg.eval.goals["survival"]
    assert goal_of(cfg, "")("Bounce-Html") == goal_of(cfg)("Bounce-Html") != cfg.eval.goals["survival"]
    games = ["Airstriker-Genesis-v0", "Bounce-Html"] * 300
    goals = example_goals(cfg, games, seed=0)
    assert goals == example_goals(cfg, games, seed=0)  # seeded
    for game in set(games):
        seen = {g for g, name in zip(goals, games) if name == game}
        assert seen == {goal_of(cfg)(game), *cfg.eval.goals.values()}


@pytest.mark.unit
def test_alignment_evaluation_samples_every_game_and_states_both_baselines(tiny):
    """Held-out steps are sampled across the store (its first rows are a few episodes of one game);
    the baselines are the most frequent training code / window overall and of the example's game."""
    from learners.align import AlignData, evaluate

    policy = PhysCodePolicy(tiny[1], codes=K)
    games = np.repeat(["game a", "game b"], 40)  # rows in store order: every game-a step, then game b
    windows = np.where(games[:, None] == "game a", [1, 2, 3, 4], [5, 6, 7, 8])
    windows[40:52] = [9, 9, 9, 9]  # game b's training steps are mixed: 1234 is the most frequent overall
    heldout = np.zeros(80, bool)
    heldout[30:40] = heldout[70:80] = True  # the last episode of each game
    # every other example prompted with a level's goal, which does not name the game: the game baseline
    # still comes from the example's game
    goals = [g if i % 2 else "Stay alive as long as possible." for i, g in enumerate(games)]
    data = AlignData(np.stack(frames(80)), goals, windows, heldout, games=list(games))
    m = evaluate(policy, data, L, max_examples=10, seed=0)
    assert m["eval/examples"] == 10
    assert 0.0 < m["eval/first_code_baseline"] < 1.0  # both games sampled: not only game a's held-out steps
    assert m["eval/first_code_baseline"] == m["eval/window_baseline"]
    assert m["eval/first_code_game_baseline"] == 1.0 and m["eval/window_game_baseline"] == 1.0
    assert 0.0 <= m["eval/first_code_accuracy"] <= 1.0 and 0.0 <= m["eval/window_accuracy"] <= 1.0
    every = evaluate(policy, data, L, max_examples=512)
    assert every["eval/examples"] == 20 and every["eval/first_code_baseline"] == 0.5


@pytest.mark.unit
@pytest.mark.parametrize("cells, mlp", [(1, False), (2, True)], ids=["2x2 map, linear", "4x4 map, mlp"])
def test_frame_adapter_starts_as_a_no_op_learns_the_frame_and_round_trips(tiny, tmp_path, cells, mlp):
    """The embedded model's second visual path: with its zero-initialised projection the model's logits
    are unchanged; after alignment steps on two frames of one brightness that must get different codes,
    the frames decide the first code and the adapter has been trained with the model (on a run's
    frames it is what carries them: benchmarks/align_quality.py, docs/policy.md); a saved
    checkpoint keeps the adapter (its sub-cells and projector too) beside a plain Qwen3-VL (no adapter
    key in model.safetensors) and loads back with the same outputs."""
    import shutil

    from safetensors.torch import load_file

    from ipr_dist.models.policy import FRAME_ADAPTER, FRAME_ADAPTER_WEIGHTS, FrameAdapter

    _, aligned = tiny
    with_adapter = tmp_path / "adapter"
    shutil.copytree(aligned, with_adapter)
    FrameAdapter.add_to_checkpoint(with_adapter, dim=16, frame_size=(64, 64), cells=cells, mlp=mlp)
    plain, policy = PhysCodePolicy(aligned, codes=K), PhysCodePolicy(with_adapter, codes=K)
    y, x = np.mgrid[:64, :64]
    checks = np.repeat((((x // 4) + (y // 4)) % 2 * 255).astype(np.uint8)[..., None], 3, 2)
    stripes = np.repeat(((y // 4) % 2 * 255).astype(np.uint8)[..., None], 3, 2)
    fs, goals = [checks, stripes], ["survive", "survive"]  # the same brightness everywhere, another texture
    first = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(plain.code_logits(plain.inputs(fs, goals), first),
                              policy.code_logits(policy.inputs(fs, goals), first), atol=1e-6)
    adapter = {id(p) for p in policy.adapter.parameters()}
    opt = torch.optim.Adam([{"params": list(policy.adapter.parameters()), "lr": 1e-2},
                            {"params": [p for p in policy.model.parameters() if id(p) not in adapter]}], lr=3e-3)
    targets = torch.tensor([[3], [7]])  # checks: code 3, stripes: code 7
    for _ in range(200):
        loss = -policy.sequence_logprobs(policy.inputs(fs, goals), targets).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = policy.code_logits(policy.inputs(fs, goals), first)[:, 0]
    assert logits[0].argmax() == 3 and logits[1].argmax() == 7  # the frame alone decides
    saved = tmp_path / "saved"
    policy.save(saved)
    last = policy.adapter.proj[-1] if mlp else policy.adapter.proj
    assert float(last.weight.detach().abs().sum()) > 0  # trained with the model (it started at 0)

    assert (saved / FRAME_ADAPTER).is_file() and (saved / FRAME_ADAPTER_WEIGHTS).is_file()
    assert not any("frame_adapter" in k for k in load_file(str(saved / "model.safetensors")))
    again = PhysCodePolicy(saved, codes=K)
    with torch.no_grad():
        assert torch.allclose(again.code_logits(again.inputs(fs, goals), first)[:, 0], logits, atol=1e-5)
    assert (again.adapter.cells, again.adapter.mlp) == (cells, mlp)


@pytest.mark.unit
def test_frame_adapter_tokens_carry_their_sub_cells_in_raster_order(tmp_path):
    """With cells 2, each merged image token is its own 2 x 2 block of the conv map pooled to twice the
    token grid (channels of the top-left cell, then top-right, bottom-left, bottom-right), tokens in the
    merged grid's raster order; an adapter saved before sub-cells existed (no "cells" in its meta) loads
    as one cell per token with a linear projector."""
    import json

    from safetensors.torch import save_file

    from ipr_dist.models.policy import FRAME_ADAPTER, FRAME_ADAPTER_WEIGHTS, FrameAdapter

    torch.manual_seed(0)
    adapter = FrameAdapter(8, 16, (64, 64), merge=2, cells=2)
    frames = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 4 x 4 patches merged 2 x 2: a 2 x 2 token grid
    seen = {}
    adapter.proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    adapter.norm.register_forward_hook(lambda m, args, out: seen.update(raw=args[0]))
    adapter(frames, grid)
    with torch.no_grad():
        maps = torch.nn.functional.adaptive_avg_pool2d(adapter.net(frames.permute(0, 3, 1, 2).float() / 255.0), 4)
    raw = seen["raw"].view(2, 4, 8, 2, 2)  # frame, token, channel, cell row, cell column
    for n in range(2):
        for token, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert torch.allclose(raw[n, token], maps[n, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2], atol=1e-6)
    assert seen["x"].shape == (8, 32)
    old = FrameAdapter(8, 16, (64, 64), merge=2)
    meta = {k: v for k, v in old.meta().items() if k not in ("cells", "mlp")}
    (tmp_path / FRAME_ADAPTER).write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / FRAME_ADAPTER_WEIGHTS))
    loaded = FrameAdapter.load(tmp_path)
    assert loaded.cells == 1 and isinstance(loaded.proj, torch.nn.Linear)


@pytest.mark.unit
def test_vllm_refuses_a_checkpoint_with_the_frame_adapter_no_engine(tiny, tmp_path):
    """vLLM cannot run here: the check that comes before the engine starts refuses, in one sentence,
    a checkpoint vLLM's Qwen3-VL could not serve."""
    import shutil

    from ipr_dist.models.policy import FrameAdapter
    from serving.vllm_backend import servable_meta

    _, aligned = tiny
    assert servable_meta(str(aligned), K)["codes"] == K
    with_adapter = tmp_path / "adapter"
    shutil.copytree(aligned, with_adapter)
    FrameAdapter.add_to_checkpoint(with_adapter, dim=16, frame_size=(64, 64))
    with pytest.raises(ValueError, match="frame adapter .* policy.backend: transformers"):
        servable_meta(str(with_adapter), K)


@pytest.mark.unit
def test_alignment_draws_the_configured_share_from_human_pairs():
    """Human (frame, PhysCode) pairs get `policy.align_human_share` of the draws whatever their number;
    with no human pairs (or only human ones) the draws are uniform."""
    from learners.align import AlignData

    n = 1000
    human = np.zeros(n, bool)
    human[:50] = True  # 5% of the examples were recorded from a person
    data = AlignData(np.zeros((n, 2, 2, 3), np.uint8), ["g"] * n, np.zeros((n, 4), np.int64), np.zeros(n, bool), human)
    rows = np.arange(n)
    for share in (0.5, 0.8, 1.0):
        draws = np.random.default_rng(0).choice(rows, 20_000, p=data.weights(rows, share))
        assert abs(human[draws].mean() - share) < 0.02, share
    assert AlignData(data.frames, data.goals, data.windows, data.heldout, np.zeros(n, bool)).weights(rows, 0.5) is None
    assert AlignData(data.frames, data.goals, data.windows, data.heldout).weights(rows, 0.5) is None
