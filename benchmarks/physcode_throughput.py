"""Stage 1 throughput on this machine: feature-extraction frames/s and PhysCode training steps/s.

    .venv/bin/python benchmarks/physcode_throughput.py [RUN]     (default RUN: runs/local)

Needs a run that has been through `ipr collect` and `ipr physcode train` (its pretrained appearance
encoder is reused). Extraction is timed on a few trajectory shards in one process, split by cue
(appearance, flow, semantics); training is timed on the run's own clips with the run's PhysCode
config, single worker. Results go to benchmarks/results/physcode_throughput.json.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402


def main() -> None:
    import torch

    from actors.feature_extractor import make_appearance
    from ipr_dist.config import load_config
    from ipr_dist.data.features import extract_shard
    from ipr_dist.data.schema import decode_frames
    from ipr_dist.data.store import open_store
    from ipr_dist.games import game_info
    from ipr_dist.models.encoders import FlowEncoder, make_semantic_encoder
    from ipr_dist.models.physcode import PhysCode
    from learners.physcode import load_clips, model_config

    torch.set_num_threads(1)
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/local"
    cfg = load_config(Path(run) / "config.yaml").with_absolute_root()
    store = open_store(cfg.run_dir)
    appearance = make_appearance(cfg.features, cfg.run_dir)
    flow = FlowEncoder(appearance.grid)
    semantics = make_semantic_encoder(cfg.features.semantics, cfg.features.semantics_path)
    shards = store.shard_paths()[:: max(1, len(store.shard_paths()) // 6)][:6]
    frames_total, t_extract = 0, 0.0
    t_app = t_flow = 0.0
    for path in shards:
        table = store.read_shard(path)
        meta = json.loads(store.shard_metadata(path)[b"ipr.chunk"])
        shape = store.frame_shape()
        game = game_info(meta["game"])
        start = time.perf_counter()
        extract_shard(table, shape, game, meta["key_names"], appearance, flow, semantics, cfg.features.deltas)
        t_extract += time.perf_counter() - start
        frames = decode_frames(table["frame"], shape)
        start = time.perf_counter()
        appearance.encode(frames)
        t_app += time.perf_counter() - start
        start = time.perf_counter()
        flow.encode(frames[:-1], frames[1:])
        t_flow += time.perf_counter() - start
        frames_total += table.num_rows

    p = cfg.physcode
    data = load_clips(cfg.run_dir, p.clip_len, p.flow_pool_grid, p.holdout)
    data.standardise()
    model = PhysCode(model_config(cfg, data)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    rng = np.random.default_rng(0)
    times = []
    for step in range(60):
        batch = data.batch(rng.integers(0, len(data.clips), p.batch), p.clip_len)
        start = time.perf_counter()
        out = model(*batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step >= 10:
            times.append(time.perf_counter() - start)
    result = {
        "benchmark": "physcode_throughput", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {__import__('os').cpu_count()} cores", "run": run,
        "frame_shape": list(store.frame_shape()), "deltas": cfg.features.deltas,
        "extraction_frames_per_s_one_process": round(frames_total / t_extract, 1),
        "appearance_frames_per_s": round(frames_total / t_app, 1),
        "flow_pairs_per_s": round(frames_total / t_flow, 1),
        "train_steps_per_s_one_worker": round(1 / float(np.median(times)), 2),
        "train_batch": p.batch, "model": {"d": p.d, "layers": p.layers, "heads": p.heads, "T": p.clip_len,
                                          "K": p.codes},
        "torch_threads": 1,
    }
    print(json.dumps(result, indent=2))
    write_result(result)


if __name__ == "__main__":
    main()
