"""Connecting to Ray: a local instance on the embedded default, a running cluster otherwise.

Token authentication (on by default for local clusters since Ray 2.60) is left on; a job submitted
with `ray job submit` joins its cluster with `ray.address: auto` (or RAY_ADDRESS)."""

from __future__ import annotations

import logging
import os

from ipr_dist.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, **kwargs)
