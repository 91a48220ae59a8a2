"""`ipr policy fork RUN NEW`: a copy of a trained run without its Stage 4, to play Stage 4 again.

Stage 4's outcome on one trained run is a draw (learning and acting race on Ray actors; the same store
and settings gave Airstriker -0.195, -0.019 and +0.205 Survival against the aligned policy,
docs/grpo.md), so one Stage 4 says little about a setting. A fork keeps what Stages 1-3 made
(collection, features, PhysCode and router, the world model, the aligned policy, their metrics and
TensorBoard files, the baselines, the cached episodes of every method Stage 4 does not change) and
leaves out what Stage 4 made or decides: the GRPO policy, the online world model, the agent's
trajectory shards, the episodes of every IPR method (each acts with Stage 4's policy or its online
critic) with the report built from them, and the metrics rows and TensorBoard files written from
Stage 4's start. `ipr policy grpo NEW --set ...` then runs Stage 4 alone on it, and `ipr eval NEW`
compares. Works between any two run roots (local directory, s3://, gs://).
"""

from __future__ import annotations

import json
import re
import sys

import pyarrow.fs as pafs
from tqdm import tqdm

from cluster.evaluate import IPR_PICKS
from ipr_dist.errors import StoreError
from ipr_dist.run_layout import (ALIGNED_POLICY, COMMITTED, DATA, EVAL, EVAL_EPISODES, FEATURES, GRPO_POLICY,
                                 LOCAL_TEMPORARY, METRIC_SEGMENTS, METRICS, POINTER, POLICY, TEMPORARY, TENSORBOARD,
                                 WORLD_MODEL_ONLINE, RunLayout)
from learners.grpo import PLOT, STATE

REBUILT = re.compile(r"(report\.md|summary\.json|[a-z]+\.png)$")  # `ipr eval` writes them again from the cache
TB_CREATED = re.compile(r"tfevents\.(\d+)\.")  # an event file's name holds the second its writer opened it


def stage4_start(src: RunLayout) -> float | None:
    """When the run's Stage 4 started (kept across resumes), or None when it has none."""
    state = src.load_torch(GRPO_POLICY, STATE)
    return None if state is None else float(state["started_at"])


def agent_shards(src: RunLayout) -> set[str]:
    """The names of the trajectory shards Stage 4 played (their footers say `source: agent`)."""
    from ipr_dist.data.store import TrajectoryStore

    store = TrajectoryStore(src)
    return {path.rsplit("/", 1)[-1] for path in store.shard_paths()
            if json.loads(store.shard_metadata(path)[b"ipr.chunk"])["source"] == "agent"}


def left_out(rel: str, agent: set[str], started: float | None) -> bool:
    """Whether the run's file `rel` (relative to its root) is Stage 4's or decided by it."""
    parts = rel.split("/")
    if rel == f"{POLICY}/{PLOT}" or rel.startswith((GRPO_POLICY + "/", WORLD_MODEL_ONLINE + "/", TEMPORARY + "/")):
        return True
    if LOCAL_TEMPORARY.search(parts[-1]):  # a killed writer's temporary
        return True
    if parts[0] in (DATA, FEATURES):  # a shard, its manifest (<name>.json) or a feature shard of the same name
        return parts[-1].removesuffix(".json") in agent
    if rel.startswith(EVAL_EPISODES + "/"):
        # every IPR method acts with Stage 4's policy or with the online critic it trained (ipr-no-grpo's pick)
        return parts[2].partition("@")[0] in IPR_PICKS
    if parts[0] == EVAL and len(parts) == 2:
        return bool(REBUILT.match(parts[1]))
    if parts[0] == TENSORBOARD and started is not None:
        created = TB_CREATED.search(parts[-1])
        return created is not None and int(created.group(1)) >= int(started)
    return False


def fork(src: RunLayout, dst: RunLayout, out=sys.stdout) -> dict:
    """Copy `src` to `dst` without its Stage 4 (module docstring); refuses a run with no aligned policy
    and a `dst` that already exists (nothing there is touched). Returns what was copied and left out."""
    if not src.checkpoint(ALIGNED_POLICY):
        raise StoreError(f"{src.uri}: no aligned policy (Stage 3) to fork from; run `ipr train` on it first")
    if dst.exists():
        raise StoreError(f"{dst.uri}: already exists (a fork cut short included: delete it first); give "
                         "`ipr policy fork` a new run directory")
    if dst.fs.type_name == src.fs.type_name and (dst.root + "/").startswith(src.root + "/"):
        raise StoreError(f"{dst.uri}: inside the run it forks; give `ipr policy fork` a directory outside {src.uri}")
    started, agent = stage4_start(src), agent_shards(src)
    take, skipped = [], 0
    for info in src.fs.get_file_info(pafs.FileSelector(src.root, recursive=True)):
        rel = info.path[len(src.root) + 1:]
        if info.type != pafs.FileType.File or rel == METRICS or rel.startswith(METRIC_SEGMENTS + "/"):
            continue  # the metrics are rewritten below: only the rows from before Stage 4
        if left_out(rel, agent, started):
            skipped += 1
        else:
            take.append((rel, info.size))
    # manifests and checkpoint pointers last, once what they name is there (the run layout's commit rules)
    take.sort(key=lambda item: item[0].split("/")[-2:-1] == [COMMITTED] or item[0].endswith(POINTER))
    with tqdm(total=sum(size for _, size in take), desc="fork", unit="B", unit_scale=True, file=out,
              mininterval=2.0, dynamic_ncols=True) as bar:
        for rel, size in take:
            dst.write_bytes(rel, src.read_bytes(rel))
            bar.update(size)
    copied, bytes_ = len(take), sum(size for _, size in take)
    rows, dropped = 0, 0
    if src.is_file(METRICS) or src.list_names(METRIC_SEGMENTS):
        from ipr_dist.runlog import read_metrics

        every = read_metrics(src)
        kept = [r for r in every if started is None or r["time"] < started]
        rows, dropped = len(kept), len(every) - len(kept)
        name = METRICS if dst.local else f"{METRIC_SEGMENTS}/fork.jsonl"  # how each kind of root keeps metrics
        dst.write_text(name, "".join(json.dumps(r) + "\n" for r in kept))
    print(f"forked {src.uri} to {dst.uri}: {copied} files ({bytes_ / 2**20:.1f} MiB) copied; left out Stage 4's "
          f"policy, online world model, {len(agent)} agent trajectory shards, every IPR method's evaluation "
          f"episodes and {dropped} metrics rows ({skipped} files); run Stage 4 again with "
          f"`ipr policy grpo {dst.uri}`", file=out)
    return {"copied": copied, "skipped": skipped, "agent_shards": len(agent), "metrics_rows": rows,
            "metrics_dropped": dropped}
