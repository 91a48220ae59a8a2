"""Feature extraction on Ray: a pool of actors turns trajectory shards into feature shards.

Incremental and resumable: a trajectory shard whose feature shard is committed is skipped. Each
actor reads its trajectory shard from the run's filesystem, writes the feature shard there itself and
commits it with a manifest (ipr_dist/run_layout.py), so a crash leaves only whole shards and the
driver receives only names and counts. The small appearance encoder is pretrained once
(self-supervised, on frames sampled from the store) and committed as `<run>/features/appearance_encoder/`
before the pool starts, so every actor uses the same one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import ray

from ipr_dist.config import Config, FeaturesConfig, GamesConfig
from ipr_dist.data.schema import decode_frames
from ipr_dist.data.store import TrajectoryStore, open_store
from ipr_dist.run_layout import APPEARANCE_ENCODER, FEATURES, RunLayout

log = logging.getLogger(__name__)
ENCODER_FILE = "encoder.pt"


def make_appearance(cfg: FeaturesConfig, layout: RunLayout, device: str = "cpu"):
    """The run's appearance encoder f on `device` (a GPU actor's "cuda", or the CPU)."""
    from ipr_dist.errors import StoreError
    from ipr_dist.models.encoders import DinoV3Encoder, SmallImageEncoder

    if cfg.appearance == "dinov3":
        return DinoV3Encoder(cfg.appearance_path, cfg.appearance_image_size, device)
    state = layout.load_torch(APPEARANCE_ENCODER, ENCODER_FILE)
    if state is None:
        raise StoreError(f"{layout.display(APPEARANCE_ENCODER)}: no appearance encoder; run `ipr physcode train` "
                         "first (it pretrains the encoder)")
    return SmallImageEncoder.from_state(state).to(device)


@ray.remote
class FeatureExtractor:
    def __init__(self, layout: RunLayout, cfg: FeaturesConfig, games_cfg: GamesConfig):
        import torch

        from ipr_dist.games.catalog import load_annotations
        from ipr_dist.models.encoders import FlowEncoder, make_semantic_encoder

        torch.set_num_threads(1)
        self.layout = layout
        self.store = TrajectoryStore(layout)
        self.cfg = cfg
        from ipr_dist.devices import actor_device

        self.device = actor_device()
        self.appearance = make_appearance(cfg, layout, self.device)
        self.flow = FlowEncoder(self.appearance.grid)
        self.semantics = make_semantic_encoder(cfg.semantics, cfg.semantics_path, self.device)
        self.annotations = load_annotations(games_cfg.annotation_files)
        self.html_specs = games_cfg.spec_files
        self.texts: dict = {}
        self.games: dict = {}
        self._tags: dict | None = None

    def extract(self, shard: str) -> tuple[str, int, float]:
        """Feature shard of one trajectory shard, written and committed here; returns (name, rows, s)."""
        from ipr_dist.data.features import extract_shard
        from ipr_dist.games import game_info

        table = self.store.read_shard(shard)
        meta = self.store.shard_metadata(shard)
        chunk = json.loads(meta[b"ipr.chunk"])
        shape = tuple(json.loads(meta[b"ipr.frame_shape"]))
        game = chunk["game"]
        if game not in self.games:
            try:
                self.games[game] = game_info(game, self.annotations, self.html_specs)
            except Exception:  # a game no longer in the catalog: its key names still give texts
                from ipr_dist.games.catalog import GameInfo

                self.games[game] = GameInfo(game, chunk["game_kind"], "", tuple(chunk["key_names"]), False, False, ())
        start = time.perf_counter()
        tags = None
        if b"ipr.human" in meta:  # recorded play: the person's tags are the steps' semantic cue
            if self._tags is None:  # read once per extractor (one stage), at its first human shard
                from ipr_dist.data.recording import load_tags

                self._tags = load_tags(self.store)
            tags = self._tags
        out = extract_shard(table, shape, self.games[game], chunk["key_names"], self.appearance, self.flow,
                            self.semantics, self.cfg.deltas, self.texts, tags)
        name = PurePosixPath(shard).name
        pq.write_table(out, self.layout.path(FEATURES, name), filesystem=self.layout.fs, compression="zstd")
        self.layout.commit(FEATURES, name, {"rows": table.num_rows})
        return name, table.num_rows, time.perf_counter() - start


def sample_frames(store: TrajectoryStore, n: int, seed: int) -> np.ndarray:
    """Up to n frames spread over the store's shards, for pretraining the appearance encoder."""
    shards = store.shard_paths()
    shape = store.frame_shape()
    rng = np.random.default_rng(seed)
    per = max(1, n // len(shards))
    out = []
    for path in shards:
        frames = decode_frames(store.read_shard(path, ["frame"])["frame"], shape)
        out.append(frames[rng.choice(len(frames), min(per, len(frames)), replace=False)])
    frames = np.concatenate(out)
    return frames[rng.permutation(len(frames))[:n]]


def pretrain_appearance(cfg: Config, store: TrajectoryStore, out=sys.stdout) -> None:
    from ipr_dist.models.encoders import SmallImageEncoder

    if store.layout.checkpoint(APPEARANCE_ENCODER) is not None:
        return
    fcfg = cfg.features
    frames = sample_frames(store, fcfg.pretrain_frames, cfg.run.seed)
    from tqdm import tqdm

    enc = SmallImageEncoder(fcfg.appearance_dim, frames.shape[1:3])
    print(f"pretraining the appearance encoder on {len(frames)} frames (masked-patch reconstruction)", file=out,
          flush=True)
    bar = tqdm(total=fcfg.pretrain_steps, desc="appearance encoder steps", file=out, mininterval=2.0,
               dynamic_ncols=True)

    def progress(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(step + 1 - bar.n)

    try:
        losses = enc.fit(frames, fcfg.pretrain_steps, fcfg.pretrain_batch, fcfg.pretrain_lr, fcfg.mask_ratio,
                         cfg.run.seed, log=progress)
    finally:
        bar.close()
    if losses:
        print(f"appearance encoder: loss {losses[0]:.4f} -> {losses[-1]:.4f}", file=out, flush=True)
    store.layout.save_torch(APPEARANCE_ENCODER, ENCODER_FILE, {
        "state": enc.state_dict(), "dim": enc.dim, "frame_size": list(enc.frame_size),
        "losses": losses[:: max(1, len(losses) // 100)]})


def check_model_paths(cfg: FeaturesConfig) -> None:
    """Encoder checkpoints given by path must exist before any actor tries to load them."""
    from ipr_dist.models.encoders import _require_dir

    if cfg.appearance == "dinov3":
        _require_dir(cfg.appearance_path, "DINOv3", "features.appearance_path")
    if cfg.semantics == "t5":
        _require_dir(cfg.semantics_path, "T5", "features.semantics_path")
    elif cfg.semantics == "minilm" and cfg.semantics_path:
        _require_dir(cfg.semantics_path, "MiniLM", "features.semantics_path")


def extract_features(cfg: Config, out=sys.stdout) -> dict:
    """Feature shards for every trajectory shard of the run that has none yet."""
    check_model_paths(cfg.features)
    layout = RunLayout.of(cfg)
    store = open_store(layout)
    layout.makedirs(FEATURES)
    layout.clean_uncommitted(FEATURES)  # feature shards a killed extractor wrote but never committed
    if cfg.features.appearance == "small":
        pretrain_appearance(cfg, store, out)
    done = {PurePosixPath(p).name for p in store.feature_paths()}
    todo = [p for p in store.shard_paths() if PurePosixPath(p).name not in done]
    store.check_readable(store.feature_paths())  # a truncated feature shard names itself here
    print(f"features: {len(done)} shards done, {len(todo)} to extract", file=out, flush=True)
    if not todo:
        return {"extracted": 0, "rows": 0, "seconds": 0.0}
    n = min(cfg.features.workers, len(todo))
    options = {"num_cpus": cfg.features.cpus_per_worker, "num_gpus": cfg.features.gpus_per_worker,
               "resources": dict(cfg.features.resources)}
    actors = [FeatureExtractor.options(**options).remote(layout, cfg.features, cfg.games) for _ in range(n)]
    pool = ray.util.ActorPool(actors)
    from tqdm import tqdm

    rows, start = 0, time.perf_counter()
    try:
        with tqdm(total=len(todo), desc="feature shards", file=out, mininterval=2.0, dynamic_ncols=True) as bar:
            for _, count, _ in pool.map_unordered(lambda a, s: a.extract.remote(s), todo):
                rows += count
                bar.set_postfix(frames_per_s=f"{rows / (time.perf_counter() - start):,.0f}", refresh=False)
                bar.update()
    finally:
        for actor in actors:  # their CPUs go back at once: the next stage's trainer may ask for all of them
            ray.kill(actor)
    seconds = time.perf_counter() - start
    print(f"features: {rows} frames of {len(todo)} shards in {seconds:.1f} s ({rows / seconds:,.0f} frames/s)",
          file=out, flush=True)
    return {"extracted": len(todo), "rows": rows, "seconds": seconds}
