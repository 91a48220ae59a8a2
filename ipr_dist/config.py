"""Typed configuration: pydantic models loaded from YAML presets in configs/ with `--set a.b=value`.

Every field carries a one-line docstring; defaults are the paper's values (or the plain choice where
the paper is silent) and the presets scale them down. Any invalid key or value raises ConfigError
with one line naming the file, the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ipr_dist.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunConfig(_Section):
    name: str = "local"
    """Run name: the run directory is `<root>/<name>`."""
    root: str = "runs"
    """Directory (a local path or shared mount) or object-store URI (s3://bucket/runs, gs://bucket/runs)
    holding run directories; every read and write of a run goes through ipr_dist/run_layout.py."""
    endpoint: str | None = None
    """Object-store endpoint URL for an s3:// or gs:// root (e.g. http://127.0.0.1:9000 for MinIO);
    None: the provider's default, or AWS_ENDPOINT_URL. Credentials come from the environment."""
    region: str | None = None
    """Object-store region for an s3:// root (None: AWS_DEFAULT_REGION or the SDK's default)."""
    seed: int = 0
    """Base seed; every environment and episode seed is derived from it."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return v


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join: None starts a local one of the command's own (the embedded default; never another
    cluster running on the machine), "auto" joins a running one."""
    num_cpus: int | None = None
    """CPUs a local Ray instance may use (None: all of this machine's)."""
    include_dashboard: bool = False
    """Start the Ray dashboard with a local instance (metrics are exported either way)."""
    train_resources: dict[str, float] = {}
    """Ray custom resources each Ray Train worker of Stages 1-3 asks for besides CPUs (pins the stage
    trainers to nodes that advertise them)."""
    placement_timeout_s: float = Field(600.0, gt=0)
    """Seconds to wait for a placement group or a stage's actors to start before failing with what is
    still pending (a request that can never be placed fails at once, before this)."""
    bf16: bool = True
    """On GPUs, compute forward and backward passes under bfloat16 autocast (weights and AdamW state stay
    float32); on the CPU everything stays float32."""


class EnvConfig(_Section):
    frame_size: tuple[int, int] = (128, 128)
    """Observation size (height, width) every frame is resized to."""
    frame_skip: int = Field(1, ge=1)
    """Retro games: emulator frames per env step, the action held throughout (1: native rate, paper Sec. 9.2).
    HTML games advance by their spec's frame_ms per step."""
    max_episode_steps: int = Field(14_400, ge=1)
    """Steps after which an episode is truncated (14,400 = 4 minutes at 60 FPS, paper Sec. 9.2)."""
    failure_on: Literal["game_over", "life_lost"] = "game_over"
    """What counts as the irreversible failure Survival measures: losing the game, or losing any life."""
    noop_reset_max: int = Field(30, ge=0)
    """Up to this many no-op frames after reset, drawn from the episode seed, so seeds differ."""
    interpolation: Literal["linear", "area", "nearest"] = "linear"
    """Resize filter for frames (linear is ~6x cheaper than area on a 320x224 frame)."""
    browser: str | None = None
    """Chromium executable for HTML games; None: the first found of chromium, chromium-browser,
    google-chrome on PATH and Playwright's own Chromium (ipr_dist/games/browser.py)."""


class FleetConfig(_Section):
    games: list[str] = ["Airstriker-Genesis"]
    """Games the fleet plays (retro ids, HTML game ids or spec paths); environments are assigned round-robin."""
    num_envs: int = Field(2, ge=1)
    """Number of environment actors (one environment per actor process)."""
    chunk_steps: int = Field(256, ge=1)
    """Steps an actor plays per call; each chunk becomes one shard, written by the actor itself."""
    inflight_chunks: int = Field(2, ge=1)
    """Chunk requests queued per actor, so an actor starts its next chunk while the last is consumed."""
    cpus_per_env: float = Field(0.5, gt=0)
    """Ray CPU request per environment actor; fractional values pack more actors than cores."""
    resources: dict[str, float] = {}
    """Ray custom resources each env actor asks for besides CPUs (e.g. {env_node: 0.01} to keep the env
    actors on nodes started with `ray start --resources='{"env_node": 100}'`)."""
    max_restarts: int = Field(-1, ge=-1)
    """Times Ray restarts a crashed environment actor (-1: without limit)."""
    max_failures_in_a_row: int = Field(5, ge=0)
    """An environment whose actor dies this many times in a row, with no chunk in between, is given up."""
    action_source: Literal["random", "scripted"] = "random"
    """How actors choose actions until a policy is supplied: uniform random keys, or the script below."""
    scripted_actions: list[list[str]] = [["RIGHT"], ["RIGHT", "B"], ["LEFT"], ["B"]]
    """Scripted source: button combinations cycled in order, each held for `scripted_hold` steps."""
    scripted_hold: int = Field(8, ge=1)
    """Scripted source: steps each combination is held."""
    source_label: Literal["human", "random", "scripted", "agent"] | None = None
    """Label stored with each step (None: the action source's own name)."""


class CollectConfig(_Section):
    steps: int = Field(2048, ge=1)
    """Total environment steps the run's store should hold; a rerun collects only what is missing."""


class StoreConfig(_Section):
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    """Parquet compression codec for trajectory shards."""
    writer_threads: int = Field(2, ge=1)
    """Threads in the driver that commit shard manifests (the env actors write the shards themselves)."""


class GamesConfig(_Section):
    annotation_files: list[str] = []
    """Extra YAML files of per-game annotations, merged over the bundled ones (later files win)."""
    html_specs: list[str] = []
    """YAML specs of your own HTML/Canvas games (docs/html_games.md); their ids join the catalog."""
    desktop_specs: list[str] = []
    """YAML specs of your own desktop games (docs/desktop_games.md); their ids join the catalog."""

    @property
    def spec_files(self) -> tuple[str, ...]:
        """Every user game spec, HTML and desktop (each loader picks its own kind by the file's keys)."""
        return tuple(self.html_specs) + tuple(self.desktop_specs)


class RecordConfig(_Section):
    chunk_steps: int = Field(256, ge=1, le=100_000)
    """Steps of human play kept in memory before they are written and committed as one shard (a killed
    server loses at most this many)."""
    games: list[str] = []
    """Games offered on the recording page (empty: the run's training games)."""
    html_in_page: bool = True
    """HTML games run in the person's own browser page, under the env's virtual clock and input bridge
    (the page uploads each step's frame and variables); false: in the server's headless Chromium, one
    request per frame, as retro and desktop games are."""
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    """Largest batch of in-page steps the server takes in one request (a bigger one is refused with 413)."""


class PreprocessConfig(_Section):
    """Human play preprocessing (`ipr data preprocess`, paper Sec. 9.2; ipr_dist/data/preprocess.py)."""

    static_motion: float = Field(0.5, ge=0.0)
    """Mean absolute frame difference (0-255) under which a step shows no motion."""
    static_min_steps: int = Field(60, ge=1)
    """A run of at least this many steps with no input and no motion is non-interactive (menu, loading,
    person away) and is dropped."""
    idle_min_steps: int = Field(120, ge=2)
    """A run of at least this many steps with no input (the game moving) is an idle window, thinned."""
    idle_keep_every: int = Field(4, ge=1)
    """In an idle window keep 1 step of this many (and always its first and last)."""
    flick_max_steps: int = Field(2, ge=0)
    """A key or button held for at most this many steps is a flick, removed (0: keep every press)."""
    jitter: float = Field(0.01, ge=0.0, le=1.0)
    """Pointer moves smaller than this (fraction of the frame) keep the previous position."""
    resample_hz: float = Field(60.0, gt=0.0, le=1000.0)
    """Fixed timeline that recordings taken on the wall clock (real-time desktop games) are resampled to;
    frame-locked recordings (retro, HTML, stepped desktop games) are on their game's timeline already."""


class FeaturesConfig(_Section):
    appearance: Literal["small", "dinov3"] = "small"
    """Appearance encoder f: a small encoder trained from scratch on the run's frames, or DINOv3."""
    appearance_path: str | None = None
    """DINOv3 checkpoint directory (local; nothing is downloaded)."""
    appearance_dim: int = Field(256, ge=8)
    """Width of the small appearance encoder."""
    appearance_image_size: int = Field(224, ge=16)
    """DINOv3 input size (its patch grid is size / patch)."""
    pretrain_steps: int = Field(2000, ge=0)
    """Self-supervised (masked-patch reconstruction) steps for the small encoder."""
    pretrain_batch: int = Field(64, ge=1)
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_frames: int = Field(20_000, ge=1)
    """Frames sampled from the store to pretrain the small encoder on."""
    mask_ratio: float = Field(0.5, gt=0, lt=1)
    """Share of 8x8 patches hidden in the small encoder's self-supervised objective."""
    semantics: Literal["minilm", "t5", "hashing"] = "minilm"
    """Semantic encoder e of the control text y_t: packaged MiniLM, T5 from a path, or hashing."""
    semantics_path: str | None = None
    """T5 (or another MiniLM) checkpoint directory."""
    deltas: list[int] = [1, 2, 4]
    """Horizons D of (x_t, x_{t+D}) pairs (paper Sec. 10.1)."""
    workers: int = Field(2, ge=1)
    """Feature-extraction actors."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs of each feature-extraction actor (DINOv3, T5 and the flow run on it; a fraction shares one)."""
    resources: dict[str, float] = {}
    """Ray custom resources each feature-extraction actor asks for besides CPUs."""


class PhysCodeTrainConfig(_Section):
    d: int = Field(512, ge=8)
    """Width of projections, transformer and codes (d = 512)."""
    layers: int = Field(6, ge=1)
    heads: int = Field(8, ge=1)
    clip_len: int = Field(8, ge=1)
    """T: steps per clip."""
    codes: int = Field(256, ge=2)
    """K: codebook size."""
    window: int = Field(4, ge=1)
    """L: codes per action."""
    flow_dropout: float = Field(0.5, ge=0, le=1)
    gate_sparsity: float = Field(1e-4, ge=0)
    """lambda_gate (the paper: "mild", no value given). 1e-2 pinned the gates to uniform on our
    standardised features, where Eq. 17's first term is ~4e-4 (docs/physcode.md)."""
    flow_pool_grid: int = Field(1, ge=1)
    """Pool(u) of Eq. 13: average flow over pool_grid x pool_grid cells (1: the whole field, the paper's)."""
    centre_per_game: Literal["off", "appearance", "all"] = "off"
    """Subtract each game's mean cue from PhysCode's inputs (statistics of the training rows, kept in the
    checkpoint): "appearance" the appearance feature f, "all" f and the semantic cue e, so the code is
    chosen by what moves rather than by which game it is. The world model and the policy keep the
    run-wide standardisation. Measured in docs/physcode.md ("all": 37% of codes shared across games
    instead of 0%, better future-feature prediction, but a worse router), hence off by default."""

    @field_validator("centre_per_game", mode="before")
    @classmethod
    def _centre_from_bool(cls, v):  # runs saved while this was a yes/no setting
        return {False: "off", True: "all"}.get(v, v) if isinstance(v, bool) else v
    beta: float = 0.25
    gamma: float = 0.25
    routing: Literal["mode", "sample", "outcome"] = "outcome"
    """How the router turns an executed code into a control: "mode", the code's most frequent control in the
    labelled play (the paper's table); "sample", a control drawn in proportion to those counts, P(control |
    code), the controls under which the world model saw the code's futures; "outcome" (the default), the
    control whose steps with that code were followed by the best outcome at `world_model.level` over
    `routing_horizon` steps (one step of policy improvement over the collection's play, code by code). Codes a
    person's steps carry keep their mode under "outcome", as do routers built before outcomes were recorded.
    Measured in docs/physcode.md."""
    routing_horizon: int = Field(16, ge=1)
    """Steps of reward (discount `world_model.gamma`; at the survival level 1 per step until a failure or a
    life lost) that make a step's outcome for `routing: outcome`; read when the router is built (`ipr physcode
    inspect`, calibration)."""
    routing_prior: float = Field(10.0, ge=0)
    """Pseudo-steps at the code's mean outcome that each control's mean is shrunk with (`routing: outcome`)."""
    routing_alpha: float = Field(1.0, gt=0, le=1)
    """Below 1, `routing: outcome` leaves the collection's play only where its steps show it: a code routes to
    its best control when that control's steps beat the code's other steps at one-sided level `routing_alpha`
    (pooled within-code variance, Bonferroni over the code's controls), else its control is drawn as under
    "sample" (safe policy improvement, as SPIBB in offline RL). 1 (the default) routes every code to its best
    control, as do routers built before 2026-12-07, which kept no variances (`ipr physcode inspect RUN` rebuilds
    the router from the run's steps). At 0.05 on three runs' copies: half the losses to random play, but most
    gains gone too (docs/physcode.md, "Routing only where the data show a better control")."""
    ema_decay: float = Field(0.99, gt=0, lt=1)
    temporal_weight: float = 1.0
    semantic_weight: float = Field(0.0, ge=0)
    """Weight of a head predicting the executed control's text embedding e_t from the quantised code (not in
    the paper): the code must then carry what was done, which the router maps back to a control. Measured in
    docs/physcode.md (router exact on Bounce and Hopper, but under random play the code can then no longer be
    read from the frame, so alignment falls to its baseline), hence 0 by default: Eq. 17 as the paper has it."""
    steps: int = Field(500_000, ge=1)
    """Optimizer steps (500k in the paper)."""
    batch: int = Field(1024, ge=1)
    """Clips per batch (1024 in the paper)."""
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: int = Field(5000, ge=0)
    """Linear warm-up steps before the cosine schedule."""
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(1000, ge=1)
    workers: int = Field(1, ge=1)
    """Ray Train workers (data parallel; gloo on CPU, NCCL on GPUs)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs of each Ray Train worker (0: train on the CPU)."""
    holdout: float = Field(0.1, ge=0, lt=1)
    """Share of each game's episodes held out for evaluation, counted per game (at least one of two or more)
    and recorded in physcode/held_out.json before PhysCode first trains: every stage holds out the same."""


class WorldModelTrainConfig(_Section):
    d: int = Field(512, ge=8)
    layers: int = Field(8, ge=2)
    """Transformer layers (8); the value head shares all but the last."""
    heads: int = Field(8, ge=1)
    horizon: int = Field(5, ge=1)
    """H: length of the latent trajectories trained on and imagined (5)."""
    gamma: float = Field(0.99, gt=0, le=1)
    target_tau: float = Field(0.005, gt=0, le=1)
    """Polyak rate of the critic's target network (the paper: "slowly updated")."""
    level: Literal["survival", "utility"] = "survival"
    """Reward the critic learns: survival (1 per step alive, failure ends the return) or utility (game reward)."""
    episodic_life: bool = False
    """A life lost ends the critic's episode (its TD targets, the continuation head's and the observed returns it
    ranks; Stage 2 and Stage 4's online learner), as DQN's training did on Atari: each game of 3 lives gives the
    critic 3 outcomes instead of 1. What evaluation calls a failure stays `env.failure_on`."""
    dynamics_steps: int = Field(100_000, ge=0)
    """Phase (i) optimizer steps (the paper gives none; scaled down by the presets)."""
    critic_steps: int = Field(50_000, ge=0)
    """Phase (ii) optimizer steps."""
    reward_scale: float = Field(1.0, gt=0)
    """Rewards are multiplied by this before the TD target; e.g. 1 - gamma keeps survival values in [0, 1]."""
    batch: int = Field(256, ge=1)
    lr: float = Field(1e-4, gt=0)
    critic_lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: int = Field(1000, ge=0)
    """Linear warm-up steps of each phase before its cosine schedule."""
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(1000, ge=1)
    workers: int = Field(1, ge=1)
    """Ray Train workers (data parallel, gradients averaged; gloo on CPU, NCCL on GPUs)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs of each Ray Train worker (0: train on the CPU)."""
    scorer_cpus: float = Field(0.5, gt=0)
    """Ray CPU request of the world-model scorer actor."""
    scorer_gpus: float = Field(0.0, ge=0)
    """GPUs of the world-model scorer actor (a fraction shares one with other actors)."""
    online: bool = True
    """Stage 4 keeps training the world model, its critic and heads on the agent's own real steps, in a
    learner actor of their own (learners/online_world_model.py); new versions go to the scorer.
    Evaluation and serving use the latest version, frozen."""
    online_lr: float = Field(1e-4, gt=0)
    online_warmup: int = Field(100, ge=0)
    """Online updates over which the learning rate rises linearly to `online_lr` (Stage 2 ends its cosine
    schedule near zero; the online learner's moments start afresh)."""
    online_batch: int = Field(64, ge=1)
    online_updates: int = Field(4, ge=0)
    """Optimizer steps of the online learner after each acting round."""
    online_publish_every: int = Field(20, ge=1)
    """Online optimizer steps between two published versions (the scorer reloads each)."""
    online_buffer: int = Field(20_000, ge=2)
    """The agent's most recent steps the online learner samples from."""
    online_learning_starts: int = Field(256, ge=2)
    """Steps the buffer holds before the online learner's first update (DQN's learning_starts): batches
    drawn from a few dozen steps overfit them, and the critic's error on the next steps rose above Stage 2's
    (docs/world_model.md). Until then new steps are only measured."""
    online_train_shared: bool = False
    """Whether Stage 4's dynamics loss also trains the layers the critic shares with the dynamics (the input
    embedding and the trunk). Off: only the dynamics' own last layer and head learn online, so the critic
    keeps reading the representation it was trained on (as in Stage 2's phase ii); on, the shared layers
    moved by ~19% in 600 updates and the critic's held-out ranking fell with them (docs/world_model.md)."""
    online_rank_rows: int = Field(8192, ge=0)
    """With `critic_rank_weight` > 0: how many of Stage 2's training steps with a known return its final
    checkpoint keeps (plus a quarter as many held-out ones) for the online learner, which goes on
    ranking them beside its TD target on the agent's steps (0: the online learner is TD only)."""
    online_rank_weight: float = Field(0.1, ge=0)
    """The ranking loss's weight in the online learner, on those rows. Lower than Stage 2's: at 1 its
    gradient outweighed the TD error's (a few hundredths) and the online critic's error on the agent's
    steps did not fall below Stage 2's; at 0.1 it did, and the held-out ranking was kept, the layers it reads
    being frozen (docs/world_model.md)."""
    online_cpus: float = Field(0.25, gt=0)
    online_gpus: float = Field(0.0, ge=0)
    imagined_return: Literal["reward", "q_sum"] = "q_sum"
    """How a candidate's imagined return is formed (ipr_dist/models/world_model.py): "reward", the
    predicted rewards of the H imagined steps then the critic's value at the horizon; "q_sum", the sum of
    the critic's values along the rollout. docs/world_model.md compares them on held-out returns: with
    the "mean" critic target, q_sum orders outcomes within a game better (+0.38 against -0.33)."""
    td_steps: int = Field(1, ge=1, le=64)
    """n of the critic's n-step TD target, in Stage 2 and in Stage 4's online learner: the discounted
    rewards of the next n steps (fewer where the episode, its stored chunk or the environment's stream
    ends) plus gamma^n times the target network's value there.
    1: Eq. 20 exactly. Larger n carries a failure's signal n steps back per update (docs/world_model.md)."""
    critic_target: Literal["max", "mean"] = "mean"
    """The next state's value in the critic's TD target: "max" over the game's codes (Eq. 20 as written)
    or "mean" (their average: the value of going on as the store's random play did, with no maximisation
    bias). docs/world_model.md compares them: with "max" the values climbed to 7x the returns and ranked
    held-out outcomes backwards (rho -0.40); with "mean", rho +0.44."""
    critic_mc_weight: float = Field(0.0, ge=0, le=1)
    """Stage 2 only: the critic's target mixes in the step's observed discounted return with this weight
    where it is known (its episode ends inside the stored chunk): (1 - w) TD target + w G_t. 0 is Eq. 20."""
    critic_rank_weight: float = Field(0.0, ge=0)
    """Plus this weight times a within-game pairwise ranking loss on Stage 2's training steps whose
    observed return is known (`WorldModel.rank_loss`: the critic must order them as they turned out), in
    Stage 2 and, on `online_rank_rows` of those steps (weight `online_rank_weight`), in Stage 4's online
    learner.
    docs/world_model.md measures it on three stores; 0 is Eq. 20 alone."""
    critic_members: int = Field(0, ge=0)
    """E: an ensemble of small member heads beside the critic (ipr_dist/models/world_model.py), each
    regressing the critic's own TD target from its own random initialisation, in Stage 2 and online; their
    disagreement on a group's candidates is the critic's uncertainty of R^'s order, which GRPO's advantages
    (`grpo.advantage_noise_weight`) and the agent's pick (`policy.pick_uncertainty_weight`) can use. 0: none."""
    raw_key_baseline: bool = True
    """Also train the comparison world model conditioned on the raw controls instead of PhysCode."""


class PolicyTrainConfig(_Section):
    model_path: str | None = None
    """Local Qwen3-VL checkpoint directory (e.g. Qwen3-VL-8B-Instruct on shared storage). Unset: the
    embedded tiny Qwen3-VL, built once into <run>/policy/base (`ipr policy init-tiny`)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Policy server: transformers in a Ray actor (default, CPU or GPU) or vLLM engines (GPU clusters)."""
    servers: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per policy server (vLLM: its tensor-parallel size)."""
    cpus_per_server: float = Field(1.0, gt=0)
    """Ray CPU request of a transformers policy server."""
    candidates: int = Field(8, ge=1)
    """B: candidate PhysCode sequences per step (8)."""
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    distinct_first_codes: bool = False
    """When the agent acts (serving, evaluation): the B candidates start with B different codes, drawn
    without replacement from the first code's distribution at T (Gumbel-top-k), so the world model
    always has B different first actions to choose among. Stage 4's groups are sampled i.i.d. always
    (GRPO's estimator needs draws from the policy)."""
    pick_prior_weight: float = Field(0.0, ge=0)
    """beta: the agent executes the candidate with the largest R^ + beta * log pi_T(candidate), its
    imagined return plus beta times its log-probability under the policy at the sampling temperature
    (the mode of pi_T * exp(R^ / beta), the KL-regularised improvement of the policy by the world
    model's scores). 0: the highest imagined return alone (the paper). Where the critic's scores of
    most candidates tie within its noise, beta lets the policy break the tie while a clearly lower
    imagined return still prunes a candidate (docs/evaluation.md). Used wherever the agent acts: Stage
    4's real steps, `ipr eval`, `ipr serve`; GRPO's advantages are the scores alone."""
    pick_uncertainty_weight: float = Field(0.0, ge=0)
    """kappa: with `world_model.critic_members` >= 2 the agent executes the candidate with the largest
    R^ - kappa * u + beta * log pi_T, u the members' disagreement on the candidate's place in its group
    (`member_disagreement`): a lower confidence bound, so a candidate the critic only seems to prefer
    because it lies outside its data is not chosen for that. 0: R^ alone (with the prior term)."""
    window_ms: float = Field(5.0, ge=0)
    """Requests arriving within this window are answered by one batched generate."""
    max_batch: int = Field(16, ge=1)
    align_steps: int = Field(3000, ge=0)
    """Stage 3 optimizer steps on (frame, goal, PhysCode window) examples."""
    align_batch: int = Field(64, ge=1)
    align_lr: float = Field(1e-5, gt=0)
    """Small, to keep the language parameters near their initialisation (1e-5 for Qwen3-VL-8B)."""
    align_weight_decay: float = Field(0.01, ge=0)
    align_warmup: int = Field(100, ge=0)
    align_examples: int = Field(10_000, ge=1)
    """Examples drawn from the trajectories (10k frame-action pairs in the paper)."""
    align_human_share: float = Field(0.5, ge=0.0, le=1.0)
    """Share of each alignment batch drawn from human (frame, PhysCode) pairs (steps recorded with `ipr
    record`) when the store has them; the rest from the other steps. 1.0: human pairs only."""
    checkpoint_every: int = Field(500, ge=1)
    workers: int = Field(1, ge=1)
    """Ray Train workers for alignment (data parallel, gradients averaged)."""
    align_cpus_per_worker: float = Field(1.0, gt=0)
    align_gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs of each alignment worker (0: align on the CPU)."""
    align_fsdp: bool = False
    """Shard the policy, its gradients and AdamW state over the alignment workers (torch FSDP2, as the
    GRPO learners do) instead of a whole replica each: needed for an 8B policy on 80 GB GPUs."""
    tiny_hidden: int = Field(64, ge=16)
    """Width of the embedded tiny Qwen3-VL (text and vision tower output)."""
    tiny_layers: int = Field(2, ge=1)
    frame_adapter: bool = True
    """Give the embedded tiny model a second visual path (ipr_dist/models/policy.py: FrameAdapter): the
    Stage 1 appearance encoder's conv net, initialised from the run's, added to its image tokens. Its own
    random vision tower carries almost nothing of the frame (docs/policy.md). Not used with
    policy.model_path: a released Qwen3-VL brings a trained vision tower."""
    frame_adapter_cells: int = Field(2, ge=1, le=4)
    """Sub-cells per side that each of the adapter's image tokens carries (its conv map pooled to
    cells x the merged token grid, each token's block concatenated): 2 gives a 64 x 64 frame's 4 tokens
    a 4 x 4 map. Held-out first code 0.395 with 1, 0.578 with 2, 0.537 with 4 (docs/policy.md)."""
    frame_adapter_mlp: bool = False
    """A two-layer projector from the adapter's features to the model's width instead of one linear map
    (measured worse: 0.479 against 0.578, docs/policy.md)."""


class GRPOConfig(_Section):
    real_steps: int = Field(100_000, ge=1)
    """Real environment steps of Stage 4 over all environments; each proposes B candidates, scores them
    by imagination and executes the best (paper Sec. 10.2 Stage 4)."""
    imagined_per_real: int = Field(4, ge=0)
    """k: imagination-only updates each real step licenses, on contexts sampled from the replay (k = 4)."""
    tolerance: int = Field(8, ge=0)
    """How many imagined updates either side may run ahead of k x real steps before the limiter blocks
    it (Reverb's error buffer): the cumulative ratio stays within k +- tolerance / real steps."""
    replay_capacity: int = Field(10_000, ge=1)
    """Recent contexts the replay buffer holds; the oldest is dropped first."""
    update_batch: int = Field(8, ge=1)
    """Contexts (groups of B candidates) per optimizer step, real or imagined; each imagined context counts
    as one imagined update toward the ratio. An acting round's real groups are split into steps of this
    size, so real and imagined optimizer steps keep the 1 : k ratio too."""
    micro_batch: int | None = Field(None, ge=1)
    """Groups per forward/backward pass on a learner; gradients accumulate over the micro-batches of a
    step, which equals the whole step at once (None: a learner's whole share in one pass)."""
    weight_sync: Literal["broadcast", "object_store"] = "broadcast"
    """How new weights reach the policy servers: a torch.distributed broadcast from learner rank 0 (NCCL
    in bfloat16 on GPUs, gloo on the CPU; vLLM through its weight-transfer engine), or the full state
    dict through Ray's object store (the fallback)."""
    beta_kl: float = Field(0.04, ge=0)
    """beta_KL of Eq. 21 (the paper gives none; 0.04 is GRPO's own default)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus on the next-code distributions at the sampling temperature (not in
    Eq. 21; 0 is Eq. 21 exactly). Keeps a group's B candidates apart so the world model has a choice."""
    entropy_to_reference: bool = False
    """The entropy bonus counts only the entropy the policy lost against pi_0 at the same prefix,
    sum_l max(0, H_l(pi_0) - H_l(pi)): it resists the nucleus closing and never pulls the policy flatter
    than the aligned one. The plain bonus has, with the KL term, its optimum where advantages vanish at
    pi ~ pi_0^(beta_KL / (beta_KL + entropy_coef)): pi_0^0.44 with the local preset's 0.04 and 0.05, a
    policy that drifts from the aligned one on every group the critic cannot tell apart (docs/grpo.md)."""
    advantage_std_floor: float = Field(0.0, ge=0)
    """s: advantages are (R^ - mean) / max(std, s) within each group (0: Eq. 21's std). Returns that lie
    closer than s, in R^'s units, move the policy in proportion instead of with unit advantages: the
    critic's noise stops deciding what the policy learns (docs/grpo.md). s is in R^'s units: the local and
    smoke presets (rewards scaled by 1 - gamma) use 0.05; the cluster preset keeps Eq. 21."""
    advantage_noise_weight: float = Field(0.0, ge=0)
    """w: with `world_model.critic_members` >= 2 the group's std is also floored at w times the members'
    disagreement on its candidates' order (the root mean square over the group of `member_disagreement`):
    A = (R^ - mean) / max(std, s, w * noise). A group whose spread of R^ the critic's own members do not
    agree on moves the policy in proportion to how far it exceeds that noise (docs/grpo.md). 0: off."""
    min_critic_rank: float | None = Field(None, ge=-1, le=1)
    """GRPO learns only on the games whose critic orders real outcomes: a game's groups train the policy
    when Stage 2's held-out Spearman rho of the imagined return with the observed returns within that game
    (world_model/metrics.json, in world_model/report.md) exceeds this; the other games' groups are not
    learned from (counted as `grpo/gated_groups`; see `anchor_unlearned`). A game whose rho
    could not be measured (too few held-out returns) is not learned from. None: every game (Eq. 21)."""
    min_critic_rank_of: Literal["action", "return"] = "action"
    """Which of the critic's held-out rankings `min_critic_rank` reads. "action": how it orders actions, the
    rho of the executed codes' R^ less the state's value to the critic (the mean R^ of codes drawn from the
    game's play) with the observed return, that value held fixed: what GRPO's advantage within one group
    rests on. "return": how it orders the imagined returns themselves, which within a game mostly ranks
    states (which are nearer their end); on E26 and E29 Cannon passed it (rho +0.284, +0.375), ranked
    actions at +0.02 and +0.05, and lost its Survival to GRPO (docs/grpo.md)."""
    anchor_unlearned: bool = True
    """With `min_critic_rank` and some games learned on: the other games' groups (real steps and imagined
    updates) still reach the learner, with no advantage, so only the KL to pi_0 and the entropy term act on
    them. Every game shares the policy's weights, and without them the learned games' updates moved the
    others as well (E25's store: first-code KL 0.65 from the aligned policy on Cannon, not learned on; 0.10
    with them; docs/grpo.md). Costs a proposal and a backward pass per such group; nothing when no game
    or every game is learned on."""
    anchor_beta_kl: float | None = Field(1.0, ge=0)
    """beta_KL on those groups (None: `beta_kl`): with no advantage to trade against, the KL alone decides how
    close to pi_0 they hold the policy. At 0.04 (`beta_kl`) Stage 4 still cost a game not learned on its
    Survival; at 1.0 it did not (docs/grpo.md)."""
    min_critic_rank_episodes: int = Field(1, ge=1)
    """With `min_critic_rank`: a game's rho counts only when its held-out returns come from at least this many
    episode ends. Within one episode the return-to-go falls as the end nears, so a rho over one or two ends
    mostly says whether the critic knows how far the end is, not which action leads further (docs/grpo.md)."""
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate of the policy (1e-6 suits an 8B VLM; the presets raise it for the tiny one)."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip: float = Field(0.2, gt=0, lt=1)
    """Ratio clip for samples produced by an older policy version."""
    max_staleness: int = Field(8, ge=0)
    """Groups whose policy version is more than this many updates behind the learner are dropped (counted).
    A real step's group is typically about k updates behind: imagined updates run while it plays."""
    learners: int = Field(1, ge=1)
    """M learner actors in one torch.distributed group (gloo on CPU, NCCL on GPUs), gradients averaged."""
    fsdp: bool = False
    """Shard the policy, its gradients and AdamW state over the M learners (torch FSDP2, one shard per
    transformer block) instead of a whole replica each: needed for an 8B policy on 80 GB GPUs."""
    cpus_per_learner: float = Field(1.0, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    learner_resources: dict[str, float] = {}
    """Ray custom resources each GRPO learner asks for besides CPUs and GPUs."""
    sync_every: int = Field(1, ge=1)
    """Optimizer steps between weight pushes to the policy servers (each push bumps the version)."""
    checkpoint_every: int = Field(200, ge=1)
    """Real steps between checkpoints of the policy, optimizer and limiter counters."""
    probe_contexts: int = Field(16, ge=0)
    """The first real steps' contexts are kept as a fixed probe: every `probe_every` updates the policy's
    proposals for them are scored, so the predicted return is compared on the same states."""
    probe_every: int = Field(50, ge=1)
    num_envs: int | None = Field(None, ge=1)
    """Environment actors playing during Stage 4 (None: fleet.num_envs)."""
    cpus_per_env: float | None = Field(None, gt=0)
    """Ray CPU request per environment actor during Stage 4 (None: fleet.cpus_per_env)."""

    @model_validator(mode="after")
    def _no_deadlock(self) -> GRPOConfig:
        # The learner needs update_batch licences at once while the actors may run only `tolerance`
        # ahead; below this bound both sides could wait for each other forever.
        if self.imagined_per_real and self.update_batch > 2 * self.tolerance + 1:
            raise ValueError(f"update_batch ({self.update_batch}) must be at most 2 x tolerance + 1 "
                             f"({2 * self.tolerance + 1}), or the limiter could block both sides; raise "
                             "grpo.tolerance or lower grpo.update_batch")
        if self.fsdp and self.learners < 2:
            raise ValueError("grpo.fsdp shards the policy over the learners and needs grpo.learners >= 2; "
                             "set grpo.learners or turn grpo.fsdp off")
        return self



class EvalConfig(_Section):
    methods: list[str] = ["random", "ipr@survival", "ipr@utility", "ipr-no-wm@utility", "vlm@utility",
                          "ppo@survival", "ppo@utility", "dqn@utility"]
    """Methods `ipr eval` rolls out, each `name` or `name@level` (level: survival | curiosity | utility,
    what the method is optimised for, Table 2's "@"). Names: random, ipr, ipr-no-wm, ipr-random-pick (IPR's
    candidates, one picked at random: the control for the world model's ranking), ipr-no-grpo (IPR with the
    aligned policy of Stage 3 in place of Stage 4's: what GRPO adds), vlm, ppo, dqn."""
    games: list[str] = []
    """Games to evaluate (empty: the fleet's games plus the held-out ones)."""
    held_out: list[str] = []
    """G2U split (paper Sec. 5.4): games kept out of every training stage (the fleet never plays them
    while collecting or in Stage 4); `ipr eval` proves from the run's data that none of their steps
    were trained on."""
    episodes: int = Field(8, ge=1)
    """Episodes per (method, game), on the same fixed seeds for every method."""
    max_episode_steps: int = Field(14_400, ge=1)
    """Evaluation episodes are truncated here (Survival is then censored at this length)."""
    cap_at_step_unit: bool = True
    """After the random policy's episodes, every other method's episodes on a game stop at that game's
    step unit H (Eq. 10; at most max_episode_steps): Survival = L / H then reads 1 for an agent that
    lived through H, and no episode is played longer than the score can count."""
    num_envs: int = Field(4, ge=1)
    """Environment actors playing evaluation episodes in parallel."""
    cpus_per_env: float = Field(1.0, gt=0)
    frames_per_episode: int = Field(64, ge=2)
    """Curiosity: frames subsampled evenly per episode (the magnitude costs a Cholesky solve of this
    size per scale)."""
    scales: int = Field(30, ge=2)
    """Curiosity: scales the magnitude function is evaluated at, evenly from 0 to the game's t_max."""
    scale_target: float = Field(0.95, gt=0, lt=1)
    """Curiosity: t_max of a game is where the random policy's episodes reach this share of their
    point count (median over its episodes), fixed once per game so areas compare across methods."""
    curiosity_encoder: Literal["appearance", "clip"] = "appearance"
    """Frame embedding for Curiosity: the run's own appearance encoder (embedded default) or a CLIP
    vision encoder from `clip_path` (the paper's)."""
    clip_path: str | None = None
    """Local CLIP checkpoint directory (e.g. openai/clip-vit-base-patch32 on shared storage)."""
    human_stores: list[str] = []
    """Trajectory stores holding recorded human play (source `human`); the run's own store is always
    searched. A game with no human episode has no human reference: its Utility is reported missing."""
    utility_clip: tuple[float, float] | None = None
    """Clip HNS into this range (paper: "optionally clipped"); None keeps it raw."""
    goals: dict[str, str] = {
        "survival": "Stay alive as long as possible and avoid every hazard.",
        "curiosity": "Explore: reach as many different places and situations of the game as you can."}
    """Goal text per level for the language-conditioned methods; utility uses each game's annotated goal.
    Alignment prompts its examples with these and the annotated goal alike, and Stage 4 with the goal of
    `world_model.level`, so `ipr@<level>` plays under a prompt the policy was trained with."""
    calibration_steps: int = Field(512, ge=1)
    """Router calibration steps (random play, `ipr physcode calibrate`) for a game the router has no
    table for, such as a held-out game, before the IPR agent plays it."""
    vlm_path: str | None = None
    """Prompt-only VLM baseline checkpoint (unset: the run's base policy checkpoint, before alignment)."""
    vlm_max_new_tokens: int = Field(96, ge=8)
    vlm_history: int = Field(4, ge=0)
    """Recent actions shown in the prompt's step context."""
    vlm_cpus: float = Field(1.0, gt=0)
    vlm_gpus: float = Field(0.0, ge=0)
    rl_steps: int = Field(100_000, ge=1)
    """Environment steps each PPO/DQN baseline trains for, per (algorithm, level, game)."""
    rl_batch: int = Field(2048, ge=32)
    """PPO train batch per iteration."""
    rl_epochs: int = Field(4, ge=1)
    rl_lr: float = Field(3e-4, gt=0)
    rl_conv_filters: list[list] = [[16, [8, 8], 4], [32, [4, 4], 2], [64, [4, 4], 2]]
    """RLlib CNN encoder: [channels, [kernel, kernel], stride] per layer."""

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        names = ("random", "ipr", "ipr-no-wm", "ipr-random-pick", "ipr-no-grpo", "vlm", "ppo", "dqn")
        levels = ("survival", "curiosity", "utility")
        for m in v:
            name, _, level = m.partition("@")
            if name not in names or (level and level not in levels) or (name == "random" and level):
                raise ValueError(f"unknown method {m!r}: use one of {', '.join(names)}, optionally @"
                                 f"{'|@'.join(levels)} (random takes no level)")
        if len(set(v)) != len(v):
            raise ValueError("methods are listed twice")
        return v


class Config(_Section):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    env: EnvConfig = EnvConfig()
    fleet: FleetConfig = FleetConfig()
    collect: CollectConfig = CollectConfig()
    store: StoreConfig = StoreConfig()
    games: GamesConfig = GamesConfig()
    features: FeaturesConfig = FeaturesConfig()
    physcode: PhysCodeTrainConfig = PhysCodeTrainConfig()
    world_model: WorldModelTrainConfig = WorldModelTrainConfig()
    policy: PolicyTrainConfig = PolicyTrainConfig()
    grpo: GRPOConfig = GRPOConfig()
    eval: EvalConfig = EvalConfig()
    record: RecordConfig = RecordConfig()
    preprocess: PreprocessConfig = PreprocessConfig()

    @model_validator(mode="after")
    def _something_to_train_on(self) -> Config:
        if self.eval.held_out and not self.training_games:
            raise ValueError("eval.held_out keeps every game of fleet.games out of training; leave at least one "
                             "game to train on")
        return self

    @model_validator(mode="after")
    def _align_fsdp_needs_workers(self) -> Config:
        if self.policy.align_fsdp and self.policy.workers < 2:
            raise ValueError("policy.align_fsdp shards the policy over the alignment workers and needs "
                             "policy.workers >= 2; set policy.workers or turn policy.align_fsdp off")
        return self

    @model_validator(mode="after")
    def _uncertainty_needs_members(self) -> Config:
        used = [name for name, value in (("grpo.advantage_noise_weight", self.grpo.advantage_noise_weight),
                                         ("policy.pick_uncertainty_weight", self.policy.pick_uncertainty_weight))
                if value > 0]
        if used and self.world_model.critic_members < 2:
            raise ValueError(f"{' and '.join(used)} use the disagreement of the critic's member heads, which "
                             f"needs world_model.critic_members >= 2 (it is {self.world_model.critic_members}); "
                             "set it or set those weights to 0")
        return self

    @model_validator(mode="after")
    def _frame_adapter_needs_transformers(self) -> Config:
        p = self.policy
        if p.backend == "vllm" and p.frame_adapter and not p.model_path:
            raise ValueError("policy.frame_adapter gives the embedded tiny model a second visual path that vLLM "
                             "cannot serve: with policy.backend: vllm set policy.model_path to a released Qwen3-VL, "
                             "or set policy.frame_adapter: false")
        return self

    @property
    def training_games(self) -> list[str]:
        """The fleet's games minus the held-out ones: what collection and Stage 4 play."""
        return [g for g in self.fleet.games if g not in self.eval.held_out]

    @property
    def run_dir(self) -> str:
        return f"{self.run.root.rstrip('/')}/{self.run.name}"

    def with_absolute_root(self) -> Config:
        """The same config with a local run root made absolute, for processes with another cwd
        (Ray Train workers); URIs (s3://, gs://) are left as they are."""
        import os

        if "://" in self.run.root:
            return self
        return self.model_copy(update={"run": self.run.model_copy(update={"root": os.path.abspath(self.run.root)})})


def _format_error(source: str, err: ValidationError, data: dict[str, Any]) -> str:
    """The first validation problem as one line: file, dotted key, what is wrong and what is allowed."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<top level>"
    if e["type"] == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in e["loc"][:-1]:
            field = model.model_fields.get(str(part))
            if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
                break
            model = field.annotation
        allowed = ", ".join(model.model_fields)
        return f"{source}: unknown key '{key}'; allowed keys here: {allowed}"
    got = e.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {key}: {e['msg']}{got_text}"


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set fleet.num_envs=4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or the defaults when `path` is None) and apply `--set` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found; pass a preset such as configs/local.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}; fix the file's syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (run, fleet, ...)")
    for override in overrides:
        _apply_override(data, override)
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, data)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
