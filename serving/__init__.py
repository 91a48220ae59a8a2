"""Policy servers (transformers backend by default, vLLM on clusters), the act step of the IPR
agent, and the Ray Serve inference app.

Both backends are Ray actors with one interface:
  propose(frames, goals, candidates, temperature, top_p) -> Proposals(codes (N, B, L), logprobs (N, B), version)
  update_weights(state, version) -> version;  version() -> int;  stats() -> dict
"""

from __future__ import annotations


# A crashed server is restarted from its checkpoint path; the GRPO driver pushes the current weights
# again at its next sync (proposals carry the version, so the lag is visible and bounded).
RESTART = {"max_restarts": -1, "max_task_retries": -1}


def make_policy_server(cfg, policy, codes: int, length: int, **placement):
    """A policy server actor for the configured backend, placed by Ray resources (and, given
    `placement`, the scheduling options of a reserved bundle: actors/placement.py); `policy` is a
    CheckpointRef (or a local checkpoint directory) the server opens on its own node."""
    from ipr_dist.run_layout import as_ref

    policy = as_ref(policy)
    p = cfg.policy
    bundle = server_bundle(cfg)
    options = {"num_cpus": bundle["CPU"], "num_gpus": bundle["GPU"], **RESTART, **placement}
    if p.backend == "vllm":
        from serving.vllm_backend import VLLMPolicyServer

        return VLLMPolicyServer.options(**options).remote(policy, codes, length,
                                                          tensor_parallel_size=int(bundle["GPU"]), seed=cfg.run.seed)
    from serving.transformers_backend import TransformersPolicyServer

    return TransformersPolicyServer.options(**options).remote(policy, codes, length, p.window_ms, p.max_batch,
                                                              cfg.run.seed)


def server_bundle(cfg) -> dict[str, float]:
    """The resources of one policy server (a vLLM engine: its tensor-parallel size in GPUs), what
    `make_policy_server` asks Ray for and Stage 4's placement reserves."""
    p = cfg.policy
    if p.backend == "vllm":
        return {"CPU": 1.0, "GPU": float(max(1, int(p.num_gpus)))}
    return {"CPU": p.cpus_per_server, "GPU": p.num_gpus}
