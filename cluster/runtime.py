"""Connecting to Ray: a local instance on the embedded default, a running cluster otherwise.

Token authentication (on by default for local clusters since Ray 2.60) is left on; a job submitted
with `ray job submit` joins its cluster with `ray.address: auto` (or RAY_ADDRESS)."""

from __future__ import annotations

import logging
import os

from ipr_dist.config import RayConfig


# Library progress bars and advice that would flood the console from every actor (transformers'
# "Loading weights" bars, one per policy server and learner); our own bars and result lines stay.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Library loggers whose warnings are advice for library developers, not for a user of ipr: RLlib's
# deprecation notices about its own internals and its "new API stack" notice, Tune's "Install gputil", Ray's notice that token
# authentication is on (it stays on) and how to turn it off. Their errors still show.
QUIET_LOGGERS = ("ray._common.deprecation", "ray.tune.utils.util", "ray.rllib.algorithms.algorithm_config",
                 "ray._private.authentication.authentication_token_setup")


def quiet_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def worker_setup() -> None:
    """Ray's `worker_process_setup_hook` for every worker process of an `ipr` job (set in init_ray):
    the quiet library settings above, and Ray Train's placement-group cleaner pointed at its own
    cluster. The cleaner polls the State API, which answers only with the dashboard running: without
    it (the embedded default) the cleaner warns every few seconds that the API is unavailable and
    carries on (it only removes Ray Train's placement group if the trainer's controller dies, which
    Ray also does when the job ends), so its warnings are left out; its errors still show. With
    several Ray instances on one machine (tests) it could not tell which to ask without RAY_ADDRESS."""
    import logging

    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    quiet_loggers()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # not connected yet: the cleaner then finds the address itself
        pass


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})  # the driver, as its workers
    quiet_loggers()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # The hook by module path: a job submitted with its own runtime env (working_dir, pip) keeps it; Ray
    # merges this field into it.
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True,
                    "runtime_env": {"worker_process_setup_hook": "cluster.runtime.worker_setup"}}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # One machine is never drained or preempted, so Ray Train's preemption watcher has nothing to watch;
        # its restartable actor only makes Ray log an error line per training stage (ray-project/ray#53727).
        # Clusters keep it (spot nodes). Ray Train hands this variable from the driver to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # "local": an instance of this command's own. With no address Ray joins the latest cluster recorded on
        # this machine (by `ray start` or ray.cluster_utils.Cluster), and the command dies when that one stops.
        # No workers prestarted for the first driver: Ray starts them with the default runtime env, which
        # nothing of ours can use (every task and actor carries the setup hook above), so they only cost two
        # process starts and then exit as idle, and a worker's exit is where Ray 2.60 has been seen to abort
        # ("Mutex corrupt", SIGABRT) and print that error on the console (a repeated suite run, 2026-12-04).
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 _system_config={"prestart_worker_first_driver": False}, **kwargs)
