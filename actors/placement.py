"""Where the roles of a stage go: every request checked against what the cluster offers before
anything starts, and placement groups whose waits end with an error naming what is still pending.

A role is a set of identical actors (policy servers, learners, the scorer, env actors, Ray Train
workers) with one resource bundle each. `check` fails at once when a bundle fits no node (nor any
node type an autoscaler may add), or when, on a cluster that cannot grow, the bundles of all roles
cannot be packed onto its nodes together: such a request would otherwise wait forever (on GCP too,
where Ray keeps an infeasible request pending without a word). `Placement` reserves placement
groups for the roles that hold accelerators, learners packed on one node where they fit (their
NCCL all-reduce stays inside the node), and gives each actor its bundle; Ray restarts a crashed
actor inside the same bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ray

from ipr_dist.errors import ConfigError

# Where `ray up` leaves the cluster's config on the head node (its `available_node_types`).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class PlacementTimeout(RuntimeError):
    """A placement group or an actor did not start within `ray.placement_timeout_s`."""


@dataclass(frozen=True)
class Role:
    name: str  # what the user reads, e.g. "GRPO learners"
    settings: str  # the config keys that size it, e.g. "grpo.learners x grpo.gpus_per_learner"
    count: int
    bundle: dict[str, float]  # resources of one member
    pack: bool = False  # members on one node where they fit
    reserve: bool = True  # a placement group holds its bundles (False: only checked)

    @property
    def request(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.bundle.items() if v > 0}

    def describe(self) -> str:
        return f"{self.count} x {_fmt(self.request)} ({self.settings})"


@dataclass
class Offer:
    """What the cluster can hold: its alive nodes, and node types an autoscaler may start."""

    nodes: list[dict[str, float]]
    node_types: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def can_grow(self) -> bool:
        return bool(self.node_types)

    def describe(self) -> str:
        parts = [f"{len(self.nodes)} node(s): " + "; ".join(_fmt(_main(n)) for n in self.nodes)]
        if self.node_types:
            parts.append("node types: " + "; ".join(f"{k} {_fmt(_main(v))}" for k, v in self.node_types.items()))
        return ", ".join(parts)


def _main(resources: dict[str, float]) -> dict[str, float]:
    """CPU, GPU and custom resources, without Ray's bookkeeping ones (memory, node:..., accelerator_type)."""
    return {k: v for k, v in resources.items()
            if not (k in ("memory", "object_store_memory") or k.startswith("node:") or k.startswith("accelerator_type"))}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}" if resources else "{}"


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def cluster_offer(bootstrap_config: str | None = None) -> Offer:
    """The alive nodes' total resources and, on a `ray up` cluster, its autoscaler's node types."""
    import yaml

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    path = Path(bootstrap_config or os.environ.get("IPR_RAY_BOOTSTRAP_CONFIG", BOOTSTRAP_CONFIG)).expanduser()
    types: dict[str, dict[str, float]] = {}
    if path.is_file():
        conf = yaml.safe_load(path.read_text()) or {}
        for name, spec in (conf.get("available_node_types") or {}).items():
            # `resources: {}` is filled in from the instance type by the provider (AWS) when `ray up`
            # prepares the config; left empty, the type's size is unknown here and is not held against it.
            if (spec or {}).get("max_workers", 1) > 0:
                types[name] = {k: float(v) for k, v in ((spec or {}).get("resources") or {}).items()}
    return Offer(nodes, types)


def check(roles: list[Role], offer: Offer, stage: str) -> None:
    """Fail at once, in one sentence, when `roles` can never be placed on what `offer` holds."""
    homes = offer.nodes + list(offer.node_types.values())
    unknown = any(not resources for resources in offer.node_types.values())
    for role in roles:
        if not unknown and not any(_fits(role.request, home) for home in homes):
            raise ConfigError(f"{stage} cannot place its {role.name}: each asks for {_fmt(role.request)} "
                              f"({role.settings}) but no node offers that ({offer.describe()}); lower those "
                              "settings or add a node (type) that has it")
    if offer.can_grow:
        return  # the autoscaler adds nodes of the types above; what fits one node can be placed
    free = [dict(n) for n in offer.nodes]
    # First-fit decreasing, GPU bundles first: a necessary condition (Ray's own placement is no better).
    bundles = sorted(((role, role.request) for role in roles for _ in range(role.count)),
                     key=lambda rb: (-rb[1].get("GPU", 0.0), -rb[1].get("CPU", 0.0)))
    for role, bundle in bundles:
        home = next((n for n in free if _fits(bundle, n)), None)
        if home is None:
            total = {k: sum(n.get(k, 0.0) for n in offer.nodes) for k in bundle}
            asked = " + ".join(r.describe() for r in roles if any(k in r.request for k in bundle))
            raise ConfigError(f"{stage} asks for {asked}, which does not fit this cluster ({offer.describe()}; "
                              f"{_fmt(total)} in all): its {role.name} cannot all be placed; lower those "
                              "settings or add nodes")
        for k, v in bundle.items():
            home[k] -= v


def wait(refs: list, timeout_s: float, what: str) -> list:
    """ray.get with a deadline: past it, one error naming `what` is still pending and why it may be."""
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise PlacementTimeout(f"{len(pending)} of {len(refs)} {what} not started after {timeout_s:g} s "
                               "(ray.placement_timeout_s); the cluster may lack free resources for them "
                               f"(`ray status` shows what is pending), or they are still loading their weights")
    return ray.get(refs)


class Placement:
    """Placement groups for the reserved roles; `options(name, i)` schedules member i in its bundle."""

    def __init__(self, roles: list[Role], timeout_s: float, stage: str, offer: Offer | None = None):
        from ray.util.placement_group import placement_group, remove_placement_group

        check(roles, offer or cluster_offer(), stage)
        self.groups = {}
        try:
            for role in roles:
                if not role.reserve:
                    continue
                group = placement_group([role.request] * role.count, strategy="PACK" if role.pack else "SPREAD",
                                        name=f"ipr-{stage}-{role.name}".replace(" ", "-").lower())
                self.groups[role.name] = group
                ready, _ = ray.wait([group.ready()], timeout=timeout_s)
                if not ready:
                    raise PlacementTimeout(f"{stage}: the {role.name}' placement group, {role.describe()}, was not "
                                           f"placed after {timeout_s:g} s (ray.placement_timeout_s); the cluster has "
                                           "no free room for it now (`ray status` shows the pending demand); free "
                                           "resources, lower those settings, or wait for the autoscaler")
        except BaseException:
            for group in self.groups.values():
                remove_placement_group(group)
            raise
        self._remove = remove_placement_group

    def options(self, name: str, index: int = 0) -> dict:
        """Actor options that put member `index` of role `name` into its reserved bundle (nothing when the
        role has no group)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = self.groups.get(name)
        if group is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}

    def remove(self) -> None:
        for group in self.groups.values():
            self._remove(group)
        self.groups = {}
