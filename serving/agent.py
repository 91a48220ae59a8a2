"""The IPR agent's act step from a run directory (paper Sec. 10.2, inference): encode the frame,
propose B PhysCode sequences with the policy server, score each by an imagined rollout with the
world-model scorer, execute the best through the router.
"""

from __future__ import annotations

import numpy as np

from ipr_dist.config import Config
from ipr_dist.errors import StoreError


def pick_candidate(scores, logprobs, prior_weight: float, uncertainty=None, uncertainty_weight: float = 0.0) -> int:
    """The candidate the agent executes: the largest imagined return R^, plus `prior_weight` (beta) times
    its log-probability under the policy (config `policy.pick_prior_weight`; 0: R^ alone), minus
    `uncertainty_weight` (kappa, `policy.pick_uncertainty_weight`) times the critic members' disagreement
    on it (`uncertainty`, (B,); None: no such term)."""
    value = np.asarray(scores, np.float64)
    if prior_weight:
        value = value + prior_weight * np.asarray(logprobs, np.float64)
    if uncertainty_weight and uncertainty is not None:
        value = value - uncertainty_weight * np.asarray(uncertainty, np.float64)
    return int(np.argmax(value))


def pick(answer, logprobs, policy) -> int:
    """`pick_candidate` on a scorer's answer with its members (B, 1 + E), with the weights of `policy`
    (the config's policy section)."""
    scores, uncertainty = split_scores(answer)
    return pick_candidate(scores, logprobs, policy.pick_prior_weight, uncertainty, policy.pick_uncertainty_weight)


def split_scores(scores) -> tuple[np.ndarray, np.ndarray]:
    """A scorer's answer with its members, (B, 1 + E), as the critic's R^ (B,) and the members'
    disagreement on each candidate's place in the group (B,) (zeros with fewer than 2 members)."""
    from ipr_dist.models.world_model import member_disagreement

    scores = np.asarray(scores, np.float32)
    return scores[:, 0], member_disagreement(scores[:, 1:])


class Agent:
    def __init__(self, cfg: Config, policy_server=None, scorer=None, placement=None, policy=None):
        import torch

        from actors.world_model_scorer import WorldModelScorer, run_settings
        from ipr_dist.data.store import TrajectoryStore
        from ipr_dist.models.router import Router
        from ipr_dist.run_layout import ROUTER, WORLD_MODEL_CHECKPOINT, CheckpointRef, RunLayout
        from learners.align import goal_of, latest_policy
        from learners.physcode import load_model
        from serving import make_policy_server

        cfg = cfg.with_absolute_root()
        layout = RunLayout.of(cfg)
        physcode, ckpt = load_model(layout)
        if not layout.is_file(ROUTER):
            raise StoreError(f"{layout.uri}: no router ({layout.display(ROUTER)}); run `ipr physcode inspect "
                             f"{layout.uri}` first")
        from learners.online_world_model import latest_world_model

        world_model = latest_world_model(cfg)  # Stage 4's online versions once there are any
        policy = policy or latest_policy(cfg)  # a CheckpointRef: Stage 4's policy unless another is given
        for ref, command in ((world_model, "ipr world-model train"), (policy, "ipr policy align")):
            if not ref.exists():
                raise StoreError(f"{layout.uri}: no checkpoint at {ref}; run `{command} {layout.uri}` first")
        self.cfg = cfg
        self.codes, self.length = physcode.cfg.codes, physcode.cfg.window
        torch.set_num_threads(1)
        self.router = Router.loads(layout.read_text(ROUTER))
        self.route_rng = np.random.default_rng(cfg.run.seed)  # "sample", and "outcome" where no control is shown better
        self.key_names = TrajectoryStore(layout).key_names()
        self.goal_of = goal_of(cfg)
        # `placement` (actors/placement.py): the bundles reserved for the server and the scorer.
        self.policy = policy_server or make_policy_server(
            cfg, policy, self.codes, self.length, **(placement.options("policy servers", 0) if placement else {}))
        # Restarted by Ray after a crash; a score call is a pure function of its inputs, so it is retried.
        # It holds the appearance encoder too: f_t is computed on its device, never in the driver.
        wm = cfg.world_model
        self.scorer = scorer or WorldModelScorer.options(
            num_cpus=wm.scorer_cpus, num_gpus=wm.scorer_gpus, max_restarts=-1, max_task_retries=-1,
            **(placement.options("world-model scorer", 0) if placement else {})).remote(
            world_model, physcode.quantizer.codebook.numpy(), appearance=(cfg.features, layout),
            f_norm=ckpt["norm"]["f"], settings=run_settings(wm),
            reference=CheckpointRef(layout, WORLD_MODEL_CHECKPOINT) if wm.online else None)
        self._check_members(cfg, world_model)

    def _check_members(self, cfg: Config, world_model) -> None:
        """The uncertainty weights read the world model's member critics: refuse a world model without them
        rather than act as if they always agreed."""
        from actors.placement import wait

        used = [name for name, value in (("grpo.advantage_noise_weight", cfg.grpo.advantage_noise_weight),
                                         ("policy.pick_uncertainty_weight", cfg.policy.pick_uncertainty_weight))
                if value > 0]
        if used and wait([self.scorer.stats.remote()], cfg.ray.placement_timeout_s, "world-model scorer")[0]["members"] < 2:
            raise StoreError(f"{world_model}: this world model has no member critics, which {' and '.join(used)} "
                             "need; retrain Stage 2 with world_model.critic_members >= 2 (remove world_model/checkpoint "
                             "and world_model/online, then `ipr world-model train`), or set those weights to 0")

    @property
    def games(self) -> list[str]:
        return sorted(self.router.tables)

    def features(self, frames: np.ndarray) -> np.ndarray:
        """f_t as the world model knows it: appearance features (N, f_dim) of frames (N, H, W, 3),
        standardised like PhysCode's, computed by the scorer actor on its device."""
        import ray

        return ray.get(self.scorer.features.remote(np.asarray(frames)))

    async def act(self, frame: np.ndarray, game: str, goal: str | None = None) -> dict:
        if game not in self.router.tables:
            raise KeyError(game)
        p = self.cfg.policy
        goal = goal or self.goal_of(game)
        f = (await self.scorer.features.remote(frame[None]))[0]
        props = await self.policy.propose.remote([frame], [goal], p.candidates, p.temperature, p.top_p,
                                                 p.distinct_first_codes)
        answer = await self.scorer.score.remote(f, props.codes[0], members=True)
        scores, uncertainty = split_scores(answer)
        best = pick(answer, props.logprobs[0], p)
        return {"game": game, "goal": goal, "codes": props.codes[0][best].tolist(), "policy_version": props.version,
                "candidates": [{"codes": c.tolist(), "logprob": float(lp), "imagined_return": float(s),
                                "uncertainty": float(u)}
                               for c, lp, s, u in zip(props.codes[0], props.logprobs[0], scores, uncertainty)],
                "actions": [self._jsonable(game, a) for a in self.route(game, props.codes[0][best])]}

    def route(self, game: str, codes) -> list[dict]:
        """The game's actions for an executed code sequence, routed as `physcode.routing` says."""
        p = self.cfg.physcode
        return self.router.route(game, codes, p.routing, self.route_rng, p.routing_prior, p.routing_alpha)

    def _jsonable(self, game: str, action: dict) -> dict:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in action.items()}
        names = self.key_names.get(game, [])
        out["pressed"] = [names[i] for i in np.flatnonzero(action["keys"]) if i < len(names)]
        return out
