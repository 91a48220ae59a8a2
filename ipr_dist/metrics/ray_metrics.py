"""Every Ray metric ipr-dist exports, in one place: name, kind, meaning and tags. The Ray dashboard
shows them as `ray_<name>` (Prometheus, each node's metrics export port); cluster/grafana/ipr.json
has a panel for each (tests/test_cluster.py checks the two lists agree) and docs/cluster.md lists them."""

from __future__ import annotations

# name -> (kind, description, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ipr_env_steps": ("counter", "environment steps played, per game", ("game",)),
    "ipr_env_episodes": ("counter", "episodes finished, per game", ("game",)),
    "ipr_env_steps_per_second": ("gauge", "steps/s of one environment actor", ("game", "actor")),
    "ipr_env_actor_restarts": ("counter", "environment actors restarted by Ray after a crash, per game", ("game",)),
    "ipr_replay_ratio": ("gauge", "imagined updates per real step, cumulative (the paper's k = 4)", ()),
    "ipr_replay_size": ("gauge", "contexts in the replay buffer", ()),
    "ipr_replay_insert_wait_seconds": ("gauge", "total seconds real steps waited on the 1:k limiter", ()),
    "ipr_replay_sample_wait_seconds": ("gauge", "total seconds imagined updates waited on the 1:k limiter", ()),
    "ipr_grpo_loss": ("gauge", "GRPO loss of the last update (Eq. 21)", ()),
    "ipr_grpo_kl": ("gauge", "k3 estimate of KL(pi || pi_0) of the last update", ()),
    "ipr_grpo_imagined_return": ("gauge", "mean imagined return of the last update's candidates", ()),
    "ipr_grpo_version": ("gauge", "policy version of the learner (optimizer steps)", ()),
    "ipr_stage_step": ("gauge", "optimizer steps done by a Stage 1-3 trainer", ("stage",)),
    "ipr_stage_metric": ("gauge", "a Stage 1-3 trainer's per-step metric (loss terms, code usage, gates, lr), by its "
                         "metrics.jsonl name", ("stage", "name")),
}


def make(name: str):
    """The Ray metric `name` (ray.util.metrics Counter or Gauge) with its registered meaning and tags."""
    from ray.util import metrics

    kind, description, tags = METRICS[name]
    cls = metrics.Counter if kind == "counter" else metrics.Gauge
    return cls(name, description, tag_keys=tags)
