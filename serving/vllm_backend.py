"""The cluster policy server: a vLLM engine in a Ray actor, with the same interface as the
transformers backend (`propose`, `update_weights`, `version`, `stats`).

Written against vLLM 0.33.0 (`pip install -e .[vllm]`, pinned), which serves Qwen3-VL:
- images go in as multimodal inputs (`multi_modal_data={"image": PIL image}`) with the chat
  template's single image placeholder, which vLLM's Qwen3-VL processor expands;
- PhysCode-only sampling through `SamplingParams(allowed_token_ids=..., min_tokens=L,
  max_tokens=L)`: exactly L PhysCode tokens per candidate, n=B candidates per prompt;
- log-probabilities are `cumulative_logprob` with `logprobs_mode="raw_logprobs"`: the model's own
  full-vocabulary log-probabilities at temperature 1, before temperature, top-p and the token mask,
  which is the definition the transformers backend and GRPO use;
- new weights from the learner go to every worker of the running engine through
  `LLM.collective_rpc` into the worker extension below (`model.load_weights`), then the prefix cache
  is reset; no restart. The state dict travels through Ray's object store; for 8B weights on many
  engines an NCCL broadcast from the learner is the faster path (not built).
Placement: one engine per actor, `num_gpus=tensor_parallel_size` from the config, so Ray places
engines by GPU resources (placement groups when the learner group reserves GPUs beside them).
Not run on this machine (no GPU); `tests/test_policy.py` covers everything around the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ray

from ipr_dist.models.policy import PHYSCODE_TOKENS, Proposals, chat_prompt

VLLM_VERSION = "0.33.0"


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): loads a state dict into the running model."""

    def load_state(self, state: dict) -> None:
        self.model_runner.model.load_weights(weights=list(state.items()))


def sampling_kwargs(token_ids: list[int], candidates: int, length: int, temperature: float, top_p: float,
                    seed: int | None = None) -> dict:
    """SamplingParams for B candidates of exactly L PhysCode tokens, with their log-probabilities."""
    return dict(n=candidates, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                max_tokens=length, min_tokens=length, allowed_token_ids=list(token_ids), logprobs=0, seed=seed,
                skip_special_tokens=False)


@ray.remote
class VLLMPolicyServer:
    def __init__(self, policy, codes: int, length: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096, seed: int = 0):
        from ipr_dist.run_layout import as_ref

        # An object-store run's checkpoint is downloaded to this node for the engine to load, and
        # deleted once the engine holds the weights.
        with as_ref(policy).open() as path:
            if path is None:
                raise FileNotFoundError(f"{policy}: no checkpoint; serve an aligned run (`ipr policy align`)")
            self._start(str(path), codes, length, tensor_parallel_size, gpu_memory_utilization, max_model_len, seed)

    def _start(self, path: str, codes: int, length: int, tensor_parallel_size: int, gpu_memory_utilization: float,
               max_model_len: int, seed: int) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        meta_path = Path(path) / PHYSCODE_TOKENS
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: no {PHYSCODE_TOKENS}; serve an aligned checkpoint (`ipr policy align`)")
        meta = json.loads(meta_path.read_text())
        if meta["codes"] != codes:
            raise ValueError(f"{path}: PhysCode tokens for K={meta['codes']}, the run's codebook has {codes}")
        self.token_ids = meta["token_ids"]
        self.code_of = {t: k for k, t in enumerate(self.token_ids)}
        self.length = length
        self.version_ = meta.get("version", 0)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.llm = LLM(model=path, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": 1}, logprobs_mode="raw_logprobs",
                       worker_extension_cls="serving.vllm_backend.WeightLoader")

    def propose(self, frames, goals: list[str], candidates: int, temperature: float = 0.7,
                top_p: float = 0.9) -> Proposals:
        from PIL import Image
        from vllm import SamplingParams

        prompts = [{"prompt": chat_prompt(self.tokenizer, g),
                    "multi_modal_data": {"image": Image.fromarray(np.asarray(f, np.uint8))}}
                   for f, g in zip(frames, goals)]
        params = SamplingParams(**sampling_kwargs(self.token_ids, candidates, self.length, temperature, top_p))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        codes = np.array([[[self.code_of[t] for t in c.token_ids] for c in o.outputs] for o in outs], np.int64)
        logprobs = np.array([[c.cumulative_logprob for c in o.outputs] for o in outs], np.float32)
        return Proposals(codes, logprobs, self.version_)

    def update_weights(self, state: dict, version: int) -> int:
        self.llm.collective_rpc("load_state", args=(state,))
        self.llm.reset_prefix_cache()
        self.version_ = version
        return version

    def version(self) -> int:
        return self.version_

    def stats(self) -> dict:
        return {"version": self.version_, "device": "cuda", "codes": len(self.token_ids), "backend": "vllm"}
